"""``pipeline sweep --config C --sweep S --count N [--resume SWEEP_ID]``: search finetune hyperparameters."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--sweep", required=True, metavar="YAML", help="a W&B sweep config (method, metric, parameters, ...)")
    p.add_argument("--count", type=int, required=True, metavar="N", help="trials to run in this invocation")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue this sweep (its trials count towards run_cap)")
    p.add_argument("--publish-trials", action="store_true",
                   help="publish every trial's model (default: only the best one, at the end)")


def main(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from pipeline.commands.stage import EXIT_CODES
    from pipeline.config import load_config
    from pipeline.results import StageResult, write_json_atomic
    from pipeline.sweep import load_sweep
    from pipeline.tracking import resolve_mode

    config = load_config(args.config, args.overrides)
    spec = load_sweep(args.sweep)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the best model's reference
            if resolve_mode(config.tracking.mode) == "online" and config.tracking.registry != "local":
                from pipeline.sweep import run_online

                outcome = run_online(config, sweep=spec, count=args.count, resume=args.resume, group=args.group,
                                     publish_trials=args.publish_trials)
            else:
                from pipeline.sweep import run

                outcome = run(config, sweep=spec, count=args.count, resume=args.resume, group=args.group,
                              publish_trials=args.publish_trials)
    except BaseException as e:
        if args.result_json:
            write_json_atomic(args.result_json, StageResult(stage="sweep", status="failed", message=str(e)).to_dict())
        raise
    result = outcome.to_stage_result()
    if args.result_json:
        write_json_atomic(args.result_json, result.to_dict())
    print(result.message, file=sys.stderr)
    print(", ".join(result.produced))
    return EXIT_CODES[result.status]
