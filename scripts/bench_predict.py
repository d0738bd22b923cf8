#!/usr/bin/env python
"""Scoring texts of mixed lengths: length-ordered batches against batches in input order.

    python scripts/bench_predict.py [--rows 1000] [--batch-size 64] [--repeat 3]

`Classifier.logits` (what evaluate, reproduce, deploy's smoke test and `predict` use) batches
texts in order of length, so a batch pads to similar lengths. This scores the same texts both
ways with the packaged all-MiniLM-L6-v2 under a fresh classification head, prints the median
wall times, their ratio and the largest difference between the two sets of logits (padding
changes the arithmetic only in the last bits).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mixed_texts(rows: int, seed: int = 3) -> list[str]:
    """Support tickets of 1 to 12 sentences: short and long texts mixed, as in real queues."""
    import numpy as np

    from pipeline.demo_data import generate

    base = [r["text"] for r in generate(2000, seed=seed)]
    rng = np.random.default_rng(seed)
    return [" ".join(base[j] for j in rng.integers(0, len(base), rng.integers(1, 13))) for _ in range(rows)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from benchutil import packaged_classifier
    from pipeline.predict import load

    torch.manual_seed(0)
    work = tempfile.TemporaryDirectory(prefix="bench-predict-")
    classifier = load(packaged_classifier(Path(work.name) / "classifier"), max_length=256)
    texts = mixed_texts(args.rows)
    lengths = [len(t) for t in texts]
    print(f"{args.rows} texts of {min(lengths)} to {max(lengths)} characters (median {int(np.median(lengths))}), "
          f"batch size {args.batch_size}, max_length 256, {torch.get_num_threads()} threads")
    times: dict[bool, list[float]] = {False: [], True: []}
    out = {}
    for _ in range(args.repeat):
        for ordered in (False, True):
            t = time.perf_counter()
            out[ordered] = classifier.logits(texts, batch_size=args.batch_size, sort_by_length=ordered)
            times[ordered].append(time.perf_counter() - t)
    plain, ordered = statistics.median(times[False]), statistics.median(times[True])
    print(f"input order:  {plain:.2f} s ({args.rows / plain:.0f} texts/s)")
    print(f"length order: {ordered:.2f} s ({args.rows / ordered:.0f} texts/s)")
    agree = float(np.mean(out[False].argmax(1) == out[True].argmax(1)))
    print(f"speed-up {plain / ordered:.2f}x; largest logit difference {np.abs(out[False] - out[True]).max():.2e}; "
          f"same predicted class on {agree:.2%} of texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
