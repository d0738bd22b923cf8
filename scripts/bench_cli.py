#!/usr/bin/env python
"""How long a command takes to end once its work is done: `python -m pipeline` against plain `main()`.

    python scripts/bench_cli.py [--repeat 5]

`python -m pipeline` (and the `pipeline` script) runs `pipeline.cli.run`, which freezes the
objects alive out of the cyclic garbage collector before the process ends; Python's shutdown
would otherwise collect them all once more. This runs the same `predict` command (the packaged
all-MiniLM-L6-v2 under a fresh two-label head, saved to a temporary folder as a classifier; one
text) both ways, alternating, each in a fresh process,
and prints the median wall time and the median time from the command's last output line to the
process's end (its shutdown).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = {
    "main() then a plain exit": [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"],
    "python -m pipeline (run)": [sys.executable, "-m", "pipeline"],
}


def once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, seconds from the last output line to the end of the process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    last = start
    for _ in proc.stdout:  # the output is one line per text, flushed as it is printed
        last = time.perf_counter()
    if proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    end = time.perf_counter()
    return end - start, end - last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from benchutil import packaged_classifier

    work = tempfile.TemporaryDirectory(prefix="bench-cli-")
    model = packaged_classifier(Path(work.name) / "classifier")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = ["predict", "--model-dir", str(model), "I was charged twice this month"]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(args.repeat):
        for name, prefix in WAYS.items():
            runs[name].append(once([*prefix, *command], env))
    print(f"`pipeline {' '.join(command[:2])} <minilm> TEXT`, {args.repeat} runs each, alternating (medians)")
    for name, times in runs.items():
        print(f"  {name:<26} {statistics.median(t for t, _ in times):6.2f} s wall, "
              f"{statistics.median(e for _, e in times):5.2f} s from its output to its end")
    (plain, plain_exit), (ours, ours_exit) = ([statistics.median(x[i] for x in runs[n]) for i in (0, 1)] for n in WAYS)
    print(f"saved {plain - ours:.2f} s a command ({plain / ours:.2f}x); shutdown {plain_exit:.2f} -> {ours_exit:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
