"""The CPUs a container's cgroup quota allows, read as the kernel lays them out (v1 and v2), and what the command
line makes of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cpus import cgroup_cpu_limit, limit_threads_to_quota
from tests.conftest import REPO


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_v2_quota_of_the_process_s_cgroup_and_the_tightest_above_it(tmp_path):
    proc = tmp_path / "proc"
    proc.write_text("0::/kubepods/pod1/c1\n")
    fs = tree(tmp_path / "fs", {"kubepods/pod1/c1/cpu.max": "max 100000\n",  # the container: no limit of its own
                                "kubepods/pod1/cpu.max": "250000 100000\n",  # the pod's limit: 2.5 CPUs
                                "kubepods/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(proc, fs) == 2  # rounded down: a third thread would get the group throttled
    (fs / "kubepods/pod1/c1/cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert cgroup_cpu_limit(proc, fs) == 1
    (fs / "kubepods/pod1/c1/cpu.max").write_text("max 100000\n")
    (fs / "kubepods/pod1/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc, fs) is None  # no limit anywhere


def test_inside_a_container_the_host_s_path_is_missing_and_the_mount_s_root_is_read(tmp_path):
    proc = tmp_path / "proc"
    proc.write_text("0::/system.slice/docker-abc.scope\n")  # the host's path; the container sees its own cgroup at /
    assert cgroup_cpu_limit(proc, tree(tmp_path / "fs", {"cpu.max": "400000 100000\n"})) == 4


def test_v1_cpu_controller_mounted_alone_or_with_cpuacct(tmp_path):
    proc = tmp_path / "proc"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    fs = tree(tmp_path / "fs", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                                "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                                "memory/docker/abc/memory.limit_in_bytes": "1073741824\n"})
    assert cgroup_cpu_limit(proc, fs) == 3
    (fs / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(proc, fs) is None


def test_no_cgroup_file_system_or_a_garbled_file_is_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "no-proc", tmp_path) is None
    proc = tmp_path / "proc"
    proc.write_text("0::/\n")
    assert cgroup_cpu_limit(proc, tree(tmp_path / "fs", {"cpu.max": "lots\n"})) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs, to set a quota below them")
def test_a_quota_below_the_cpus_sets_the_thread_pools_and_the_user_s_setting_wins(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    proc.write_text("0::/\n")
    fs = tree(tmp_path / "fs", {"cpu.max": "100000 100000\n"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    assert limit_threads_to_quota(proc, fs) == 1
    assert (os.environ["OMP_NUM_THREADS"], os.environ["RAYON_NUM_THREADS"]) == ("1", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert limit_threads_to_quota(proc, fs) is None and os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.delenv("OMP_NUM_THREADS")
    (fs / "cpu.max").write_text(f"{len(os.sched_getaffinity(0)) * 100000} 100000\n")  # as many as it has: unchanged
    assert limit_threads_to_quota(proc, fs) is None and "OMP_NUM_THREADS" not in os.environ


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs, to set a quota below them")
def test_from_python_torch_s_threads_are_lowered_once_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    import torch

    from pipeline.cpus import torch_threads_within_quota

    proc = tmp_path / "proc"
    proc.write_text("0::/\n")
    fs = tree(tmp_path / "fs", {"cpu.max": "100000 100000\n"})
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or the command line's) setting wins
    assert torch_threads_within_quota(proc, fs) is None and torch.get_num_threads() == before
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        assert torch_threads_within_quota(proc, fs) == 1
        assert torch.get_num_threads() == 1 and (os.environ["OMP_NUM_THREADS"], os.environ["RAYON_NUM_THREADS"]) == ("1", "1")
        torch.set_num_threads(2)  # set by hand afterwards: OMP_NUM_THREADS now says the process was set up once
        assert torch_threads_within_quota(proc, fs) is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_out_of_memory_kills_are_read_from_either_cgroup_version_with_their_limit(tmp_path):
    from pipeline.cpus import memory_kills

    proc = tmp_path / "proc"
    proc.write_text("0::/kubepods/pod1/c1\n")
    fs = tree(tmp_path / "v2", {"kubepods/pod1/c1/memory.events": "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n",
                                "kubepods/pod1/c1/memory.max": f"{4 << 30}\n",
                                "kubepods/pod1/memory.events": "oom 0\noom_kill 0\n"})
    assert memory_kills(proc, fs) == (2, 4 << 30)
    (fs / "kubepods/pod1/c1/memory.max").write_text("max\n")
    assert memory_kills(proc, fs) == (2, None)  # no limit of its own (a parent's killed, say)
    (fs / "kubepods/pod1/c1/memory.events").write_text("oom 0\noom_kill 0\n")
    assert memory_kills(proc, fs) is None
    proc.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    fs = tree(tmp_path / "v1", {"memory/docker/abc/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
                                "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n"})  # v1's no limit
    assert memory_kills(proc, fs) == (1, None)
    assert memory_kills(tmp_path / "no-proc", fs) is None


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def _cgroup_with_quota(tmp_path: Path, cpus: float) -> Path | None:
    """A v1 cgroup with a CPU quota, where this machine lets the test make one (root, a writable cpu hierarchy)."""
    if not (CGROUP_V1_CPU / "cgroup.procs").is_file():
        return None
    folder = CGROUP_V1_CPU / f"pipeline-test-{os.getpid()}-{tmp_path.name}"[:60]
    try:
        folder.mkdir()
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
    except OSError:
        return None
    return folder


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs, to set a quota below them")
def test_a_stage_under_a_cpu_quota_trains_with_a_thread_per_cpu_of_it(tmp_path):
    """Under a quota of one CPU on a machine of two, torch started two threads, which shared one CPU's time. The
    command line sets OMP_NUM_THREADS from the quota; the version records the threads its training used."""
    import json

    from tests.tiny import write_tickets, write_tiny_model

    # 1.9 CPUs: one whole CPU to the pipeline (a second thread would be throttled), and the time of almost two to the
    # test's processes, which start torch and transformers twice
    folder = _cgroup_with_quota(tmp_path, 1.9)
    if folder is None:
        pytest.skip("this machine lets the test make no cgroup with a CPU quota")
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"dataset: {{name: t, source: {write_tickets(tmp_path / 'd.csv', rows=120)}, id_column: "
                          f"ticket_id}}\nmodel: {{name: clf, base: {write_tiny_model(tmp_path / 'bert')}, max_length: "
                          f"32}}\ntrain: {{epochs: 1}}\ntracking: {{dir: {tmp_path / 'track'}}}\n")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        from pipeline.config import load_config
        from pipeline.registry.local import LocalRegistry
        from pipeline.stages import dataset_publish

        dataset_publish.run(load_config(config))  # the data needs no quota: published here, not in a process under it
        out = subprocess.run(["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", sys.executable,
                              "-m", "pipeline", "finetune", "--config", str(config), "--result-json",
                              str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

        produced = json.loads((tmp_path / "r.json").read_text())["produced"][0]
        version = LocalRegistry(tmp_path / "track" / "registry").resolve(produced)
        assert version.metadata["training"]["threads"] == 1
        assert "runs under a CPU quota of 1 CPU(s) (a container's limit)" in out.stderr
        # From Python, with torch loaded first (a notebook, an orchestrator's Python task): no command line set
        # OMP_NUM_THREADS, and the training ran a thread per core, as the version recorded.
        script = ("import logging, sys, torch; from pipeline.config import load_config; from pipeline.stages import "
                  "finetune; logging.basicConfig(level=logging.INFO); "
                  "before = torch.get_num_threads(); r = finetune.run(load_config(sys.argv[1]), reuse=False); "
                  "print(before, torch.get_num_threads(), r.produced[0])")
        out = subprocess.run(["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c",
                              script, str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        before, after, produced = out.stdout.split()[-3:]
        assert (int(before), int(after)) == (len(os.sched_getaffinity(0)), 1)
        assert LocalRegistry(tmp_path / "track" / "registry").resolve(produced).metadata["training"]["threads"] == 1
        assert f"torch's CPU threads lowered from {before} to 1, and OMP_NUM_THREADS=1 set" in out.stderr
    finally:
        folder.rmdir()
