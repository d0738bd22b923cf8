"""``pipeline lineage REF [--format text|json|mermaid] [--depth N]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments

    p.add_argument("ref", metavar="REF", help="name, name:vN or name:ALIAS")
    p.add_argument("--format", choices=("text", "json", "mermaid"), default="text")
    p.add_argument("--depth", type=int, default=5, metavar="N", help="artifact hops to follow each way (default 5)")
    add_config_arguments(p, required=False)


def main(args: argparse.Namespace) -> int:
    import sys

    from pipeline.commands.artifacts import _open
    from pipeline.errors import PipelineError
    from pipeline.lineage import build, render

    if args.depth < 0:
        raise PipelineError("--depth must be 0 or more")
    sys.stdout.write(render(build(_open(args, read_only=True)[0], args.ref, args.depth), args.format))
    return 0
