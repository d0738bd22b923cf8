"""``pipeline reproduce MODEL_REF [--check] [--tolerance X]``: retrain a model version and compare."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments

    p.add_argument("model", metavar="MODEL_REF", help="the model version to rebuild, e.g. intent-classifier:v3")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the rebuild's metrics or test predictions differ beyond --tolerance")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="X",
                   help="largest allowed absolute metric difference (default 0: exactly equal, as on the CPU "
                        "with the same package versions)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code in the base model's folder, for a model trained with "
                        "model.trust_remote_code (read that code first)")
    add_config_arguments(p, required=False)
    p.add_argument("--result-json", metavar="PATH", help="write the machine-readable result (every comparison) here")
    p.add_argument("--group", help="W&B group for the reproduction run")


def main(args: argparse.Namespace) -> int:

    from pipeline.commands.stage import run_stage
    from pipeline.config import load_tracking
    from pipeline.errors import PipelineError

    if not args.tolerance >= 0:  # and not nan, which compares false with every difference: --check could not fail
        raise PipelineError(f"--tolerance must be a number, 0 or more (got {args.tolerance})")
    # --config only says where the registry is; --set tracking.* does too, and every --set also
    # changes the recorded config of the rebuild on purpose.
    tracking_only = [o for o in args.overrides if o.startswith("tracking.")]
    config = load_tracking(args.config, tracking_only)
    code = run_stage("pipeline.reproduce", args, config=config, model=args.model, overrides=tuple(args.overrides),
                     check=args.check, tolerance=args.tolerance, trust_remote_code=args.trust_remote_code)
    return code
