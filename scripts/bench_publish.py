#!/usr/bin/env python
"""dataset-publish on a large CSV against pyarrow's own CSV-to-Parquet conversion.

    python scripts/bench_publish.py [--rows 1000000] [--repeat 3]

Each measurement runs in a fresh child process so its peak RSS is its own; baseline and
publish runs alternate, and each publish writes to a fresh tracking folder (a new version, not
a dedupe hit). Prints the median wall time, peak RSS, and the ratio publish / pyarrow
(target: <= 2x, peak RSS < 2 GB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = """
import sys, pyarrow.csv as csv, pyarrow.parquet as pq
pq.write_table(csv.read_csv(sys.argv[1]), sys.argv[2], compression="zstd")
"""

PUBLISH = """
import sys
from pipeline.config import load_config
from pipeline.stages import dataset_publish
cfg = load_config(None, ["dataset.name=big", "dataset.source=" + sys.argv[1], "dataset.id_column=ticket_id",
                         "model.name=m", "tracking.dir=" + sys.argv[2], "dataset.on_invalid=drop"])
print(dataset_publish.run(cfg).produced)
"""


def child(code: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-c", code, *args], env)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {code[:60]!r}")
    return wall, usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians are reported")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.demo_data import generate

    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        src = work / "big.csv"
        base = generate(20_000, seed=5)
        with open(src, "w", encoding="utf-8") as f:
            f.write("ticket_id,text,label\n")
            for i in range(args.rows):
                r = base[i % len(base)]
                # unique text per row (a row number in it), so no conflicting labels are created
                f.write(f'B{i:08d},"{r["text"].replace(chr(34), "")} (ref {i})",{r["label"]}\n')
        size = src.stat().st_size
        print(f"input: {args.rows:,} rows, {size / 2**20:.0f} MiB CSV")
        base_runs, pub_runs = [], []
        for i in range(args.repeat):
            base_runs.append(child(BASELINE, str(src), str(work / "out.parquet")))
            pub_runs.append(child(PUBLISH, str(src), str(work / f"track{i}")))
        t_base, rss_base = statistics.median(t for t, _ in base_runs), max(r for _, r in base_runs)
        t_pub, rss_pub = statistics.median(t for t, _ in pub_runs), max(r for _, r in pub_runs)
        print("runs (s): pyarrow " + " ".join(f"{t:.2f}" for t, _ in base_runs)
              + " | publish " + " ".join(f"{t:.2f}" for t, _ in pub_runs))
        print(f"{'':<34}{'seconds':>9}{'peak RSS MiB':>14}")
        print(f"{'pyarrow CSV -> Parquet (median)':<34}{t_base:>9.2f}{rss_base:>14.0f}")
        print(f"{'dataset-publish (median)':<34}{t_pub:>9.2f}{rss_pub:>14.0f}")
        print(f"ratio publish / pyarrow: {t_pub / t_base:.2f}x (target <= 2x); peak RSS {rss_pub / 1024:.2f} GiB (target < 2 GB)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
