"""The lock a training process holds on its run's checkpoint folder (`pipeline.runlock`)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from pipeline import runlock
from pipeline.config import load_config
from pipeline.stages import finetune
from tests.conftest import REPO


def test_a_held_folder_names_its_holder_refuses_a_second_holder_and_is_free_after(tmp_path):
    folder = tmp_path / "checkpoints" / "clf" / "run1"
    assert runlock.holder(folder) is None  # no folder: nobody
    with runlock.hold(folder, "finetune run run1"):
        found = runlock.holder(folder)  # a lock of another open file, as another process would see it
        assert found["pid"] == os.getpid() and found["host"] == socket.gethostname() and found["since"]
        with pytest.raises(runlock.RunBusy, match=rf"^finetune run run1 is training now in another process "
                                                  rf"\(pid {os.getpid()} on {socket.gethostname()}, since "):
            with runlock.hold(folder, "finetune run run1"):
                pass
        (folder / "resume.json").write_text("{}")
    assert runlock.holder(folder) is None
    assert (folder / "resume.json").is_file()  # a folder with the run's files stays


def test_a_folder_that_holds_nothing_but_the_lock_goes_with_the_parents_made_for_it(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "keep").mkdir()
    with runlock.hold(tmp_path / "checkpoints" / "clf" / "run1", "run1"):
        assert (tmp_path / "checkpoints" / "clf" / "run1" / runlock.LOCK_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["keep"]  # clf/ was made for it; keep/ not


def test_a_folder_left_with_only_a_free_lock_is_removed_and_a_held_or_used_one_is_not(tmp_path):
    dead, live, used = tmp_path / "dead", tmp_path / "live", tmp_path / "used"
    for folder in (dead, used):  # what a process killed outright leaves: the lock file, locked by nobody
        folder.mkdir()
        (folder / runlock.LOCK_FILE).write_text(json.dumps({"pid": 1}))
    (used / "best").mkdir()  # a sweep's model kept: waiting for the sweep to go on
    with runlock.hold(live, "sweep live", doing="running"):
        assert runlock.remove_if_abandoned(live) is False and live.is_dir()  # its process is alive (this one)
        assert runlock.remove_if_abandoned(dead) is True and not dead.exists()
        assert runlock.remove_if_abandoned(used) is False and (used / "best").is_dir()
        assert runlock.remove_if_abandoned(tmp_path / "none") is False


def test_a_sweep_goes_on_without_removing_a_trial_that_is_training_now(tmp_path):
    cfg = load_config(None, ["dataset.name=d", "dataset.source=d.csv", "model.name=clf", f"tracking.dir={tmp_path / 'track'}"])
    trials = {}
    for run_id in ("live", "killed"):
        trials[run_id] = tmp_path / "track" / "checkpoints" / "clf" / run_id
        trials[run_id].mkdir(parents=True)
        (trials[run_id] / finetune.TRIAL_FILE).write_text(json.dumps({"run_id": run_id, "sweep": "s1"}))
    with runlock.hold(trials["live"], "trial"):  # the live trial's process (another sweep process going on)
        assert finetune.remove_trial_leftovers(cfg, "s1") == [("killed", "s1")]
        assert trials["live"].is_dir() and not trials["killed"].exists()
        listed = {r["run_id"]: r["training"] for r in finetune.interrupted_runs(tmp_path / "track")}
        assert listed["live"]["pid"] == os.getpid()
    other = tmp_path / "track" / "checkpoints" / "clf" / "other"  # a killed trial of another sweep
    other.mkdir()
    (other / finetune.TRIAL_FILE).write_text(json.dumps({"run_id": "other", "sweep": "s2"}))
    assert finetune.remove_trial_leftovers(cfg, "s1") == [("live", "s1")]  # its process is gone: a leftover
    assert other.is_dir()
    assert finetune.remove_trial_leftovers(cfg) == [("other", "s2")]  # every sweep's (what a sweep that starts does)


def test_artifacts_list_marks_a_sweep_that_is_running_now(tmp_path, cli_here):
    # an offline sweep's folder, and an online sweep's agent's (several agents of one sweep may run on one machine)
    folder, agent = tmp_path / "track" / "sweeps" / "s1", tmp_path / "track" / "sweeps" / "s2.agent-a1b2c3d4"
    for f, trial in ((folder, 2), (agent, 5)):
        (f / "best" / "model").mkdir(parents=True)
        (f / "best" / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
        (f / "best" / "trial.json").write_text(json.dumps({"trial": trial, "value": 0.91}))
        (f / "best" / "metadata.json").write_text(json.dumps({"config": {"model": {"name": "clf"}}}))
    track = f"tracking.dir={tmp_path / 'track'}"

    def rows() -> dict[str, str]:
        listed = cli_here("artifacts", "list", "--set", track).stdout.splitlines()
        return {s: next(line for line in listed if line.strip().startswith(f"{s} ")) for s in ("s1", "s2")}

    with runlock.hold(folder, "sweep s1", doing="running"):
        row = rows()["s1"]
        assert f"2 (0.91); running now (pid {os.getpid()} on {socket.gethostname()}, since " in row
    listed = rows()
    assert "2 (0.91)" in listed["s1"] and "running now" not in listed["s1"]  # interrupted: its model waits for the sweep
    assert "5 (0.91)" in listed["s2"] and str(agent) in listed["s2"]  # listed by its sweep's id


def test_an_exclusive_folder_lock_waits_for_the_process_holding_it(tmp_path):
    import subprocess
    import sys

    folder, log = tmp_path / "sweeps", tmp_path / "order.log"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pipeline import runlock
with runlock.exclusive({str(folder)!r}):
    print("held", flush=True)
    time.sleep(1.0)
    open({str(log)!r}, "a").write("other process done\\n")
"""], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with runlock.exclusive(folder):  # waits for the other process
            with open(log, "a") as f:
                f.write("this process\n")
    finally:
        holder.wait(timeout=60)
    assert log.read_text().splitlines() == ["other process done", "this process"]
    assert not list(folder.iterdir())  # a lock on the folder itself: no file is left in it


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS", 524])  # 524: the kernel's ENOTSUPP (Lustre)
def test_a_file_system_without_locks_refuses_nothing_and_claims_no_lock(tmp_path, monkeypatch, code):
    """Lustre mounted without -o flock, and some network mounts, answer every flock with an error. Every such
    error was read as "another process holds it": each finetune was refused as training now, with no process
    training it. Where locks do not work, nothing is locked and nothing is refused, as where fcntl is missing."""
    import errno
    import fcntl

    from pipeline.registry.local import LocalRegistry
    from pipeline.tracking import TrackedRun

    number = code if isinstance(code, int) else getattr(errno, code)

    def no_locks(fd, operation):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder = tmp_path / "checkpoints" / "run1"
    with runlock.hold(folder, "finetune run run1"):
        assert runlock.holder(folder) is None
        with runlock.hold(folder, "finetune run run1"):  # not refused: nothing says another process trains it
            (folder / "resume.json").write_text("{}")
        with runlock.exclusive(tmp_path / "one-at-a-time"):
            pass
    assert sorted(p.name for p in folder.iterdir()) == ["resume.json"]  # no lock file that no lock stands behind
    reg = LocalRegistry(tmp_path / "registry")
    run = TrackedRun(id="r1", project="p", job_type="finetune", group=None, mode="offline", config={}, registry=reg)
    reg.start_run(run)
    assert reg.get_run("r1")["status"] == "running"  # not taken for crashed: there is no lock to go by
    reg.finish_run(run, "finished")
    assert reg.get_run("r1")["status"] == "finished"
