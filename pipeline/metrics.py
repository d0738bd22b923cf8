"""Classification metrics as an `evaluate` module defined in the package.

``evaluate.load("accuracy")`` fetches a script from the Hugging Face hub, which fails offline;
`ClassificationMetrics` is the same kind of module (an ``evaluate.Metric``) built here, so the
finetune and evaluate stages compute accuracy, macro/micro/weighted F1, precision and recall
with no network. The arithmetic lives in plain numpy functions that the module and the stages
share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Keys the stages log, grouped by split as W&B users expect (eval/accuracy, test/macro_f1).
SUMMARY_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "weighted_f1")


def confusion(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts[true, predicted]."""
    idx = np.asarray(references, dtype=np.int64) * num_labels + np.asarray(predictions, dtype=np.int64)
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # sklearn's zero_division=0: a class never predicted (or absent) scores 0, not NaN
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def _from_confusion(cm: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(summary metrics, per-class arrays) of confusion matrices ``[..., true, predicted]``, batched over leading axes."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum(axis=(-2, -1))
    # macro averages over the classes the references contain or the predictions use, like sklearn's labels=None
    present = (support > 0) | (predicted > 0)
    n_present = present.sum(axis=-1)

    def macro(values: np.ndarray) -> np.ndarray:
        return _safe_div((values * present).sum(axis=-1), n_present.astype(np.float64))

    accuracy = _safe_div(tp.sum(axis=-1), total)
    summary = {
        "accuracy": accuracy,
        "macro_f1": macro(f1),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "micro_f1": accuracy,  # single-label classification: micro F1 equals accuracy
        "weighted_f1": _safe_div((f1 * support).sum(axis=-1), total),
    }
    return summary, {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def scores(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted F1, macro precision/recall and per-class arrays."""
    cm = confusion(predictions, references, num_labels)
    summary, per_class = _from_confusion(cm)
    return {**{k: float(v) for k, v in summary.items()}, "per_class": per_class, "confusion_matrix": cm}


def paired_bootstrap(predictions_a: np.ndarray, predictions_b: np.ndarray, references: np.ndarray, num_labels: int,
                     keys: tuple[str, ...] = SUMMARY_KEYS, resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile interval of ``metric(a) - metric(b)`` over the rows resampled with replacement.

    Both models are scored on the same resampled rows each time (a paired bootstrap), so the
    interval reflects how much the difference depends on which rows the test split happens to
    hold. Seeded: the same predictions give the same interval.
    """
    refs = np.asarray(references, dtype=np.int64)
    n = len(refs)
    if n == 0:
        return {k: [0.0, 0.0] for k in keys}
    cells = num_labels * num_labels
    cell_a = refs * num_labels + np.asarray(predictions_a, dtype=np.int64)
    cell_b = refs * num_labels + np.asarray(predictions_b, dtype=np.int64)
    rng = np.random.default_rng(seed)
    cm_a = np.empty((resamples, cells), dtype=np.int64)
    cm_b = np.empty((resamples, cells), dtype=np.int64)
    for r in range(resamples):
        rows = rng.integers(0, n, n)
        cm_a[r] = np.bincount(cell_a[rows], minlength=cells)
        cm_b[r] = np.bincount(cell_b[rows], minlength=cells)
    shape = (resamples, num_labels, num_labels)
    a, _ = _from_confusion(cm_a.reshape(shape))
    b, _ = _from_confusion(cm_b.reshape(shape))
    return {k: [float(np.percentile(a[k] - b[k], 2.5)), float(np.percentile(a[k] - b[k], 97.5))] for k in keys}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _metric_class():
    import datasets
    import evaluate

    class ClassificationMetrics(evaluate.Metric):
        """Accuracy, macro-F1, macro precision and recall (and micro/weighted F1) for single-label classification."""

        def _info(self):
            return evaluate.MetricInfo(
                description=__doc__ or "",
                citation="",
                inputs_description="predictions and references: class ids; num_labels: the number of classes",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references, num_labels: int | None = None, per_class: bool = False):
            p = np.asarray(predictions, dtype=np.int64)
            r = np.asarray(references, dtype=np.int64)
            n = num_labels or int(max(p.max(initial=0), r.max(initial=0)) + 1)
            out = scores(p, r, n)
            if not per_class:
                return {k: out[k] for k in SUMMARY_KEYS}
            return out

    return ClassificationMetrics


_CLASS = None


def load_metric(**kwargs):
    """A `ClassificationMetrics` instance (in memory: no cache files, no hub). `evaluate` makes its cache folder
    even so (``~/.cache/huggingface/metrics/...``, which a container's read-only home refuses); kept in memory, the
    instance never uses it, so it is made in a temporary folder that goes at once."""
    import tempfile

    global _CLASS
    if _CLASS is None:
        _CLASS = _metric_class()
    with tempfile.TemporaryDirectory(prefix="metric-") as unused:
        return _CLASS(keep_in_memory=True, cache_dir=unused, **kwargs)


def calibration(probs: np.ndarray, references: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the reliability curve.

    ECE = sum over bins of (rows in bin / rows) * |accuracy in bin - mean confidence in bin|.
    """
    probs = np.asarray(probs, dtype=np.float64)
    refs = np.asarray(references, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == refs
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right-closed bins, (lo, hi], with the first one closed on 0 as well
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        mean_conf = float(conf[mask].mean()) if n else 0.0
        if n:
            ece += n / len(conf) * abs(acc - mean_conf)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                     "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": rows}
