"""``pipeline sweep --config C --sweep S --count N [--resume SWEEP_ID|auto]``: search finetune hyperparameters."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--sweep", required=True, metavar="YAML", help="a W&B sweep config (method, metric, parameters, ...)")
    p.add_argument("--count", type=int, required=True, metavar="N",
                   help="trials to run in this invocation (with --resume auto: in all the calls of one sweep together)")
    p.add_argument("--resume", metavar="SWEEP_ID|auto",
                   help="continue this sweep for N more trials (its trials count towards run_cap); auto, offline: "
                        "continue the newest interrupted sweep of this sweep file, config and dataset version for "
                        "the trials it has left of its --count, else start a new one (for an orchestrator's retries)")
    p.add_argument("--dataset", metavar="NAME:REF",
                   help="dataset version the trials train on (default: <dataset.name>:latest), pinned to its vN when "
                        "the sweep starts; a resumed sweep keeps its own")
    p.add_argument("--publish-trials", action="store_true",
                   help="publish every trial's model (default: only the best one, at the end)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="offline: draw a new sweep's trials from this seed, e.g. another sweep's (recorded in its "
                        "result as details.seed) to draw its trials again; default: a new seed per sweep, as W&B "
                        "draws each sweep anew")


def main(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import sys

    from pipeline.commands.stage import EXIT_CODES
    from pipeline.config import load_config
    from pipeline.results import failed, write_json_atomic
    from pipeline.sweep import keys_not_used, load_sweep
    from pipeline.tracking import resolve_mode

    from pipeline.errors import ConfigError

    config = load_config(args.config, args.overrides)
    spec = load_sweep(args.sweep)
    for line in keys_not_used(spec, config):
        logging.getLogger("pipeline.sweep").warning("%s", line)
    online = resolve_mode(config.tracking.mode) == "online" and config.tracking.registry != "local"
    if args.resume == "auto" and online:
        raise ConfigError("--resume auto continues offline sweeps (the local engine records each sweep's count and "
                          "whether it finished); an online sweep lives in W&B: continue it with --resume SWEEP_ID "
                          "(a failed sweep's result file names it: details.resume)")
    if args.seed is not None and (args.resume not in (None, "auto") or online):
        raise ConfigError("--seed goes with a new offline sweep: " + ("a resumed sweep keeps the seed it started with"
                          if args.resume else "W&B draws an online sweep's trials itself"))
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError("--seed must be between 0 and 2**32 - 1")
    on_failure: dict = {}  # the sweep id, once there is one: a failed sweep's result says what to --resume
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the best model's reference
            if online:
                from pipeline.sweep import run_online

                outcome = run_online(config, sweep=spec, count=args.count, resume=args.resume, group=args.group,
                                     publish_trials=args.publish_trials, on_failure=on_failure, dataset=args.dataset)
            else:
                from pipeline.sweep import run

                outcome = run(config, sweep=spec, count=args.count, resume=args.resume, group=args.group,
                              publish_trials=args.publish_trials, seed=args.seed, on_failure=on_failure,
                              dataset=args.dataset)
    except BaseException as e:
        if args.result_json:
            result = failed("sweep", e)
            result.details.update(on_failure)
            write_json_atomic(args.result_json, result.to_dict())
        raise
    result = outcome.to_stage_result()
    if args.result_json:
        write_json_atomic(args.result_json, result.to_dict())
    print(result.message, file=sys.stderr)
    if line := result.stdout_line():
        print(line)
    return EXIT_CODES[result.status]
