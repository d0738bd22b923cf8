"""reproduce a model from its version, and lineage over a publish -> finetune -> evaluate -> deploy chain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import reproduce
from pipeline.config import load_config
from pipeline.errors import ConfigError, RefError
from pipeline.lineage import build, render
from pipeline.registry.local import LocalRegistry
from pipeline.runner import run_all
from tests.conftest import inspect_summary, offline, reg_runs, run_cli
from tests.tiny import write_tickets, write_tiny_custom_code_model, write_tiny_model

TRAIN = ["train.epochs=4", "train.batch_size=16", "train.learning_rate=3e-3", "train.warmup_ratio=0",
         "train.misclassified_rows=2",
         "evaluate.gate.better_than_chance=false"]  # a tiny model trained for seconds: its lineage is what matters


def overrides(root: Path, model_dir: Path, csv: Path) -> list[str]:
    return ["dataset.name=tickets", f"dataset.source={csv}", "model.name=clf", f"model.base={model_dir}",
            "model.max_length=64", f"tracking.dir={root / 'track'}", f"deploy.dir={root / 'deploy'}", *TRAIN]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """publish -> finetune -> evaluate -> deploy-fetch, once: tickets:v0, clf:v0 in production."""
    root = tmp_path_factory.mktemp("chain")
    model_dir = write_tiny_model(root / "bert")
    csv = write_tickets(root / "tickets.csv", rows=240)
    with offline(root):
        result = run_all(load_config(None, overrides(root, model_dir, csv)))
    assert result.status == "ok"
    return root, model_dir, csv, result


@pytest.fixture
def env(chain, tmp_path):
    root, model_dir, csv, result = chain
    shutil.copytree(root / "track", tmp_path / "track", ignore=shutil.ignore_patterns("wandb", "artifacts", "cache"))

    def cfg(*extra: str):
        return load_config(None, [*overrides(tmp_path, model_dir, csv), *extra])

    return cfg, result


def registry(cfg) -> LocalRegistry:
    return LocalRegistry(Path(cfg.tracking.dir) / "registry")


def test_cpu_reproduction_is_exact_and_keeps_one_version(env):
    make, _ = env
    cfg = make()
    result = reproduce.run(cfg, model="clf:v0", check=True)
    d = result.details
    assert result.status == "ok" and d["matches"] and d["same_weights"]
    assert result.produced == ["clf:v0"] and [v.ref for v in registry(cfg).list_versions(type="model")] == ["clf:v0"]
    assert "bit for bit" in result.message and "registry kept one version" in result.message
    assert d["config_diff"] == {} and d["dataset"]["same"] and d["base_model"]["same"]
    assert d["test"]["predictions_differ"] == 0 and d["test"]["max_abs_probability_delta"] == 0.0
    assert all(v["delta"] == 0.0 for v in d["validation_metrics"].values()) and d["validation_metrics"]
    run = registry(cfg).get_run(result.run_id)
    assert run["job_type"] == "finetune" and run["summary"]["reproduces"] == "clf:v0"
    assert run["consumed"] == ["tickets:v0"]  # the exact recorded version, not latest
    # the original records that it was rebuilt, and how closely: `artifacts show` and lineage tell it
    [record] = registry(cfg).resolve("clf:v0").metadata["reproductions"]
    assert {k: record[k] for k in ("run", "version", "same_digest", "matches", "max_abs_metric_delta",
                                   "test_predictions_differ")} == {
        "run": result.run_id, "version": "clf:v0", "same_digest": True, "matches": True, "max_abs_metric_delta": 0.0,
        "test_predictions_differ": 0}
    text = render(build(registry(cfg), "clf:v0"), "text").splitlines()
    assert text[text.index("reproduced (reproduce)") + 1] == (f"└─ run {result.run_id}  {record['at'][:19]}  clf:v0: bit for "
                                                            "bit (same digest)")


def test_a_model_whose_training_a_sweep_s_pruner_stopped_is_rebuilt_stopping_where_it_stopped(env, monkeypatch):
    """A hyperband sweep stops a trial at an evaluation (`SweepMetricCallback`), and a stopped trial can be the sweep's
    best model: nothing in its config says so. Rebuilt from its config, it trained every step and differed from the
    model it reproduces. The version records the step its training stopped at, and the rebuild stops there too."""
    from transformers import TrainerCallback

    from pipeline.stages import finetune

    class Pruner(TrainerCallback):  # as a sweep's hyperband pruner stops a trial: after an evaluation
        def on_evaluate(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                control.should_training_stop = True

    from pipeline import provenance

    monkeypatch.setattr(provenance, "code_version", lambda: {"git_commit": "a" * 40, "git_dirty": False})  # clean
    make, _ = env
    cfg = make()
    stopped = finetune.run(cfg, callbacks=(Pruner(),))
    reg = registry(cfg)
    training = reg.resolve(stopped.produced[0]).metadata["training"]
    assert stopped.produced == ["clf:v1"] and stopped.details["stopped_early"]
    assert 0 < training["stopped_at_step"] < training["max_steps"]
    rebuilt = reproduce.run(cfg, model="clf:v1", check=True)
    assert rebuilt.status == "ok" and rebuilt.details["same_digest"] and rebuilt.produced == ["clf:v1"]
    assert rebuilt.details["stopped_at_step"] == training["stopped_at_step"]
    assert reg.resolve("clf:v0").metadata["training"].get("stopped_at_step") is None  # trained every step
    # and it is not what this config trains: it records no input signature, so a finetune of this config that reuses
    # a version trained from the same inputs trains (and gives clf:v0's bytes), rather than reuse the stopped clf:v1
    assert "input_signatures" not in reg.resolve("clf:v1").metadata
    again = finetune.run(cfg, reuse=True)
    assert not again.details.get("reused") and again.produced == ["clf:v0"]
    # rebuilt on purpose with another schedule (more epochs), the step it stopped at is another point of it: the
    # rebuild trains every step of its own, as it asked
    longer = reproduce.run(cfg, model="clf:v1", overrides=("train.epochs=5",))
    made = reg.resolve(longer.produced[0]).metadata["training"]
    assert longer.details["stopped_at_step"] is None and made.get("stopped_at_step") is None
    steps = inspect_summary(Path(longer.paths["run_dir"]))["summary"]["train/global_step"]
    assert longer.produced == ["clf:v2"] and steps == training["max_steps"] * 5 // 4


def test_a_cpu_model_is_rebuilt_with_the_threads_it_was_trained_with(env):
    """On the CPU the number of threads decides how each sum is split, so a model trained with one thread and rebuilt
    with two differs in the last bit of its weights (1.2e-7 on a tiny model): `reproduce` on a machine with more
    cores than the one that trained it was never bit for bit. The version records the threads, and the rebuild uses
    as many."""
    import torch

    from pipeline.stages import finetune

    make, _ = env
    cfg = make("train.seed=7")  # another model than the chain's
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trained = finetune.run(cfg)
        assert registry(cfg).resolve(trained.produced[0]).metadata["training"]["threads"] == 1
        torch.set_num_threads(2)  # a machine with more cores
        rebuilt = reproduce.run(cfg, model=trained.produced[0], check=True)
        assert torch.get_num_threads() == 2  # as it was
    finally:
        torch.set_num_threads(before)
    assert rebuilt.details["same_digest"] and rebuilt.produced == trained.produced


def test_a_bit_for_bit_reproduction_says_that_latest_is_back_on_the_original(env, tmp_path):
    """Publishing an older version's bytes again puts `latest` on it, as on W&B: a reproduction of clf:v0 made
    clf:latest, which `model.base: clf:latest` trains from, the old model without a word. It is said now."""
    make, _ = env
    cfg = make()
    reg = registry(cfg)
    v0 = reg.resolve("clf:v0")
    newer = tmp_path / "newer"
    shutil.copytree(reg.fetch(v0).path, newer)
    (newer / "README.md").write_text("another card\n")
    reg.publish("clf", "model", newer, metadata=v0.metadata)
    assert reg.resolve("clf:latest").ref == "clf:v1"
    result = reproduce.run(cfg, model="clf:v0")
    assert result.message.endswith("reproduces clf:v0 bit for bit: same digest, so the registry kept one version; "
                                   "clf:latest is clf:v0 again (it was clf:v1)")
    assert reg.resolve("clf:latest").ref == "clf:v0"


def test_a_relative_base_folder_is_the_one_it_was_when_reproduced_from_another_directory(chain, tmp_path, monkeypatch):
    from pipeline.stages import dataset_publish, finetune

    _, model_dir, csv, _ = chain
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(model_dir, project / "models" / "bert")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    cfg = load_config(None, [*overrides(tmp_path, Path("models/bert"), csv), "train.epochs=1"])  # written relative
    dataset_publish.run(cfg)
    trained = finetune.run(cfg)
    assert registry(cfg).resolve(trained.produced[0]).metadata["base_model"]["id"] == str(project / "models" / "bert")

    monkeypatch.chdir(elsewhere)  # where models/bert is nothing
    result = reproduce.run(cfg, model=trained.produced[0], check=True)
    assert result.status == "ok" and result.details["same_weights"] and result.details["config_diff"] == {}
    assert result.details["base_model"]["id"] == str(project / "models" / "bert") and result.details["base_model"]["same"]
    # --set model.base=... on purpose is that base, resolved here
    with pytest.raises(ConfigError, match=r"model.base='./models/bert': no such folder \({}\)".format(elsewhere / "models" / "bert")):
        reproduce.run(cfg, model=trained.produced[0], overrides=("model.base=./models/bert",))


def test_a_renamed_rebuild_has_the_same_weights_in_a_new_version(env):
    make, _ = env
    cfg = make()
    result = reproduce.run(cfg, model="clf:v0", overrides=("model.name=renamed",), check=True)
    d = result.details
    assert result.status == "ok" and result.produced == ["renamed:v0"]
    assert d["same_weights"] and not d["same_digest"] and d["test"]["predictions_differ"] == 0
    assert "model.safetensors" not in d["files_differ"] and "training_config.json" in d["files_differ"]
    assert d["config_diff"] == {"model.name": {"original": "clf", "reproduction": "renamed"}}
    assert "has the same weights as clf:v0, bit for bit; other files differ (" in result.message
    reg = registry(cfg)
    weights = {v: next(f.digest for f in reg.resolve(v).files if f.path == "model.safetensors") for v in ("clf:v0", "renamed:v0")}
    assert weights["clf:v0"] == weights["renamed:v0"]


def test_changed_config_is_reported_and_check_fails(env, tmp_path, cli_here):
    make, _ = env
    cfg = make()
    result = reproduce.run(cfg, model="clf:v0", overrides=("train.learning_rate=0.01",), check=True)
    assert result.status == "failed" and not result.details["matches"]
    assert result.details["config_diff"] == {"train.learning_rate": {"original": 0.003, "reproduction": 0.01}}
    assert result.produced == ["clf:v1"] and "differs from clf:v0" in result.message
    assert registry(cfg).resolve("clf:production").ref == "clf:v0"  # a reproduction moves no alias but latest
    [record] = registry(cfg).resolve("clf:v0").metadata["reproductions"]
    assert (record["version"], record["same_digest"], record["matches"]) == ("clf:v1", False, False)
    line = render(build(registry(cfg), "clf:v0"), "text").splitlines()[-1]
    assert line.startswith(f"└─ run {result.run_id}  ") and line.endswith(
        f"clf:v1: differs (largest metric difference {record['max_abs_metric_delta']:.4g}; "
        f"{record['test_predictions_differ']} of {result.details['test']['rows']} test predictions differ)")
    assert json.loads(render(build(registry(cfg), "clf:v0"), "json"))["reproductions"] == [record]
    # the command line: exit 1 under --check, and the result file carries every comparison
    cli = cli_here("reproduce", "clf:v0", "--check", "--set", f"tracking.dir={cfg.tracking.dir}", "--set", "train.seed=9",
                  "--result-json", str(tmp_path / "r.json"))
    assert cli.returncode == 1, cli.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "failed" and data["details"]["config_diff"]["train.seed"] == {"original": 42, "reproduction": 9}
    assert {"dataset", "base_model", "code", "packages_differ", "validation_metrics", "test", "warnings"} <= set(data["details"])
    assert [r["run"] for r in registry(cfg).resolve("clf:v0").metadata["reproductions"]] == [result.run_id, data["run_id"]]


def test_missing_inputs_are_named_and_nothing_is_published(env):
    make, _ = env
    cfg = make()
    reg = registry(cfg)
    with pytest.raises(RefError, match="tickets:v0 is a 'dataset' artifact; reproduce takes a model version"):
        reproduce.run(cfg, model="tickets:v0")
    dataset = reg.resolve("clf:v0").metadata["dataset"]
    reg.update_metadata("clf:v0", {"dataset": {**dataset, "ref": "tickets:v5"}})
    with pytest.raises(RefError, match="clf:v0 was trained on tickets:v5, which is gone: tickets has no version 'v5'"):
        reproduce.run(cfg, model="clf:v0")
    reg.update_metadata("clf:v0", {"dataset": dataset})
    meta = reg.resolve("clf:v0").metadata
    recorded = meta["config"]
    reg.update_metadata("clf:v0", {"config": {**recorded, "model": {**recorded["model"], "base": "/gone/bert"}},
                                   "base_model": {**meta["base_model"], "id": "/gone/bert"}})  # a base folder since deleted
    with pytest.raises(ConfigError, match=r"the base model clf:v0 recorded \(/gone/bert\) cannot be found: "
                                          "model.base='/gone/bert': no such folder"):
        reproduce.run(cfg, model="clf:v0")
    assert [v.ref for v in reg.list_versions(type="model")] == ["clf:v0"]
    with pytest.raises(RefError, match="no artifact named 'nothing'"):
        reproduce.run(cfg, model="nothing:v0")


def test_inputs_that_are_other_bytes_now_are_refused_before_a_run_opens(env, caplog):
    """A dataset version or a base model folder whose files changed since cannot give the model back: reproduce
    says which and stops before training (no run, no version, `latest` where it was), as it says when one is
    gone. `--set model.base=...` rebuilds from another base on purpose: then the difference is a warning."""
    from pipeline.errors import PipelineError

    make, _ = env
    cfg = make()
    reg = registry(cfg)
    meta = reg.resolve("clf:v0").metadata
    runs = len(reg_runs(reg))
    reg.update_metadata("clf:v0", {"dataset": {**meta["dataset"], "digest": "d" * 64}})
    with pytest.raises(PipelineError, match=r"tickets:v0 has digest \w{12} now, but clf:v0 was trained on dddddddddddd"):
        reproduce.run(cfg, model="clf:v0")
    reg.update_metadata("clf:v0", {"dataset": meta["dataset"],
                                   "base_model": {**meta["base_model"], "digest": "b" * 64}})  # its files changed
    base = meta["base_model"]["id"]
    with pytest.raises(PipelineError) as refused:
        reproduce.run(cfg, model="clf:v0")
    assert f"the base model {base} has other files now (digest " in str(refused.value)
    assert "but clf:v0 was trained from bbbbbbbbbbbb" in str(refused.value)
    assert "--set model.base=" in str(refused.value)
    assert [v.ref for v in reg.list_versions(type="model")] == ["clf:v0"] and len(reg_runs(reg)) == runs
    assert reg.resolve("clf:latest").ref == "clf:v0"
    rebuilt = reproduce.run(cfg, model="clf:v0", overrides=(f"model.base={base}",))  # on purpose: warned, rebuilt
    assert rebuilt.produced and any("different files now" in w for w in rebuilt.details["warnings"])
    assert rebuilt.details["base_model"]["same"] is False


def test_a_hub_base_is_rebuilt_from_the_commit_it_was_trained_from(tmp_path, monkeypatch):
    """A hub model moves on (a new commit: a tokenizer setting edited, weights uploaded again). The version records
    the commit its base was at, and `reproduce` takes that commit again, not the newest. (The hub here is a local
    Hugging Face cache, offline, as a machine that downloaded both commits has it.)"""
    from huggingface_hub import constants

    from pipeline.stages import dataset_publish, finetune

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--someorg--tiny-bert"
    then, later = "a" * 40, "b" * 40
    write_tiny_model(repo / "snapshots" / then)
    shutil.copytree(repo / "snapshots" / then, repo / "snapshots" / later)
    config = json.loads((repo / "snapshots" / later / "config.json").read_text())
    (repo / "snapshots" / later / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(then)
    cfg = load_config(None, overrides(tmp_path, "someorg/tiny-bert", write_tickets(tmp_path / "tickets.csv", rows=240)))
    dataset_publish.run(cfg)
    trained = finetune.run(cfg)
    base = registry(cfg).resolve(trained.produced[0]).metadata["base_model"]
    assert (base["source"], base["id"], base["revision"]) == ("hub", "someorg/tiny-bert", then)
    (repo / "refs" / "main").write_text(later)  # the hub moved on
    assert finetune.plan(cfg).base.revision == later  # what a new training takes
    rebuilt = reproduce.run(cfg, model=trained.produced[0], check=True)
    assert rebuilt.details["same_digest"] and rebuilt.details["base_model"]["same"]

    # and an interrupted run goes on from the commit it began from, not the newest
    from tests.test_finetune import StopAt

    (repo / "refs" / "main").write_text(then)
    steps = load_config(None, [*overrides(tmp_path, "someorg/tiny-bert", tmp_path / "tickets.csv"),
                               "train.eval_strategy=steps", "train.eval_steps=5"])
    with pytest.raises(KeyboardInterrupt):
        finetune.run(steps, callbacks=(StopAt(7),))
    (repo / "refs" / "main").write_text(later)
    resumed = finetune.plan(steps, resume="latest")
    assert resumed.resume_from is not None and resumed.base.revision == then


def test_lineage_in_three_formats(env):
    make, result = env
    cfg = make()
    reg = registry(cfg)
    runs = {s.stage: s.run_id for s in result.stages}
    g = build(reg, "clf:production")
    assert g.root == "clf:v0"
    data = json.loads(render(g, "json"))
    kinds = {(e["from"], e["to"]): e["kind"] for e in data["edges"]}
    assert kinds[(f"run:{runs['dataset-publish']}", "artifact:tickets:v0")] == "output"
    assert kinds[("artifact:tickets:v0", f"run:{runs['finetune']}")] == "input"
    assert kinds[(f"run:{runs['finetune']}", "artifact:clf:v0")] == "output"
    assert kinds[("artifact:clf:v0", f"run:{runs['evaluate']}")] == "input"
    assert kinds[("artifact:clf:v0", f"run:{runs['deploy-fetch']}")] == "input"
    jobs = {r["id"]: r["job_type"] for r in data["runs"]}
    assert jobs == {runs["dataset-publish"]: "dataset-publish", runs["finetune"]: "finetune",
                    runs["evaluate"]: "evaluate", runs["deploy-fetch"]: "deploy-fetch"}
    assert {a["ref"] for a in data["artifacts"]} == {"clf:v0", "tickets:v0"}
    assert "production" in next(a for a in data["artifacts"] if a["ref"] == "clf:v0")["aliases"]

    text = render(g, "text")
    lines = text.splitlines()
    assert lines[0].startswith("clf:v0  model  aliases: candidate, latest, production")
    assert any(f"run {runs['finetune']}  finetune  finished" in ln and "epochs=4, lr=0.003" in ln for ln in lines)
    assert any("tickets:v0  dataset" in ln for ln in lines)
    assert any(f"run {runs['dataset-publish']}  dataset-publish" in ln and "source=" in ln for ln in lines)
    assert any(f"run {runs['evaluate']}  evaluate" in ln and "gate: promoted" in ln for ln in lines)
    assert any(f"run {runs['deploy-fetch']}  deploy-fetch" in ln and "deployed to" in ln for ln in lines)

    mermaid = render(g, "mermaid")
    assert mermaid.startswith("flowchart LR\n")
    assert f"run_{runs['finetune']} --> artifact_clf_v0" in mermaid
    assert f"artifact_tickets_v0 --> run_{runs['finetune']}" in mermaid
    assert "style artifact_clf_v0" in mermaid

    # depth limits the walk; the dataset's downstream reaches the model through the finetune run
    shallow = json.loads(render(build(reg, "tickets:v0", depth=1), "json"))
    assert {a["ref"] for a in shallow["artifacts"]} == {"tickets:v0", "clf:v0"}
    cli = run_cli("lineage", "clf:v0", "--format", "mermaid", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert cli.returncode == 0 and cli.stdout == mermaid
    bad = run_cli("lineage", "clf:v7", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert bad.returncode == 2 and "clf has no version 'v7'" in bad.stderr


def test_a_run_that_failed_before_deciding_shows_its_state_not_a_question_mark():
    """A deploy-fetch whose smoke test failed recorded no folder: lineage said `failed ... deployed to ?`."""
    from pipeline.lineage import _run_summary

    assert _run_summary({"job_type": "deploy-fetch", "summary": {}}) == ""
    assert _run_summary({"job_type": "evaluate", "summary": {}}) == ""
    assert _run_summary({"job_type": "deploy-fetch", "summary": {"deploy/dir": "/srv/clf"}}) == "deployed to /srv/clf"
    assert _run_summary({"job_type": "evaluate", "summary": {"gate/outcome": "rejected"}}) == "gate: rejected"


def test_mermaid_keeps_names_apart_that_differ_only_in_punctuation():
    """`tickets-v2` and `tickets_v2` are two names; Mermaid ids allow neither `-` nor `:`, and one id for both would
    draw one node with both datasets' edges: a model made from data it never saw."""
    from pipeline.lineage import Graph

    g = Graph(root="clf:v0")
    for ref, kind in (("clf:v0", "model"), ("tickets-v2:v0", "dataset"), ("tickets_v2:v0", "dataset"),
                      ("tickets_v2_2:v0", "dataset")):
        g.artifacts[ref] = {"ref": ref, "type": kind, "aliases": []}
    g.runs["r1"] = {"job_type": "finetune", "status": "finished"}
    g.runs["r2"] = {"job_type": "evaluate", "status": "finished"}
    g.edge("artifact:tickets-v2:v0", "run:r1")
    g.edge("run:r1", "artifact:clf:v0")
    g.edge("artifact:tickets_v2:v0", "run:r2")
    g.edge("artifact:tickets_v2_2:v0", "run:r2")
    g.edge("artifact:clf:v0", "run:r2")
    lines = render(g, "mermaid").splitlines()
    nodes = {ln.split("[", 1)[0].strip(): ln for ln in lines if '[("' in ln}
    assert len(nodes) == 4  # four artifacts, four ids
    ids = {ln.split('("', 1)[1].split("<br/>")[0]: node for node, ln in nodes.items()}
    assert ids["tickets-v2:v0"] == "artifact_tickets_v2_v0"
    assert len(set(ids.values())) == 4
    # the finetune run read only tickets-v2; the evaluate run read the other two and the model
    assert [ln.strip() for ln in lines if ln.strip().endswith("--> run_r1")] == ["artifact_tickets_v2_v0 --> run_r1"]
    assert sorted(ln.split(" -->")[0].strip() for ln in lines if ln.strip().endswith("--> run_r2")) == sorted(
        [ids["tickets_v2:v0"], ids["tickets_v2_2:v0"], "artifact_clf_v0"])
    assert "style artifact_clf_v0 stroke-width:3px" in lines[-1]


def test_a_model_version_as_the_base_is_an_input_pinned_for_reproduction_and_kept_from_deletion(env):
    """model.base: clf:production trains the production model further (on new data, say)."""
    import yaml

    from pipeline.errors import RegistryError
    from pipeline.stages import finetune

    make, _ = env
    cfg = make("model.base=clf:production", "train.epochs=1")
    reg = registry(cfg)
    result = finetune.run(cfg)
    assert result.produced == ["clf:v1"] and result.consumed == ["tickets:v0", "clf:v0"]  # what an orchestrator reads
    v0, v1 = reg.resolve("clf:v0"), reg.resolve("clf:v1")
    base = v1.metadata["base_model"]
    assert (base["source"], base["id"], base["spec"], base["digest"]) == ("registry", "clf:v0", "clf:production", v0.digest)
    assert sorted(reg.get_run(result.run_id)["consumed"]) == ["clf:v0", "tickets:v0"]  # an input of the run
    g = json.loads(render(build(reg, "clf:v1"), "json"))
    assert {(e["from"], e["to"]) for e in g["edges"]} >= {("artifact:clf:v0", f"run:{result.run_id}"),
                                                          (f"run:{result.run_id}", "artifact:clf:v1")}
    card = reg.fetch(v1).path / "README.md"
    front = yaml.safe_load(card.read_text().split("---")[1])
    assert "base_model" not in front  # not a hub id: the Hub would reject the card

    reg.set_alias("clf:v1", "production")  # the alias moves on; the reproduction still starts from clf:v0
    rebuilt = reproduce.run(cfg, model="clf:v1", check=True)
    assert rebuilt.details["same_digest"] and rebuilt.produced == ["clf:v1"]
    assert rebuilt.details["base_model"] == {"id": "clf:v0", "recorded_digest": v0.digest, "digest": v0.digest,
                                             "same": True}
    with pytest.raises(RegistryError, match=r"clf:v0 is what clf:v1 was made from"):
        reg.delete("clf:v0")
    # --set model.base=... on purpose: that base, not the pinned one
    other = reproduce.run(cfg, model="clf:v1", overrides=("model.base=clf:v1",))
    assert other.details["base_model"]["id"] == "clf:v1" and not other.details["same_digest"]


@pytest.mark.parametrize("base, message", [
    ("nosuch:v0", r"model.base='nosuch:v0': no artifact named 'nosuch'"),
    ("tickets:v0", r"model.base='tickets:v0': tickets:v0 is a 'dataset' artifact, not a 'model' artifact"),
    ("clf:v7", r"model.base='clf:v7': clf has no version 'v7'"),
])
def test_a_base_model_reference_the_registry_lacks_fails_before_a_run_opens(env, base, message):
    from pipeline.stages import finetune

    make, _ = env
    cfg = make(f"model.base={base}")
    runs = len(reg_runs(registry(cfg)))
    with pytest.raises(RefError, match=message):
        finetune.run(cfg)
    assert len(reg_runs(registry(cfg))) == runs  # no run opened
    assert [v.ref for v in registry(cfg).list_versions(type="model")] == ["clf:v0"]


def test_the_code_version_is_the_pipelines_own_checkout_never_a_repository_it_is_installed_in(tmp_path):
    """A wheel installed in a project's .venv sits inside the project's git work tree: `git rev-parse`
    there answers with the project's commit, which says nothing about the pipeline's code."""
    import os
    import subprocess
    import sys

    from pipeline.provenance import code_version, package_digest
    from tests.conftest import REPO

    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "site-packages"
    shutil.copytree(REPO / "pipeline", site / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".gitignore").write_text(".venv/\n")
    (project / "train.yaml").write_text("project: theirs\n")

    def git(*args: str, where: Path = project) -> str:
        return subprocess.run(["git", "-C", str(where), "-c", "user.email=ml@example.com", "-c", "user.name=ML", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "their project")
    installed = subprocess.run([sys.executable, "-c", "import json, pipeline.provenance as p; print(json.dumps(p.code_version()))"],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    # no commit names it: the digest of its Python files does (the version, 0.1.0, names no build)
    assert json.loads(installed.stdout) == {"git_commit": None, "git_dirty": None,
                                            "package_digest": package_digest(REPO / "pipeline")}
    with open(site / "pipeline" / "refs.py", "a") as f:  # another build of the same version
        f.write("# edited\n")
    (site / "pipeline" / "__pycache__").mkdir(exist_ok=True)
    (site / "pipeline" / "__pycache__" / "refs.cpython-311.pyc").write_bytes(b"compiled")  # not code that is read
    edited = subprocess.run([sys.executable, "-c", "import json, pipeline.provenance as p; print(json.dumps(p.code_version()))"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert json.loads(edited.stdout)["package_digest"] == package_digest(site / "pipeline") != package_digest(REPO / "pipeline")
    # from its own checkout (this repository), the commit it is at
    assert code_version()["git_commit"] == git("rev-parse", "HEAD", where=REPO)

    # A checkout of the pipeline: its package's files decide `git_dirty`; an edited config or new data does not.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "pipeline", checkout / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / ".gitignore").write_text("__pycache__/\n")
    (checkout / "configs").mkdir()
    (checkout / "configs" / "demo.yaml").write_text("project: demo\n")
    git("init", "-q", where=checkout)
    git("add", ".", where=checkout)
    git("commit", "-qm", "pipeline", where=checkout)

    def version_there() -> dict:
        out = subprocess.run([sys.executable, "-c", "import json, pipeline.provenance as p; print(json.dumps(p.code_version()))"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    head = git("rev-parse", "HEAD", where=checkout)
    (checkout / "configs" / "demo.yaml").write_text("project: edited\n")
    (checkout / "tickets.csv").write_text("text,label\n")
    assert version_there() == {"git_commit": head, "git_dirty": False}
    with open(checkout / "pipeline" / "refs.py", "a") as f:
        f.write("# edited\n")
    assert version_there() == {"git_commit": head, "git_dirty": True}


def test_a_base_whose_architecture_is_its_own_code_runs_only_where_trusted(tmp_path):
    """model.trust_remote_code: finetune, evaluate and deploy-fetch run the code in the base's folder, which the model
    version carries; predict and reproduce run it only when told to, on the command line or in the call."""
    from pipeline.predict import Classifier
    from pipeline.stages import dataset_publish, finetune

    base = write_tiny_custom_code_model(tmp_path / "custom")
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    untrusted = load_config(None, overrides(tmp_path, base, csv))
    dataset_publish.run(untrusted)
    with pytest.raises(ConfigError, match=r"its architecture is Python code shipped in the model's folder "
                                          r"\(transformers' trust_remote_code\); it runs only when trusted: "
                                          r"model.trust_remote_code: true"):
        finetune.run(untrusted)
    assert registry(untrusted).list_versions(type="model") == []
    headless = tmp_path / "headless"  # its code has no classifier: refused before a run, trusted or not
    shutil.copytree(base, headless)
    config = json.loads((headless / "config.json").read_text())
    del config["auto_map"]["AutoModelForSequenceClassification"]
    (headless / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"its model type 'tiny-custom' has no sequence-classification head in "
                                          r"transformers \(AutoModelForSequenceClassification\) nor in its own code"):
        finetune.run(load_config(None, [*overrides(tmp_path, headless, csv), "model.trust_remote_code=true"]))

    cfg = load_config(None, [*overrides(tmp_path, base, csv), "model.trust_remote_code=true"])
    result = run_all(cfg)
    assert [s.status for s in result.stages] == ["unchanged", "ok", "ok", "ok"], result.to_dict()
    version = registry(cfg).resolve("clf:v0")
    assert {"modeling_tinycustom.py", "configuration_tinycustom.py"} <= {f.path for f in version.files}
    assert version.metadata["config"]["model"]["trust_remote_code"] is True
    deployed = tmp_path / "deploy"
    assert json.loads((deployed / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_tinycustom.TinyCustomForSequenceClassification"

    # the card's example runs as written in plain transformers
    card = (deployed / "README.md").read_text()
    example = 'classify = pipeline("text-classification", model="path/to/this/folder", trust_remote_code=True)'
    assert example in card
    from transformers import pipeline as hf_pipeline

    assert hf_pipeline("text-classification", model=str(deployed), trust_remote_code=True)("where is my parcel")

    # evaluate and deploy-fetch without the trust refuse the version before a run opens (not when loading it inside)
    from pipeline.stages import deploy_fetch, evaluate

    runs = len(reg_runs(registry(cfg)))
    with pytest.raises(ConfigError, match=r"clf:v0 carries its architecture as Python code \(configuration_tinycustom.py, "
                                          r"modeling_tinycustom.py\); it runs only when trusted"):
        evaluate.run(untrusted, model="clf:v0")
    with pytest.raises(ConfigError, match=r"clf:v0 carries its architecture as Python code"):
        deploy_fetch.run(untrusted, to=tmp_path / "elsewhere")
    assert len(reg_runs(registry(cfg))) == runs and not (tmp_path / "elsewhere").exists()
    # a plain challenger is compared with production, whose code runs too
    plain = load_config(None, overrides(tmp_path, write_tiny_model(tmp_path / "bert"), csv))
    assert finetune.run(plain).produced == ["clf:v1"]
    runs = len(reg_runs(registry(cfg)))
    with pytest.raises(ConfigError, match=r"clf:v0 \(production, to compare clf:v1 with\) carries its architecture as "
                                          r"Python code"):
        evaluate.run(plain, model="clf:v1")
    assert len(reg_runs(registry(cfg))) == runs

    refused = run_cli("predict", "--model-dir", str(deployed), "where is my parcel")
    assert refused.returncode != 0 and "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    trusted = run_cli("predict", "--model-dir", str(deployed), "--trust-remote-code", "--json", "where is my parcel")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    clf = Classifier(deployed, trust_remote_code=True)
    assert type(clf.model).__name__ == "TinyCustomForSequenceClassification"
    assert json.loads(trusted.stdout)["label"] == clf.predict(["where is my parcel"])[0].label

    with pytest.raises(ConfigError, match=r"clf:v0 was trained with model.trust_remote_code: rebuilding it runs the "
                                          r"Python code in its base model's folder .*pass --trust-remote-code"):
        reproduce.run(cfg, model="clf:v0")
    again = reproduce.run(cfg, model="clf:v0", check=True, trust_remote_code=True)
    assert again.status == "ok" and again.produced == ["clf:v0"]  # rebuilt bit for bit


def test_a_model_made_at_another_commit_with_other_packages_is_rebuilt_and_each_difference_named(env, caplog):
    """What reproduce cannot make the same is said, before the training and in the result: a model trained at
    another commit, from a tree with uncommitted changes, with other package versions (a model made last month on
    another machine)."""
    from pipeline.provenance import code_version, package_versions

    make, _ = env
    cfg = make()
    reg = registry(cfg)
    meta = reg.resolve("clf:v0").metadata
    then = {**meta["packages"], "torch": "2.0.0"}
    del then["accelerate"]
    reg.update_metadata("clf:v0", {"code": {**meta["code"], "git_commit": "0" * 40, "git_dirty": True},
                                   "packages": then,  # and trained on a GPU, in two processes:
                                   "training": {**meta["training"], "processes": 2, "device": "cuda:NVIDIA H200",
                                                "precision": "bf16"}})
    caplog.set_level("WARNING", logger="pipeline.reproduce")
    result = reproduce.run(cfg, model="clf:v0", check=True)
    now = package_versions()
    said = result.details["warnings"]
    assert f"code version differs: clf:v0 was made at commit {'0' * 40}, this is commit {code_version()['git_commit']}" in said
    assert "clf:v0 was made from a tree with uncommitted changes: its code cannot be pinned exactly" in said
    assert (f"package versions differ: accelerate None -> {now['accelerate']}, torch 2.0.0 -> {now['torch']}"
            in said)
    from pipeline.stages.finetune import trained_on

    assert (f"clf:v0 was trained on cuda:NVIDIA H200 in bf16 by 2 processes; this rebuild runs on "
            f"{trained_on('auto')['device']} in fp32 by 1 process: another device, precision or number of processes "
            "(each takes a batch) gives other weights") in said
    assert result.details["packages_differ"] == {"accelerate": {"original": None, "reproduction": now["accelerate"]},
                                                 "torch": {"original": "2.0.0", "reproduction": now["torch"]}}
    assert all(w in caplog.text for w in said)  # in the log before the training, too
    # the rebuild itself is the same: the differences are warnings, not a failed check
    assert result.status == "ok" and result.details["matches"]
    # made by an installed package (no checkout): its code is named by the digest of its files
    reg.update_metadata("clf:v0", {"code": {"git_commit": None, "git_dirty": None, "package_digest": "e" * 64}})
    said = reproduce.run(cfg, model="clf:v0").details["warnings"]
    assert (f"code version differs: clf:v0 was made at an installed package (files eeeeeeeeeeee), this is commit "
            f"{code_version()['git_commit']}") in said


def test_another_cpu_than_the_one_that_trained_a_model_is_named_before_its_rebuild():
    """A CPU with other vector instructions sums in another order too: a rebuild there is not bit for bit, and the
    warning says why. The device names the CPU (`cpu:<model name>`); a version that recorded only `cpu` (before the
    name was) is not said to differ from any CPU."""
    from pipeline.stages.finetune import trained_on

    here = trained_on("auto")
    assert here["device"].startswith("cpu:") and len(here["device"]) > len("cpu:")
    then = {**here, "device": "cpu:AMD EPYC 9654 96-Core Processor"}
    assert reproduce._other_setup("clf:v0", then, here) == (
        f"clf:v0 was trained on cpu:AMD EPYC 9654 96-Core Processor in fp32 by 1 process; this rebuild runs on "
        f"{here['device']} in fp32 by 1 process: another device, precision or number of processes (each takes a batch) "
        "gives other weights")
    assert reproduce._other_setup("clf:v0", {**here, "device": "cpu"}, here) is None
    assert reproduce._other_setup("clf:v0", here, here) is None


def test_a_difference_of_exactly_the_tolerance_is_within_it():
    """`reproduce --tolerance 0.01` of 0.92 against 0.91: the difference is 0.010000000000000009 in floating point, and
    the rebuild was said to differ, `0.01 > 0.01`."""
    assert abs(0.91 - 0.92) > 0.01  # what the comparison met
    assert reproduce.within(abs(0.91 - 0.92), 0.01, predictions_differ=3)
    assert not reproduce.within(0.0101, 0.01, predictions_differ=0)
    # no tolerance: the same metrics and not one test prediction changed
    assert reproduce.within(0.0, 0.0, predictions_differ=0) and not reproduce.within(0.0, 0.0, predictions_differ=1)
