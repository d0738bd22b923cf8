"""``pipeline evaluate --config C [--model REF] [--dataset REF] [--no-promote]``: score and gate a model version."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--model", metavar="NAME:REF", help="model version to evaluate (default: <model.name>:candidate)")
    p.add_argument("--dataset", metavar="NAME:REF",
                   help="dataset version to score on (default: the exact version the model was trained on)")
    p.add_argument("--no-promote", action="store_true", help="evaluate and record the decision, but move no alias")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.stage import run_stage

    return run_stage("pipeline.stages.evaluate", args, model=args.model, dataset=args.dataset, promote=not args.no_promote)
