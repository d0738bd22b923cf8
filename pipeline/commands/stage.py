"""The shared command-line wrapper of a stage: config in, result file out, exit code by status."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

# status -> exit code; gate_failed is distinct so an orchestrator can branch on it
EXIT_CODES = {"ok": 0, "unchanged": 0, "failed": 1, "gate_failed": 3}


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--result-json", metavar="PATH", help="write the machine-readable result here")
    p.add_argument("--group", help="W&B group shared with the other stages of one pipeline execution")


def run_stage(module: str, args: argparse.Namespace, *, config=None, **kwargs) -> int:
    from pipeline.config import load_config
    from pipeline.launch import process_rank
    from pipeline.results import failed, write_json_atomic
    from pipeline.tracking import runs_opened

    if config is None:
        config = load_config(args.config, args.overrides)
    stage = importlib.import_module(module)
    # Under accelerate launch / torchrun only the main process reports; the others just train.
    main_process = process_rank() == 0
    with runs_opened() as runs:
        try:
            # Libraries print progress and notices to stdout; stdout is kept for the reference(s) printed last.
            with contextlib.redirect_stdout(sys.stderr):
                result = stage.run(config, group=args.group, **kwargs)
        except BaseException as e:
            if args.result_json and main_process:
                write_json_atomic(args.result_json, failed(stage.STAGE, e, runs).to_dict())
            raise
    if not main_process:
        return EXIT_CODES[result.status]
    if args.result_json:
        write_json_atomic(args.result_json, result.to_dict())
    print(result.summary_line(), file=sys.stderr)
    if line := result.stdout_line():
        print(line)
    return EXIT_CODES[result.status]
