"""Tracked runs: closed on every path, readable back from the offline run folder, no secrets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.registry.local import LocalRegistry
from pipeline.results import StageResult, write_json_atomic
from pipeline.tracking import open_registry, resolve_mode, tracked_run
from tests.conftest import REPO, inspect_records, inspect_summary, reg_runs


def test_successful_run_reads_back(make_config, tmp_path):
    cfg = make_config("train.epochs=2")
    with tracked_run(cfg, "dataset-publish", group="g-1", tags=["t1"], notes="hello") as run:
        run.log({"train/loss": 0.5})
        run.set_summary(**{"eval/accuracy": 0.75})
    summary = inspect_summary(run.wandb_dir)
    assert summary["state"] == "finished" and summary["run_id"] == run.id
    assert summary["config"]["train"]["epochs"] == 2
    assert summary["summary"]["eval/accuracy"] == 0.75 and summary["summary"]["train/loss"] == 0.5
    assert summary["tags"] == ["t1"] and summary["notes"] == "hello"
    record = next(r for r in inspect_records(run.wandb_dir) if r["type"] == "run")["run"]
    assert record["job_type"] == "dataset-publish" and record["run_group"] == "g-1"
    row = run.registry.get_run(run.id)
    assert row["status"] == "finished" and row["job_type"] == "dataset-publish" and row["run_group"] == "g-1"
    assert row["wandb_dir"] == str(run.wandb_dir) and row["ended_at"] and row["summary"]["eval/accuracy"] == 0.75
    # the run's requirements.txt lists every installed package, as W&B's own full parse of their metadata gives it
    from importlib.metadata import distributions

    listed = (run.wandb_dir / "files" / "requirements.txt").read_text().splitlines()
    assert sorted(listed) == sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
    assert any(line.startswith("wandb==") for line in listed)


def test_a_stage_run_resumes_only_when_the_stage_says_whatever_wandb_resume_says(make_config, monkeypatch):
    """Each stage run has an id of its own (only `finetune --resume` goes on with one), so a WANDB_RESUME left in the
    environment (a cluster template's `must`, for the preempted job it was written for) does not decide: online,
    `must` with a new id failed every stage at wandb.init."""
    monkeypatch.setenv("WANDB_RESUME", "must")
    cfg = make_config()
    with tracked_run(cfg, "dataset-publish") as run:
        assert run.wandb_run.settings.resume == "never"
    with tracked_run(cfg, "finetune", run_id=run.id, resume=True) as again:
        assert again.wandb_run.settings.resume == "allow"


def test_wandb_tags_are_on_every_stage_run_beside_the_stage_s_own(make_config, monkeypatch):
    """WANDB_TAGS tags every run, as W&B users set it to; a stage run that passed tags of its own (a reused version, a
    reproduction, a sweep trial) lost them, since wandb.init's tags take the place of the variable's."""
    monkeypatch.setenv("WANDB_TAGS", "nightly, team-a")
    cfg = make_config("tracking.tags=[from-config]")
    with tracked_run(cfg, "finetune", tags=["reused"]) as run:
        pass
    assert inspect_summary(run.wandb_dir)["tags"] == ["from-config", "nightly", "team-a", "reused"]
    with tracked_run(cfg, "dataset-publish") as plain:
        pass
    assert inspect_summary(plain.wandb_dir)["tags"] == ["from-config", "nightly", "team-a"]


def test_the_package_list_reads_only_the_metadata_headers(tmp_path, monkeypatch):
    from pipeline.tracking import _installed_packages

    def dist(folder: str, metadata: str) -> None:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "METADATA").write_bytes(metadata.encode())

    dist("plain-1.0.dist-info", "Metadata-Version: 2.1\nName: Plain_Pkg\nVersion: 1.0\n\nName: not-a-header\n")
    dist("crlf-2.0.dist-info", "Metadata-Version: 2.1\r\nSummary: x\r\n  Name: folded\r\nversion: 2.0\r\nNAME: crlf\r\n")
    dist("noversion-1.0.dist-info", "Metadata-Version: 2.1\nName: noversion\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {(d.key, d.version) for d in _installed_packages()}
    assert {("Plain_Pkg", "1.0"), ("crlf", "2.0")} <= found
    assert not {k for k, _ in found} & {"folded", "not-a-header", "noversion"}


def test_failing_stage_leaves_run_marked_failed(make_config):
    cfg = make_config()
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(cfg, "finetune") as run:
            run.log({"train/loss": 1.0})
            raise RuntimeError("boom")
    assert inspect_summary(run.wandb_dir)["state"] == "failed"
    assert inspect_summary(run.wandb_dir)["exit_code"] == 1
    assert run.registry.get_run(run.id)["status"] == "failed"


def test_ctrl_c_marks_run_killed(make_config):
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(make_config(), "finetune") as run:
            raise KeyboardInterrupt
    assert run.registry.get_run(run.id)["status"] == "killed"
    assert inspect_summary(run.wandb_dir)["exit_code"] == 130


_SIGTERM_SCRIPT = """
import sys, time
from pipeline.config import load_config
from pipeline.tracking import tracked_run
cfg = load_config(None, ["dataset.name=d", "dataset.source=s", "model.name=m", "tracking.dir=" + sys.argv[1]])
with tracked_run(cfg, "finetune") as run:
    print(run.id, flush=True)
    time.sleep(120)
"""


def test_sigterm_marks_run_killed_and_exits_nonzero(tmp_path):
    track = tmp_path / "track"
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(track)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    row = LocalRegistry(track / "registry").get_run(run_id)
    assert row["status"] == "killed"
    assert inspect_summary(Path(row["wandb_dir"]))["exit_code"] == 130


_SIGNAL_AS_IT_CLOSES = """
import os, signal, sys
import wandb.sdk.wandb_run
from pipeline.config import load_config
from pipeline.tracking import tracked_run
finish = wandb.sdk.wandb_run.Run.finish
def finish_signalled(self, *args, **kwargs):  # SIGTERM again as W&B writes the run's end
    os.kill(os.getpid(), signal.SIGTERM)
    return finish(self, *args, **kwargs)
wandb.sdk.wandb_run.Run.finish = finish_signalled
cfg = load_config(None, ["dataset.name=d", "dataset.source=s", "model.name=m", "tracking.dir=" + sys.argv[1]])
with tracked_run(cfg, "finetune") as run:
    print(run.id, flush=True)
    if sys.argv[2] == "stopped":
        os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.parametrize("how", ["stopped", "ending"])
def test_a_signal_while_the_run_closes_waits_for_it(tmp_path, how):
    """accelerate launch passes its SIGTERM on twice, 4 ms apart, and so come two Ctrl-Cs: the second came as the
    first closed the run, interrupted W&B as it wrote the run's end, and W&B's exit hook wrote a second end, exit 0,
    so that the killed run read as finished (or, with SIGTERM's default action back, none at all). It waits for the
    run to be closed now: a killed run ends killed; a run that was ending ends finished, and the command stops."""
    track = tmp_path / "track"
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AS_IT_CLOSES, str(track), how], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "KeyboardInterrupt: signal 15" in done.stderr  # it stops, as asked
    row = LocalRegistry(track / "registry").get_run(done.stdout.strip())
    assert row["status"] == {"stopped": "killed", "ending": "finished"}[how]
    ends = [r["exit"]["exit_code"] for r in inspect_records(Path(row["wandb_dir"])) if r.get("type") == "exit"]
    assert ends == [{"stopped": 130, "ending": 0}[how]]


_TWICE_ON_THE_WAY_OUT = """
import logging, os, signal, sys, threading, time
from pipeline import cli
from pipeline.stages import dataset_publish

log_stats = dataset_publish._log_stats
sig = getattr(signal, os.environ["STOP_WITH"])
def stopped(*args, **kwargs):  # the signal, and the same again 4 ms later (accelerate launch, an impatient Ctrl-C)
    try:
        threading.Timer(0.004, os.kill, (os.getpid(), sig)).start()
        os.kill(os.getpid(), sig)
        time.sleep(30)
    finally:
        time.sleep(0.05)  # a cleanup on the way out (a temporary folder removed, say)
        logging.getLogger("pipeline").warning("cleaned up")
dataset_publish._log_stats = stopped
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_the_same_signal_twice_does_not_cut_the_way_out_short(tmp_path, sig, code):
    """The second SIGTERM of accelerate launch's pair (or Ctrl-C pressed twice) raised KeyboardInterrupt again, in
    whatever the first had set going: here a cleanup that never finished. It is the same request within a second of
    the first, and passes."""
    data = tmp_path / "t.csv"
    data.write_text("ticket_id,text,label\n" + "".join(f"t{i},text number {i},{'ab'[i % 2]}\n" for i in range(40)),
                    encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", _TWICE_ON_THE_WAY_OUT, "dataset-publish", "--config",
                           str(REPO / "configs" / "demo.yaml"), "--set", "dataset.name=d",
                           "--set", f"dataset.source={data}", "--set", "model.name=m", "--set",
                           f"tracking.dir={tmp_path / 'track'}", "--result-json", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "STOP_WITH": sig})
    assert done.returncode == code, done.stderr[-2000:]
    assert "WARNING pipeline: cleaned up" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "failed"
    assert [r["status"] for r in reg_runs(LocalRegistry(tmp_path / "track" / "registry"))] == ["killed"]


_TWICE_AS_THE_RESULT_IS_WRITTEN = """
import os, signal, sys, time
from pipeline import cli
from pipeline.commands import dataset_publish

def stopped(args):  # Ctrl-C before the stage wrote its result (reading its config, say)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
write_failed = cli._write_failed
def write_failed_twice(*args):  # the same Ctrl-C again, 20 ms later, as the command line writes the result
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    write_failed(*args)
dataset_publish.main = stopped
cli._write_failed = write_failed_twice
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_twice_still_writes_the_result_file(tmp_path):
    """The command line wrote the result file (and said "interrupted") after its handler was gone: a second Ctrl-C
    then, within a second of the first, raised KeyboardInterrupt in the writing, with a traceback and no result."""
    result = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-c", _TWICE_AS_THE_RESULT_IS_WRITTEN, "dataset-publish", "--config",
                           str(REPO / "configs" / "demo.yaml"), "--result-json", str(result)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.rstrip().endswith("interrupted"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert json.loads(result.read_text())["message"] == "interrupted"


_CTRL_C_AT_EXIT = """
import atexit, os, signal, sys, time
from pipeline import cli
def exit_handler():  # a Ctrl-C while an exit handler runs
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("exit handler went on", file=sys.stderr)
if sys.argv[1] == "last":  # registered before the command line's own: runs after it, as the interpreter's end would
    atexit.register(exit_handler)
else:  # registered as the command runs (W&B's teardown, torch's finalizers)
    main = cli.main
    cli.main = lambda: (atexit.register(exit_handler), main())[1]
sys.argv[1:2] = []
sys.argv[0] = "pipeline"
cli.run()
"""


@pytest.mark.parametrize("when", ["teardown", "last"])
def test_a_ctrl_c_during_the_interpreter_s_exit_ends_it_at_once_without_a_traceback(tmp_path, when):
    """Python's handler raised KeyboardInterrupt inside whichever exit handler ran ("Exception ignored in atexit
    callback", a traceback from W&B's or torch's teardown), and the process still ended 0. The command is done by
    then (its runs and files closed): the process ends at once, 130, as stopped by Ctrl-C. In the interpreter's last
    moments, after every exit handler, Python's default action for SIGINT killed the process by the signal (Ctrl-C
    pressed twice, the second 50 ms after the first, as the command ended): it passes there, and the code stands."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_AT_EXIT, when, "artifacts", "list", "--set",
                           f"tracking.dir={tmp_path / 'track'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if when == "teardown":
        assert done.returncode == 130 and "went on" not in done.stderr
    else:
        assert done.returncode == 0 and "went on" in done.stderr


def test_disabled_mode_still_records_lineage(make_config, tmp_path):
    cfg = make_config("tracking.mode=disabled")
    src = tmp_path / "f.txt"
    src.write_text("x")
    with tracked_run(cfg, "dataset-publish") as run:
        ref = run.registry.publish("ds", "dataset", {"f.txt": src}, run=run).ref
    assert run.wandb_dir is None and run.mode == "disabled"
    assert run.registry.get_run(run.id)["produced"] == [ref] == ["ds:v0"]
    assert not (Path(cfg.tracking.dir) / "wandb").exists() or not any((Path(cfg.tracking.dir) / "wandb").glob("*run-*"))


def test_mode_resolution(monkeypatch, tmp_path):
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        resolve_mode()
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode() == "offline"  # no key, no netrc
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    os.chmod(netrc, 0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert resolve_mode() == "offline"  # the key is for another host
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"


def test_registry_choice(make_config):
    cfg = make_config()
    assert isinstance(open_registry(cfg.tracking, "offline"), LocalRegistry)
    assert isinstance(open_registry(cfg.tracking, "disabled"), LocalRegistry)
    with pytest.raises(ConfigError, match="needs online mode"):
        open_registry(make_config("tracking.registry=wandb").tracking, "offline")


def test_artifact_logged_into_offline_run_without_staging_copy(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha" * 1000)
    (src / "sub" / "b.txt").write_text("beta")
    with tracked_run(make_config(), "dataset-publish") as run:
        res = run.registry.publish("ds", "dataset", src, metadata={"rows": 3}, aliases=["candidate"], run=run)
    art = next(r["artifact"] for r in inspect_records(run.wandb_dir) if r["type"] == "artifact")
    assert art["name"] == "ds" and art["type"] == "dataset"
    assert sorted(art["aliases"]) == ["candidate", "latest"]
    meta = json.loads(art["metadata"])
    assert meta["rows"] == 3 and meta["registry"] == {"ref": "ds:v0", "digest": res.version.digest}
    entries = {e["path"]: e for e in art["manifest"]["contents"]}
    assert set(entries) == {"a.txt", "sub/b.txt"}
    reg = run.registry
    for f in res.version.files:  # W&B points at the registry's objects: no second copy
        assert entries[f.path]["local_path"] == str(reg.object_path(f.digest))
    staged = [p for p in (tmp_path / "wandb-data").rglob("*") if p.is_file()]
    staged += [p for p in (tmp_path / "wandb-cache").rglob("*") if p.is_file()]
    assert staged == []
    assert inspect_summary(run.wandb_dir)["summary"]["artifacts/produced"] == ["ds:v0"]


SECRET = "planted-secret-7f3a9c1e55"
WANDB_KEY = "w" * 20 + "planted-wandb-key"


def test_planted_secret_appears_in_no_file(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)  # a key present, yet the mode is offline
    cfg = make_config(
        f"dataset.source=s3://alice:{SECRET}@bucket/tickets.csv",
        f"tracking.notes=rotate {SECRET} later",
        f"tracking.tags=[tag-{SECRET}]",
    )
    src = tmp_path / "f.txt"
    src.write_text("data")
    with tracked_run(cfg, "dataset-publish") as run:
        import logging

        from pipeline.redact import RedactingFilter

        log_file = tmp_path / "track" / "stage.log"
        handler = logging.FileHandler(log_file)
        handler.addFilter(RedactingFilter())
        logging.getLogger("pipeline").addHandler(handler)
        logging.getLogger("pipeline").warning("connecting with %s and %s", SECRET, WANDB_KEY)
        logging.getLogger("pipeline").removeHandler(handler)
        handler.close()
        run.log({"train/loss": 0.1})
        run.set_summary(note=f"used {SECRET}", hf_token="hf_abcdefghijk")
        res = run.registry.publish("ds", "dataset", {"f.txt": src}, run=run,
                                   metadata={"source": cfg.dataset.source, "password": "hunter2hunter2", "api_key": WANDB_KEY})
        write_json_atomic(tmp_path / "track" / "result.json",
                          StageResult("dataset-publish", run_id=run.id, produced=[res.ref], message=f"via {SECRET}").to_dict())
    files = [p for p in (tmp_path / "track").rglob("*") if p.is_file()]
    assert len(files) > 5 and log_file in files
    for p in files:
        data = p.read_bytes()
        for secret in (SECRET, WANDB_KEY, "hunter2hunter2", "hf_abcdefghijk"):
            assert secret.encode() not in data, f"{secret!r} leaked into {p}"
    # What was masked is still recognisable.
    assert inspect_summary(run.wandb_dir)["config"]["dataset"]["source"] == "s3://alice:***@bucket/tickets.csv"
    assert "***" in log_file.read_text()


def test_an_unusable_run_folder_is_a_config_error_before_any_run(make_config, tmp_path, monkeypatch):
    cfg = make_config()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))
    with pytest.raises(ConfigError, match=rf"the W&B run folder {blocker}/wandb \(WANDB_DIR\) cannot be created"):
        with tracked_run(cfg, "test"):
            raise AssertionError("the run must not open")
    assert LocalRegistry(Path(cfg.tracking.dir) / "registry").list_versions() == []
    import sqlite3

    with sqlite3.connect(Path(cfg.tracking.dir) / "registry" / "catalog.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0  # no run recorded either


def test_a_registry_that_cannot_record_the_run_still_closes_it_as_failed(make_config, monkeypatch):
    """A full disk fails the registry's first write, after W&B opened the run: the run must not stay open."""
    import sqlite3

    def disk_full(self, run):
        raise sqlite3.OperationalError("database or disk is full")  # what SQLite says on a full disk

    cfg = make_config()
    monkeypatch.setattr(LocalRegistry, "start_run", disk_full)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        with tracked_run(cfg, "dataset-publish"):
            pytest.fail("the stage must not start without its run recorded")
    (run_dir,) = (Path(cfg.tracking.dir) / "wandb").glob("offline-run-*")
    summary = inspect_summary(run_dir)
    assert summary["state"] == "failed" and summary["exit_code"] == 1


def test_a_run_the_registry_cannot_close_fails_in_wandb_too(make_config, monkeypatch):
    import sqlite3

    def disk_full(self, run, status):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(LocalRegistry, "finish_run", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        with tracked_run(make_config(), "dataset-publish") as run:
            run.set_summary(done=1)
    assert inspect_summary(run.wandb_dir)["exit_code"] == 1


def test_runs_opened_collects_the_runs_of_each_nested_watch(make_config):
    from pipeline.tracking import runs_opened

    with runs_opened() as outer:
        with runs_opened() as inner:
            pass  # nothing opened: an empty list, equal to the outer one
        with tracked_run(make_config(), "evaluate") as run:
            pass
    assert inner == [] and outer == [run]


def test_a_run_starts_without_importing_w_and_b_launch_yet_applies_staged_launch_inputs(tmp_path):
    """Each wandb.init imported W&B Launch (0.13 s of every run's start) to apply the job inputs a Launch job
    stages; inputs are staged through that very module. A run of a process that staged none imports nothing of
    it; one that staged a config file (`manage_config_file`) still gets the file saved, as W&B does."""
    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.tracking import tracked_run\n"
        f"cfg = load_config(None, ['dataset.name=t', 'model.name=m', 'dataset.source=x.csv', 'tracking.dir={tmp_path / 'track'}'])\n"
        "with tracked_run(cfg, 'plain') as plain:\n"
        "    pass\n"
        "print('wandb.sdk.launch' in sys.modules)\n"
        "open('job.yaml', 'w').write('lr: 1\\n')\n"
        "from wandb.sdk.launch import manage_config_file\n"
        "manage_config_file('job.yaml')  # relative to the working folder, as W&B asks\n"
        "with tracked_run(cfg, 'launched') as launched:\n"
        "    pass\n"
        "print(plain.wandb_dir)\n"
        "print(launched.wandb_dir)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    imported, plain, launched = out.stdout.splitlines()
    assert imported == "False"
    assert not (Path(plain) / "files" / "_wandb_configs").exists()
    assert (Path(launched) / "files" / "_wandb_configs" / "job.yaml").read_text() == "lr: 1\n"


def test_the_stages_run_where_the_home_folder_cannot_be_written(tmp_path):
    """A container run under another user id (``docker run --user``: HOME is ``/``) or with a read-only root file
    system: W&B stages every table a run logs in ``~/.local/share/wandb`` and opens its service log in
    ``~/.cache/wandb``, and `evaluate` makes ``~/.cache/huggingface/metrics`` even for a metric kept in memory. Each
    stage ended in a traceback at its first table (finetune at its metric), and a model that carries its own code
    (trusted) failed as transformers copied that code to ``~/.cache/huggingface/modules``. W&B's folders go under
    ``<tracking.dir>/wandb-home`` then, the metric makes its folder in a temporary one, and the module cache is a
    temporary folder."""
    from tests.tiny import write_tickets, write_tiny_custom_code_model

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # nothing can be made below a file, whoever runs the test (root ignores permissions)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "HF_HOME", "HF_MODULES_CACHE", "WANDB_DATA", "WANDB_CACHE"))}
    env.update(HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"), XDG_DATA_HOME=str(blocker / "data"))
    track = tmp_path / "track"
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {{name: tickets, source: {write_tickets(tmp_path / 'data.csv', rows=120)}, "
                      f"id_column: ticket_id}}\nmodel: {{name: clf, base: {write_tiny_custom_code_model(tmp_path / 'm')}, "
                      f"max_length: 32, trust_remote_code: true}}\ntrain: {{epochs: 1, batch_size: 16}}\n"
                      f"tracking: {{dir: {track}}}\n")
    for stage in ("dataset-publish", "finetune"):
        result = tmp_path / f"{stage}.json"
        out = subprocess.run([sys.executable, "-m", "pipeline", stage, "--config", str(config), "--result-json",
                              str(result)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"W&B uses {track / 'wandb-home' / 'cache'} instead (WANDB_CACHE_DIR)" in out.stderr
        if stage == "finetune":
            assert "a model's own code is copied to " in out.stderr
        summary = inspect_summary(Path(json.loads(result.read_text())["paths"]["run_dir"]))["summary"]
        table = "samples/train" if stage == "dataset-publish" else "eval/misclassified"
        assert summary[table]["_type"] == "table-file"  # the run recorded its table
    staged = [p for p in (track / "wandb-home" / "data" / "artifacts" / "staging").iterdir() if p.is_file()]
    assert staged and all(json.loads(p.read_text())["columns"] for p in staged)  # the tables, kept for `wandb sync`
    assert not (blocker.parent / "home").exists()


def test_an_offline_run_s_staged_tables_are_kept_beside_it_not_in_the_home_folder(tmp_path):
    """W&B stages a copy of every table a run logs, and an offline run records that copy's path: `wandb sync` uploads
    it from there. In the home folder (W&B's default), the copies stayed behind when run folders were deleted, and
    were lost with a container's home while its runs, on a volume, waited to be synced. Offline, they are kept under
    the W&B root (``tracking.dir``), beside the runs that name them."""
    from tests.tiny import write_tickets

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "WANDB_DATA", "WANDB_CACHE"))}
    env["HOME"] = str(home)
    track = tmp_path / "track"
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {{name: tickets, source: {write_tickets(tmp_path / 'data.csv', rows=120)}}}\n"
                      f"model: {{name: clf}}\ntracking: {{dir: {track}}}\n")
    out = subprocess.run([sys.executable, "-m", "pipeline", "dataset-publish", "--config", str(config), "--result-json",
                          str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not [p for p in (home / ".local" / "share").rglob("*") if p.is_file()]
    run_dir = Path(json.loads((tmp_path / "r.json").read_text())["paths"]["run_dir"])
    records = (next(run_dir.glob("*.wandb"))).read_bytes()
    # what `wandb sync` will upload, where the run says it is
    named = set(re.findall(rb"/[^\x00-\x20]*/artifacts/staging/tmp[0-9a-z_]{8}", records))
    assert named and all(Path(p.decode()).is_file() for p in named)
    assert all(Path(p.decode()).is_relative_to(track / "wandb-home" / "data") for p in named)


@pytest.mark.parametrize("xdg", [{}, {"XDG_CACHE_HOME": "/x/cache", "XDG_DATA_HOME": "/x/data"},
                                 {"XDG_CACHE_HOME": "  ", "XDG_DATA_HOME": ""}])
def test_w_and_b_s_default_folders_are_found_as_w_and_b_finds_them(xdg, monkeypatch):
    """W&B finds its data and cache folders with platformdirs; the stage reads the same XDG variables without
    importing it (8 ms of every stage's start)."""
    import platformdirs

    from pipeline.tracking import _wandb_default

    for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in xdg.items():
        monkeypatch.setenv(var, value)
    for kind in ("user_data_dir", "user_cache_dir"):
        assert _wandb_default(kind) == getattr(platformdirs, kind)("wandb")
