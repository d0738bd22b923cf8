"""The package's own classification metrics against scikit-learn, and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from pipeline.metrics import SUMMARY_KEYS, load_metric, paired_bootstrap, scores


def noisy(refs: np.ndarray, right: float, num_labels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(refs)) < right, refs, rng.integers(0, num_labels, len(refs)))


@pytest.mark.parametrize("num_labels, absent", [(2, None), (5, None), (7, 3)])
def test_scores_match_scikit_learn(num_labels, absent):
    rng = np.random.default_rng(num_labels)
    refs = rng.integers(0, num_labels, 400)
    preds = noisy(refs, 0.7, num_labels, seed=1)
    if absent is not None:  # a class neither in the references nor predicted: not part of the macro average
        refs[refs == absent] = 0
        preds[preds == absent] = 1
    got = scores(preds, refs, num_labels)
    want = {
        "accuracy": accuracy_score(refs, preds),
        "macro_f1": f1_score(refs, preds, average="macro", zero_division=0),
        "macro_precision": precision_score(refs, preds, average="macro", zero_division=0),
        "macro_recall": recall_score(refs, preds, average="macro", zero_division=0),
        "micro_f1": f1_score(refs, preds, average="micro", zero_division=0),
        "weighted_f1": f1_score(refs, preds, average="weighted", zero_division=0),
    }
    for key in SUMMARY_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    per_class = f1_score(refs, preds, average=None, labels=list(range(num_labels)), zero_division=0)
    assert got["per_class"]["f1"] == pytest.approx(per_class)
    assert got["confusion_matrix"].sum() == 400 and got["per_class"]["support"].tolist() == np.bincount(refs, minlength=num_labels).tolist()
    module = load_metric().compute(predictions=preds, references=refs, num_labels=num_labels)
    assert module == {k: pytest.approx(got[k]) for k in SUMMARY_KEYS}


def test_paired_bootstrap_interval_of_the_difference():
    refs = np.random.default_rng(0).integers(0, 4, 300)
    a, b = noisy(refs, 0.80, 4, seed=1), noisy(refs, 0.78, 4, seed=2)
    same = paired_bootstrap(a, a, refs, 4)
    assert all(lo == hi == 0.0 for lo, hi in same.values())  # the same predictions never differ
    ci = paired_bootstrap(a, b, refs, 4)
    assert ci == paired_bootstrap(a, b, refs, 4)  # seeded
    observed = {k: scores(a, refs, 4)[k] - scores(b, refs, 4)[k] for k in SUMMARY_KEYS}
    for key, (lo, hi) in ci.items():
        assert lo <= observed[key] <= hi, key
    assert ci["accuracy"][0] < 0 < ci["accuracy"][1]  # two points apart on 300 rows: within the noise
    # many more rows: the interval narrows around the difference; a clearly better model's excludes 0
    big = np.random.default_rng(3).integers(0, 4, 20_000)
    narrow = paired_bootstrap(noisy(big, 0.80, 4, seed=4), noisy(big, 0.78, 4, seed=5), big, 4, keys=("accuracy",))
    assert narrow["accuracy"][1] - narrow["accuracy"][0] < (ci["accuracy"][1] - ci["accuracy"][0]) / 4
    assert narrow["accuracy"][0] > 0
    assert paired_bootstrap(a[:0], b[:0], refs[:0], 4, keys=("macro_f1",)) == {"macro_f1": [0.0, 0.0]}


def test_the_confusion_chart_is_w_and_b_s_for_up_to_100_labels():
    import wandb

    from pipeline.callbacks import confusion_chart

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    y = rng.integers(0, 7, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 7, 500))
    mine = confusion_chart(y, p, names, "t")
    theirs = wandb.plot.confusion_matrix(y_true=y.tolist(), preds=p.tolist(), class_names=names, title="t")
    assert mine.table.data == [[a, b, int(n)] for a, b, n in theirs.table.data]  # every cell, zeros too
    assert vars(mine.spec) == vars(theirs.spec)


def test_past_100_labels_the_confusion_chart_keeps_every_prediction_within_w_and_b_s_row_limit(monkeypatch, caplog):
    """W&B keeps 10,000 rows of a logged table: a cell per pair of 150 labels (22,500 rows) lost the later labels."""
    import pipeline.callbacks as callbacks

    rng = np.random.default_rng(1)
    names = [f"intent_{i}" for i in range(150)]
    y = rng.integers(0, 150, 3000)
    p = np.where(rng.random(3000) < 0.7, y, rng.integers(0, 150, 3000))
    rows = callbacks.confusion_chart(y, p, names, "t").table.data
    assert len(rows) == len({(a, b) for a, b in zip(y.tolist(), p.tolist())}) <= callbacks.TABLE_ROWS
    assert sum(n for _, _, n in rows) == 3000 and all(n > 0 for _, _, n in rows)
    cell = {(a, b): n for a, b, n in rows}
    assert cell[("intent_149", "intent_149")] == int(((y == 149) & (p == 149)).sum())

    monkeypatch.setattr(callbacks, "TABLE_ROWS", 160)  # more non-empty cells than a table keeps
    kept = callbacks.confusion_chart(y, p, names, "few rows").table.data
    assert len(kept) == 160
    diagonal = [r for r in kept if r[0] == r[1]]
    assert len(diagonal) == 150  # every correct cell first, then the largest errors
    errors = sorted((n for a, b, n in rows if a != b), reverse=True)
    assert sorted((n for a, b, n in kept if a != b), reverse=True) == errors[:10]
    assert "few rows: " in caplog.text and "non-empty cells of the confusion matrix left out" in caplog.text
