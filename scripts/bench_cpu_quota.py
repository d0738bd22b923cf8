"""Benchmark: finetune under a container's CPU quota, with a thread per core of the machine or per CPU of the quota.

    sudo python scripts/bench_cpu_quota.py [--cpus 1] [--repeat 3] [--set train.max_steps=40 ...]

A Kubernetes CPU limit or ``docker run --cpus N`` is a cgroup quota: the process sees every core and
torch starts a thread per core, which then share N CPUs' time. The pipeline's command line sets
``OMP_NUM_THREADS`` from the quota (`pipeline.cpus`); this compares the two on the demo data, in a
cgroup of its own with a quota of ``--cpus`` (made with cgroup v1's cpu hierarchy or cgroup v2,
which needs root and a writable cgroup file system; removed at the end). "cores" is the behaviour
without the quota read (``OMP_NUM_THREADS`` set to the cores the process can run on, as torch's
default would be), "quota" the command as it is. Runs alternate; medians of the stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_cgroup(cpus: float) -> Path:
    """A cgroup with a CPU quota of `cpus` (period 100 ms); SystemExit saying why when none can be made."""
    name = f"pipeline-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/cpu")
    quota = str(int(cpus * 100000))
    try:
        if (v1 / "cgroup.procs").is_file():
            folder = v1 / name
            folder.mkdir()
            (folder / "cpu.cfs_quota_us").write_text(quota)
        else:
            folder = Path("/sys/fs/cgroup") / name
            folder.mkdir()
            (folder / "cpu.max").write_text(f"{quota} 100000")
    except OSError as e:
        raise SystemExit(f"cannot make a cgroup with a CPU quota here ({e}); run as root on Linux with a writable "
                         "cgroup file system") from None
    return folder


def finetune(folder: Path, config: Path, track: Path, overrides: list[str], threads: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", **({"OMP_NUM_THREADS": threads} if threads else {}))
    cmd = ["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", sys.executable, "-m", "pipeline",
           "finetune", "--config", str(config), "--retrain", "--set", f"tracking.dir={track}", "--result-json",
           str(track / "r.json")]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"finetune failed:\n{out.stderr[-3000:]}")
    json.loads((track / "r.json").read_text())
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--cpus", type=float, default=1.0, help="the quota, in CPUs (default 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    if args.cpus >= cores:
        raise SystemExit(f"--cpus {args.cpus} is not below the {cores} CPUs this process can run on: nothing to compare")
    overrides = args.overrides or ["train.max_steps=40"]
    folder = make_cgroup(args.cpus)
    times: dict[str, list[float]] = {"cores": [], "quota": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cpu-quota-") as tmp:
            track = Path(tmp) / "track"
            env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
            publish = [sys.executable, "-m", "pipeline", "dataset-publish", "--config", args.config, "--set",
                       f"tracking.dir={track}"]
            subprocess.run(publish + [a for o in overrides for a in ("--set", o)], cwd=REPO, env=env, check=True,
                           capture_output=True)
            finetune(folder, Path(args.config), track, overrides, None)  # untimed: caches, page cache
            for i in range(args.repeat):
                for side, threads in (("cores", str(cores)), ("quota", None)):
                    times[side].append(finetune(folder, Path(args.config), track, overrides, threads))
                    print(f"run {i + 1} {side}: {times[side][-1]:.1f} s", flush=True)
    finally:
        folder.rmdir()
    cores_s, quota_s = statistics.median(times["cores"]), statistics.median(times["quota"])
    print(f"finetune ({' '.join(overrides)}) under a quota of {args.cpus:g} CPU(s) on {cores}: a thread per core "
          f"{cores_s:.1f} s, a thread per CPU of the quota {quota_s:.1f} s ({cores_s / quota_s:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
