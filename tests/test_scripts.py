"""The benchmark scripts run to their report (their speed is theirs to measure, not the tests')."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tiny import write_tickets, write_tiny_model


@pytest.mark.parametrize("script, args, reports", [
    ("bench_predict.py", ["--rows", "8", "--repeat", "1"], "speed-up "),
    ("bench_registry.py", ["--total-mb", "2", "--files", "2"], "republish / hashing alone: "),
    ("bench_publish.py", ["--rows", "3000", "--small-rows", "0", "--repeat", "1"], "ratio publish / pyarrow: "),
    # the tiny model on a few tickets (MiniLM on the demo data: 30 s for the same lines of the script)
    ("bench_finetune.py", ["--set=dataset.source={tmp}/tickets.csv", "--set=model.base={tmp}/tiny", "--set=train.max_steps=2",
                           "--set=train.eval_strategy=steps", "--set=train.eval_steps=2", "--set=model.max_length=16"],
     "ratio stage / plain: "),
])
def test_a_benchmark_script_runs_to_its_report(script, args, reports, tmp_path):
    if any("{tmp}" in a for a in args):
        write_tiny_model(tmp_path / "tiny")
        write_tickets(tmp_path / "tickets.csv", rows=120)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / script), *[a.format(tmp=tmp_path) for a in args]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert reports in out.stdout


def test_the_cpu_quota_benchmark_runs_to_its_report(tmp_path):
    """It makes a cgroup with a CPU quota: where this machine lets it (root, a writable cgroup file system)."""
    from tests.test_cpus import _cgroup_with_quota

    probe = _cgroup_with_quota(tmp_path, 1.0)
    if probe is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("no cgroup with a CPU quota below this machine's CPUs can be made here")
    probe.rmdir()
    write_tiny_model(tmp_path / "tiny")
    write_tickets(tmp_path / "tickets.csv", rows=120)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_cpu_quota.py"), "--repeat", "1",
                          f"--set=dataset.source={tmp_path}/tickets.csv", f"--set=model.base={tmp_path}/tiny",
                          "--set=train.max_steps=2", "--set=model.max_length=16"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a thread per CPU of the quota " in out.stdout


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_the_ranges_pyproject_allows():
    """scripts/setup.sh installs constraints.txt's versions: each of pyproject.toml's requirements (the test
    extras too) must be pinned there, at a version its range admits, or a fresh set-up fails or drifts."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]]
    pins = _pins()
    unpinned = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    outside = [f"{r} (pinned {pins[canonicalize_name(r.name)]})" for r in wanted
               if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not unpinned and not outside, f"run scripts/update_constraints.sh: unpinned {unpinned}, outside their range {outside}"


@pytest.mark.skipif(os.environ.get("PIPELINE_UNPINNED") == "1", reason="set up with PIPELINE_UNPINNED=1: newest releases")
def test_the_tests_run_on_the_versions_constraints_pins():
    """What the suite passes on is what constraints.txt gives a fresh set-up (a local label, torch's +cpu, aside)."""
    from importlib.metadata import PackageNotFoundError, version

    differ = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name).split("+", 1)[0]
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            differ[name] = (pinned, installed)
    assert not differ, f"installed versions differ from constraints.txt (pinned, installed): {differ}; " \
                       "bash scripts/setup.sh --test installs the pins, scripts/update_constraints.sh moves them"
