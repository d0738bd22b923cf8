"""``pipeline run --config C``: dataset-publish, finetune, evaluate and deploy-fetch in order."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.finetune import add_retrain_argument
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    add_retrain_argument(p, also=" (and dataset-publish reads the data again, as its --reread does, and an "
                                 "interrupted finetune is not continued)")


def main(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from pipeline.commands.stage import EXIT_CODES
    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    from pipeline.launch import process_rank
    from pipeline.results import write_json_atomic
    from pipeline.runner import PipelineResult, run_all
    from pipeline.tracking import new_run_id

    try:
        config = load_config(args.config, args.overrides)
    except PipelineError as e:  # no stage ran: the result says so, in the shape it always has
        if args.result_json:
            write_json_atomic(args.result_json, PipelineResult(group=args.group, status="failed", message=str(e)).to_dict())
        raise
    outcome = PipelineResult(group=args.group or config.tracking.group or f"pipeline-{new_run_id()}")

    def report(stage_result) -> None:
        print(stage_result.summary_line(), file=sys.stderr)  # as each stage's own command prints it

    # Under torchrun the main process reports; the others train with it, and say nothing (`runner._follow`).
    report_here = process_rank() == 0
    if not report_here:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the main process's references
            run_all(config, result=outcome, reuse=not args.retrain, resume=None if args.retrain else "auto")
        return EXIT_CODES[outcome.status]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the produced references
            # Run again after a stop, it continues an interrupted finetune of this config and data (bit for bit the
            # same model as an uninterrupted run on the CPU); --retrain starts afresh.
            run_all(config, on_stage=report, result=outcome, reuse=not args.retrain,
                    resume=None if args.retrain else "auto")
    finally:
        if args.result_json:  # also when a stage failed: the file says which, and what came before
            write_json_atomic(args.result_json, outcome.to_dict())
    if outcome.status == "gate_failed":  # evaluate's line above says why; said once
        said = f"{outcome.stages[-1].stdout_line()} was not promoted, so nothing was deployed"
    else:
        said = outcome.message
    print(f"run: {outcome.status}" + (f": {said}" if said else ""), file=sys.stderr)
    print(", ".join(outcome.to_dict()["produced"]))
    return EXIT_CODES[outcome.status]
