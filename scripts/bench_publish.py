#!/usr/bin/env python
"""dataset-publish on a large CSV against pyarrow's own CSV-to-Parquet conversion.

    python scripts/bench_publish.py [--rows 1000000] [--small-rows 1000] [--repeat 3]

Each measurement runs in a fresh child process so its peak RSS and CPU time are its own;
baseline and publish runs alternate, and each publish writes to a fresh tracking folder (a new
version, not a dedupe hit). The publish is the command users run, `python -m pipeline
dataset-publish --config ...` (offline W&B), from start to exit. Prints the median wall time, CPU time (user + system, the child's
reaped children included), peak RSS, and the ratio publish / pyarrow, of the medians and of each publish to the
pyarrow run just before it (the machine's speed drifts; a pair is run close together) (target: <= 2x, peak RSS
< 2 GB).

The same pair also runs on a `--small-rows` file, which measures the fixed cost that does not
grow with the data (Python imports; W&B's import, service, run and exit). The per-row ratio is
(publish(rows) - publish(small)) / (pyarrow(rows) - pyarrow(small)): what the data path costs
against pyarrow once start-up is taken out. `--small-rows 0` skips it.

Each publish's result file gives the seconds of its steps (read, validate, split, open the W&B run, log
its charts, write the split files, publish the version); their medians are printed, with what is left
of the wall time outside them (Python start-up and imports, and exit).

Last, the big file is published again into a folder that holds its version: what an unchanged nightly
publish costs (the data is not read again when the pipeline's package has no uncommitted changes).
"""

from __future__ import annotations

import argparse
import json
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

CONFIG = """project: bench
dataset: {{name: big, source: {source}, id_column: ticket_id, on_invalid: drop}}
model: {{name: m}}
"""


def child(argv: list[str], log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds) of one child process; its output goes to `log`."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            os.execve(sys.executable, [sys.executable, *argv], env)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(argv)[:200]}\n{log.read_text(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def write_csv(path: Path, rows: int) -> None:
    from pipeline.demo_data import generate

    base = generate(20_000, seed=5)
    with open(path, "w", encoding="utf-8") as f:
        f.write("ticket_id,text,label\n")
        for i in range(rows):
            r = base[i % len(base)]
            # unique text per row (a row number in it), so no conflicting labels are created
            f.write(f'B{i:08d},"{r["text"].replace(chr(34), "")} (ref {i})",{r["label"]}\n')


STEPS = ("read", "validate", "split", "open_run", "log", "write", "publish")


def measure(src: Path, work: Path, repeat: int) -> dict[str, tuple[float, float, float]]:
    """Medians (wall, CPU) and the peak RSS of `repeat` alternating runs of each, and (key "steps") the median
    seconds of each step of the publish, from its result file."""
    runs: dict[str, list[tuple[float, float, float]]] = {"pyarrow": [], "publish": []}
    steps: list[dict[str, float]] = []
    config = work / f"{src.stem}.yaml"
    config.write_text(CONFIG.format(source=json.dumps(str(src))), encoding="utf-8")
    log = work / "child.log"
    for i in range(repeat):
        runs["pyarrow"].append(child(["-c", BASELINE, str(src), str(work / "out.parquet")], log))
        result = work / "result.json"
        runs["publish"].append(child(["-m", "pipeline", "dataset-publish", "--config", str(config), "--result-json",
                                      str(result), "--set", f"tracking.dir={work / f'track-{src.stem}-{i}'}"], log))
        steps.append(json.loads(result.read_text())["details"]["timings"])
    print(f"  runs (s) on {src.name}: pyarrow " + " ".join(f"{t:.2f}" for t, _, _ in runs["pyarrow"])
          + " | publish " + " ".join(f"{t:.2f}" for t, _, _ in runs["publish"]))
    out = {k: (statistics.median(t for t, _, _ in v), max(r for _, r, _ in v), statistics.median(c for _, _, c in v))
           for k, v in runs.items()}
    out["steps"] = {k: statistics.median(s[k] for s in steps) for k in STEPS}
    # each publish against the pyarrow run just before it: the machine's speed drifts less within a pair than
    # between the medians of all runs
    out["paired"] = [p / b for (p, _, _), (b, _, _) in zip(runs["publish"], runs["pyarrow"])]
    return out


def print_steps(steps: dict[str, float], wall: float) -> None:
    """Where the publish's wall time goes. The files are written on another thread while the run opens and logs."""
    inside = steps["read"] + steps["validate"] + steps["split"] + max(steps["open_run"] + steps["log"], steps["write"]) \
        + steps["publish"]
    print("  publish steps (median s): " + ", ".join(f"{k} {steps[k]:.2f}" for k in STEPS)
          + f"; outside them (Python start-up and imports, exit): {wall - inside:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small-rows", type=int, default=1000, help="rows of the fixed-cost run (0: skip it)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians are reported")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))

    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        src = work / "big.csv"
        write_csv(src, args.rows)
        print(f"input: {args.rows:,} rows, {src.stat().st_size / 2**20:.0f} MiB CSV")
        big = measure(src, work, args.repeat)
        print(f"{'':<34}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>14}")
        for label, key in (("pyarrow CSV -> Parquet (median)", "pyarrow"), ("dataset-publish (median)", "publish")):
            wall, rss, cpu = big[key]
            print(f"{label:<34}{wall:>9.2f}{cpu:>9.2f}{rss:>14.0f}")
        (t_base, _, c_base), (t_pub, rss_pub, c_pub) = big["pyarrow"], big["publish"]
        paired = big["paired"]
        print(f"ratio of each publish to the pyarrow run before it: median {statistics.median(paired):.2f}x, "
              f"{min(paired):.2f}-{max(paired):.2f}x")
        print(f"ratio publish / pyarrow: {t_pub / t_base:.2f}x wall, {c_pub / c_base:.2f}x CPU (target <= 2x); "
              f"peak RSS {rss_pub / 1024:.2f} GiB (target < 2 GB)")
        print_steps(big["steps"], t_pub)
        # The same file and config again, into a tracking folder that holds its version: not read again (reuse),
        # unless the pipeline's package has uncommitted changes, when the signature cannot name the code.
        again = [child(["-m", "pipeline", "dataset-publish", "--config", str(work / f"{src.stem}.yaml"),
                        "--set", f"tracking.dir={work / f'track-{src.stem}-0'}"], work / "child.log")
                 for _ in range(args.repeat)]
        reused = "not read again" in (work / "child.log").read_text(errors="replace")
        print(f"publishing it again (unchanged, median): {statistics.median(t for t, _, _ in again):.2f} s wall, "
              f"peak RSS {max(r for _, r, _ in again):.0f} MiB "
              + ("(the version published before is the result: the data is not read)" if reused else
                 "(read and checked again: the pipeline's package has uncommitted changes)"))
        if args.small_rows:
            small_src = work / "small.csv"
            write_csv(small_src, args.small_rows)
            small = measure(small_src, work, args.repeat)
            (s_base, _, sc_base), (s_pub, _, sc_pub) = small["pyarrow"], small["publish"]
            print_steps(small["steps"], s_pub)
            print(f"fixed cost ({args.small_rows:,} rows): publish {s_pub:.2f} s wall / {sc_pub:.2f} s CPU, "
                  f"pyarrow {s_base:.2f} s / {sc_base:.2f} s; publish's fixed cost alone is {s_pub / t_base:.2f}x "
                  f"pyarrow's whole time at {args.rows:,} rows")
            if t_base > s_base and c_base > sc_base:
                print(f"per-row ratio (fixed cost taken out): {(t_pub - s_pub) / (t_base - s_base):.2f}x wall, "
                      f"{(c_pub - sc_pub) / (c_base - sc_base):.2f}x CPU")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
