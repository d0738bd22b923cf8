"""evaluate (gate, champion/challenger), deploy-fetch, predict, run and the orchestrator chain, offline."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, IntegrityError, PipelineError, RefError, StageFailed
from pipeline.predict import load as load_classifier
from pipeline.registry.local import LocalRegistry
from pipeline.runner import run_all
from pipeline.stages import dataset_publish, deploy_fetch, evaluate, finetune
from tests.conftest import offline, REPO, inspect_summary, reg_runs, run_cli
from tests.tiny import write_ticket_pairs, write_tickets, write_tiny_model

# 20 epochs of a 2-layer, 32-wide BERT learn these tickets well (0.94 validation accuracy; early stopping may end
# it sooner). 10 epochs gave 0.77 once splits kept the near-copies of a text in one split.
GOOD = ["train.epochs=20", "train.batch_size=16", "train.learning_rate=3e-3", "train.warmup_ratio=0",
        "train.misclassified_rows=3"]
BAD = ["train.max_steps=1", "train.learning_rate=1e-6"]  # an untrained head: a clear regression


def overrides(root: Path, model_dir: Path, csv: Path) -> list[str]:
    return ["dataset.name=tickets", f"dataset.source={csv}", "dataset.id_column=ticket_id", "model.name=clf",
            f"model.base={model_dir}", "model.max_length=64", f"tracking.dir={root / 'track'}",
            f"deploy.dir={root / 'deploy'}", *GOOD]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A tracking dir holding tickets:v0 and a well-trained clf:v0 (candidate), built once."""
    root = tmp_path_factory.mktemp("template")
    model_dir = write_tiny_model(root / "bert")
    csv = write_tickets(root / "tickets.csv", rows=480)
    with offline(root):
        cfg = load_config(None, overrides(root, model_dir, csv))
        dataset_publish.run(cfg)
        finetune.run(cfg)
    return root, model_dir, csv


@pytest.fixture
def env(template, tmp_path):
    root, model_dir, csv = template
    shutil.copytree(root / "track", tmp_path / "track", ignore=shutil.ignore_patterns("wandb", "artifacts"))

    def cfg(*extra: str):
        return load_config(None, [*overrides(tmp_path, model_dir, csv), *extra])

    return cfg


def registry(cfg) -> LocalRegistry:
    return LocalRegistry(Path(cfg.tracking.dir) / "registry")


def test_gate_pass_promotes_and_records_the_decision_everywhere(env):
    cfg = env()
    result = evaluate.run(cfg)
    reg = registry(cfg)
    assert result.status == "ok" and result.details["production"] == "clf:v0"
    assert reg.resolve("clf:production").ref == "clf:v0"
    assert result.consumed == ["clf:v0", "tickets:v0"]  # the exact dataset version from the model's lineage

    # the metrics are what the model really scores on the test split
    data_dir = reg.fetch(reg.resolve("tickets:v0")).path
    test = pq.read_table(data_dir / "test.parquet").to_pydict()
    clf = load_classifier(reg.fetch(reg.resolve("clf:v0")).path)
    preds = clf.logits(test["text"]).argmax(axis=1)
    assert result.metrics["test_accuracy"] == pytest.approx(float(np.mean(preds == np.array(test["label_id"]))))
    assert result.metrics["test_accuracy"] > 0.6
    assert 0 <= result.metrics["test_ece"] <= 1
    assert set(result.details["per_class"]) == set(reg.resolve("clf:v0").metadata["label_names"])

    meta = reg.resolve("clf:v0").metadata["evaluation"]
    assert meta["gate"]["passed"] and meta["gate"]["outcome"] == "promoted"
    assert meta["run_id"] == result.run_id and meta["dataset"] == "tickets:v0"
    summary = inspect_summary(Path(result.paths["run_dir"]))["summary"]
    assert summary["gate/passed"] is True and summary["gate/outcome"] == "promoted"
    assert summary["test/accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    for key in ("test/per_class", "test/confusion_matrix_table", "test/calibration", "test/reliability_diagram_table",
                "test/misclassified"):
        assert summary[key]["_type"] == "table-file", key

    again = evaluate.run(cfg)  # already production: nothing to move, still exit 0
    assert again.status == "ok" and "already production" in again.message
    assert len(reg.resolve("clf:v0").metadata["evaluations"]) == 2


def test_gate_failure_leaves_production_and_says_why(env, tmp_path, cli_here):
    cfg = env()
    evaluate.run(cfg)  # clf:v0 -> production
    worse = finetune.run(env(*BAD))
    assert worse.produced == ["clf:v1"]
    result = evaluate.run(cfg)  # the candidate is now clf:v1
    reg = registry(cfg)
    assert result.status == "gate_failed"
    assert reg.resolve("clf:production").ref == "clf:v0"
    assert reg.resolve("clf:candidate").ref == "clf:v1"
    # champion and challenger scored on the same rows in the same run
    assert result.consumed == ["clf:v1", "tickets:v0", "clf:v0"]
    assert result.metrics["champion_test_accuracy"] > result.metrics["test_accuracy"] + 0.01
    failed = [c for c in result.details["gate"]["checks"] if not c["passed"]]
    [acc] = [c for c in failed if c["check"] == "accuracy vs production"]
    # with the paired bootstrap's 95% interval of the difference, around the measured difference
    delta = result.metrics["test_accuracy"] - result.metrics["champion_test_accuracy"]
    lo, hi = acc["delta_ci95"]
    assert acc["delta"] == pytest.approx(delta, abs=1e-6) and lo <= delta <= hi and hi < 0
    assert f"difference {delta:+.4f}, 95% CI {lo:+.4f} to {hi:+.4f}" in acc["reason"]
    assert "below production clf:v0" in result.message
    gate = reg.resolve("clf:v1").metadata["evaluation"]["gate"]
    assert gate["outcome"] == "rejected" and not gate["passed"]
    summary = inspect_summary(Path(result.paths["run_dir"]))["summary"]
    assert summary["gate/passed"] is False and summary["champion"] == "clf:v0"
    assert summary["champion/test/accuracy"] == pytest.approx(result.metrics["champion_test_accuracy"])
    assert summary["gate/comparison"]["_type"] == "table-file"
    [table] = (Path(result.paths["run_dir"]) / "files").glob("media/table/gate/comparison_*.table.json")
    comparison = json.loads(table.read_text())
    assert comparison["columns"] == ["metric", "challenger clf:v1", "production clf:v0", "delta", "delta 95% CI low",
                                     "delta 95% CI high"]
    accuracy_row = next(r for r in comparison["data"] if r[0] == "accuracy")
    assert accuracy_row[4:] == pytest.approx([lo, hi], abs=1e-6)

    # the non-inferiority test judges the interval's lower end: here too far below, so rejected again
    strict = evaluate.run(env("evaluate.gate.regression_test=non_inferiority"), promote=False)
    [acc] = [c for c in strict.details["gate"]["checks"] if c["check"] == "accuracy vs production"]
    assert strict.status == "gate_failed" and acc["test"] == "non_inferiority" and not acc["passed"]
    assert acc["value"] == acc["delta_ci95"][0] and acc["threshold"] == -0.01
    assert acc["reason"].startswith("accuracy vs production: lower 95% bound of the difference")

    # the command line gives gate_failed its own exit code, for an orchestrator to branch on
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    cli = cli_here("evaluate", "--config", str(config), "--result-json", str(tmp_path / "r.json"))
    assert cli.returncode == 3, cli.stderr[-2000:]
    judged = json.loads((tmp_path / "r.json").read_text())
    assert judged["status"] == "gate_failed"
    assert cli.stdout == f"{judged['details']['model']}\n"  # on stdout, the exact version that was judged
    assert reg.resolve("clf:production").ref == "clf:v0"


def test_promotion_compares_with_production_as_it_is_when_another_evaluation_moves_it(env, monkeypatch):
    # every challenger passes: the test is about which one ends up in production
    cfg = env("evaluate.gate.max_regression=1", "evaluate.gate.better_than_chance=false")
    reg = registry(cfg)
    reg.set_alias("clf:v0", "production")
    assert finetune.run(env(*BAD, "train.seed=1")).produced == ["clf:v1"]
    assert finetune.run(env(*BAD, "train.seed=2")).produced == ["clf:v2"]
    other_process = registry(cfg)  # a concurrent `evaluate` promoting another version writes through its own registry
    real_score = evaluate.score

    def score_while_clf_v1_is_promoted(model_dir, rows, labels, batch_size, bins, ref, *trust):
        if ref == "clf:v2" and other_process.resolve("clf:production").ref == "clf:v0":
            other_process.set_alias("clf:v1", "production")
        return real_score(model_dir, rows, labels, batch_size, bins, ref, *trust)

    monkeypatch.setattr(evaluate, "score", score_while_clf_v1_is_promoted)
    result = evaluate.run(cfg, model="clf:v2")
    # compared with clf:v0, found production on clf:v1 when promoting, compared with clf:v1, then promoted
    assert result.status == "ok" and reg.resolve("clf:production").ref == "clf:v2"
    assert result.consumed == ["clf:v2", "tickets:v0", "clf:v0", "clf:v1"]
    record = reg.resolve("clf:v2").metadata["evaluation"]
    assert record["champion"]["ref"] == "clf:v1" and record["gate"]["outcome"] == "promoted"
    assert any(c["check"] == "accuracy vs production" and c["champion"] == round(result.metrics["champion_test_accuracy"], 6)
               for c in record["gate"]["checks"])

    def score_while_production_keeps_moving(model_dir, rows, labels, batch_size, bins, ref, *trust):
        scored = real_score(model_dir, rows, labels, batch_size, bins, ref, *trust)
        if ref != "clf:v0":  # a champion was just scored: another evaluation moves production before this one promotes
            other_process.set_alias("clf:v1" if ref == "clf:v2" else "clf:v2", "production")
        return scored

    monkeypatch.setattr(evaluate, "score", score_while_production_keeps_moving)
    with pytest.raises(StageFailed, match="clf:v0 passed the gate, but production kept moving while it was compared"):
        evaluate.run(cfg, model="clf:v0")
    assert reg.resolve("clf:production").ref == "clf:v1"  # as the other evaluation left it, never the challenger
    assert "evaluation" not in reg.resolve("clf:v0").metadata  # no decision recorded for a promotion that did not happen


def test_a_new_class_is_compared_with_production_on_the_classes_it_knows(env, template, tmp_path):
    cfg = env()
    evaluate.run(cfg)  # clf:v0 (six labels) -> production
    _, _, csv = template
    grown = tmp_path / "grown.csv"
    extra = "".join(f"refund-{i},please refund my last payment of {i} euros,refund_request\n" for i in range(40))
    grown.write_text(csv.read_text() + extra)
    dataset_publish.run(env(f"dataset.source={grown}"))  # tickets:v1 has a seventh label
    assert finetune.run(env(f"dataset.source={grown}", *BAD)).produced == ["clf:v1"]
    result = evaluate.run(cfg)  # was: "clf:v0 predicts labels [...], but the dataset's labels are [...]", exit 2
    reg = registry(cfg)
    record = reg.resolve("clf:v1").metadata["evaluation"]
    assert record["dataset"] == "tickets:v1" and result.consumed == ["clf:v1", "tickets:v1", "clf:v0"]
    # production is scored on the test rows whose label it knows, and the challenger on the same rows
    test = pq.read_table(reg.fetch(reg.resolve("tickets:v1")).path / "test.parquet").to_pydict()
    old_labels = reg.resolve("clf:v0").metadata["label_names"]
    # a new label leaves the other labels' splits as they were: no test row is one production trained on
    assert not {fold(t) for t in test["text"]} & trained_texts(reg, "tickets:v0")
    known = [i for i, label in enumerate(test["label"]) if label in old_labels]
    assert 0 < len(known) < len(test["label"])
    champion = record["champion"]
    assert champion["ref"] == "clf:v0" and champion["rows"] == len(known) and champion["labels"] == old_labels
    production = load_classifier(reg.fetch(reg.resolve("clf:v0")).path)
    preds = production.logits([test["text"][i] for i in known]).argmax(axis=1)
    expected = np.mean([old_labels[p] == test["label"][i] for p, i in zip(preds, known)])
    assert champion["metrics"]["accuracy"] == pytest.approx(expected)
    regression = [c for c in record["gate"]["checks"] if c["check"].endswith("vs production")]
    assert regression and all(c["rows"] == len(known) for c in regression)
    assert f"(on the {len(known)} of {len(test['label'])} rows whose labels production knows)" in regression[0]["reason"]
    assert "seen_in_training" not in champion
    assert result.status in ("ok", "gate_failed")  # decided, like any challenger


def fold(text: str) -> str:
    """dataset-publish's comparison of copies, for ASCII text."""
    return " ".join(text.lower().split())


def trained_texts(reg: LocalRegistry, ref: str) -> set[str]:
    folder = reg.fetch(reg.resolve(ref)).path
    return {fold(t) for split in ("train", "validation") for t in pq.read_table(folder / f"{split}.parquet")["text"].to_pylist()}


def test_production_is_not_compared_on_rows_it_trained_on(env, template, tmp_path, caplog):
    """A dataset version split another way (other fractions or seed, the user's own split files, or
    published before splits kept rows in place) can have production's train or validation rows in its
    test split, where production scores what it memorised. The regression checks leave them out."""
    cfg = env()
    evaluate.run(cfg)  # clf:v0, trained on tickets:v0 -> production
    # A larger test fraction: the texts ranked first are test rows as before, the next were validation rows.
    wider = ("dataset.split.train=0.75", "dataset.split.test=0.15")
    dataset_publish.run(env(*wider))
    assert finetune.run(env(*wider, "train.max_steps=2")).produced == ["clf:v1"]
    caplog.set_level("INFO", logger="pipeline")
    evaluate.run(cfg)
    reg = registry(cfg)
    test = pq.read_table(reg.fetch(reg.resolve("tickets:v1")).path / "test.parquet").to_pydict()
    seen = trained_texts(reg, "tickets:v0")
    unseen = [i for i, t in enumerate(test["text"]) if fold(t) not in seen]
    assert len(test["text"]) // 2 < len(unseen) < len(test["text"])
    champion = reg.resolve("clf:v1").metadata["evaluation"]["champion"]
    assert champion["seen_in_training"] == len(test["text"]) - len(unseen) and champion["rows"] == len(unseen)
    production = load_classifier(reg.fetch(reg.resolve("clf:v0")).path)
    labels = production.label_names
    expected = np.mean([labels[p] == test["label"][i] for p, i in
                        zip(production.logits([test["text"][i] for i in unseen]).argmax(axis=1), unseen)])
    assert champion["metrics"]["accuracy"] == pytest.approx(expected)
    assert f"{len(test['text']) - len(unseen)} of {len(test['text'])} rows of this split are texts production clf:v0 " \
           "trained on" in caplog.text

    # another seed: nearly every test row is one production trained on; too few others, so every row is
    # compared as before (production favoured), and the record says so
    dataset_publish.run(env("dataset.split.seed=7"))
    finetune.run(env("dataset.split.seed=7", "train.max_steps=2"))
    evaluate.run(cfg)
    champion = reg.resolve("clf:v2").metadata["evaluation"]["champion"]
    assert champion["seen_in_training_but_compared"] > champion["rows"] // 2 and "seen_in_training" not in champion
    assert "too few others to compare on, so the regression checks use every row" in caplog.text

    # production's dataset deleted: which rows it trained on is unknown; every row is compared, and it says so
    reg.delete("tickets:v0", force=True)
    finetune.run(env("dataset.split.seed=7", "train.max_steps=3"))  # on tickets:v2, as clf:v2
    evaluate.run(cfg)
    champion = reg.resolve("clf:v3").metadata["evaluation"]["champion"]
    assert champion["rows"] == reg.resolve("tickets:v2").metadata["num_rows"]["test"]
    assert not {"seen_in_training", "seen_in_training_but_compared"} & set(champion)
    assert "the rows it trained on cannot be known (its dataset tickets:v0" in caplog.text


def test_chance_is_what_predictions_that_ignore_the_text_would_score():
    from pipeline.stages.evaluate import Scored, chance_check, cohen_kappa

    def check(refs: list[int], predicted: list[int], labels=("a", "b", "c", "d")) -> dict:
        logp = np.full((len(predicted), len(labels)), -5.0)
        logp[np.arange(len(predicted)), predicted] = -0.01
        confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(confusion, (np.asarray(refs), np.asarray(predicted)), 1)
        return chance_check(Scored(ref="m:v1", metrics={}, per_class={}, confusion=confusion, calibration={},
                                   logp=logp, refs=np.asarray(refs), label_names=list(labels)))

    # one label for everything: 70% accuracy on a 70/30 split, which a minimum accuracy of 0.6 would let through
    collapsed = check([0] * 70 + [1] * 30, [0] * 100)
    assert not collapsed["passed"] and collapsed["value"] == collapsed["chance"] == 0.7 and collapsed["kappa"] == 0
    assert collapsed["reason"] == (
        "better than chance: accuracy 0.7000 <= 0.7754, the one-sided 95% bound of chance 0.7000 (predictions that "
        "ignore the text, in the same label shares); Cohen's kappa 0.000 on 100 rows; not shown to beat chance, 100% "
        "of the rows predicted 'a' (evaluate.gate.better_than_chance)")
    # a split of one label cannot show anything, and says so
    one = check([2] * 30, [2] * 30)
    assert not one["passed"] and one["value"] == one["chance"] == 1.0
    assert one["reason"].endswith("the split's rows all have the label 'c', so no accuracy can show it: score on a "
                                  "split with several labels, or set evaluate.gate.better_than_chance: false")
    # guessing in the right shares
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 4, 1000)
    assert not check(refs.tolist(), rng.integers(0, 4, 1000).tolist())["passed"]
    # informative, though less accurate than always answering the majority label (0.9): it passes
    refs = [0] * 90 + [1] * 10
    minority_first = [1] * 20 + [0] * 70 + [1] * 10  # every minority row found, 20 majority rows mistaken for it
    informative = check(refs, minority_first)
    assert informative["passed"] and informative["value"] == 0.8 and informative["chance"] == pytest.approx(0.66)
    assert informative["kappa"] == pytest.approx((0.8 - 0.66) / 0.34, abs=1e-6)
    # the evaluation reports kappa as a metric: observed 0.7, chance 0.5 (30x25 + 20x25 of 50x50) -> 0.4
    assert cohen_kappa(np.array([[20, 5], [10, 15]])) == pytest.approx(0.4)
    assert cohen_kappa(np.array([[70, 0], [30, 0]])) == 0 and cohen_kappa(np.array([[5]])) == 0


def test_a_model_no_better_than_chance_is_not_promoted(env):
    cfg = env()
    assert finetune.run(env(*BAD)).produced == ["clf:v1"]  # an untrained head
    result = evaluate.run(cfg)  # the first evaluation: no production to compare with, minimums of 0
    assert result.status == "gate_failed"
    [failed] = [c for c in result.details["gate"]["checks"] if not c["passed"]]
    assert failed["check"] == "better than chance" and failed["value"] <= failed["threshold"]
    assert abs(failed["kappa"]) < 0.1 and "not shown to beat chance" in result.message
    with pytest.raises(RefError, match="no alias 'production'"):
        registry(cfg).resolve("clf:production")
    allowed = evaluate.run(env("evaluate.gate.better_than_chance=false"), promote=False)
    assert allowed.status == "ok" and not any(c["check"] == "better than chance" for c in allowed.details["gate"]["checks"])
    trained = evaluate.run(cfg, model="clf:v0")  # the well-trained one
    [chance] = [c for c in trained.details["gate"]["checks"] if c["check"] == "better than chance"]
    assert trained.status == "ok" and chance["passed"] and chance["kappa"] > 0.5
    assert trained.metrics["test_kappa"] == pytest.approx(chance["kappa"], abs=1e-6)  # recorded with the metrics


def test_another_dataset_version_is_scored_by_label_name(env, template, tmp_path):
    """A version whose labels are in another order (other class ids) scores the model as its own does; one
    with a label the model cannot predict is refused before a run opens."""
    import csv as csvlib

    cfg = env()
    own = evaluate.run(cfg, promote=False)
    labels = registry(cfg).resolve("tickets:v0").metadata["label_names"]
    reordered = dataset_publish.run(env(f"dataset.labels={json.dumps(labels[::-1])}"))
    assert reordered.produced == ["tickets:v1"]
    assert registry(cfg).resolve("tickets:v1").metadata["label_names"] == labels[::-1]
    other = evaluate.run(cfg, dataset="tickets:v1", promote=False)  # the same rows in the same splits
    assert other.status == own.status == "ok"
    assert {k: other.metrics[k] for k in ("test_accuracy", "test_macro_f1", "test_kappa")} == \
        {k: own.metrics[k] for k in ("test_accuracy", "test_macro_f1", "test_kappa")}

    _, _, tickets = template
    with open(tickets, newline="", encoding="utf-8") as f:
        rows = list(csvlib.DictReader(f))
    more = tmp_path / "more.csv"
    with open(more, "w", newline="", encoding="utf-8") as f:
        w = csvlib.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + [{**rows[0], "ticket_id": f"R{i}", "text": f"please refund order {i}", "label": "refund"}
                            for i in range(6)])
    assert dataset_publish.run(env(f"dataset.source={more}")).produced == ["tickets:v2"]
    runs_before = len(registry(cfg).resolve("clf:v0").used_by)
    with pytest.raises(ConfigError, match=r"tickets:v2 has label\(s\) \['refund'\] that clf:v0 does not predict"):
        evaluate.run(cfg, dataset="tickets:v2", promote=False)
    assert len(registry(cfg).resolve("clf:v0").used_by) == runs_before

    # fewer labels: scored; a recall minimum for the missing one cannot be checked, and says so
    fewer = tmp_path / "fewer.csv"
    with open(fewer, "w", newline="", encoding="utf-8") as f:
        w = csvlib.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["label"] != labels[0])
    assert dataset_publish.run(env(f"dataset.source={fewer}")).produced == ["tickets:v3"]
    assert evaluate.run(cfg, dataset="tickets:v3", promote=False).status == "ok"
    strict = evaluate.run(env(f"evaluate.gate.min_class_recall={{{labels[0]}: 0.5}}"), dataset="tickets:v3",
                          promote=False)
    [failed] = [c for c in strict.details["gate"]["checks"] if not c["passed"]]
    assert strict.status == "gate_failed" and failed["reason"] == (
        f"recall[{labels[0]}] cannot be checked: the split has no row labelled '{labels[0]}' "
        "(evaluate.gate.min_class_recall asks for 0.5000)")


def test_a_held_out_dataset_for_evaluation_only(env, tmp_path, caplog):
    """dataset.split.train=0 publishes a golden set: `evaluate --dataset` scores a model on it, and says how many
    of its rows are texts the model trained on; finetune refuses to train on it, before a run opens."""
    import csv as csvlib

    import pyarrow.parquet as pq

    cfg = env()
    reg = registry(cfg)
    own = reg.fetch(reg.resolve("tickets:v0")).path
    unseen = pq.read_table(own / "test.parquet").slice(0, 20).to_pylist()  # copies of a text stay in one split
    trained = pq.read_table(own / "train.parquet").slice(0, 30).to_pylist()
    golden = tmp_path / "golden.csv"
    with open(golden, "w", newline="", encoding="utf-8") as f:
        w = csvlib.writer(f)
        w.writerow(["ticket_id", "text", "label"])
        w.writerows([r["id"], r["text"], r["label"]] for r in unseen + trained)
    split = ["dataset.split.train=0", "dataset.split.validation=0", "dataset.split.test=1"]
    gold_cfg = env("dataset.name=golden", f"dataset.source={golden}", *split)
    assert dataset_publish.run(gold_cfg).produced == ["golden:v0"]
    assert reg.resolve("golden:v0").metadata["num_rows"] == {"train": 0, "validation": 0, "test": 50}

    caplog.set_level("WARNING")
    scored = evaluate.run(cfg, dataset="golden:v0", promote=False)
    assert scored.status == "ok" and "golden:v0" in scored.consumed
    assert ("30 of 50 test rows of golden:v0 are texts clf:v0 trained on or chose its checkpoint on (the train and "
            "validation splits of tickets:v0)") in caplog.text
    assert reg.resolve("clf:v0").metadata["evaluation"]["seen_in_training"] == 30
    evaluate.run(cfg, promote=False)  # its own test split: no row it trained on
    assert "seen_in_training" not in reg.resolve("clf:v0").metadata["evaluation"]

    runs_before = len(reg_runs(reg))
    with pytest.raises(ConfigError, match=r"golden:v0 has no train rows: it was published for evaluation only"):
        finetune.run(gold_cfg)
    assert len(reg_runs(reg)) == runs_before and [v.ref for v in reg.list_versions(type="model")] == ["clf:v0"]


def test_non_inferiority_needs_the_whole_interval_within_max_regression():
    from pipeline.config import GateConfig
    from pipeline.stages.evaluate import Comparison, Scored, decide

    def scored(ref: str, accuracy: float) -> Scored:
        metrics = {"accuracy": accuracy, "macro_f1": accuracy}
        return Scored(ref=ref, metrics=metrics, per_class={}, confusion=np.zeros((2, 2)), calibration={},
                      logp=np.zeros((0, 2)), refs=np.zeros(0, dtype=np.int64), label_names=["a", "b"])

    rows = {"label": ["a"] * 200}
    # 0.5 points below production, on a split too small to tell: [-4, +3] points
    close = Comparison(challenger=scored("m:v2", 0.895), champion=scored("m:v1", 0.900), rows=rows, total=200,
                       intervals={"accuracy": [-0.04, 0.03], "macro_f1": [-0.04, 0.03]})
    point = decide(GateConfig(max_regression=0.01), close.challenger, close, ["a", "b"])
    assert point.passed  # measured: within 0.01
    shown = decide(GateConfig(max_regression=0.01, regression_test="non_inferiority"), close.challenger, close, ["a", "b"])
    assert not shown.passed and shown.failed == [
        "accuracy vs production: lower 95% bound of the difference -0.0400 < -0.0100 (not shown to be within "
        "evaluate.gate.max_regression=0.01 of production m:v1 (0.9000)); difference -0.0050, 95% CI -0.0400 to +0.0300",
        "macro_f1 vs production: lower 95% bound of the difference -0.0400 < -0.0100 (not shown to be within "
        "evaluate.gate.max_regression=0.01 of production m:v1 (0.9000)); difference -0.0050, 95% CI -0.0400 to +0.0300"]
    # a large split narrows the interval: the same difference is then shown to be within 0.01
    narrow = Comparison(challenger=close.challenger, champion=close.champion, rows=rows, total=200,
                        intervals={"accuracy": [-0.009, -0.001], "macro_f1": [-0.009, -0.001]})
    assert decide(GateConfig(max_regression=0.01, regression_test="non_inferiority"), narrow.challenger, narrow,
                  ["a", "b"]).passed


def test_a_value_exactly_at_its_threshold_passes_whatever_floating_point_makes_of_the_threshold():
    """70 of 100 against production's 80 of 100, with max_regression 0.1: exactly 0.1 below is allowed, but 0.8 - 0.1 is
    0.7000000000000001 in floating point, and the gate said `accuracy vs production 0.7000 < 0.7000`."""
    from pipeline.config import GateConfig
    from pipeline.stages.evaluate import Comparison, Scored, decide

    def scored(ref: str, accuracy: float) -> Scored:
        return Scored(ref=ref, metrics={"accuracy": accuracy, "macro_f1": accuracy}, per_class={},
                      confusion=np.zeros((2, 2)), calibration={}, logp=np.zeros((0, 2)), refs=np.zeros(0, dtype=np.int64),
                      label_names=["a", "b"])

    assert 0.8 - 0.1 > 0.7 and 0.7 - 0.8 < -0.1  # what the comparisons met
    rows = {"label": ["a"] * 100}
    for mine, theirs in ((0.7, 0.8), (0.82, 0.92), (0.83, 0.93)):
        lo = mine - theirs  # the difference as the bootstrap computes it
        cmp = Comparison(challenger=scored("m:v2", mine), champion=scored("m:v1", theirs), rows=rows, total=100,
                         intervals={"accuracy": [lo, 0.0], "macro_f1": [lo, 0.0]})
        for test in ("point", "non_inferiority"):
            decision = decide(GateConfig(max_regression=0.1, regression_test=test), cmp.challenger, cmp, ["a", "b"])
            assert decision.passed, (mine, theirs, test, decision.failed)
        assert decide(GateConfig(min_accuracy=mine, min_macro_f1=mine), cmp.challenger, None, ["a", "b"]).passed
    # a hair below still fails
    below = Comparison(challenger=scored("m:v2", 0.6999), champion=scored("m:v1", 0.8), rows=rows, total=100,
                       intervals={"accuracy": [-0.1001, 0.0], "macro_f1": [-0.1001, 0.0]})
    for test in ("point", "non_inferiority"):
        assert not decide(GateConfig(max_regression=0.1, regression_test=test), below.challenger, below, ["a", "b"]).passed


def test_a_label_with_control_characters_is_shown_escaped_in_the_gate_reasons():
    """Labels are the data's: one holding a terminal escape sequence or a line break is written escaped in the
    gate's check names and reasons, which the stage logs and prints."""
    from pipeline.config import GateConfig
    from pipeline.stages.evaluate import Scored, decide

    labels = ["\x1b[2Jwipe", "two\nlines"]
    challenger = Scored(ref="m:v2", metrics={"accuracy": 0.5, "macro_f1": 0.5},
                        per_class={name: {"recall": 0.5, "support": 10} for name in labels},
                        confusion=np.zeros((2, 2)), calibration={}, logp=np.zeros((0, 2)), refs=np.zeros(0, dtype=np.int64),
                        label_names=labels)
    decision = decide(GateConfig(min_class_recall=0.9, better_than_chance=False), challenger, None, labels)
    recall = [c for c in decision.checks if c["check"].startswith("recall[")]
    assert [c["check"] for c in recall] == ["recall[\\x1b[2Jwipe]", "recall[two\\nlines]"]
    assert all("\x1b" not in c["reason"] and "\n" not in c["reason"] for c in recall)


def test_thresholds_and_no_promote(env):
    strict = env("evaluate.gate.min_accuracy=0.99", "evaluate.gate.min_class_recall=0.99")
    result = evaluate.run(strict)
    assert result.status == "gate_failed"
    reasons = [c["check"] for c in result.details["gate"]["checks"] if not c["passed"]]
    assert "accuracy" in reasons and any(r.startswith("recall[") for r in reasons)
    with pytest.raises(RefError, match="no alias 'production'"):
        registry(strict).resolve("clf:production")
    passed = evaluate.run(env(), promote=False)
    assert passed.status == "ok" and "not promoted" in passed.message
    with pytest.raises(RefError, match="no alias 'production'"):
        registry(strict).resolve("clf:production")
    runs_before = len(registry(strict).resolve("clf:v0").used_by)
    with pytest.raises(ConfigError, match="labels the model does not have: 'nonsense'; labels: \\['account_access', "):
        evaluate.run(env("evaluate.gate.min_class_recall={nonsense: 0.5}"))
    assert len(registry(strict).resolve("clf:v0").used_by) == runs_before  # refused before a run was opened


def test_a_model_that_scores_nan_is_refused_and_production_stays(env, tmp_path):
    """A model version whose outputs are not numbers (diverged weights) passes no gate: a minimum of 0 would
    otherwise promote it, as an argmax over NaN is still a label."""
    from safetensors.torch import load_file, save_file

    cfg = env()
    evaluate.run(cfg)  # clf:v0 -> production
    reg = registry(cfg)
    v0 = reg.resolve("clf:v0")
    broken = tmp_path / "broken"
    shutil.copytree(reg.fetch(v0).path, broken)
    weights = load_file(broken / "model.safetensors")
    bias = next(k for k in weights if k.endswith("classifier.bias"))
    weights[bias][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    reg.publish("clf", "model", broken, metadata=v0.metadata, aliases=["candidate"])
    with offline(tmp_path):
        with pytest.raises(StageFailed, match=r"clf:v1 gives scores that are not numbers \(NaN or infinite\) for "
                                              r"(\d+) of \1 rows .* it cannot be evaluated or promoted"):
            evaluate.run(cfg)
    assert reg.resolve("clf:production").ref == "clf:v0"
    assert reg.resolve("clf:v1").metadata == v0.metadata  # no evaluation record added
    # nor does deploy-fetch put it in place: its smoke prediction is no number
    with offline(tmp_path):
        deploy_fetch.run(cfg)
        with pytest.raises(StageFailed, match=r"smoke prediction gave probabilities that are not numbers \(nan\)"):
            deploy_fetch.run(cfg, model="clf:v1")
    assert json.loads((Path(cfg.deploy.dir) / "manifest.json").read_text())["ref"] == "clf:v0"
    # and a broken production is no bar to clear: a good challenger replaces it on the minimums alone
    reg.set_alias("clf:v1", "production")
    reg.set_alias("clf:v0", "candidate")
    with offline(tmp_path):
        result = evaluate.run(cfg)
    assert result.status == "ok" and reg.resolve("clf:production").ref == "clf:v0"
    skipped = reg.resolve("clf:v0").metadata["evaluation"]["champion"]
    assert skipped["ref"] == "clf:v1" and "clf:v1 gives scores that are not numbers" in skipped["not_compared"]


def test_deploy_fetch_deploys_no_model_whose_smoke_prediction_fails(env, tmp_path):
    """The smoke test stands between a model version and the deployment folder: a version that will not load (its
    tokenizer files are gone: transformers made a tokenizer of special tokens alone, and every text read as unknown
    words, with a confident label), that has another model's tokenizer (an IndexError on the words past its
    embeddings), whose weights are saved under names the architecture does not use (they were random, and so was
    each label) or names a label its dataset does not have (its config was edited) is refused
    with what went wrong, exit 1, and the model deployed before stays in place, byte for byte."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    cfg = env()
    reg = registry(cfg)
    v0 = reg.resolve("clf:v0")
    with offline(tmp_path):
        deploy_fetch.run(cfg, model="clf:v0")
    deployed = {p.name: p.read_bytes() for p in Path(cfg.deploy.dir).iterdir()}
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(reg.fetch(v0).path, no_tokenizer)
    for f in no_tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    renamed = tmp_path / "renamed"
    shutil.copytree(reg.fetch(v0).path, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config["id2label"] = {k: f"{v}_old" for k, v in config["id2label"].items()}
    config["label2id"] = {f"{k}_old": v for k, v in config["label2id"].items()}
    (renamed / "config.json").write_text(json.dumps(config))
    prefixed = tmp_path / "prefixed"  # saved from a DistributedDataParallel wrapper: every name under module.
    shutil.copytree(reg.fetch(v0).path, prefixed)
    weights = load_file(prefixed / "model.safetensors")
    save_file({f"module.{k}": v for k, v in weights.items()}, prefixed / "model.safetensors", metadata={"format": "pt"})
    other_tokenizer = tmp_path / "other-tokenizer"  # another model's, with more tokens than these weights have rows
    shutil.copytree(reg.fetch(v0).path, other_tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(other_tokenizer)
    tokenizer.add_tokens([f"word{i}" for i in range(10)])
    tokenizer.save_pretrained(other_tokenizer)
    more_labels = tmp_path / "more-labels"  # config.json says 7 labels; the head's weights have a row for 6
    shutil.copytree(reg.fetch(v0).path, more_labels)
    config = json.loads((more_labels / "config.json").read_text())
    config["id2label"] = {**config["id2label"], str(len(config["id2label"])): "extra"}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (more_labels / "config.json").write_text(json.dumps(config))
    for folder, said in ((more_labels, r"smoke prediction failed on .*: PipelineError: .*: the model does not load: the "
                                       r"shapes of its weights do not match its config.json"),
                         (other_tokenizer, r"smoke prediction failed on .*: PipelineError: .*: its tokenizer has (\d+) "
                                           r"tokens, but the model has embeddings for (\d+) \(vocab_size\)"),
                         (no_tokenizer, r"smoke prediction failed on .*: PipelineError: .*: its tokenizer has no "
                                        r"vocabulary \(only its 5 special tokens\)"),
                         (prefixed, r"smoke prediction failed on .*: PipelineError: .*: (\d+) of its \1 weight tensors "
                                    r"are not in the checkpoint \(bert\.embeddings.*\), which holds \1 it does not use "
                                    r"instead \(module\.bert\.embeddings.*\): the checkpoint's names do not match the "
                                    r"architecture; without them its predictions would be random"),
                         (renamed, r"smoke prediction gave unknown label '\w+_old'; expected one of \['account_access'")):
        bad = reg.publish("clf", "model", folder, metadata=v0.metadata).version
        with offline(tmp_path):
            with pytest.raises(StageFailed, match=said) as failed:
                deploy_fetch.run(cfg, model=bad.ref)
        assert failed.value.exit_code == 1
        assert {p.name: p.read_bytes() for p in Path(cfg.deploy.dir).iterdir()} == deployed, bad.ref


def test_evaluate_bad_references(env):
    cfg = env()
    with pytest.raises(RefError, match="clf has no version 'v9'; versions: v0; aliases: candidate -> v0, latest -> v0"):
        evaluate.run(cfg, model="clf:v9")
    with pytest.raises(RefError, match="is a 'dataset' artifact, not a 'model'"):
        evaluate.run(cfg, model="tickets:v0")
    # a --dataset that is not there is the user's reference, not the model's training data
    with pytest.raises(RefError, match=r"^--dataset golden:latest: no artifact named 'golden' .*known artifacts: clf, tickets$"):
        evaluate.run(cfg, dataset="golden:latest")
    with pytest.raises(RefError, match=r"^--dataset tickets:v7: tickets has no version 'v7'"):
        evaluate.run(cfg, dataset="tickets:v7")
    # the dataset the model trained on was deleted (pruned): the way on is another version, named with --dataset
    registry(cfg).delete("tickets:v0", delete_aliases=True, force=True)
    with pytest.raises(RefError, match=r"^clf:v0 was trained on tickets:v0, which cannot be found: tickets:v0 was deleted "
                                       r"\(.*\); its files are gone, its record stays for lineage; evaluate it on another "
                                       r"dataset version with --dataset NAME:vN$"):
        evaluate.run(cfg)


def test_deploy_fetch_is_atomic_verified_and_idempotent(env, tmp_path, cli_here):
    cfg = env()
    with pytest.raises(RefError, match="no alias 'production'; versions: v0; aliases: candidate -> v0, latest -> v0"):
        deploy_fetch.run(cfg)
    candidate = tmp_path / "candidate"
    deploy_fetch.run(cfg, model="clf:v0", to=candidate)  # deployed before its evaluation
    early = json.loads((candidate / "manifest.json").read_text())
    assert "production" not in early["aliases"] and early["evaluation"] is None
    weights = (candidate / "model.safetensors").stat().st_mtime_ns
    evaluate.run(cfg)
    first = deploy_fetch.run(cfg)
    dest = tmp_path / "deploy"
    assert first.status == "ok" and not first.details["reused"] and first.consumed == ["clf:v0"]
    reg = registry(cfg)
    version = reg.resolve("clf:v0")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["ref"] == "clf:v0" and manifest["digest"] == version.digest
    # the training data's columns, for predict --input
    assert manifest["input_columns"] == {"text": "text", "id": "ticket_id"}

    # deployed again once promoted: the files stay as they are, the manifest says what is true now
    again = deploy_fetch.run(cfg, to=candidate)
    refreshed = json.loads((candidate / "manifest.json").read_text())
    assert again.details["reused"] and (candidate / "model.safetensors").stat().st_mtime_ns == weights
    assert "production" in refreshed["aliases"] and refreshed["evaluation"] == manifest["evaluation"]
    assert (refreshed["fetched_at"], refreshed["deploy_run"]) == (early["fetched_at"], early["deploy_run"])
    assert deploy_fetch.run(cfg, to=candidate).details["reused"]  # still the registry's verified copy
    assert manifest["dataset"]["ref"] == "tickets:v0" and manifest["training_run"] == version.produced_by
    assert manifest["evaluation"]["metrics"]["accuracy"] == version.metadata["evaluation"]["metrics"]["accuracy"]
    assert manifest["smoke"]["label"] in version.metadata["label_names"] and manifest["fetched_at"]
    from pipeline.registry.local import hash_file

    for f in version.files:
        assert hash_file(dest / f.path)[0] == f.digest
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    second = deploy_fetch.run(cfg)  # same verified version in place: no copy, manifest untouched
    assert second.details["reused"] and {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    # the command prints the folder on stdout (DIR=$(python -m pipeline deploy-fetch ...)), the rest on stderr
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    printed = cli_here("deploy-fetch", "--config", str(config), "--to", str(candidate))
    assert printed.returncode == 0 and printed.stdout == f"{candidate}\n", printed.stderr[-2000:]

    # a tampered stored object fails verification and leaves the old deployment as it was
    finetune.run(env("train.seed=7"))  # clf:v1
    reg.set_alias("clf:v1", "production")
    v1 = reg.resolve("clf:v1")
    obj = reg.object_path(next(f.digest for f in v1.files if f.path == "model.safetensors"))
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00tampered")
    shutil.rmtree(Path(cfg.tracking.dir) / "artifacts" / "clf" / "v1", ignore_errors=True)
    with pytest.raises(IntegrityError, match="clf:v1: model.safetensors does not match"):
        deploy_fetch.run(cfg)
    assert json.loads((dest / "manifest.json").read_text())["ref"] == "clf:v0"
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".deploy")]  # no staging left behind

    # a folder holding something else is never overwritten without --force
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    runs_before = len(registry(cfg).resolve("clf:v0").used_by)
    with pytest.raises(ConfigError, match=rf"deploy folder {other} \(--to or deploy.dir\) already holds files that are "
                                          r"not a deployment \(no manifest.json\); pass --force"):
        deploy_fetch.run(cfg, model="clf:v0", to=other)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=rf"deploy folder {other}/notes.txt \(--to or deploy.dir\) is a file"):
        deploy_fetch.run(cfg, model="clf:v0", to=other / "notes.txt")
    assert len(registry(cfg).resolve("clf:v0").used_by) == runs_before  # refused before a run was opened
    forced = deploy_fetch.run(cfg, model="clf:v0", to=other, force=True)
    assert forced.status == "ok" and not (other / "notes.txt").exists()
    runs_before = len(registry(cfg).resolve("clf:v0").used_by)
    with pytest.raises(ConfigError, match=rf"deploy folder {other}/notes.txt/deploy \(--to or deploy.dir\) cannot be created"):
        (other / "notes.txt").write_text("a file where a folder would go")
        deploy_fetch.run(cfg, model="clf:v0", to=other / "notes.txt" / "deploy")
    assert len(registry(cfg).resolve("clf:v0").used_by) == runs_before  # refused before a run was opened


def test_deploy_fetch_never_replaces_the_registry_the_current_or_the_home_folder(env, tmp_path, monkeypatch):
    """Deploying replaces the target folder whole: with --force, `--to .` would have deleted the project."""
    cfg = env()
    track = Path(cfg.tracking.dir).resolve()
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("mine")
    monkeypatch.chdir(project / "src")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    runs_before = len(registry(cfg).resolve("clf:v0").used_by)
    for target, what in ((track, "the tracking folder"), (track.parent, "the tracking folder"),
                         (project / "src", "the current folder"), (project, "the current folder"),
                         (tmp_path / "home", "your home folder")):
        with pytest.raises(ConfigError, match=rf"deploy folder {target} \(--to or deploy.dir\) is {what}"):
            deploy_fetch.run(cfg, model="clf:v0", to=target, force=True)
    # nor a folder the pipeline keeps under it: `--to .pipeline/registry --force` emptied the catalog
    for target in (track / "registry", track / "registry" / "objects", track / "artifacts" / "clf" / "v0",
                   track / "checkpoints", track / "cache" / "tokenized", track / "sweeps", track / "wandb"):
        with pytest.raises(ConfigError, match=rf"deploy folder {target} \(--to or deploy.dir\) is inside "
                                              rf"{track / target.relative_to(track).parts[0]}, which the pipeline keeps"):
            deploy_fetch.run(cfg, model="clf:v0", to=target, force=True)
    assert (project / "src" / "train.py").read_text() == "mine" and registry(cfg).resolve("clf:v0").ref == "clf:v0"
    assert len(registry(cfg).resolve("clf:v0").used_by) == runs_before  # refused before a run was opened
    assert deploy_fetch.run(cfg, model="clf:v0", to=project / "src" / "deploy").status == "ok"  # a folder of its own
    assert deploy_fetch.run(cfg, model="clf:v0", to=track / "deploy").status == "ok"  # under tracking.dir, not in its folders


def test_predict_command_and_function(env, template, tmp_path, cli_here):
    cfg = env()
    evaluate.run(cfg)
    deploy_fetch.run(cfg)
    dest = tmp_path / "deploy"
    labels = registry(cfg).resolve("clf:v0").metadata["label_names"]
    from pipeline.predict import predict

    preds = predict(dest, ["i was charged twice for my invoice", "tracking for my order has not updated since monday"], top_k=3)
    assert all(p.label in labels and 0 < p.confidence <= 1 and len(p.top) == 3 for p in preds)
    assert [p.label for p in preds] == ["billing", "shipping"]
    out = run_cli("predict", "--model-dir", str(dest), "i was charged twice for my invoice")
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr  # no progress bar for loading a model to classify one text
    assert "longer than the model's max_length" not in out.stderr
    long = cli_here("predict", "--model-dir", str(dest), "my parcel never arrived " * 60, "short one")
    assert long.returncode == 0 and len(long.stdout.splitlines()) == 2
    assert "1 of 2 texts are longer than the model's max_length" in long.stderr
    label, score, text = out.stdout.strip().split("\t")
    assert label == "billing" and 0 < float(score) <= 1 and text == "i was charged twice for my invoice"
    # A text (any data's) prints on its own line, and cannot drive the terminal: what splits lines (\x0b, NEL,
    # U+2028, as str.splitlines() does) is a space as a tab or line break is, and a control character (a terminal
    # escape sequence's ESC, DEL, C1) or a direction override is written escaped, as `cat -v` would show it.
    odd = cli_here("predict", "--model-dir", str(dest), "red \x1b[31malert\x1b[0m", "a\x0bb\x85c\u2028d\u2029e",
                   "\u202eevil\x7f\x9b")
    assert odd.returncode == 0, odd.stderr
    shown = [line.split("\t")[-1] for line in odd.stdout.splitlines()]
    assert shown == ["red \\x1b[31malert\\x1b[0m", "a b c d e", "\\u202eevil\\x7f\\x9b"], odd.stdout
    js = cli_here("predict", "--model-dir", str(dest), "--json", "--top-k", "2", "tracking for my order has not updated since monday")
    row = json.loads(js.stdout)
    assert row["label"] == "shipping" and len(row["top"]) == 2
    missing = cli_here("predict", "--model-dir", str(tmp_path / "nothing"), "x")
    assert missing.returncode == 2 and f"{tmp_path / 'nothing'} is not a model folder (it does not exist); " in missing.stderr
    typo = dest.parent / (dest.name[:-1] + "x")  # one letter off: the deployed folder is named
    misspelt = cli_here("predict", "--model-dir", str(typo), "x")
    assert misspelt.returncode == 2 and f"(it does not exist; did you mean {dest}?)" in misspelt.stderr
    base = cli_here("predict", "--model-dir", str(template[1]), "x")  # the base encoder: no trained head
    assert base.returncode == 2 and "is not a trained classifier (its config.json says ['BertModel']" in base.stderr

    # Batches go in order of length; the rows come back in input order, with the same logits.
    classifier = load_classifier(dest)
    texts = ["refund", "my parcel has not arrived and the tracking page has said in transit for nine days now",
             "i was charged twice for my invoice", "", "login fails " * 20, "where is my order"]
    in_order = classifier.logits(texts, batch_size=2, sort_by_length=False)
    assert np.allclose(classifier.logits(texts, batch_size=2), in_order, atol=1e-5)
    longer_first = ["tracking for my order has not updated since monday", "i was charged twice for my invoice"]
    assert [p.label for p in classifier.predict(longer_first)] == ["shipping", "billing"]

    # A damaged deployment is one message naming what changed since deploy-fetch, and how to restore it.
    with open(dest / "model.safetensors", "r+b") as fh:
        fh.write(b"\xff" * 16)  # the safetensors header length: now absurd
    damaged = cli_here("predict", "--model-dir", str(dest), "where is my parcel")
    assert damaged.returncode == 2 and "Traceback" not in damaged.stderr, damaged.stderr[-2000:]
    assert "the model does not load (SafetensorError" in damaged.stderr
    assert f"since deploy-fetch put clf:v0 here: model.safetensors changed. Run deploy-fetch --model clf:v0 --to {dest}" \
        in damaged.stderr
    deploy_fetch.run(env(), model="clf:v0", to=dest)  # as the message says: the verified copy is back
    (dest / "config.json").unlink()  # a file gone, even the one that makes it a model folder, is named the same way
    gone = cli_here("predict", "--model-dir", str(dest), "where is my parcel")
    assert gone.returncode == 2 and gone.stderr.strip() == (
        f"error: {dest} is not a model folder (no config.json); since deploy-fetch put clf:v0 here: config.json "
        f"missing. Run deploy-fetch --model clf:v0 --to {dest} again to restore it")
    deploy_fetch.run(env(), model="clf:v0", to=dest)
    assert [p.label for p in predict(dest, ["i was charged twice for my invoice"])] == ["billing"]

    # One string is one text, not a sequence of characters; a non-string is named by its index.
    [one] = predict(dest, "i was charged twice for my invoice")
    assert one.label == "billing"
    with pytest.raises(PipelineError, match=r"texts\[1\] is a NoneType, not a string"):
        predict(dest, ["my parcel is late", None])

    def stdin(data: bytes) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model-dir", str(dest)], input=data,
                              capture_output=True, timeout=300, cwd=REPO, env=os.environ)

    # stdin is UTF-8 (a BOM, as Windows editors write, and CRLF line ends are dropped); other bytes are named
    ok = stdin("\ufeffi was charged twice for my invoice\r\n\ncaf\u00e9 order tracking\n".encode("utf-8"))
    assert ok.returncode == 0, ok.stderr
    assert [line.split(b"\t")[-1] for line in ok.stdout.splitlines()] == [
        b"i was charged twice for my invoice", "caf\u00e9 order tracking".encode("utf-8")]
    latin1 = stdin("fine\ncaf\u00e9 order\n".encode("latin-1"))
    assert latin1.returncode == 2 and latin1.stdout == b""
    assert b"stdin line 2 is not valid UTF-8" in latin1.stderr and b"Traceback" not in latin1.stderr

    # stdin is classified 1,024 lines at a time: results come while the input is still open, in input order.
    texts = [f"my order {i} has not arrived" if i % 3 else f"i was charged {i} times" for i in range(1030)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "predict", "--model-dir", str(dest)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=os.environ)
    guard = threading.Timer(240, proc.kill)  # a predict that waits for the end of input fails, not hangs
    guard.start()
    try:
        proc.stdin.write("".join(t + "\n" for t in texts).encode())
        proc.stdin.flush()
        first = proc.stdout.readline()  # stdin is still open
        proc.stdin.write(b"refund please\n")
        proc.stdin.close()
        rest = proc.stdout.read().splitlines()
    finally:
        guard.cancel()
    assert proc.wait() == 0 and first, "no output before the end of input"
    streamed = [line.decode().rstrip("\n").split("\t") for line in [first, *rest]]
    assert [row[-1] for row in streamed] == [*texts, "refund please"]
    assert [row[0] for row in streamed] == [p.label for p in predict(dest, [*texts, "refund please"])]


def test_a_classifier_folder_finetune_did_not_make_reads_no_more_tokens_than_its_positions(env, tmp_path):
    """A Hugging Face classifier's folder has no training_config.json to say its max_length, and a tokenizer saved
    without model_max_length says no limit: texts were cut at 512 tokens, and one longer than the model's 128
    positions stopped predict with a RuntimeError about tensor sizes. The limit is the model's positions."""
    cfg = env()
    reg = registry(cfg)
    folder = tmp_path / "hub-like"
    shutil.copytree(reg.fetch(reg.resolve("clf:v0")).path, folder)
    (folder / "training_config.json").unlink()
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("model_max_length", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    classifier = load_classifier(folder)
    assert classifier.max_length == json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 128
    [prediction] = classifier.predict([" ".join(["my parcel never arrived"] * 60)])
    assert prediction.label in classifier.label_names and classifier.truncated == 1


def test_printed_predictions_keep_one_column_per_field_when_a_label_or_id_holds_a_tab(capsys):
    """Labels are kept as the training data wrote them, so a tab or a line break can be part of one; printed as is,
    it would shift every column after it or split the row."""
    import argparse

    from pipeline.commands.predict import _print

    record = {"id": "T\t1", "text": "refund\nplease", "label": "new\tline",
              "top": [{"label": "new\tline", "score": 0.61}, {"label": "multi\nline", "score": 0.39}]}
    as_written = {"new\tline": "new\tline", "multi\nline": "multi\nline"}
    _print(record, argparse.Namespace(json=False, as_written=as_written))
    _print(record, argparse.Namespace(json=True, as_written=as_written))
    printed, as_json = capsys.readouterr().out.splitlines()
    assert printed.split("\t") == ["T 1", "new line", "0.6100", "multi line", "0.3900", "refund please"]
    assert json.loads(as_json) == record  # --json keeps everything as it is


def test_predict_classifies_the_rows_of_a_data_file_and_writes_a_table(env, tmp_path, cli_here):
    cfg = env()
    evaluate.run(cfg)
    dest = tmp_path / "deploy"
    deploy_fetch.run(cfg, to=dest)
    from pipeline.predict import predict

    bodies = ["i was charged twice for my invoice", "where is my parcel\nthe tracking has not moved", "",
              *[f"my order {i} has not arrived" for i in range(1100)]]  # more rows than one chunk of 1,024
    src = tmp_path / "tickets.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ticket", "body", "other"])
        w.writerows([f"T{i}", b, "x"] for i, b in enumerate(bodies))
    expected = predict(dest, bodies, top_k=2)
    args = ["predict", "--model-dir", str(dest), "--input", str(src), "--text-column", "body", "--id-column", "ticket",
            "--top-k", "2"]
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        out = cli_here(*args, "--output", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{len(bodies)} predictions written to {tmp_path / name}" in out.stderr
        # the empty body (row 3) is classified like any row, and said to be empty, on line 5 (row 2 has two lines)
        assert f"1 of {len(bodies)} rows have no text in column 'body' (empty, blank or missing; the first: {src} row 3, " \
            "line 5)" in out.stderr
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["id", "text", "label", "confidence", "label_2", "score_2"]
    assert [r["id"] for r in table] == [f"T{i}" for i in range(len(bodies))] and table[1]["text"] == bodies[1]
    assert [(r["label"], r["label_2"]) for r in table] == [(p.top[0][0], p.top[1][0]) for p in expected]
    assert [float(r["confidence"]) for r in table] == pytest.approx([p.confidence for p in expected], abs=1e-5)
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in records] == [p.label for p in expected] and len(records[0]["top"]) == 2
    assert pq.read_table(tmp_path / "p.parquet").column("label").to_pylist() == [p.label for p in expected]
    printed = cli_here(*args[:-2])  # to stdout: one line per row, line breaks in a text shown as spaces
    lines = printed.stdout.splitlines()
    assert len(lines) == len(bodies) and lines[1].split("\t") == ["T1", expected[1].label, lines[1].split("\t")[2],
                                                                   "where is my parcel the tracking has not moved"]
    by_row = cli_here("predict", "--model-dir", str(dest), "--input", str(src), "--text-column", "body", "--json")
    assert json.loads(by_row.stdout.splitlines()[2])["id"] == f"{src}:3"  # no id column: the file and row

    def refused(*extra: str) -> str:
        out = cli_here("predict", "--model-dir", str(dest), *extra, "--output", str(tmp_path / "never.csv"))
        assert out.returncode == 2 and "Traceback" not in out.stderr and not (tmp_path / "never.csv").exists()
        return out.stderr

    missing = refused("--input", str(src))
    assert f"{src}: missing column(s) text; the file has: ticket, body, other" in missing
    assert ("(set --text-column / --text-pair-column / --id-column to match; by default 'text', the columns of the "
            "model's training data)") in missing
    assert "not both" in refused("--input", str(src), "--text-column", "body", "some text")
    assert f"--input not found: {tmp_path / 'nowhere.csv'}" in refused("--input", str(tmp_path / "nowhere.csv"))
    assert "--id-column goes with --input" in refused("--id-column", "ticket", "some text")
    assert "--text-column goes with --input" in refused("--text-column", "body", "some text")
    assert "classifies single texts; --text-pair-column is for sentence-pair models" in refused(
        "--input", str(src), "--text-column", "body", "--text-pair-column", "other")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(src.read_bytes().replace(b"T1050,my order", b"T1050,caf\xe9 order"))
    assert "row 1051, line 1053: column 'body' is not valid UTF-8" in refused("--input", str(bad), "--text-column", "body")
    out = cli_here(*args, "--output", str(tmp_path / "p.xlsx"))
    assert out.returncode == 2 and "name a .csv, .tsv, .jsonl, .parquet file" in out.stderr
    linked = tmp_path / "linked.csv"  # renamed over, the link itself would be replaced by the table
    linked.symlink_to(tmp_path / "p.csv")
    out = cli_here(*args, "--output", str(linked))
    assert out.returncode == 2 and f"--output {linked} is not a regular file (a link or a pipe)" in out.stderr
    assert linked.is_symlink()
    # a path that cannot be written, or a folder: said before any text is classified, as one line (a file where its
    # folder would be ended in FileExistsError's traceback, after the model had loaded)
    (tmp_path / "a-file").write_text("")
    out = cli_here(*args, "--output", str(tmp_path / "a-file" / "p.csv"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--output {tmp_path / 'a-file' / 'p.csv'} cannot be written: File exists" in out.stderr
    (tmp_path / "folder.csv").mkdir()
    out = cli_here(*args, "--output", str(tmp_path / "folder.csv"))
    assert out.returncode == 2 and f"--output {tmp_path / 'folder.csv'} is a folder; give a file path" in out.stderr

    # ids of numbers (JSON Lines, Parquet) come back as numbers, so the predictions join the caller's own table;
    # text beside numbers (another file of a folder) or rows named by file and row make them all text
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    (numbered / "a.jsonl").write_text('{"ticket": 7, "body": "my parcel is late"}\n{"ticket": 8, "body": "refund"}\n')
    pq.write_table(pa.table({"ticket": pa.array([9], pa.int32()), "body": ["charged twice"]}), tmp_path / "b.parquet")
    for source, ids in ((numbered / "a.jsonl", [7, 8]), (tmp_path / "b.parquet", [9])):
        for name in ("n.jsonl", "n.parquet", "n.csv"):
            out = cli_here("predict", "--model-dir", str(dest), "--input", str(source), "--text-column", "body",
                           "--id-column", "ticket", "--output", str(tmp_path / name))
            assert out.returncode == 0, out.stderr[-2000:]
        assert [json.loads(line)["id"] for line in (tmp_path / "n.jsonl").read_text().splitlines()] == ids
        assert pq.read_table(tmp_path / "n.parquet").column("id").to_pylist() == ids
        assert (tmp_path / "n.csv").read_text().splitlines()[1].startswith(f"{ids[0]},")
    (numbered / "b.jsonl").write_text("")  # an empty part file: no rows, and no type that makes the ids text
    shard = cli_here("predict", "--model-dir", str(dest), "--input", str(numbered), "--text-column", "body",
                     "--id-column", "ticket", "--json")
    assert [json.loads(line)["id"] for line in shard.stdout.splitlines()] == [7, 8], shard.stderr[-2000:]
    (numbered / "c.jsonl").write_text('{"ticket": 10.5, "body": "where is it"}\n')  # not 7.0 beside 10.5
    (numbered / "d.jsonl").write_text('{"ticket": "T-11", "body": "wrong size"}\n')
    mixed = cli_here("predict", "--model-dir", str(dest), "--input", str(numbered), "--text-column", "body",
                     "--id-column", "ticket", "--json")
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    assert [json.loads(line)["id"] for line in mixed.stdout.splitlines()] == ["7", "8", "10.5", "T-11"]

    # a CSV as Excel writes it in many locales (;) or on Windows (cp1252): the message names predict's own flags
    excel = tmp_path / "excel.csv"
    excel.write_bytes("ticket;body\nE1;caf\u00e9 charged twice for my invoice\nE2;where is my parcel\n".encode("cp1252"))
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(excel), "--text-column", "body", "--id-column",
                   "ticket")
    assert out.returncode == 2 and f"{excel}: the first line has no ',', but it has ';': pass --delimiter ';'" in out.stderr
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(excel), "--text-column", "body", "--id-column",
                   "ticket", "--delimiter", ";")
    assert out.returncode == 2 and f"{excel} row 1: column 'body' is not valid UTF-8; a CSV saved in another encoding " \
        "needs --encoding, e.g. cp1252" in out.stderr
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(excel), "--text-column", "body", "--id-column",
                   "ticket", "--delimiter", ";", "--encoding", "cp1252", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(r["id"], r["text"]) for r in map(json.loads, out.stdout.splitlines())] == [
        ("E1", "caf\u00e9 charged twice for my invoice"), ("E2", "where is my parcel")]
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("ticket\tbody\nE1\twhere is my parcel\n", encoding="utf-8")
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(tabbed), "--text-column", "body", "--delimiter", "\\t")
    assert out.returncode == 0 and out.stdout.rstrip().endswith("where is my parcel"), out.stderr[-2000:]
    spark = tmp_path / "spark.csv"  # quotes escaped with a backslash, as Spark writes CSV
    spark.write_text('ticket,body\nS1,"he said \\"my parcel\\" never came"\n', encoding="utf-8")
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(spark), "--text-column", "body", "--json")
    assert out.returncode == 0 and "holds a backslash before a quote" in out.stderr and "set --escape-char '\\'" in out.stderr
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(spark), "--text-column", "body", "--json",
                   "--escape-char", "\\")
    assert out.returncode == 0 and json.loads(out.stdout)["text"] == 'he said "my parcel" never came', out.stderr[-2000:]
    assert "backslash" not in out.stderr
    assert "--escape-char goes with --input" in cli_here("predict", "--model-dir", str(dest), "--escape-char", "\\", "x").stderr
    glue = tmp_path / "glue.tsv"  # never quoted, as GLUE's TSV files
    glue.write_text('ticket\tbody\nG1\t"my parcel" never came\n', encoding="utf-8")
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(glue), "--text-column", "body", "--json")
    assert out.returncode == 0 and "set --no-quoting" in out.stderr and json.loads(out.stdout)["text"] == "my parcel never came"
    out = cli_here("predict", "--model-dir", str(dest), "--input", str(glue), "--text-column", "body", "--json", "--no-quoting")
    assert out.returncode == 0 and json.loads(out.stdout)["text"] == '"my parcel" never came', out.stderr[-2000:]
    assert "--no-quoting goes with --input" in cli_here("predict", "--model-dir", str(dest), "--no-quoting", "x").stderr
    both = cli_here("predict", "--model-dir", str(dest), "--input", str(glue), "--no-quoting", "--escape-char", "\\")
    assert both.returncode == 2 and "with --no-quoting no field is quoted: set one or the other" in both.stderr
    assert "--delimiter goes with --input" in cli_here("predict", "--model-dir", str(dest), "--delimiter", ";", "x").stderr
    assert "--encoding: unknown text encoding 'klingon'" in cli_here(
        "predict", "--model-dir", str(dest), "--input", str(excel), "--encoding", "klingon").stderr


def test_sentence_pair_model_from_publish_to_predict(template, tmp_path, cli_here):
    """A second text column travels through finetune, evaluate, the deploy smoke test and predict."""
    import csv as csvlib

    from pipeline.errors import PipelineError

    root, model_dir, tickets = template
    pairs = write_ticket_pairs(tickets, tmp_path / "pairs.csv", header=("pid", "question", "topic", "verdict"))
    cfg = load_config(None, [*overrides(tmp_path, model_dir, pairs), "dataset.name=pairs", "dataset.id_column=pid",
                             "dataset.text_column=question", "dataset.text_pair_column=topic",
                             "dataset.label_column=verdict", "model.name=pairclf", "train.epochs=2",
                             "evaluate.gate.better_than_chance=false"])  # a tiny model, two epochs: not the point here
    result = run_all(cfg)
    assert [s.status for s in result.stages] == ["ok"] * 4, result.to_dict()
    deployed = tmp_path / "deploy"
    manifest = json.loads((deployed / "manifest.json").read_text())
    assert manifest["smoke"]["text_pair"] == deploy_fetch.SMOKE_PAIR and manifest["smoke"]["label"] in ("match", "mismatch")
    training = json.loads((deployed / "training_config.json").read_text())
    assert training["inputs"] == ["text", "text_pair"]
    assert "pair_separator" not in training  # BERT's tokenizer puts [SEP] between the texts itself
    # the model card's example for a pair model runs as written in plain transformers
    card = (deployed / "README.md").read_text()
    example = 'classify({"text": "my order never arrived", "text_pair": "shipping"})'
    assert example in card
    from transformers import pipeline as hf_pipeline

    scored = hf_pipeline("text-classification", model=str(deployed))({"text": "my order never arrived", "text_pair": "shipping"})
    assert scored["label"] in ("match", "mismatch")

    classifier = load_classifier(deployed)
    assert classifier.takes_pairs
    # evaluate scored the test split as pairs: its accuracy is what the classifier gets on (text, text_pair)
    reg = LocalRegistry(Path(cfg.tracking.dir) / "registry")
    test = pq.read_table(reg.fetch(reg.resolve("pairs:v0"), tmp_path / "ds").path / "test.parquet").to_pydict()
    preds = classifier.predict(test["text"], test["text_pair"])
    accuracy = float(np.mean([p.label == y for p, y in zip(preds, test["label"])]))
    assert result.stages[2].metrics["test_accuracy"] == pytest.approx(accuracy)
    with pytest.raises(PipelineError, match="classifies text pairs"):
        classifier.predict(["where is my parcel"])
    texts = ["where is my parcel", "i was charged twice"]
    one = classifier.logits(texts, ["shipping", "billing"])
    other = classifier.logits(texts, ["billing", "shipping"])
    assert not np.allclose(one, other)  # the second text reaches the model

    out = cli_here("predict", "--model-dir", str(deployed), "--json", "where is my parcel\tshipping")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["text"] == "where is my parcel" and row["text_pair"] == "shipping" and row["label"] in ("match", "mismatch")
    unpaired = cli_here("predict", "--model-dir", str(deployed), "where is my parcel")
    assert unpaired.returncode == 2 and "give each as TEXT<TAB>PAIR (input 1 has no tab)" in unpaired.stderr
    # a data file's two columns, the pairs in the order of the file
    table = cli_here("predict", "--model-dir", str(deployed), "--input", str(pairs), "--text-column", "question",
                    "--text-pair-column", "topic", "--id-column", "pid", "--output", str(tmp_path / "pairs.jsonl"))
    assert table.returncode == 0, table.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    with open(pairs, newline="", encoding="utf-8") as f:
        in_file = [(r["pid"], r["question"], r["topic"]) for r in csvlib.DictReader(f)]
    assert [(r["id"], r["text"], r["text_pair"]) for r in written] == in_file
    assert [r["label"] for r in written] == [p.label for p in classifier.predict([r["text"] for r in written],
                                                                                 [r["text_pair"] for r in written])]
    # unnamed, the columns are the training data's (deploy-fetch records them): the same predictions
    assert manifest["input_columns"] == {"text": "question", "text_pair": "topic", "id": "pid"}
    unnamed = cli_here("predict", "--model-dir", str(deployed), "--input", str(pairs), "--json")  # the ids too
    assert unnamed.returncode == 0, unnamed.stderr[-2000:]
    assert [json.loads(line) for line in unnamed.stdout.splitlines()] == written
    # a file without the id column: its rows are named by file and row, as without a default
    no_ids = tmp_path / "no_ids.csv"
    with open(no_ids, "w", newline="", encoding="utf-8") as f:
        csvlib.writer(f).writerows([("question", "topic"), *((q, t) for _, q, t in in_file[:2])])
    named = cli_here("predict", "--model-dir", str(deployed), "--input", str(no_ids), "--json")
    assert [json.loads(line)["id"] for line in named.stdout.splitlines()] == [f"{no_ids}:1", f"{no_ids}:2"]
    # and so is a row whose id is empty, quoted empty or blank: no id, as dataset-publish reads it
    blank_ids = tmp_path / "blank_ids.csv"
    blank_ids.write_text("pid,question,topic\n" + "".join(f'{pid},"{q}",{t}\n' for pid, (_, q, t) in
                                                         zip(("", '""', "  ", "P9"), in_file[:4])))
    named = cli_here("predict", "--model-dir", str(deployed), "--input", str(blank_ids), "--json")
    assert [json.loads(line)["id"] for line in named.stdout.splitlines()] == [
        f"{blank_ids}:1", f"{blank_ids}:2", f"{blank_ids}:3", "P9"], named.stderr[-2000:]
    # a model folder without them (copied by hand, or deployed before they were recorded) needs the flags
    bare = tmp_path / "bare"
    shutil.copytree(deployed, bare)
    (bare / "manifest.json").unlink()
    no_pair = cli_here("predict", "--model-dir", str(bare), "--input", str(pairs), "--text-column", "question")
    assert no_pair.returncode == 2 and "name the second text's column with --text-pair-column" in no_pair.stderr
    assert "missing column(s) text;" in cli_here("predict", "--model-dir", str(bare), "--input", str(pairs)).stderr

    # A single-text challenger for the same labels cannot be scored on production's inputs (pairs): the
    # gate decides on the minimums and says why (it was a "classifies text pairs" failure of the stage).
    joined = tmp_path / "joined.csv"
    with open(pairs, newline="", encoding="utf-8") as src, open(joined, "w", newline="", encoding="utf-8") as f:
        w = csvlib.writer(f)
        w.writerow(["pid", "question", "verdict"])
        w.writerows([r["pid"], f"{r['question']} | {r['topic']}", r["verdict"]] for r in csvlib.DictReader(src))
    single = load_config(None, [*overrides(tmp_path, model_dir, joined), "dataset.name=joined", "dataset.id_column=pid",
                                "dataset.text_column=question", "dataset.label_column=verdict", "model.name=pairclf",
                                "train.max_steps=2"])
    dataset_publish.run(single)
    assert finetune.run(single).produced == ["pairclf:v1"]
    outcome = evaluate.run(single)
    record = reg.resolve("pairclf:v1").metadata["evaluation"]
    assert record["champion"] == {"ref": "pairclf:v0", "not_compared": "production pairclf:v0 classifies sentence pairs, "
                                                                      "the challenger single texts"}
    assert not any(c["check"].endswith("vs production") for c in record["gate"]["checks"])
    assert outcome.consumed == ["pairclf:v1", "joined:v0", "pairclf:v0"]
    # Nor can either model score the other's dataset version: refused before a run opens (it was Arrow's traceback,
    # "No match for FieldRef.Name(text_pair)", once the run had opened)
    runs_before = len(reg_runs(reg))
    for model, data, holds, takes in (("pairclf:v1", "pairs:v0", "sentence pairs", "single texts"),
                                      ("pairclf:v0", "joined:v0", "single texts", "sentence pairs")):
        with pytest.raises(ConfigError, match=f"{data} holds {holds} but {model} classifies {takes}; evaluate it on "
                                              f"a dataset version of {takes}"):
            evaluate.run(single, model=model, dataset=data, promote=False)
    assert len(reg_runs(reg)) == runs_before
    assert [reg.resolve(m).metadata["inputs"] for m in ("pairclf:v0", "pairclf:v1")] == [["text", "text_pair"], ["text"]]
    # What a model classifies is its dataset version's kind, not its config's: the single-text config trained on the
    # pairs (finetune --dataset) made a pair model, which evaluate scores on pairs
    paired = finetune.run(single, dataset="pairs:v0").produced[0]
    assert reg.resolve(paired).metadata["inputs"] == ["text", "text_pair"]
    assert evaluate.run(single, model=paired, promote=False).consumed[:2] == [paired, "pairs:v0"]
    # a version made before `inputs` were recorded is asked through the dataset version it trained on
    with sqlite3.connect(Path(cfg.tracking.dir) / "registry" / "catalog.db") as db:
        db.execute("UPDATE versions SET metadata = json_remove(metadata, '$.inputs') WHERE name = 'pairclf' AND "
                   "version = ?", (int(paired.split(":v")[1]),))
    assert "inputs" not in reg.resolve(paired).metadata
    with pytest.raises(ConfigError, match=f"joined:v0 holds single texts but {paired} classifies sentence pairs"):
        evaluate.run(single, model=paired, dataset="joined:v0", promote=False)


def test_run_executes_the_four_stages_in_one_group(env, tmp_path):
    cfg = env()
    shutil.rmtree(Path(cfg.tracking.dir))  # a clean start
    result = run_all(cfg)
    assert [s.stage for s in result.stages] == ["dataset-publish", "finetune", "evaluate", "deploy-fetch"]
    assert [s.status for s in result.stages] == ["ok"] * 4 and result.status == "ok"
    with sqlite3.connect(Path(cfg.tracking.dir) / "registry" / "catalog.db") as conn:
        groups = {r[0] for r in conn.execute("SELECT run_group FROM runs")}
    assert groups == {result.group}
    assert (tmp_path / "deploy" / "manifest.json").is_file()
    out = result.to_dict()
    assert out["stage"] == "run" and out["produced"] == ["tickets:v0", "clf:v0"] and len(out["stages"]) == 4

    # a gate that says no stops the run with its exit code before deploy-fetch
    config = tmp_path / "strict.yaml"
    import yaml

    config.write_text(yaml.safe_dump(env("evaluate.gate.min_accuracy=1.0", *BAD).to_dict()))  # a one-step model
    cli = run_cli("run", "--config", str(config), "--result-json", str(tmp_path / "run.json"))
    assert cli.returncode == 3, cli.stderr[-2000:]
    # stderr is a pipe here, as in an orchestrator: a plain log, no progress bars redrawn with \r
    assert "\r" not in cli.stderr and "it/s" not in cli.stderr and "'train_loss'" in cli.stderr
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"] == "gate_failed" and [s["stage"] for s in data["stages"]] == ["dataset-publish", "finetune", "evaluate"]
    assert data["stages"][0]["status"] == "unchanged"
    # each stage's line says what it decided, as the stage's own command does: here why the gate said no
    gate_line = next(line for line in cli.stderr.splitlines() if line.startswith("evaluate: gate_failed"))
    assert gate_line.startswith(f"evaluate: gate_failed: {data['stages'][1]['produced'][0]}: ") and "accuracy" in gate_line
    # and the run's last line says what it came to, without saying evaluate's reasons a second time
    assert cli.stderr.rstrip().splitlines()[-1] == (f"run: gate_failed: {data['stages'][1]['produced'][0]} was not promoted, "
                                                    "so nothing was deployed")


@pytest.mark.slow
def test_orchestrator_chain_through_result_files(env, tmp_path):
    import yaml

    cfg = env()
    shutil.rmtree(Path(cfg.tracking.dir))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    work = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "orchestrate.py"), "--config", str(config),
                           "--workdir", str(work)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads((work / f).read_text()) for f in
             ("1-dataset-publish.json", "2-finetune.json", "3-evaluate.json", "4-deploy-fetch.json")]
    assert [s["status"] for s in steps] == ["ok"] * 4
    assert steps[1]["consumed"] == steps[0]["produced"] == ["tickets:v0"]
    assert steps[2]["consumed"][0] == steps[1]["produced"][0] == "clf:v0"
    assert steps[3]["consumed"] == ["clf:v0"]
    assert "--dataset tickets:v0" in done.stdout and "--model clf:v0" in done.stdout
    # the gate branch: exit 3, nothing deployed
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(env("evaluate.gate.min_accuracy=1.0", *BAD).to_dict()))  # a one-step model
    gated = subprocess.run([sys.executable, str(REPO / "scripts" / "orchestrate.py"), "--config", str(strict),
                            "--workdir", str(tmp_path / "r2")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert gated.returncode == 3 and "gate said no" in gated.stdout
    assert not (tmp_path / "r2" / "4-deploy-fetch.json").exists()


def test_labels_that_were_numbers_in_the_source_are_predicted_as_numbers(template, tmp_path, cli_here):
    """Class ids 0..5 in JSON Lines are published and trained on as the texts "0".."5" (compared as text everywhere),
    and predict gives them back as numbers, so its predictions compare equal to the caller's own labels: as the
    texts, pandas' `"1" == 1` would be False on every row without a word."""
    import pandas as pd

    root, model_dir, tickets = template
    with open(tickets, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    source = tmp_path / "ids.jsonl"
    source.write_text("".join(json.dumps({"n": i, "body": r["text"], "y": names.index(r["label"])}) + "\n"
                              for i, r in enumerate(rows)), encoding="utf-8")
    cfg = load_config(None, [*overrides(tmp_path, model_dir, source), "dataset.name=ids", "dataset.id_column=n",
                             "dataset.text_column=body", "dataset.label_column=y", "model.name=idclf", "train.epochs=2",
                             "evaluate.gate.better_than_chance=false"])
    result = run_all(cfg)
    assert [s.status for s in result.stages] == ["ok"] * 4, result.to_dict()
    reg = LocalRegistry(Path(cfg.tracking.dir) / "registry")
    dataset = reg.resolve("ids:v0")
    manifest = json.loads((reg.fetch(dataset, tmp_path / "ds").path / "dataset.json").read_text())
    assert manifest["label_names"] == ["0", "1", "2", "3", "4", "5"] and manifest["label_type"] == "integer"
    assert dataset.metadata["label_type"] == "integer"
    assert pq.read_table(tmp_path / "ds" / "train.parquet").schema.field("label").type == pa.string()  # as text
    deployed = tmp_path / "deploy"
    assert json.loads((deployed / "labels.json").read_text())["label_type"] == "integer"
    assert reg.resolve("idclf:v0").metadata["label_type"] == "integer"
    assert json.loads((deployed / "manifest.json").read_text())["smoke"]["label"] in manifest["label_names"]

    classifier = load_classifier(deployed)
    assert classifier.label_names == manifest["label_names"] and classifier.labels == [0, 1, 2, 3, 4, 5]
    texts = [r["text"] for r in rows]
    expected = [p.label for p in classifier.predict(texts)]
    assert {type(label) for label in expected} == {int}
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        out = cli_here("predict", "--model-dir", str(deployed), "--input", str(source), "--top-k", "2",
                       "--output", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-2000:]
    truth = pd.read_json(source, lines=True)
    for frame in (pd.read_json(tmp_path / "p.jsonl", lines=True), pd.read_parquet(tmp_path / "p.parquet"),
                  pd.read_csv(tmp_path / "p.csv")):
        assert frame["label"].tolist() == expected and frame["label"].dtype == truth["y"].dtype
        joined = truth.merge(frame, left_on="n", right_on="id")
        assert len(joined) == len(rows)
        assert (joined["y"] == joined["label"]).mean() == pytest.approx(np.mean([p == y for p, y in zip(expected, truth["y"])]))
    assert (tmp_path / "p.csv").read_text().splitlines()[1].split(",")[2] == str(expected[0])  # written as in the data
    printed = cli_here("predict", "--model-dir", str(deployed), "--json", texts[0])
    assert json.loads(printed.stdout)["label"] == expected[0]
    printed = cli_here("predict", "--model-dir", str(deployed), texts[0])
    assert printed.stdout.split("\t")[0] == str(expected[0])

    # a labels.json edited so that its names are not numbers, or without label_type: the names, as before
    labels = json.loads((deployed / "labels.json").read_text())
    (deployed / "labels.json").write_text(json.dumps({**labels, "label_type": "boolean"}))
    assert load_classifier(deployed).labels == manifest["label_names"]
    (deployed / "labels.json").write_text(json.dumps({k: v for k, v in labels.items() if k != "label_type"}))
    assert load_classifier(deployed).predict(texts[:1])[0].label == str(expected[0])
