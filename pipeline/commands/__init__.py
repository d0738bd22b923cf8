"""Thin command-line wrappers; each module has add_arguments(parser) and main(args) -> exit code."""
