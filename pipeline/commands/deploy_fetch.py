"""``pipeline deploy-fetch --config C [--model REF] [--to DIR] [--force]``: a verified local copy of a model."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--model", metavar="NAME:REF", help="model version to deploy (default: <model.name>:production)")
    p.add_argument("--to", metavar="DIR", help="target folder (default: deploy.dir from the config)")
    p.add_argument("--force", action="store_true", help="replace a target folder that holds something else")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.stage import run_stage

    return run_stage("pipeline.stages.deploy_fetch", args, model=args.model, to=args.to, force=args.force)
