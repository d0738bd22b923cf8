"""``pipeline predict --model-dir DIR TEXT...``: classify text with a fetched or deployed model."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, metavar="DIR", help="a folder from deploy-fetch (or any fetched model version)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify; none or '-': one text per line on stdin")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="labels to show per text (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar for loading a small model is noise here
    from pipeline.errors import PipelineError
    from pipeline.predict import load

    texts = args.texts
    if not texts or texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise PipelineError("no text to classify: pass TEXT arguments or lines on stdin")
    if args.top_k < 1:
        raise PipelineError("--top-k must be at least 1")
    for text, pred in zip(texts, load(args.model_dir).predict(texts, top_k=args.top_k)):
        if args.json:
            print(json.dumps({"text": text, **pred.to_dict()}))
        else:
            print("\t".join(f"{label}\t{score:.4f}" for label, score in pred.top) + f"\t{text}")
    return 0
