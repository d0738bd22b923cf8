"""``pipeline dataset-publish --config C``: raw data -> NAME:vN."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.commands.stage import add_stage_arguments

    add_stage_arguments(p)
    p.add_argument("--reread", action="store_true",
                   help="read and check the data even when a live version was published from the same files, config "
                        "and code (by default that version is the result, status unchanged, without reading them)")
    p.add_argument("--dry-run", action="store_true",
                   help="read, check and split the data as publishing would, print the counts, and make nothing (no "
                        "version, no W&B run); invalid data fails as it would")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.stage import run_stage

    return run_stage("pipeline.stages.dataset_publish", args, reuse=not args.reread, dry_run=args.dry_run)
