"""``pipeline predict --model-dir DIR TEXT...``: classify text with a fetched or deployed model."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, metavar="DIR", help="a folder from deploy-fetch (or any fetched model version)")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none or '-': one text per line on stdin. A sentence-pair model takes "
                        "TEXT<TAB>PAIR")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="labels to show per text (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")


CHUNK = 1024  # texts classified together: length-ordered batches within it, memory bounded by it


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar for loading a small model is noise here
    from pipeline.errors import PipelineError
    from pipeline.predict import load

    if args.top_k < 1:
        raise PipelineError("--top-k must be at least 1")
    texts = _texts(args.texts)
    first = list(itertools.islice(texts, CHUNK))
    if not first:
        raise PipelineError("no text to classify: pass TEXT arguments or lines on stdin")
    classifier = load(args.model_dir)
    # stdin is classified CHUNK lines at a time, each chunk printed when done: a pipe sees results as they
    # come and memory does not grow with the input. An error further in stops there, naming its line.
    done = 0
    for chunk in itertools.chain([first], iter(lambda: list(itertools.islice(texts, CHUNK)), [])):
        _classify(classifier, chunk, args, done)
        done += len(chunk)
        sys.stdout.flush()
    return 0


def _classify(classifier, texts: list[str], args: argparse.Namespace, before: int) -> None:
    from pipeline.errors import PipelineError

    pairs = None
    if classifier.takes_pairs:
        unpaired = next((i for i, t in enumerate(texts, before + 1) if "\t" not in t), None)
        if unpaired is not None:
            raise PipelineError(f"{args.model_dir} classifies text pairs: give each as TEXT<TAB>PAIR "
                                f"(input {unpaired} has no tab)")
        texts, pairs = zip(*(t.split("\t", 1) for t in texts))
    for i, pred in enumerate(classifier.predict(list(texts), list(pairs) if pairs else None, top_k=args.top_k)):
        shown = {"text": texts[i], **({"text_pair": pairs[i]} if pairs else {})}
        if args.json:
            print(json.dumps({**shown, **pred.to_dict()}))
        else:
            print("\t".join(f"{label}\t{score:.4f}" for label, score in pred.top) + "\t" + "\t".join(shown.values()))


def _texts(argv: list[str]) -> Iterator[str]:
    """The texts from the arguments, or one per non-blank line of stdin (UTF-8, a leading BOM dropped), as read."""
    from pipeline.errors import PipelineError

    if argv and argv != ["-"]:
        for i, text in enumerate(argv, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes the locale could not decode arrive as surrogates
                raise PipelineError(f"TEXT argument {i} is not valid UTF-8") from None
        yield from argv
        return
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(f"stdin line {n} is not valid UTF-8 (byte {e.start + 1}: {e.reason}); "
                                "convert the input to UTF-8, e.g. with iconv") from None
        if line.strip():
            yield line.rstrip("\r\n")
