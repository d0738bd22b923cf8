"""One module per stage, each with one entry point: ``run(config, ...) -> StageResult``."""
