"""``pipeline finetune --config C [--dataset NAME:REF] [--resume [RUN_ID|auto]]``: dataset version -> MODEL:vM."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--dataset", metavar="NAME:REF", help="dataset version to train on (default: <dataset.name>:latest)")
    p.add_argument(
        "--resume", nargs="?", const="latest", metavar="RUN_ID",
        help="continue an interrupted run from its last checkpoint, in the same W&B run "
             "(default: the newest interrupted run of this model); 'auto': the interrupted run of this config and "
             "dataset version if there is one, else train afresh (for an orchestrator's retries)",
    )
    add_retrain_argument(p)


def add_retrain_argument(p: argparse.ArgumentParser, also: str = "") -> None:
    p.add_argument("--retrain", action="store_true",
                   help="train even when a live version of the model was trained from the same inputs (dataset "
                        "version, base model, model and train config, code and libraries); by default that "
                        f"version is the result, status unchanged{also}")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.stage import run_stage

    return run_stage("pipeline.stages.finetune", args, dataset=args.dataset, resume=args.resume, reuse=not args.retrain)
