"""The CPUs a container lets this process use, which torch, NumPy and Arrow do not see (and, for a run that was
killed outright, whether its memory limit killed processes: `memory_kills`).

A Kubernetes CPU limit or ``docker run --cpus`` is a cgroup *quota* of CPU time, not a set of
cores: the process still sees every core of the host (``os.cpu_count()``, its affinity), and
torch, NumPy's BLAS and Arrow start a thread per core. Those threads then share the quota, and
the kernel stops them all whenever it is spent, so a training runs slower than it would with a
thread per CPU of the quota. `cgroup_cpu_limit` reads the quota; `pipeline.cli.run` turns it into
``OMP_NUM_THREADS`` (which all three read when they start; ``RAYON_NUM_THREADS`` for the tokenizers)
when the user has not set it, and `torch_threads_within_quota` lowers torch's threads where a stage runs from
Python (torch may be loaded before the pipeline is).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def cgroup_cpu_limit(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Whole CPUs the tightest cgroup CPU quota over this process allows (its quota divided by its period, rounded
    down, at least 1: a thread more than the quota can run gets the whole group throttled), or None where no quota
    applies (no limit set, no cgroup file system, not Linux).

    Both cgroup versions: v2's ``cpu.max`` (``"200000 100000"``; ``"max 100000"`` is no limit) and v1's
    ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (a quota of -1 is no limit). The process's own cgroup and every
    one above it count (a limit is often set on a parent: a Kubernetes pod's, above its containers'). Inside a
    container the path /proc names may be the host's (``/kubepods/...``), which the container's mount does not have:
    the mount's own root (the container's cgroup) is read then."""
    shares = [share for folder, v2 in _cgroup_folders("cpu", proc_cgroup, root)
              if (share := _quota(folder, v2=v2)) is not None]
    return max(1, math.floor(min(shares))) if shares else None


def _cgroup_folders(controller: str, proc_cgroup: str | Path, root: str | Path) -> Iterator[tuple[Path, bool]]:
    """(folder, whether it is cgroup v2's) of each cgroup over this process that `controller` (``cpu``, ``memory``)
    governs: the process's own and every one above it, in either version's layout (v2: one hierarchy, at the root,
    or at root/unified beside v1's; v1: the controller's own mount). Inside a container the path /proc names may be
    the host's, which the container's mount does not have: the mount's own root is read then. Nothing without
    the files (no cgroup file system, not Linux)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return
    root = Path(root)
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if not path.startswith("/"):
            continue
        if controllers == "":
            bases = [root, root / "unified"]
        elif controller in controllers.split(","):
            bases = [d for d in _listdir(root) if controller in d.name.split(",")]
        else:
            continue
        for base in bases:
            for folder in _up_from(base, path):
                yield folder, controllers == ""


def _listdir(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _up_from(base: Path, path: str) -> list[Path]:
    """`base`/`path` and each folder above it up to `base`, those that exist; `base` alone when `path` is not there
    (a host's path, seen from inside a container whose mount is its own cgroup)."""
    parts = [p for p in path.strip("/").split("/") if p]
    folders = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def _quota(folder: Path, v2: bool) -> float | None:
    """CPUs of the quota set on one cgroup folder, or None (no limit there, or not readable)."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a cpuset), where the platform says."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def limit_threads_to_quota(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Set ``OMP_NUM_THREADS`` to the cgroup quota's CPUs when it is below the CPUs the process can run on and the user
    has not set it (and ``RAYON_NUM_THREADS``, for the tokenizers' thread pool, unless set); the number set, or None.
    Before torch, NumPy, Arrow or the tokenizers load: each reads it once, as it starts."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    limit = cgroup_cpu_limit(proc_cgroup, root)
    if limit is None or limit >= usable_cpus():
        return None
    os.environ["OMP_NUM_THREADS"] = str(limit)
    os.environ.setdefault("RAYON_NUM_THREADS", str(limit))
    return limit


def torch_threads_within_quota(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """The command line's rule where a stage runs from Python (``stage.run(config)`` in a notebook, an orchestrator's
    Python task), which no command line set up and where torch may be loaded already: when ``OMP_NUM_THREADS`` is
    unset and torch runs more CPU threads than the cgroup quota's whole CPUs, torch's threads are lowered to those,
    and ``OMP_NUM_THREADS`` (and ``RAYON_NUM_THREADS``, unless set) say so for the rest of the process, as the
    command line's would: it is done once. The number set, or None. A stage calls it before it trains or predicts."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    limit = cgroup_cpu_limit(proc_cgroup, root)
    if limit is None:
        return None
    import torch

    before = torch.get_num_threads()
    if before <= limit:
        return None
    torch.set_num_threads(limit)
    os.environ["OMP_NUM_THREADS"] = str(limit)
    os.environ.setdefault("RAYON_NUM_THREADS", str(limit))
    log.info("this process runs under a CPU quota of %d CPU(s) (a container's limit): torch's CPU threads lowered "
             "from %d to %d, and OMP_NUM_THREADS=%d set for the rest of the process (set it yourself to choose)",
             limit, before, limit, limit)
    return limit


def memory_kills(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> tuple[int, int | None] | None:
    """(processes the kernel's out-of-memory killer has killed, the memory limit in bytes or None) of the cgroups over
    this process that have recorded any (a container's memory limit: v2's ``memory.events`` and ``memory.max``, v1's
    ``memory.oom_control`` and ``memory.limit_in_bytes``), the most kills of them; None where none has (or no memory
    cgroup is there to read). A process the killer ends gets no word out: the next one in the same container can say
    so. The counters are the kernel's, since the cgroup was made: a container's own, not only this pipeline's."""
    found: list[tuple[int, int | None]] = []
    for folder, v2 in _cgroup_folders("memory", proc_cgroup, root):
        events, limit_file = ("memory.events", "memory.max") if v2 else ("memory.oom_control", "memory.limit_in_bytes")
        try:
            counts = dict(ln.split()[:2] for ln in (folder / events).read_text().splitlines() if ln.strip())
            kills = int(counts.get("oom_kill", 0))
        except (OSError, ValueError):
            continue
        if kills:
            try:
                limit = (folder / limit_file).read_text().strip()
                cap = int(limit) if limit.isdigit() and int(limit) < 1 << 60 else None  # v1's "none": ~2**63
            except (OSError, ValueError):
                cap = None
            found.append((kills, cap))
    return max(found, key=lambda f: f[0]) if found else None
