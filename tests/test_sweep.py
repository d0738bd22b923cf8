"""Sweeps offline: W&B's sweep format on the local engine, with a tiny model."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import TrainerCallback

from pipeline import runlock, sweep as sweeps
from pipeline.callbacks import SweepMetricCallback
from pipeline.config import load_config
from pipeline.errors import ConfigError, RefError
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from pipeline.tracking import open_registry
from tests.conftest import REPO, inspect_summary, run_cli
from tests.tiny import write_separable_tickets, write_tickets, write_tiny_model

ISSUE_YAML = """
method: random
metric:
  name: val/loss
  goal: minimize
parameters:
  learning_rate:
    distribution: log_uniform_values
    min: 0.00001
    max: 0.01
  batch_size:
    values: [32, 64, 128]
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-assets")
    return write_tiny_model(root / "bert"), write_tickets(root / "tickets.csv", rows=240)


@pytest.fixture
def cfg(assets, tmp_path):
    model_dir, csv = assets

    def make(*extra: str):
        return load_config(None, ["dataset.name=tickets", f"dataset.source={csv}", "model.name=clf",
                                  f"model.base={model_dir}", "model.max_length=64", f"tracking.dir={tmp_path / 'track'}",
                                  "train.epochs=2", "train.warmup_ratio=0", "train.misclassified_rows=0", *extra])

    c = make()
    dataset_publish.run(c)
    return make


def registry(c) -> LocalRegistry:
    return LocalRegistry(Path(c.tracking.dir) / "registry")


def test_what_a_w_and_b_sweep_file_says_that_a_pipeline_sweep_does_not_use_is_said(cfg):
    """A sweep file written for `wandb sweep` + `wandb agent` names a program, a command, a project and an entity.
    Each trial here is the finetune stage in this process, in the config's project: so the program and command are
    not run, and a project or entity other than the config's gives way to it, as wandb.sweep's own project and
    entity arguments take precedence over the file's. Accepted, and said, rather than left for the user to find."""
    c = cfg()
    spec = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML) | {"program": "train.py", "command": ["${env}", "${program}"],
                                                            "project": "old-project", "entity": "someone"})
    said = sweeps.keys_not_used(spec, c)
    assert said == [
        "the sweep file's program and command are not run: each trial is the finetune stage, in this process",
        f"the sweep file's project 'old-project' is not where the trials run: they run in {c.project!r} (the config's "
        "project, or WANDB_PROJECT), as wandb.sweep's project argument takes precedence over the file's",
        "the sweep file's entity 'someone' is not where the trials run: they run in W&B's default entity (the "
        "config's entity, or WANDB_ENTITY), as wandb.sweep's entity argument takes precedence over the file's"]
    same = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML) | {"project": c.project})
    assert sweeps.keys_not_used(same, c) == [] and sweeps.keys_not_used(spec, cfg("entity=someone"))[2:] == []


def test_the_issue_yaml_runs_verbatim_offline(cfg):
    assert yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text()) == yaml.safe_load(ISSUE_YAML)
    c = cfg()
    spec = sweeps.load_sweep(REPO / "configs" / "sweep.yaml")
    assert spec.metric == "loss" and not spec.maximize
    assert [p.key for p in spec.params] == ["train.learning_rate", "train.batch_size"]
    out = sweeps.run(c, sweep=spec, count=3)
    assert out.status == "ok" and out.stop_reason == "count 3 done" and len(out.trials) == 3
    for t in out.trials:
        assert t.state == "complete" and 1e-5 <= t.params["train.learning_rate"] <= 1e-2
        assert t.params["train.batch_size"] in (32, 64, 128)
    assert len({t.params["train.learning_rate"] for t in out.trials}) == 3
    assert out.best.value == min(t.value for t in out.trials)

    reg = registry(c)
    # each trial is a finetune run in the sweep's group, on the pinned dataset version; none published
    for t in out.trials:
        run = reg.get_run(t.run_id)
        assert run["job_type"] == "finetune" and run["run_group"] == f"sweep-{out.sweep_id}"
        assert run["consumed"] == ["tickets:v0"] and run["produced"] == []
        assert run["summary"]["sweep/trial"] == t.number
    models = reg.list_versions(type="model")
    assert [m.ref for m in models] == ["clf:v0"] and out.best_model == "clf:v0"
    best = reg.resolve("clf:v0")
    assert {"candidate", f"sweep-{out.sweep_id}-best", "latest"} == set(best.aliases)
    assert best.metadata["sweep"]["trial"] == out.best.number and best.metadata["sweep"]["params"] == out.best.params
    assert best.metadata["config"]["train"]["learning_rate"] == out.best.params["train.learning_rate"]
    assert best.metadata["training"]["run_id"] == out.best.run_id
    # the sweep run logs the trials table; the result names the best config and model
    summary = inspect_summary(Path(out.run_dir))["summary"]
    assert summary["sweep/trials"]["_type"] == "table-file" and summary["sweep/best_model"] == "clf:v0"
    result = out.to_stage_result().to_dict()
    assert result["produced"] == ["clf:v0"]
    assert result["details"]["best_config"]["train"]["batch_size"] == out.best.params["train.batch_size"]
    assert result["details"]["best_config"]["train"]["metric_for_best_model"] == "loss"
    # only the best trial's model was kept, until it was published: then its folder went too
    assert not (Path(c.tracking.dir) / "sweeps" / out.sweep_id).exists()


def test_each_sweep_draws_its_own_trials_and_a_seed_draws_them_again(cfg, tmp_path):
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-5,
                                                                "max": 1e-2}},
                               "run_cap": 1})
    c = cfg("train.max_steps=1")
    dead = Path(c.tracking.dir) / "sweeps" / "killed1"  # a sweep process killed before it kept a model left its lock
    dead.mkdir(parents=True)
    (dead / runlock.LOCK_FILE).write_text("{}")
    first, second = sweeps.run(c, sweep=spec, count=1), sweeps.run(c, sweep=spec, count=1)
    assert not dead.exists()  # a sweep that starts removes it
    assert first.seed != second.seed and first.trials[0].params != second.trials[0].params
    assert first.to_stage_result().details["seed"] == first.seed
    again = sweeps.run(c, sweep=spec, count=1, seed=first.seed)
    assert again.trials[0].params == first.trials[0].params
    # the command line takes --seed for a new sweep only
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec.raw))
    cli = run_cli("sweep", "--config", str(config), "--sweep", str(tmp_path / "s.yaml"), "--count", "1", "--seed", "3",
                  "--resume", first.sweep_id)
    assert cli.returncode == 2 and "--seed goes with a new offline sweep: a resumed sweep keeps the seed it started " \
                                   "with" in cli.stderr
    for seed in ("-1", str(2**32)):  # NumPy's and Optuna's seeds: 0 to 2**32 - 1
        cli = run_cli("sweep", "--config", str(config), "--sweep", str(tmp_path / "s.yaml"), "--count", "1", "--seed", seed)
        assert cli.returncode == 2 and "--seed must be between 0 and 2**32 - 1" in cli.stderr, cli.stderr[-2000:]


def test_grid_exhaustion_stops_the_sweep(cfg, tmp_path, cli_here):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "eval/accuracy", "goal": "maximize"},
                                    "parameters": {"train.learning_rate": {"values": [0.003, 0.001]},
                                                   "seed": {"value": 1}}}))
    c = cfg()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    cli = cli_here("sweep", "--config", str(config), "--sweep", str(path), "--count", "5",
                  "--result-json", str(tmp_path / "r.json"))
    assert cli.returncode == 0, cli.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["details"]["stop_reason"] == "grid exhausted (2 combinations)"
    assert [t["params"] for t in data["details"]["trials"]] == [{"train.learning_rate": 0.003, "train.seed": 1},
                                                                  {"train.learning_rate": 0.001, "train.seed": 1}]
    assert cli.stdout.strip() == data["produced"][0]
    best = data["details"]["best_trial"]
    value = data["details"]["trials"][best]["value"]
    assert data["message"] == (f"sweep {data['details']['sweep_id']}: grid exhausted (2 combinations); best trial "
                               f"{best} (eval/accuracy {value:.4g}) -> {data['produced'][0]}")


def test_a_trial_that_runs_out_of_memory_fails_and_the_sweep_goes_on(cfg, tmp_path):
    """Its batch size, say, was too big for the device: the other trials still run, and the best is published."""
    import torch

    class TooBigFor(TrainerCallback):  # the trial with this learning rate makes an allocation the CPU cannot
        def on_step_end(self, args, state, control, **kwargs):
            if args.learning_rate == 0.003:
                torch.empty(2**60, dtype=torch.uint8)

    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "eval/accuracy", "goal": "maximize"},
                               "parameters": {"train.learning_rate": {"values": [0.003, 0.001]}}})
    c = cfg("train.max_steps=2")
    out = sweeps.run(c, sweep=spec, count=4, callbacks=(TooBigFor(),))
    # the failed point is not tried again by this process: it would fail again, taking the count from the others
    assert [(t.params["train.learning_rate"], t.state) for t in out.trials] == [(0.003, "failed"), (0.001, "complete")]
    assert out.stop_reason == "grid exhausted (2 combinations; 1 failed, tried again if the sweep is resumed)"
    assert out.trials[0].error.startswith("out of memory on the CPU while training: lower train.batch_size (now 32)")
    assert out.best.number == out.trials[1].number and out.best_model == "clf:v0"
    assert not list((Path(c.tracking.dir) / "checkpoints").rglob("checkpoint-*"))  # the failed trial's went too
    # resumed where it fits (another machine, or memory freed: here the allocation no longer fails), it runs
    again = sweeps.run(c, sweep=spec, count=2, resume=out.sweep_id)
    assert [(t.params["train.learning_rate"], t.state) for t in again.trials[2:]] == [(0.003, "complete")]
    assert again.stop_reason == "grid exhausted (2 combinations)"


class InterruptTrial(TrainerCallback):
    """SIGTERM in the middle of the n-th trial this object sees (0-based)."""

    def __init__(self, trial: int):
        self.trial, self.seen = trial, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.seen == self.trial and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_interruption_continues_the_count_on_the_pinned_data(cfg, assets, tmp_path):
    import optuna

    c = cfg()
    spec = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML) | {"run_cap": 4})
    on_failure = {}  # what the command's result file tells: the sweep to --resume
    with pytest.raises(KeyboardInterrupt):  # seeded: trial 1 draws a batch size that gives it a step 2 to stop at
        sweeps.run(c, sweep=spec, count=3, callbacks=(InterruptTrial(1),), seed=42, on_failure=on_failure)
    storage = f"sqlite:///{Path(c.tracking.dir) / 'registry' / 'sweeps.db'}"
    [summary] = optuna.get_all_study_summaries(storage)
    sweep_id = summary.study_name
    assert on_failure == {"resume": sweep_id}
    # new data arrives meanwhile: the sweep stays on the version it pinned
    write_tickets(tmp_path / "more.csv", rows=300, seed=11)
    dataset_publish.run(cfg(f"dataset.source={tmp_path / 'more.csv'}"))
    assert registry(c).resolve("tickets:latest").ref == "tickets:v1"

    out = sweeps.run(c, sweep=spec, count=5, resume=sweep_id)
    states = [(t.number, t.state) for t in out.trials]
    assert states == [(0, "complete"), (1, "failed"), (2, "complete"), (3, "complete")]
    assert out.stop_reason == "run_cap 4 reached"  # the interrupted trial counts towards the cap
    assert out.dataset == "tickets:v0"
    for t in out.trials:
        if t.run_id:
            assert registry(c).get_run(t.run_id)["consumed"] == ["tickets:v0"]
    with pytest.raises(ConfigError, match="different sweep config"):
        sweeps.run(c, sweep=sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML)), count=1, resume=sweep_id)
    trials_before = len(out.trials)
    with pytest.raises(ConfigError, match=rf"cannot resume sweep {sweep_id}: the config differs from the one it started "
                                          r"with in train.weight_decay \(0.01 -> 0.2\); its trials would not be comparable"):
        sweeps.run(cfg("train.weight_decay=0.2"), sweep=spec, count=1, resume=sweep_id)
    assert len(sweeps._outcomes(optuna.load_study(study_name=sweep_id, storage=storage))) == trials_before
    # a swept key's base value, and the data source (the sweep is pinned to tickets:v0), may change
    again = sweeps.run(cfg("train.learning_rate=0.5", f"dataset.source={tmp_path / 'more.csv'}"), sweep=spec, count=1,
                       resume=sweep_id)
    assert again.stop_reason == "run_cap 4 reached" and again.dataset == "tickets:v0"


def test_a_sweep_is_not_resumed_from_a_base_model_whose_files_changed(cfg, assets, tmp_path, caplog):
    """The trials after a resume would start from other weights than those before it, and the best of them all would
    be chosen among models that are not comparable: `--resume ID` says so, `--resume auto` starts a new sweep."""
    import optuna

    model_dir, _ = assets
    base = tmp_path / "bert"
    shutil.copytree(model_dir, base)
    c = cfg(f"model.base={base}", "train.max_steps=2")
    spec = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML))
    on_failure = {}
    with pytest.raises(KeyboardInterrupt):
        sweeps.run(c, sweep=spec, count=3, callbacks=(InterruptTrial(1),), on_failure=on_failure)
    sweep_id = on_failure["resume"]
    storage = f"sqlite:///{Path(c.tracking.dir) / 'registry' / 'sweeps.db'}"
    assert sweeps._sweep_to_continue(c, spec, storage, registry(c), 3, None) == (sweep_id, 2)  # the same files
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    with pytest.raises(ConfigError, match=rf"cannot resume sweep {sweep_id}: the base model {re.escape(str(base))} has "
                                          r"other files now \(digest \w{12}\) than the sweep began with \(\w{12}\); "
                                          "its trials would not be comparable"):
        sweeps.run(c, sweep=spec, count=1, resume=sweep_id)
    trials = len(optuna.load_study(study_name=sweep_id, storage=storage).trials)
    with caplog.at_level("INFO", logger="pipeline.sweep"):
        assert sweeps._sweep_to_continue(c, spec, storage, registry(c), 3, None) == (None, 3)
    assert f"{sweep_id}: its base model's files changed since it began" in caplog.text
    assert len(optuna.load_study(study_name=sweep_id, storage=storage).trials) == trials  # refused: nothing ran


def test_a_sweep_from_a_hub_model_trains_every_trial_from_the_commit_it_began_with(cfg, assets, monkeypatch, caplog):
    """The hub model moves on (a new commit) while a sweep runs, or before it is resumed: its trials stay comparable
    only if they all start from the commit the sweep began with, as they all train on the dataset version it pinned.
    `--resume auto` starts a new sweep on the new commit, as it does on new data. (The hub is a local cache, offline.)"""
    import optuna
    from huggingface_hub import constants

    model_dir, _ = assets
    hub = Path(cfg().tracking.dir).parent / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--someorg--tiny-bert"
    then, later = "a" * 40, "b" * 40
    shutil.copytree(model_dir, repo / "snapshots" / then)
    shutil.copytree(model_dir, repo / "snapshots" / later)
    config = json.loads((repo / "snapshots" / later / "config.json").read_text())
    (repo / "snapshots" / later / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(then)
    c = cfg("model.base=someorg/tiny-bert", "train.max_steps=2")
    spec = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML))
    on_failure = {}
    with pytest.raises(KeyboardInterrupt):
        sweeps.run(c, sweep=spec, count=3, callbacks=(InterruptTrial(1),), on_failure=on_failure)
    sweep_id = on_failure["resume"]
    (repo / "refs" / "main").write_text(later)  # the hub moved on
    storage = f"sqlite:///{Path(c.tracking.dir) / 'registry' / 'sweeps.db'}"
    with caplog.at_level("INFO", logger="pipeline.sweep"):
        assert sweeps._sweep_to_continue(c, spec, storage, registry(c), 3, None) == (None, 3)
    assert f"{sweep_id}: trains {then}" in caplog.text
    out = sweeps.run(c, sweep=spec, count=1, resume=sweep_id)  # by its id: on the commit it began with
    trained = [registry(c).get_run(t.run_id) for t in out.trials if t.state == "complete"]
    assert len(trained) == 2 and optuna.load_study(study_name=sweep_id, storage=storage).user_attrs["base"] == then
    assert out.best_model and registry(c).resolve(out.best_model).metadata["base_model"]["revision"] == then


def test_resume_auto_continues_the_interrupted_sweep_of_the_same_command_for_the_trials_it_has_left(cfg, tmp_path,
                                                                                                       caplog, cli_here):
    import optuna

    c = cfg("train.max_steps=2")
    spec = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML))
    storage = f"sqlite:///{Path(c.tracking.dir) / 'registry' / 'sweeps.db'}"
    reg = registry(c)
    assert sweeps._sweep_to_continue(c, spec, storage, reg, 3, None) == (None, 3)  # nothing to continue: a new sweep
    on_failure = {}
    with pytest.raises(KeyboardInterrupt), caplog.at_level("INFO", logger="pipeline.sweep"):
        # the orchestrator stops the task in the middle of the second trial
        sweeps.run(c, sweep=spec, count=3, resume="auto", callbacks=(InterruptTrial(1),), on_failure=on_failure)
    sweep_id = on_failure["resume"]
    assert f"sweep {sweep_id} started with seed" in caplog.text and "a retry of this command continues it" in caplog.text
    assert not list((Path(c.tracking.dir) / "checkpoints").glob("*/*"))  # the cut-off trial's: nothing resumes it
    # the best model so far (trial 0's) stays on disk until the sweep publishes it: `artifacts list` shows it
    track = f"tracking.dir={c.tracking.dir}"
    listed = cli_here("artifacts", "list", "--set", track).stdout
    assert "sweep models: " in listed and "sweep --resume SWEEP_ID" in listed
    row = next(line.split() for line in listed.splitlines() if line.strip().startswith(sweep_id))
    # SWEEP MODEL SIZE(2) BEST TRIAL(2) PUBLISHED WRITTEN FOLDER
    assert row[1] == "clf" and row[4] == "0" and row[6] == "-" and row[-1].endswith(f"sweeps/{sweep_id}")
    # the dataset version it trains on is kept for it: deleted, its best model could never be published
    refused = cli_here("artifacts", "delete", "tickets:v0", "--set", track)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: tickets:v0 is what sweep {sweep_id} trains on (its best model so far, not published yet: "
        f"{Path(c.tracking.dir).resolve() / 'sweeps' / sweep_id}); continue it (sweep --resume {sweep_id}) or delete "
        "that folder first, or pass --force")

    # other commands do not continue it; the log says why for each one
    other_file = sweeps.parse_sweep(yaml.safe_load(ISSUE_YAML) | {"run_cap": 9})
    dataset_publish.run(cfg("dataset.name=tickets2"))
    for config, spec_, seed, why in [
        (cfg("train.max_steps=2", "train.weight_decay=0.2"), spec, None, "config differs in train.weight_decay (0.01 -> 0.2)"),
        (c, other_file, None, "another sweep file"),
        (cfg("train.max_steps=2", "dataset.name=tickets2"), spec, None, "sweeps tickets:v0"),
        (c, spec, 7, "drawn from seed"),
    ]:
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline.sweep"):
            assert sweeps._sweep_to_continue(config, spec_, storage, reg, 3, seed) == (None, 3)
        assert f"{sweep_id}: {why}" in caplog.text and "starting a new one (--resume auto)" in caplog.text

    # the retry of the same command goes on with it: the trials left of its count of 3 (the cut-off one is not one)
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.sweep"):
        out = sweeps.run(c, sweep=spec, count=3, resume="auto")
    assert f"continuing interrupted sweep {sweep_id} (--resume auto): 1 of its 3 trials ran, 2 to go" in caplog.text
    assert out.sweep_id == sweep_id and out.stop_reason == "count 3 done" and out.status == "ok"
    assert [(t.number, t.state) for t in out.trials] == [(0, "complete"), (1, "failed"), (2, "complete"), (3, "complete")]
    assert reg.resolve(f"clf:sweep-{sweep_id}-best").ref == out.best_model
    assert "sweep models" not in cli_here("artifacts", "list", "--set", track).stdout  # published: the folder went
    # finished: the next call of the command is a new sweep
    assert sweeps._sweep_to_continue(c, spec, storage, reg, 3, None) == (None, 3)
    # --resume ID --count N runs N more; a later --resume auto counts down from there
    more = sweeps.run(c, sweep=spec, count=1, resume=sweep_id)
    assert [t.number for t in more.trials] == [0, 1, 2, 3, 4] and more.stop_reason == "count 1 done"
    assert optuna.load_study(study_name=sweep_id, storage=storage).user_attrs["count"] == 4
    assert sweeps._sweep_to_continue(c, spec, storage, reg, 3, None) == (None, 3)  # and it finished again
    with pytest.raises(KeyboardInterrupt):  # resumed by id for 2 more, and stopped in the first: unfinished again
        sweeps.run(c, sweep=spec, count=2, resume=sweep_id, callbacks=(InterruptTrial(0),))
    assert sweeps._sweep_to_continue(c, spec, storage, reg, 3, None) == (sweep_id, 2)

    # the command line: --seed goes with auto (it draws a new sweep, and picks the sweep to continue); online, auto
    # has nothing to count with
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec.raw))
    cli = cli_here("sweep", "--config", str(config), "--sweep", str(tmp_path / "s.yaml"), "--count", "1", "--seed", "3",
                   "--resume", "auto", "--result-json", str(tmp_path / "r.json"))
    assert cli.returncode == 0, cli.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["details"]["seed"] == 3 and data["details"]["sweep_id"] != sweep_id
    cli = cli_here("sweep", "--config", str(config), "--sweep", str(tmp_path / "s.yaml"), "--count", "1",
                   "--resume", "auto", "--set", "tracking.mode=online", "--set", "tracking.registry=wandb")
    assert cli.returncode == 2 and "--resume auto continues offline sweeps" in cli.stderr
    assert "details.resume" in cli.stderr


class FailTrial(TrainerCallback):
    """A trial that fails on its own (a bad value, say) after its first step; what it sees of the checkpoint
    folders meanwhile is kept."""

    def __init__(self, config):
        self.config, self.seen = config, None

    def on_step_end(self, args, state, control, **kwargs):
        from pipeline.stages import finetune

        self.seen = (finetune.interrupted_runs(self.config.tracking.dir), finetune._stopped_runs(self.config))
        raise ValueError("loss went NaN")


def test_trials_leave_no_checkpoints_and_a_resumed_finished_sweep_keeps_its_published_best(cfg, cli_here):
    c = cfg("train.max_steps=1")
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.001]}}})
    first = sweeps.run(c, sweep=spec, count=1)
    assert first.best_model == "clf:v0" and not (Path(c.tracking.dir) / "sweeps" / first.sweep_id).exists()
    # the folder an earlier version of the pipeline left after publishing is listed as a copy of the published version
    left = Path(c.tracking.dir) / "sweeps" / first.sweep_id / "best"
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(bytes(1000))
    (left / "trial.json").write_text(json.dumps(first.best.to_dict()))
    (left / "metadata.json").write_text(json.dumps({"config": c.to_dict()}))
    listed = cli_here("artifacts", "list", "--set", f"tracking.dir={c.tracking.dir}").stdout
    row = next(line.split() for line in listed.splitlines() if line.strip().startswith(first.sweep_id))
    assert row[1] == "clf" and row[4] == str(first.best.number) and row[6] == "clf:v0"
    shutil.rmtree(left.parent)

    failing = FailTrial(c)
    more = sweeps.run(c, sweep=spec, count=1, resume=first.sweep_id, callbacks=(failing,))
    # while it trained, its folder was listed as a sweep trial's, and not one `finetune --resume` could continue
    [listed], stopped = failing.seen
    assert listed["sweep_trial"] and listed["model"] == "clf" and stopped == []
    # it failed: its checkpoints went with it
    assert [(t.number, t.state) for t in more.trials] == [(0, "complete"), (1, "failed")]
    assert not list((Path(c.tracking.dir) / "checkpoints").glob("*/*"))
    # the best is still trial 0, whose model the first call published (its folder is gone): that version stays the best
    assert more.best.number == 0 and more.best_model == "clf:v0"
    assert [v.ref for v in registry(c).list_versions(type="model")] == ["clf:v0"]
    assert {"candidate", f"sweep-{first.sweep_id}-best"} <= set(registry(c).resolve("clf:v0").aliases)

    # An online sweep resumed by id sees only the trials of its own call: when its best is worse than the model an
    # earlier call published, that model stays the best, and nothing is published
    worse = sweeps.TrialOutcome(0, {"train.learning_rate": 0.001}, "complete", value=first.best.value + 1.0)
    work = Path(c.tracking.dir) / "sweeps" / first.sweep_id
    again = sweeps.publish_best(c, spec, first.sweep_id, "g", "tickets:v0", [worse], work / "best", "count 1 done")
    assert again.best_model == "clf:v0" and again.best.number == first.best.number
    assert again.best.value == pytest.approx(first.best.value) and again.best.params == first.best.params
    assert [v.ref for v in registry(c).list_versions(type="model")] == ["clf:v0"]


def test_a_trial_whose_process_was_killed_leaves_a_folder_that_the_sweep_removes_when_it_goes_on(cfg, tmp_path, caplog):
    import subprocess
    import sys
    import time

    from pipeline.stages import finetune

    c = cfg("train.max_steps=400", "train.eval_strategy=steps", "train.eval_steps=200")  # a trial long enough to kill
    config, sweep_file = tmp_path / "c.yaml", tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    sweep_file.write_text(yaml.safe_dump({"method": "random", "metric": {"name": "val/loss"}, "run_cap": 1,
                                          "parameters": {"learning_rate": {"values": [0.001]}}}))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "--config", str(config), "--sweep",
                             str(sweep_file), "--count", "1", "--resume", "auto"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(Path(c.tracking.dir).glob(f"checkpoints/clf/*/{finetune.TRIAL_FILE}")):
            assert proc.poll() is None and time.monotonic() < deadline, "the trial did not start"
            time.sleep(0.2)
        # While it runs, the sweep is not an interrupted one: no second process goes on with it (an overlapping cron
        # job, a retry while this one lives), which would mark its running trial failed and share its folder.
        [folder] = (Path(c.tracking.dir) / "sweeps").iterdir()
        sweep_id, spec = folder.name, sweeps.load_sweep(sweep_file)
        with pytest.raises(runlock.RunBusy, match=rf"^sweep {sweep_id} is running now in another process \(pid {proc.pid} on "):
            sweeps.run(c, sweep=spec, count=1, resume=sweep_id)
        with caplog.at_level("INFO", logger="pipeline.sweep"):
            registry = open_registry(c.tracking, project=c.project, entity=c.entity)
            assert sweeps._sweep_to_continue(c, spec, sweeps._storage(c), registry, 1, None) == (None, 1)
        assert f"({sweep_id}: running now (pid {proc.pid} on " in caplog.text
        [training] = finetune.interrupted_runs(c.tracking.dir)
        assert training["sweep_trial"] and training["training"]["pid"] == proc.pid  # its trial, training now
    finally:
        proc.kill()  # SIGKILL: no except, no finally runs in it
        proc.wait()
    [listed] = finetune.interrupted_runs(c.tracking.dir)
    assert listed["sweep_trial"] and listed["training"] is None and finetune._stopped_runs(c) == []  # no finetune resumes it

    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.sweep"):  # the retry goes on with the sweep: the folder goes
        out = sweeps.run(c, sweep=sweeps.load_sweep(sweep_file), count=1, resume="auto")
    assert f"removed the checkpoints of trial run {listed['run_id']}, whose process was killed" in caplog.text
    # (the killed trial counts towards run_cap 1, so the sweep ends there, with no trial finished)
    assert [(t.number, t.state) for t in out.trials] == [(0, "failed")] and out.stop_reason == "run_cap 1 reached"
    assert not list((Path(c.tracking.dir) / "checkpoints").glob("*/*"))
    assert not folder.exists()  # nothing kept (no trial finished), and the lock went with the sweep


def test_hyperband_stops_weak_trials_early(cfg, tmp_path):
    spec = sweeps.parse_sweep({
        "method": "grid", "metric": {"name": "eval/accuracy", "goal": "maximize"},
        "parameters": {"learning_rate": {"values": [0.003, 1e-7, 2e-7, 3e-7]}},
        "early_terminate": {"type": "hyperband", "min_iter": 1, "max_iter": 1, "eta": 2},
    })
    out = sweeps.run(cfg("train.epochs=4", "train.batch_size=8"), sweep=spec, count=4)
    by_state = {}
    for t in out.trials:
        by_state.setdefault(t.state, []).append(t)
    assert by_state["pruned"], [(t.state, t.value) for t in out.trials]
    assert all(t.evaluations < 4 for t in by_state["pruned"])
    assert all(t.evaluations == 4 for t in by_state["complete"])
    assert out.best.params["train.learning_rate"] == 0.003


def test_a_trial_the_pruner_stopped_is_reproduced_stopping_where_it_stopped(cfg):
    """A pruned trial's model (the sweep's best, or any with --publish-trials) was stopped by the pruner, which its
    config does not name: its version records the step, and `reproduce` rebuilds it bit for bit."""
    from pipeline import reproduce

    spec = sweeps.parse_sweep({
        "method": "grid", "metric": {"name": "eval/accuracy", "goal": "maximize"},
        "parameters": {"learning_rate": {"values": [0.003, 1e-7]}},
        "early_terminate": {"type": "hyperband", "min_iter": 1, "max_iter": 1, "eta": 2},
    })
    c = cfg("train.epochs=3", "train.batch_size=8")
    out = sweeps.run(c, sweep=spec, count=2, publish_trials=True)
    [pruned] = [t for t in out.trials if t.state == "pruned"]
    version = registry(c).resolve(pruned.produced[0])
    assert version.metadata["training"]["stopped_at_step"] < version.metadata["training"]["max_steps"]
    rebuilt = reproduce.run(c, model=version.ref, check=True)
    assert rebuilt.status == "ok" and rebuilt.details["same_digest"] and rebuilt.produced == [version.ref]


def test_a_best_trial_the_pruner_stopped_is_said_to_be_one():
    """Its config (`details.best_config`) trains every step when run as it is: the model published as the best was
    stopped after fewer evaluations, which the result says, beside the trial."""
    best = sweeps.TrialOutcome(3, {"train.learning_rate": 0.003}, "pruned", value=0.91, run_id="r3", evaluations=2)
    result = sweeps.SweepResult(sweep_id="s1", status="ok", best=best, best_config=None, best_model="clf:v4",
                                trials=[best], stop_reason="count 4 done", dataset="tickets:v0",
                                metric_name="eval/accuracy").to_stage_result()
    assert result.message == ("sweep s1: count 4 done; best trial 3 (eval/accuracy 0.91; the pruner stopped it after 2 "
                              "evaluations, so its config run in full trains longer) -> clf:v4")
    complete = sweeps.TrialOutcome(1, {}, "complete", value=0.9, evaluations=4)
    assert "pruner" not in sweeps.SweepResult(sweep_id="s1", status="ok", best=complete, best_config=None,
                                              best_model="clf:v2", trials=[complete], stop_reason="count 4 done",
                                              dataset="tickets:v0").to_stage_result().message


def test_random_draws_follow_wandb_distributions():
    params = {
        "train.learning_rate": {"distribution": "log_uniform", "min": -3, "max": 0},
        "train.weight_decay": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25},
        "train.eval_strategy": {"values": ["epoch", "steps"], "probabilities": [1.0, 0.0]},
        "train.epochs": {"min": 1, "max": 3},
        "train.batch_size": {"distribution": "q_log_uniform_values", "min": 8, "max": 512, "q": 8},
        "train.warmup_ratio": {"distribution": "normal", "mu": 0.05, "sigma": 0.0001},
    }
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/accuracy", "goal": "maximize"}, "parameters": params})
    assert [p.distribution for p in spec.params] == ["log_uniform", "q_uniform", "categorical", "int_uniform",
                                                    "q_log_uniform_values", "normal"]
    rng = np.random.default_rng(0)
    draws = [{p.key: sweeps.sample_random(p, rng) for p in spec.params} for _ in range(300)]
    lrs = [d["train.learning_rate"] for d in draws]
    assert np.exp(-3) <= min(lrs) and max(lrs) <= 1.0
    assert {d["train.weight_decay"] for d in draws} <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {d["train.eval_strategy"] for d in draws} == {"epoch"}  # probability 0 is never drawn
    assert {d["train.epochs"] for d in draws} == {1, 2, 3}
    assert all(d["train.batch_size"] % 8 == 0 and 8 <= d["train.batch_size"] <= 512 for d in draws)
    assert abs(np.mean([d["train.warmup_ratio"] for d in draws]) - 0.05) < 1e-3


@pytest.mark.parametrize("raw, message", [
    ({"method": "hill-climb"}, "method 'hill-climb' is not one of random, grid, bayes"),
    ({"parameters": {"learning_rate": {"distribution": "zipf", "min": 1, "max": 2}}},
     "parameters.learning_rate: unknown distribution 'zipf'"),
    ({"parameters": {"learning_rate": {"distribution": "uniform", "min": 0.1, "max": 0.01}}},
     r"parameters.learning_rate: min \(0.1\) is above max \(0.01\)"),
    ({"parameters": {"dropout": {"values": [0.1, 0.2]}}},
     "parameters.dropout: maps to config key 'train.dropout', which does not exist"),
    ({"parameters": {"model.depth": {"values": [1]}}}, "maps to config key 'model.depth', which does not exist"),
    # keys that do not shape a trial's model: a sweep over them trained identical trials, or sent them elsewhere
    ({"parameters": {"model.name": {"values": ["a", "b"]}}}, "parameters.model.name: model.name cannot be swept: it "
                                                              "names the model every trial's best is published as"),
    ({"parameters": {"dataset.split.seed": {"values": [1, 2]}}},
     "parameters.dataset.split.seed: dataset.split.seed cannot be swept: the trials train on the dataset version the "
     "sweep pins"),
    ({"parameters": {"tracking.dir": {"values": ["a", "b"]}}}, "tracking.dir cannot be swept: it does not change what a "
                                                               "trial trains; a trial's model is shaped by train.. and model.."),
    ({"parameters": {"evaluate.gate.min_accuracy": {"values": [0.5]}}}, "evaluate.gate.min_accuracy cannot be swept"),
    ({"parameters": {"project": {"values": ["x"]}}}, "maps to config key 'train.project', which does not exist"),
    ({"metric": {"name": "train/perplexity", "goal": "minimize"}},
     "metric.name 'train/perplexity' is not logged by the finetune stage; use one of eval/accuracy"),
    ({"method": "grid", "parameters": {"learning_rate": {"distribution": "uniform", "min": 0.1, "max": 0.2}}},
     r"grid search needs value, values, int_uniform or q_uniform for every parameter; \['learning_rate'\] "
     r"\(uniform\) have no grid"),
    ({"method": "grid", "parameters": {"batch_size": {"values": [8, 16], "probabilities": [0.5, 0.5]}}},
     r"parameters.batch_size: probabilities are for random and bayes draws; a grid tries every value"),
    ({"method": "grid", "parameters": {"batch_size": {"distribution": "q_uniform", "min": 8, "max": 8, "q": 8}}},
     r"parameters.batch_size: q_uniform from 8 to 8 by 8 has no value below max"),
    ({"method": "grid", "parameters": {"seed": {"distribution": "int_uniform", "min": 0, "max": 10 ** 6}}},
     r"grid search over 1000001 combinations \(seed 1000001\); at most 10000"),
    ({"parameters": {"train": {"parameters": {"learning_rate": {"values": [1e-3]}}}}},
     r"parameters.train: nested parameters \(`parameters:` inside a parameter\) are not taken; name each swept key "
     r"with dots instead, e.g. `train.learning_rate:` at the top of parameters"),
    ({"early_terminate": {"type": "median"}}, "early_terminate.type must be hyperband"),
    ({"parameters": {"learning_rate": {"min": float("nan"), "max": 0.01}}}, "parameters.learning_rate: min must be a "
                                                                          "finite number"),
    ({"metric": {"name": "val/loss", "target": float("nan")}}, "metric.target must be a finite number"),
    ({"parameters": {"learning_rate": {"distribution": "normal", "mu": 0, "sigma": "wide"}}},
     "parameters.learning_rate: mu and sigma must be numbers"),  # was a TypeError's traceback
    ({"metric": {"name": "val/loss", "goal": "minimize"}, "parameters": {"class_weights": {"values": ["none", "balanced"]}}},
     "a sweep over class_weights cannot rank its trials by val/loss: each trial's validation loss is weighted"),
    ({"metric": {"name": "val/loss", "goal": "minimize"}, "parameters": {"label_smoothing": {"min": 0.0, "max": 0.2}}},
     "a sweep over label_smoothing cannot rank its trials by val/loss: each trial's validation loss is smoothed"),
    ({"metric": {"name": "val/loss", "goal": "minimize"}, "parameters": {"label_smoothing": {"values": [0.0, 0.1]}}},
     "a sweep over label_smoothing cannot rank its trials by val/loss"),
    ({"parameters": {"learning_rate": 0.1}}, r"parameters.learning_rate: expected a mapping \(value, values, distribution"),
    ({"parameters": {"learning_rate": {"values": [0.1], "step": 2}}}, r"parameters.learning_rate: unknown keys \['step'\]"),
    ({"parameters": {"learning_rate": {"distribution": "constant"}}}, "parameters.learning_rate: constant needs value"),
    ({"parameters": {"learning_rate": {"values": []}}}, "parameters.learning_rate: values must be a non-empty list"),
    ({"parameters": {"batch_size": {"values": [8, 16], "probabilities": [0.5]}}},
     "parameters.batch_size: probabilities must be 2 non-negative numbers"),
    ({"parameters": {"batch_size": {"values": [8, 16], "probabilities": [0.5, 0.6]}}},
     "parameters.batch_size: probabilities sum to 1.1, not 1"),
    ({"parameters": {"learning_rate": {"distribution": "uniform", "min": 0.1}}}, "uniform needs min and max"),
    ({"parameters": {"learning_rate": {"min": "small", "max": 0.1}}}, "parameters.learning_rate: min and max must be numbers"),
    ({"parameters": {"epochs": {"distribution": "int_uniform", "min": 1.5, "max": 3}}},
     "parameters.epochs: int_uniform needs integer min and max"),
    ({"parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 0, "max": 0.1}}},
     r"log_uniform_values needs min above 0 \(got 0\)"),
    ({"parameters": {"warmup_ratio": {"distribution": "normal", "mu": 0.1, "sigma": 0}}}, "sigma must be above 0"),
    ({"parameters": {"batch_size": {"distribution": "q_uniform", "min": 8, "max": 64, "q": 0}}}, "q must be a number above 0"),
    ({"parameters": {"learning_rate": {}}}, "parameters.learning_rate: give value, values, min/max or a distribution"),
    ({"controller": "local"}, r"unknown keys \['controller'\]; a sweep config has command, description, early_terminate"),
    ({"metric": {"goal": "maximize"}}, r"metric.name is required \(e.g. metric: \{name: val/loss, goal: minimize\}\)"),
    ({"metric": {"name": "val/loss", "goal": "lower"}}, "metric.goal must be minimize or maximize, not 'lower'"),
    ({"parameters": {}}, "parameters must map at least one parameter name to its values"),
    ({"parameters": {"learning_rate": {"values": [0.1]}, "train.learning_rate": {"values": [0.2]}}},
     r"several parameters set \['train.learning_rate'\]"),
    ({"method": "bayes", "parameters": {"warmup_ratio": {"distribution": "normal", "mu": 0.1, "sigma": 0.05}}},
     r"the offline bayes engine \(Optuna TPE\) needs bounded parameters; \['warmup_ratio'\] are unbounded normals"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 2, "rungs": 3}}, r"early_terminate has unknown keys \['rungs'\]"),
    ({"early_terminate": {"type": "hyperband"}}, "early_terminate needs min_iter or max_iter"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 1}}, "early_terminate.eta must be above 1"),
    ({"early_terminate": {"type": "hyperband", "max_iter": 9}}, "early_terminate with max_iter needs s, the number of "
                                                               "bands below it"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 0}}, "early_terminate.min_iter must be a positive integer"),
    ({"early_terminate": {"type": "hyperband", "min_iter": True}}, "early_terminate.min_iter must be a positive integer"),
    ({"run_cap": 0}, "run_cap must be a positive integer"),
    ({"run_cap": True}, "run_cap must be a positive integer"),  # YAML's `yes` was a cap of 1 trial
])
def test_bad_sweep_configs_are_refused(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(ISSUE_YAML), **raw}))
    with pytest.raises(ConfigError, match=message):
        sweeps.load_sweep(path)


def test_a_bad_sweep_config_is_one_message_before_any_trial(cfg, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(ISSUE_YAML), "parameters": {"dropout": {"values": [0.1, 0.2]}}}))
    c = cfg()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    runs = set((Path(c.tracking.dir) / "wandb").glob("offline-run-*"))  # the dataset's publish
    cli = run_cli("sweep", "--config", str(config), "--sweep", str(path), "--count", "1")
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert f"error: {path}: parameters.dropout: maps to config key 'train.dropout', which does not exist" in cli.stderr
    assert registry(c).list_versions(type="model") == []
    assert set((Path(c.tracking.dir) / "wandb").glob("offline-run-*")) == runs  # no run opened
    assert [r for r in registry(c).list_versions() if r.type == "dataset"]  # only the dataset from the fixture


def test_a_grid_enumerates_int_uniform_and_q_uniform_as_w_and_b_does():
    """W&B's grid search takes int_uniform (min to max) and q_uniform (min, min + q, ... below max: numpy's arange,
    as W&B's own grid builds it) besides values; a sweep file `wandb sweep` runs was refused offline. The points come
    in W&B's order, the product over the parameters sorted by name (not as the file lists them), so a grid cut short
    by --count runs the same points offline as online."""
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss"}, "parameters": {
        "epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
        "batch_size": {"distribution": "q_uniform", "min": 8, "max": 32, "q": 8},
        "warmup_ratio": {"value": 0.1}}})
    grid = spec.grid()
    assert [(g["train.batch_size"], g["train.epochs"]) for g in grid] == [
        (b, e) for b in (8, 16, 24) for e in (1, 2, 3)]
    assert {g["train.warmup_ratio"] for g in grid} == {0.1} and all(type(g["train.batch_size"]) is int for g in grid)


def test_beta_distributions_are_drawn_as_w_and_b_draws_them():
    """W&B's sweep configs take beta and q_beta (a, b; 1 by default); the offline engines refused them as unknown."""
    import numpy as np

    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"}, "parameters": {
        "warmup_ratio": {"distribution": "beta", "a": 2, "b": 5},
        "weight_decay": {"distribution": "q_beta", "q": 0.25}}})
    rng = np.random.default_rng(0)
    draws = [{p.key: sweeps.sample_random(p, rng) for p in spec.params} for _ in range(4000)]
    warmup = [d["train.warmup_ratio"] for d in draws]
    assert all(0 <= w <= 1 for w in warmup) and abs(np.mean(warmup) - 2 / 7) < 0.01  # the mean of beta(2, 5)
    assert {d["train.weight_decay"] for d in draws} == {0.0, 0.25, 0.5, 0.75, 1.0}
    with pytest.raises(ConfigError, match="parameters.warmup_ratio: beta's a and b must be numbers above 0"):
        sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                            "parameters": {"warmup_ratio": {"distribution": "beta", "a": 0}}})


def test_bayes_draws_quantised_values_as_random_does():
    """The offline bayes engine drew q_log_uniform(_values) parameters unquantised (a batch size of 13.65: every
    trial was refused) and q_uniform ones as floats; they are multiples of q, whole numbers when q is, as W&B's."""
    import optuna

    spec = sweeps.parse_sweep({"method": "bayes", "metric": {"name": "val/loss"}, "parameters": {
        "batch_size": {"distribution": "q_log_uniform_values", "min": 8, "max": 64, "q": 8},
        "eval_batch_size": {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8},
        "logging_steps": {"distribution": "q_log_uniform", "min": 0, "max": 4},  # q 1 by default: whole numbers
        "weight_decay": {"distribution": "q_beta", "q": 0.5},
        "warmup_ratio": {"distribution": "q_uniform", "min": 0.0, "max": 0.3, "q": 0.1}}})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    for _ in range(12):
        trial = study.ask()
        drawn = {p.key: sweeps.suggest_bayes(p, trial) for p in spec.params}
        study.tell(trial, float(drawn["train.batch_size"]))
        for key in ("train.batch_size", "train.eval_batch_size"):
            assert type(drawn[key]) is int and drawn[key] % 8 == 0 and 8 <= drawn[key] <= 64, drawn
        assert type(drawn["train.logging_steps"]) is int and 1 <= drawn["train.logging_steps"] <= 55, drawn
        assert isinstance(drawn["train.warmup_ratio"], float) and round(drawn["train.warmup_ratio"] * 10, 6) % 1 == 0
        assert drawn["train.weight_decay"] in (0.0, 0.5, 1.0)
        sweeps.trial_config(load_config(None, ["dataset.name=t", "dataset.source=x.csv", "model.name=m"]), drawn, spec)


@pytest.mark.parametrize("spec", [{"values": [1, 2, 3]}, {"value": 4}, {"distribution": "int_uniform", "min": -2, "max": 5},
                                  {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8},
                                  {"distribution": "q_uniform", "min": 0.0, "max": 0.35, "q": 0.1},
                                  {"distribution": "q_uniform", "min": 1, "max": 10, "q": 3}])
def test_a_grid_is_counted_before_it_is_built_as_it_is_built(spec):
    """The size check (a grid over 10,000 combinations is refused before it is made) counts what the grid makes."""
    [param] = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"seed": spec}}).params
    assert sweeps._grid_size(param) == len(sweeps.grid_values(param)) > 0


def test_class_weights_can_be_searched_when_trials_are_ranked_by_another_metric():
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/macro_f1", "goal": "maximize"},
                               "parameters": {"class_weights": {"values": ["none", "balanced"]}}})
    assert [g["train.class_weights"] for g in spec.grid()] == ["none", "balanced"]
    # one weighting for every trial: their losses compare
    assert sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss"},
                               "parameters": {"class_weights": {"value": "balanced"}}}).params


def test_a_sampled_value_the_config_rejects_is_caught_before_the_first_trial(cfg):
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss"},
                               "parameters": {"batch_size": {"values": [16, 0]}}})
    with pytest.raises(ConfigError, match="train.batch_size: Input should be greater than 0"):
        sweeps.run(cfg(), sweep=spec, count=2)


@pytest.mark.parametrize("method, params, message", [
    ("random", {"batch_size": {"values": [16, 0]}},
     "sweep parameter batch_size (categorical) gives train.batch_size=0, which no trial can train with: Input should "
     "be greater than 0"),
    # min: 8.0 makes it a float range: every draw was a failed trial
    ("random", {"batch_size": {"min": 8.0, "max": 64.0}},
     "got a number with a fractional part (int_uniform, q_uniform with a whole q, or values give whole numbers)"),
    ("bayes", {"learning_rate": {"distribution": "uniform", "min": 0, "max": 0.01}},
     "gives train.learning_rate=0.0, which no trial can train with: Input should be greater than 0"),
    ("random", {"epochs": {"distribution": "int_uniform", "min": 0, "max": 3}}, "gives train.epochs=0"),
    ("random", {"class_weights": {"values": ["none", "heavy"]}},
     "gives train.class_weights='heavy', which no trial can train with: expected none, balanced or {label: weight}"),
])
def test_random_and_bayes_values_the_config_rejects_are_caught_before_the_first_trial(cfg, method, params, message):
    """Listed values, the ends of a range and a few draws are checked: each was a failed trial whenever drawn."""
    c = cfg()
    runs = set((Path(c.tracking.dir) / "wandb").glob("offline-run-*"))
    spec = sweeps.parse_sweep({"method": method, "metric": {"name": "val/macro_f1", "goal": "maximize"}, "parameters": params})
    with pytest.raises(ConfigError, match=re.escape(message)):
        sweeps.run(c, sweep=spec, count=2)
    assert set((Path(c.tracking.dir) / "wandb").glob("offline-run-*")) == runs  # no trial ran
    assert not (Path(c.tracking.dir) / "sweeps").exists()


def test_values_checked_before_a_sweep_may_depend_on_each_other(cfg):
    """eval_strategy=steps needs eval_steps: a problem of the combination, not of either value, is the trial's."""
    c = cfg()
    for params in ({"eval_strategy": {"values": ["epoch", "steps"]}, "eval_steps": {"values": [5, 10]}},
                   {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
                    "batch_size": {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8},
                    "warmup_ratio": {"distribution": "uniform", "min": 0.0, "max": 0.2},
                    "class_weights": {"values": ["none", "balanced", {"billing": 2}]}}):
        spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/macro_f1", "goal": "maximize"},
                                   "parameters": params})
        sweeps.check_values(c, spec)  # no error


def test_a_sweep_trains_on_the_dataset_version_it_is_given(cfg, tmp_path, cli_here):
    import optuna

    # As finetune's --dataset: a sweep on an older version (a golden cut, the data a production model had) while
    # tickets:latest is newer. Before, a sweep could only train on tickets:latest.
    write_tickets(tmp_path / "more.csv", rows=300, seed=11)
    c = cfg("train.max_steps=1")
    assert dataset_publish.run(cfg(f"dataset.source={tmp_path / 'more.csv'}")).produced == ["tickets:v1"]
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003]}}})
    out = sweeps.run(c, sweep=spec, count=1, dataset="tickets:v0")
    assert out.dataset == "tickets:v0" and out.to_stage_result().consumed == ["tickets:v0"]
    assert registry(c).resolve(out.best_model).metadata["dataset"]["ref"] == "tickets:v0"
    with pytest.raises(RefError, match=r"tickets has no version 'v7'; versions: v0, v1"):
        sweeps.run(c, sweep=spec, count=1, dataset="tickets:v7")
    assert len(optuna.get_all_study_summaries(sweeps._storage(c))) == 1  # refused before a sweep was made
    # a sweep keeps the version it started on: another one named when it is resumed is refused
    with pytest.raises(ConfigError, match=rf"^sweep {out.sweep_id} trains on tickets:v0, and --dataset tickets names "
                                          r"tickets:v1; resume it without --dataset, or start a new sweep on tickets:v1$"):
        sweeps.run(c, sweep=spec, count=1, resume=out.sweep_id, dataset="tickets")
    assert sweeps.run(c, sweep=spec, count=1, resume=out.sweep_id, dataset="tickets:v0").dataset == "tickets:v0"
    # --resume auto looks for an interrupted sweep on the version given, as it does for tickets:latest
    assert sweeps._sweep_to_continue(c, spec, sweeps._storage(c), registry(c), 1, None, "tickets:v0")[0] is None
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec.raw))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(c.to_dict()))
    cli = cli_here("sweep", "--config", str(config), "--sweep", str(path), "--count", "1", "--dataset", "tickets:v0",
                   "--result-json", str(tmp_path / "r.json"))
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["consumed"] == ["tickets:v0"]


def test_a_dataset_for_evaluation_only_is_refused_before_the_first_trial(cfg):
    c = cfg("dataset.name=golden", "dataset.split.train=0", "dataset.split.validation=0", "dataset.split.test=1")
    dataset_publish.run(c)
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"batch_size": {"values": [16]}}})
    with pytest.raises(ConfigError, match="golden:v0 has no train rows"):
        sweeps.run(c, sweep=spec, count=1)
    assert registry(c).list_versions(type="model") == [] and not (Path(c.tracking.dir) / "sweeps").exists()


@pytest.mark.parametrize("early_terminate, first", [
    ({"min_iter": 2, "eta": 3}, 2),
    ({"max_iter": 27, "s": 2, "eta": 3}, 3),   # W&B's bands: 27 / 3 = 9, 9 / 3 = 3
    ({"max_iter": 27, "s": 5, "eta": 3}, 1),   # 9, 3, 1, and no band below 1
    ({"max_iter": 10, "s": 1}, 3),             # eta 3 by default: int(10 / 3)
])
def test_hyperband_compares_trials_first_where_w_and_b_s_first_band_is(cfg, early_terminate, first):
    """With max_iter and s, W&B's hyperband puts its bands at max_iter / eta, / eta**2, ...; the offline pruner started
    at evaluation 1 whatever they said."""
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [1e-3]}},
                               "early_terminate": {"type": "hyperband", **early_terminate}})
    assert sweeps._pruner(spec, cfg())._min_resource == first


def test_a_trial_the_pruner_rejects_at_its_last_evaluation_ran_in_full_and_is_complete():
    """Pruning stops a trial early; at the last evaluation there is nothing left to stop."""
    import optuna
    from transformers import TrainerControl, TrainerState

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.9))
    for step, expect_pruned in ((5, True), (10, False)):  # the same weak value mid-way and at the end
        cb = SweepMetricCallback("accuracy", prune_trial=study.ask(), maximize=True)
        state, control = TrainerState(global_step=step, max_steps=10), TrainerControl()
        cb.on_evaluate(None, state, control, metrics={"eval_accuracy": 0.2})
        assert cb.pruned is expect_pruned and control.should_training_stop is expect_pruned


def test_of_two_trials_with_the_same_metric_the_one_with_the_lower_validation_loss_is_best(cfg, tmp_path):
    """A grid on data both learning rates get perfect: the same F1, and the trial with the lower loss is the best
    (the first one used to stay), as between the checkpoints of one trial."""
    c = cfg(f"dataset.source={write_separable_tickets(tmp_path / 'easy.csv')}", "train.epochs=4", "train.batch_size=16")
    dataset_publish.run(c)
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "eval/macro_f1", "goal": "maximize"},
                               "parameters": {"train.learning_rate": {"values": [2e-3, 3e-3]}}})
    result = sweeps.run(c, sweep=spec, count=2)
    first, second = result.trials
    assert first.value == second.value == 1.0 and first.loss > second.loss  # the case this is about
    assert result.best.number == second.number
    assert result.best.to_dict()["loss"] == second.loss
    # the sweep run's table of trials shows the loss beside the metric
    table_ref = inspect_summary(Path(result.run_dir))["summary"]["sweep/trials"]
    table = json.loads((Path(result.run_dir) / "files" / table_ref["path"]).read_text())
    assert table["columns"][:4] == ["trial", "state", "eval/macro_f1", "validation_loss"]
    assert [row[3] for row in table["data"]] == pytest.approx([first.loss, second.loss])
    kept = json.loads((registry(c).fetch(registry(c).resolve(result.best_model)).path / "training_config.json").read_text())
    assert kept["train"]["learning_rate"] == 3e-3  # the model published is that trial's


class MoveAlias(TrainerCallback):
    """Moves `alias` of `name` to the newest version when the first trial this object sees ends."""

    def __init__(self, reg: LocalRegistry, name: str, alias: str):
        self.reg, self.name, self.alias, self.done = reg, name, alias, False

    def on_train_end(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            newest = max(self.reg.list_versions(name=self.name), key=lambda v: v.version)
            self.reg.set_alias(newest.ref, self.alias)


def test_a_base_model_alias_is_pinned_for_the_whole_sweep(cfg):
    from pipeline.stages import finetune

    c = cfg()
    reg = registry(c)
    finetune.run(c, aliases=("production",))  # clf:v0
    finetune.run(cfg("train.seed=7"))  # clf:v1, which the alias moves to during the sweep
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
                               "parameters": {"learning_rate": {"values": [0.001, 0.002]}}})
    out = sweeps.run(cfg("model.base=clf:production"), sweep=spec, count=2, publish_trials=True,
                     callbacks=(MoveAlias(reg, "clf", "production"),))
    assert reg.resolve("clf:production").ref == "clf:v1"  # it moved after trial 0
    bases = [reg.resolve(t.produced[0]).metadata["base_model"]["id"] for t in out.trials]
    assert bases == ["clf:v0", "clf:v0"]
    assert [reg.get_run(t.run_id)["consumed"] for t in out.trials] == [["tickets:v0", "clf:v0"]] * 2


class FakeSweepServer:
    """What `run_online` gets from W&B's sweep server, which these machines cannot reach: a sweep id from
    `wandb.sweep`, and `wandb.agent` handing each trial its parameters through the run `wandb.init` opens. The trials
    are real (offline W&B runs, tiny models, the local registry). `between[(agent, k)]` runs after that agent's
    trial k: what another process does meanwhile."""

    def __init__(self, monkeypatch, sweep_id: str, plan: dict[str, list[float]]):
        import wandb

        self.sweep_id, self.plan, self.between, self.started = sweep_id, plan, {}, []
        self.sweeps: dict[str, dict] = {}  # sweep id -> {"config": as W&B keeps it, "runs": each run's config}
        self._params: list[dict] = []
        self._opened = []
        self.errors: list[Exception] = []  # what the runs' functions raised
        init = wandb.init
        server = self

        class Api:  # the public API's sweep lookup, for a sweep resumed by id
            default_entity = "me"

            def sweep(self, path):
                found = server.sweeps.get(path.rsplit("/", 1)[-1])
                if found is None:
                    raise wandb.errors.CommError(f"Could not find sweep {path}")
                return type("Sweep", (), {"config": found["config"],
                                          "runs": [type("Run", (), {"config": r})() for r in found["runs"]]})()

        def init_with_params(*args, **kwargs):
            if self._params:  # the trial's run: the agent's parameters in its config, as W&B sets them
                kwargs["config"] = self._params.pop()
                self._opened.append(init(*args, **kwargs))
                return self._opened[-1]
            return init(*args, **kwargs)

        def sweep(raw, project=None, entity=None):
            self.sweeps[self.sweep_id] = {"config": raw, "runs": []}
            return self.sweep_id

        monkeypatch.setattr(wandb, "init", init_with_params)
        monkeypatch.setattr(wandb, "sweep", sweep)
        monkeypatch.setattr(wandb, "agent", self.agent)
        monkeypatch.setattr(wandb, "Api", Api)

    def agent(self, sweep_id, function, count, project=None, entity=None):
        """As W&B's in-process agent: each run's function on a thread of its own, its exception caught and logged."""
        import threading

        import wandb

        assert sweep_id in self.sweeps
        name = f"agent{len(self.started)}"
        self.started.append(name)
        for k, lr in enumerate(self.plan[name][:count]):
            self._params.append({"learning_rate": lr})

            def job():
                try:
                    wandb.teardown()  # as W&B's agent does before each run: the run starts from W&B's default settings
                    function()
                except Exception as e:  # noqa: BLE001 - the agent's own handling: the run errored (or was stopped)
                    self.errors.append(e)

            thread = threading.Thread(target=job)
            thread.start()
            thread.join()
            self.sweeps[sweep_id]["runs"].append(dict(self._opened[-1].config))  # what the trial's run recorded
            self.between.get((name, k), lambda: None)()


def test_online_agents_of_one_sweep_on_one_machine_keep_and_publish_their_own_best(cfg, tmp_path, monkeypatch, caplog):
    """Several agents of one W&B sweep on one machine (one per GPU, as W&B suggests) share the tracking folder: each
    keeps its trials' models in a folder of its own, so one never removes or publishes another's, and an agent
    whose process was killed has its best model published by the next agent to start."""
    c = cfg(f"dataset.source={write_separable_tickets(tmp_path / 'easy.csv')}", "train.epochs=2", "train.batch_size=16")
    dataset_publish.run(c)
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003, 1e-7]}}})
    # agent0: a trial that learns, then one with a value the config refuses (it fails: no model; W&B hands it out,
    # the sweep file does not list it, as the file is checked before any trial). agent1, started
    # while agent0 runs, after a third agent was killed holding a copy of agent0's best: a trial that learns nothing.
    server = FakeSweepServer(monkeypatch, "swp00001", {"agent0": [0.003, -1.0], "agent1": [1e-7]})
    sweeps_dir = Path(c.tracking.dir) / "sweeps"
    seen = {}

    def meanwhile():
        [mine] = sweeps_dir.glob("swp00001.agent-*")
        seen["agent0"] = json.loads((mine / "best" / "trial.json").read_text())
        killed = sweeps_dir / "swp00001.agent-killed0"
        shutil.copytree(mine, killed)  # its lock is free: no process holds the copy
        (killed / "trial-7" / "model").mkdir(parents=True)  # a trial's model cut off while it was being kept
        with caplog.at_level("INFO", logger="pipeline.sweep"):
            seen["agent1"] = sweeps.run_online(c, sweep=spec, count=1)
        assert not killed.exists() and mine.is_dir() and (mine / "best" / "model").is_dir()  # agent0's best is still there

    server.between[("agent0", 0)] = meanwhile
    first = sweeps.run_online(c, sweep=spec, count=2)
    second = seen["agent1"]
    assert server.started == ["agent0", "agent1"]
    assert "publishing the best model (trial 0) of an agent whose process was killed" in caplog.text

    reg = registry(c)
    versions = {v.ref: v for v in reg.list_versions(type="model")}
    # the killed agent's best (a copy of agent0's trial 0) was published by agent1 as it started
    [killed_ref] = [r for r, v in versions.items() if v.metadata["training"]["run_id"] == seen["agent0"]["run_id"]]
    assert [(t.params, t.state) for t in first.trials] == [({"train.learning_rate": 0.003}, "complete"),
                                                           ({"train.learning_rate": -1.0}, "failed")]
    # agent0 kept its own best through agent1's run: the same model, so the version published from the copy
    assert first.best.run_id == seen["agent0"]["run_id"] and first.best_model == killed_ref
    # each published version is the model of the trial its metadata names
    for v in versions.values():
        assert v.metadata["config"]["train"]["learning_rate"] == v.metadata["sweep"]["params"]["train.learning_rate"]
    # the sweep's best is the better of the agents' bests, whichever ended last
    best = reg.resolve("clf:sweep-swp00001-best")
    assert best.metadata["sweep"]["value"] == min(first.best.value, second.trials[0].value)
    assert "candidate" in best.aliases
    assert not list(sweeps_dir.glob("*"))  # every agent's folder went with it
    # the trial whose parameters the config refused: the run the agent opened for it is closed as failed, and says why
    [run_dir] = Path(c.tracking.dir).glob(f"wandb/offline-run-*-{first.trials[1].run_id}")
    recorded = inspect_summary(run_dir)
    assert recorded["state"] == "failed" and recorded["exit_code"] == 1
    assert "train.learning_rate" in recorded["summary"]["sweep/error"] and recorded["summary"]["sweep/trial"] == 1


def test_online_agents_that_publish_their_trials_tag_the_better_best_whichever_ends_last(cfg, tmp_path, monkeypatch):
    """With --publish-trials each trial publishes its own version. An agent that ends after another, or a call resumed
    by id, sees only its own trials: its best gets the sweep's aliases only if it beats the version that has them."""
    c = cfg(f"dataset.source={write_separable_tickets(tmp_path / 'easy.csv')}", "train.epochs=2", "train.batch_size=16")
    dataset_publish.run(c)
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003, 1e-7]}}})
    server = FakeSweepServer(monkeypatch, "swp00002", {"agent0": [1e-7], "agent1": [0.003]})
    seen = {}
    server.between[("agent0", 0)] = lambda: seen.update(agent1=sweeps.run_online(c, sweep=spec, count=1, publish_trials=True))
    first = sweeps.run_online(c, sweep=spec, count=1, publish_trials=True)  # ends after agent1, with the worse trial
    second = seen["agent1"]
    assert second.best.value < first.trials[0].value  # the case this is about: the agent that ends last has the worse
    assert first.best_model == second.best_model == second.trials[0].produced[0]
    tagged = registry(c).resolve("clf:sweep-swp00002-best")
    assert tagged.ref == second.best_model and "candidate" in tagged.aliases
    assert tagged.metadata["sweep"]["value"] == second.best.value  # what the next agent compares with
    assert tagged.metadata["sweep"]["params"] == {"train.learning_rate": 0.003}
    assert registry(c).resolve(first.trials[0].produced[0]).aliases == []  # agent0's own trial: published, not tagged


def test_an_online_sweep_resumed_by_id_trains_on_its_pinned_data_with_the_sweep_file_it_started_with(cfg, monkeypatch,
                                                                                                     tmp_path, assets):
    c = cfg("train.max_steps=1")
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003]}}})
    server = FakeSweepServer(monkeypatch, "swp00004", {"agent0": [0.003]})
    # started elsewhere (another machine's agent) on tickets:v0, two runs ago; the data has a newer version since
    trained = {**c.to_dict(), "learning_rate": 0.003, sweeps.DATASET_PARAM: "tickets:v0"}  # a trial's run's config
    server.sweeps["swp00003"] = {"config": {**spec.raw, "parameters": {**spec.raw["parameters"],
                                                                       sweeps.DATASET_PARAM: {"value": "tickets:v0"}}},
                                 "runs": [{"learning_rate": 0.003}, trained]}  # the first failed before finetune
    shutil.copy(assets[1], tmp_path / "more.csv")
    with open(tmp_path / "more.csv", "a") as f:
        f.write("new-1,my parcel is lost again,shipping\n")
    assert dataset_publish.run(cfg(f"dataset.source={tmp_path / 'more.csv'}")).produced == ["tickets:v1"]

    with pytest.raises(RefError, match=r"^no W&B sweep me/support-intents/nope: Could not find sweep"):
        sweeps.run_online(c, sweep=spec, count=1, resume="nope")
    other = sweeps.parse_sweep({**spec.raw, "metric": {"name": "eval/accuracy", "goal": "maximize"},
                                "parameters": {**spec.raw["parameters"], "batch_size": {"values": [8]}}})
    with pytest.raises(ConfigError, match=r"^W&B sweep me/support-intents/swp00003 was started with another sweep "
                                          r"config: parameters learning_rate in W&B, batch_size, learning_rate in the "
                                          r"sweep file; metric val/loss \(minimize\) in W&B, eval/accuracy \(maximize\)"):
        sweeps.run_online(c, sweep=other, count=1, resume="swp00003")
    server.sweeps["foreign"] = {"config": spec.raw, "runs": []}  # made with `wandb sweep`, not by the pipeline
    with pytest.raises(ConfigError, match=r"was not started by `pipeline sweep` \(its config has no pipeline_dataset"):
        sweeps.run_online(c, sweep=spec, count=1, resume="foreign")
    # the settings outside the swept parameters must be those its trials trained with, as offline
    with pytest.raises(ConfigError, match=r"^cannot resume W&B sweep me/support-intents/swp00003: the config differs "
                                          r"from the one its trials trained with in train.weight_decay \(0.01 -> 0.2\)"):
        sweeps.run_online(cfg("train.max_steps=1", "train.weight_decay=0.2", "train.learning_rate=0.1"), sweep=spec,
                          count=1, resume="swp00003")  # (the swept learning rate may differ)
    with pytest.raises(ConfigError, match=r"^sweep me/support-intents/swp00003 trains on tickets:v0, and --dataset "
                                          r"tickets names tickets:v1; resume it without --dataset"):
        sweeps.run_online(c, sweep=spec, count=1, resume="swp00003", dataset="tickets")
    assert server.started == [] and not (Path(c.tracking.dir) / "sweeps").exists()  # refused before any trial

    out = sweeps.run_online(c, sweep=spec, count=1, resume="swp00003")
    assert out.dataset == "tickets:v0" and [t.number for t in out.trials] == [2]  # after the sweep's two runs
    assert registry(c).resolve(out.best_model).metadata["dataset"]["ref"] == "tickets:v0"
    # a new sweep on a version named (--dataset), not tickets:latest: W&B's sweep config pins it
    server.plan["agent1"] = [0.003]
    assert sweeps.run_online(c, sweep=spec, count=1, dataset="tickets:v0").dataset == "tickets:v0"
    assert server.sweeps["swp00004"]["config"]["parameters"][sweeps.DATASET_PARAM] == {"value": "tickets:v0"}


class StoppedByAgent(TrainerCallback):
    """What W&B's agent does to a run it stops (hyperband, or Stop in its UI): a bare Exception raised in the thread
    running the trial, here at its first step."""

    def __init__(self):
        self.fired = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired:
            self.fired = True
            raise Exception  # noqa: TRY002 - exactly what the agent raises


def test_an_online_trial_s_run_carries_the_tags_every_stage_run_has(cfg, monkeypatch):
    """A trial's run is the one W&B's agent opens (adopted, not opened by the stage): it got neither the stage's
    `sweep` tag nor `tracking.tags` nor WANDB_TAGS, which an offline trial's run and every other stage run carry."""
    monkeypatch.setenv("WANDB_TAGS", "nightly")
    c = cfg("train.max_steps=2", "tracking.tags=[team-a]")
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003]}}})
    FakeSweepServer(monkeypatch, "swp00006", {"agent0": [0.003]})
    out = sweeps.run_online(c, sweep=spec, count=1)
    [run_dir] = Path(c.tracking.dir).glob(f"wandb/offline-run-*-{out.trials[0].run_id}")
    assert inspect_summary(run_dir)["tags"] == ["team-a", "nightly", "sweep"]


def test_an_online_trial_the_agent_stops_is_failed_leaves_nothing_and_the_agent_goes_on(cfg, monkeypatch):
    c = cfg("train.max_steps=2")
    spec = sweeps.parse_sweep({"method": "random", "metric": {"name": "val/loss"},
                               "parameters": {"learning_rate": {"values": [0.003, 0.001]}}})
    server = FakeSweepServer(monkeypatch, "swp00005", {"agent0": [0.003, 0.001]})
    out = sweeps.run_online(c, sweep=spec, count=3, callbacks=(StoppedByAgent(),))
    assert [type(e) for e in server.errors] == [Exception]  # the agent got it, and went on with the next run
    assert out.stop_reason == "W&B's agent ended after 2 of 3 trials"  # W&B had no third run for it
    assert [(t.number, t.state) for t in out.trials] == [(0, "failed"), (1, "complete")]
    assert out.trials[0].run_id and out.trials[0].run_id != out.trials[1].run_id
    assert out.best.number == 1 and out.best_model == "clf:v0"
    assert registry(c).resolve("clf:v0").metadata["sweep"]["params"] == {"train.learning_rate": 0.001}
    assert not (Path(c.tracking.dir) / "sweeps").exists() and not list(Path(c.tracking.dir).glob("checkpoints/*/*"))
    [run_dir] = Path(c.tracking.dir).glob(f"wandb/offline-run-*-{out.trials[0].run_id}")
    assert inspect_summary(run_dir)["state"] == "failed"
    # the agent's runs get the pipeline's W&B settings, as every other run: no console capture (it could copy a
    # secret from the output into a file W&B uploads), no machine metadata
    for trial in out.trials:
        [run_dir] = Path(c.tracking.dir).glob(f"wandb/offline-run-*-{trial.run_id}")
        files = {p.name for p in (run_dir / "files").iterdir()}
        assert "output.log" not in files and "wandb-metadata.json" not in files, files


def test_a_sweep_under_a_launcher_is_refused_before_it_starts(tmp_path):
    """A sweep trains each trial in one process. Under torchrun (the environment it gives each process, here the main
    one's) each process started a sweep of its own, and one ended in a traceback from their shared catalog."""
    from tests.conftest import REPO, run_cli

    data = tmp_path / "t.csv"
    data.write_text("text,label\nhello,a\n", encoding="utf-8")
    refused = run_cli("sweep", "--config", str(REPO / "configs" / "demo.yaml"), "--sweep",
                      str(REPO / "configs" / "sweep.yaml"), "--count", "1", "--set", f"tracking.dir={tmp_path / 'track'}",
                      "--set", f"dataset.source={data}", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: a sweep trains each trial in one process, but a launcher (torchrun, accelerate launch, mpirun) started "
        "this one as one of 2, each of which would run a sweep of its own: start it with `python -m pipeline sweep "
        "...`. To run trials side by side, run an online sweep's agents side by side (`sweep --resume SWEEP_ID` in "
        "each, one per GPU with CUDA_VISIBLE_DEVICES)")
    assert not (tmp_path / "track").exists()
