"""evaluate: score a model version on its own dataset's test split and gate its promotion.

The challenger (default ``<model.name>:candidate``) is scored on the test split of the exact
dataset version it was trained on, read from its lineage. The current ``production`` version,
when there is one, is scored on the same rows in the same run (champion vs challenger). The
gate checks the configured minimums and the largest allowed regression against production;
when it passes, ``production`` moves to the challenger in one registry write. The decision
and its reasons go into the run summary, the model version's metadata and the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.basemodel import check_code_trusted
from pipeline.config import Config, GateConfig
from pipeline.cpus import torch_threads_within_quota
from pipeline.errors import AliasMoved, ConfigError, RefError, RegistryError, StageFailed, near_label
from pipeline.metrics import SUMMARY_KEYS, calibration, log_softmax, paired_bootstrap, scores
from pipeline.printable import one_line
from pipeline.results import StageResult
from pipeline.tracking import open_registry, tracked_run

STAGE = "evaluate"
PRODUCTION = "production"
MAX_PROMOTION_ATTEMPTS = 3  # comparisons with a production version that another evaluation keeps moving
log = logging.getLogger(__name__)


@dataclass
class Scored:
    ref: str
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    calibration: dict[str, Any]
    logp: np.ndarray  # log-probabilities over `label_names`, one row per scored row
    refs: np.ndarray  # the true label of each row, as an index into `label_names`
    label_names: list[str]
    truncated: int = 0  # rows longer than the model's max_length: only their beginning was scored
    max_length: int | None = None

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logp)


class BrokenScores(StageFailed):
    """A model whose scores are not numbers (NaN or infinite weights)."""


# Above this share of a split's rows being ones production trained on, the rest are too few to compare
# on: every row is compared, as before, which favours production (it is scored on what it memorised).
MAX_SEEN_SHARE = 0.5


@dataclass
class Comparison:
    """The challenger and production on the same rows: all of them, or those whose label production
    knows and that production did not train on."""

    challenger: Scored  # on the compared rows
    champion: Scored
    rows: dict[str, list]
    total: int  # rows in the split
    intervals: dict[str, list[float]]
    seen: int = 0  # rows of the split left out because production trained (or chose its checkpoint) on them
    seen_but_compared: int = 0  # such rows compared all the same: the others were too few (`MAX_SEEN_SHARE`)

    @property
    def partial(self) -> bool:
        return len(self.rows["label"]) < self.total

    def describe(self) -> str:
        if not self.partial:
            return ""
        why = [w for w, n in (("production did not train on", self.seen),
                              ("whose labels production knows", self.total - self.seen - len(self.rows["label"]))) if n]
        return f"on the {len(self.rows['label'])} of {self.total} rows {' and '.join(why)}"


@dataclass
class Decision:
    passed: bool
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c["reason"] for c in self.checks]

    @property
    def failed(self) -> list[str]:
        return [c["reason"] for c in self.checks if not c["passed"]]


# A value this close below its threshold is at it: 0.8 - 0.1 is 0.7000000000000001 in floating point, and 70 of 100 rows
# exactly 0.1 below production's 80 failed as `0.7000 < 0.7000`. Far below one row in any split (1/n).
AT_THRESHOLD = 1e-12


def _check(name: str, value: float, op: str, threshold: float) -> dict[str, Any]:
    ok = value >= threshold - AT_THRESHOLD
    mark = ">=" if ok else "<"
    return {"check": name, "value": round(value, 6), "threshold": round(threshold, 6), "passed": ok,
            "reason": f"{name} {value:.4f} {mark} {threshold:.4f}" + ("" if ok else f" ({op})")}


Z_ONE_SIDED_95 = 1.6449


def _chance(predicted_counts: np.ndarray, label_counts: np.ndarray) -> float:
    """sum_k p(predicted k) p(label k): the accuracy of predictions that ignore the inputs, in these shares."""
    n = float(label_counts.sum())
    return float(np.dot(predicted_counts, label_counts)) / n**2 if n else 0.0


def _agreement(confusion: np.ndarray) -> tuple[int, float, float, float]:
    """Rows, accuracy, chance and Cohen's kappa of a confusion matrix (rows: labels, columns: predictions)."""
    n = int(confusion.sum())
    if not n:
        return 0, 0.0, 0.0, 0.0
    accuracy = float(np.trace(confusion)) / n
    chance = _chance(confusion.sum(axis=0), confusion.sum(axis=1))
    return n, accuracy, chance, (accuracy - chance) / (1 - chance) if chance < 1 else 0.0


def cohen_kappa(confusion: np.ndarray) -> float:
    """Cohen's kappa from a confusion matrix (rows: labels, columns: predictions): accuracy above chance, as a
    share of what is above chance. 0 when chance is 1 (one label, always predicted)."""
    return _agreement(confusion)[3]


def chance_check(scored: Scored) -> dict[str, Any]:
    """Is the accuracy shown to be above chance? Chance is the accuracy of predictions made without looking
    at the inputs, in the shares the model predicts each label: sum_k p(predicted k) p(label k). Under that
    null the accuracy on n rows has standard error about sqrt(c (1 - c) / n) (binomial, c held fixed); it
    must be above c plus 1.645 of them. A constant prediction is exactly at chance (kappa 0), whatever the
    label shares, so a model that collapsed to the majority label fails where a minimum accuracy would not."""
    n, accuracy, chance, kappa = _agreement(scored.confusion)
    bound = chance + Z_ONE_SIDED_95 * float(np.sqrt(max(chance * (1 - chance), 0.0) / n))
    passed = accuracy > bound
    reason = (f"better than chance: accuracy {accuracy:.4f} {'>' if passed else '<='} {bound:.4f}, the one-sided 95% "
              f"bound of chance {chance:.4f} (predictions that ignore the text, in the same label shares); Cohen's kappa "
              f"{kappa:.3f} on {n} rows")
    present = np.flatnonzero(scored.confusion.sum(axis=1))
    if not passed and len(present) == 1:  # one label in every row: always predicting it is perfect and is chance
        reason += (f"; the split's rows all have the label {scored.label_names[int(present[0])]!r}, so no accuracy can "
                   "show it: score on a split with several labels, or set evaluate.gate.better_than_chance: false")
    elif not passed:
        shares = scored.confusion.sum(axis=0) / n
        top = int(shares.argmax())
        reason += (f"; not shown to beat chance, {shares[top]:.0%} of the rows predicted {scored.label_names[top]!r} "
                   "(evaluate.gate.better_than_chance)")
    return {"check": "better than chance", "value": round(accuracy, 6), "threshold": round(bound, 6), "passed": passed,
            "chance": round(chance, 6), "kappa": round(kappa, 6), "reason": reason}


def class_recall_minimums(gate: GateConfig, label_names: list[str]) -> dict[str, float]:
    """``evaluate.gate.min_class_recall`` per label; a label the model does not have is a config error."""
    if gate.min_class_recall is None:
        return {}
    if not isinstance(gate.min_class_recall, dict):
        return dict.fromkeys(label_names, gate.min_class_recall)
    unknown = sorted(set(gate.min_class_recall) - set(label_names))
    if unknown:
        raise ConfigError(f"evaluate.gate.min_class_recall names labels the model does not have: "
                          f"{', '.join(near_label(u, label_names) for u in unknown)}; labels: {label_names}")
    return dict(gate.min_class_recall)


def decide(gate: GateConfig, challenger: Scored, comparison: Comparison | None, label_names: list[str]) -> Decision:
    """Every configured check, passed or not, with a sentence saying why.

    The minimums are on the challenger's whole split; the regression checks on the comparison's
    rows, with the paired bootstrap's 95% interval of the difference: reported with the measured
    values (``regression_test: point``), or itself the test (``non_inferiority``: its lower end
    must be above ``-max_regression``)."""
    m = challenger.metrics
    checks = [
        _check("accuracy", m["accuracy"], "below evaluate.gate.min_accuracy", gate.min_accuracy),
        _check("macro_f1", m["macro_f1"], "below evaluate.gate.min_macro_f1", gate.min_macro_f1),
    ]
    if gate.better_than_chance and challenger.confusion.sum():
        checks.append(chance_check(challenger))
    for label, minimum in class_recall_minimums(gate, label_names).items():
        shown = one_line(label)  # the data's label, in a line of the stage's output
        check = _check(f"recall[{shown}]", challenger.per_class[label]["recall"], "below evaluate.gate.min_class_recall",
                       minimum)
        if not challenger.per_class[label]["support"] and minimum > 0:  # another dataset version may lack the label
            check |= {"passed": False, "reason": f"recall[{shown}] cannot be checked: the split has no row labelled "
                                                 f"{label!r} (evaluate.gate.min_class_recall asks for {minimum:.4f})"}
        checks.append(check)
    if comparison is not None:
        mine, theirs = comparison.challenger.metrics, comparison.champion.metrics
        where = comparison.describe()
        for key in gate.regression_metrics:
            lo, hi = comparison.intervals[key]
            if gate.regression_test == "non_inferiority":
                c = _check(f"{key} vs production: lower 95% bound of the difference", lo,
                           f"not shown to be within evaluate.gate.max_regression={gate.max_regression} of production "
                           f"{comparison.champion.ref} ({theirs[key]:.4f})", -gate.max_regression)
                c["check"] = f"{key} vs production"
            else:
                c = _check(f"{key} vs production", mine[key], f"more than evaluate.gate.max_regression="
                           f"{gate.max_regression} below production {comparison.champion.ref} ({theirs[key]:.4f})",
                           theirs[key] - gate.max_regression)
            c["test"] = gate.regression_test
            c["champion"] = round(theirs[key], 6)
            c["delta"] = round(mine[key] - theirs[key], 6)
            c["delta_ci95"] = [round(lo, 6), round(hi, 6)]
            c["reason"] += f"; difference {c['delta']:+.4f}, 95% CI {lo:+.4f} to {hi:+.4f}" + (f" ({where})" if where else "")
            if where:
                c["rows"] = len(comparison.rows["label"])
            checks.append(c)
    return Decision(passed=all(c["passed"] for c in checks), checks=checks)


def score(model_dir: Path, rows: dict[str, list], label_names: list[str] | None, batch_size: int, bins: int,
          ref: str, trust_remote_code: bool = False) -> Scored:
    """The model's metrics on `rows` (whose labels it must know). With `label_names`, the model must
    predict exactly those labels in that order (a challenger on its own dataset); with None, its own.
    `trust_remote_code`: the config's ``model.trust_remote_code``, for a model that carries its own code."""
    from pipeline.predict import load

    classifier = load(model_dir, trust_remote_code=trust_remote_code)
    if label_names is not None and classifier.label_names != label_names:
        raise ConfigError(f"{ref} predicts labels {classifier.label_names}, but the dataset's labels are {label_names}")
    index = {name: i for i, name in enumerate(classifier.label_names)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise ConfigError(f"{ref} predicts labels {classifier.label_names}; the rows to score also hold {unknown}")
    refs = np.asarray([index[name] for name in rows["label"]], dtype=np.int64)
    logits = classifier.logits(rows["text"], rows.get("text_pair"), batch_size=batch_size)
    broken = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(broken):  # a diverged model: its metrics would be meaningless, and NaN is no JSON to record
        raise BrokenScores(f"{ref} gives scores that are not numbers (NaN or infinite) for {len(broken)} of {len(refs)} "
                          f"rows (the first: row {int(broken[0]) + 1} of the split); it cannot be evaluated or promoted")
    scored = _scored(ref, log_softmax(logits), refs, classifier.label_names, bins)
    scored.truncated = classifier.truncated
    scored.max_length = classifier.max_length
    return scored


def _scored(ref: str, logp: np.ndarray, refs: np.ndarray, label_names: list[str], bins: int) -> Scored:
    probs = np.exp(logp)
    s = scores(probs.argmax(axis=1), refs, len(label_names))
    cal = calibration(probs, refs, bins)
    metrics = {k: float(s[k]) for k in SUMMARY_KEYS}
    metrics["loss"] = float(-logp[np.arange(len(refs)), refs].mean()) if len(refs) else 0.0
    metrics["ece"] = cal["ece"]
    metrics["kappa"] = cohen_kappa(s["confusion_matrix"])
    pc = s["per_class"]
    per_class = {name: {"precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                        "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                 for i, name in enumerate(label_names)}
    return Scored(ref=ref, metrics=metrics, per_class=per_class, confusion=s["confusion_matrix"], calibration=cal,
                  logp=logp, refs=refs, label_names=list(label_names))


def compare(ch: Scored, champion_dir: Path, champion_ref: str, champion_labels: list[str], rows: dict[str, list],
            batch_size: int, bins: int, seen: np.ndarray | None = None,
            trust_remote_code: bool = False) -> Comparison | None:
    """Production scored on the rows whose label it knows (all of them, unless the label set changed)
    and that it did not see in training (`seen`), the challenger on the same rows, and the paired
    bootstrap of the difference. None: no row in common."""
    known = set(champion_labels)
    seen = np.zeros(len(rows["label"]), dtype=bool) if seen is None else seen
    keep = np.asarray([name in known for name in rows["label"]], dtype=bool) & ~seen
    if not keep.any():
        return None
    if keep.all():
        same_rows, mine = rows, ch
    else:
        same_rows = {k: [v for v, kept in zip(values, keep) if kept] for k, values in rows.items()}
        mine = _scored(ch.ref, ch.logp[keep], ch.refs[keep], ch.label_names, bins)
    theirs = score(champion_dir, same_rows, None, batch_size, bins, champion_ref, trust_remote_code)
    # Both models' predictions as names, then as indices into one list of every name either can predict.
    names = ch.label_names + [n for n in theirs.label_names if n not in ch.label_names]
    where = {n: i for i, n in enumerate(names)}
    their_preds = np.asarray([where[theirs.label_names[j]] for j in theirs.logp.argmax(axis=1)], dtype=np.int64)
    intervals = paired_bootstrap(mine.logp.argmax(axis=1), their_preds, mine.refs, len(names))
    return Comparison(challenger=mine, champion=theirs, rows=same_rows, total=len(rows["label"]), intervals=intervals,
                      seen=int(seen.sum()))


def _empty_split(ref: str, split: str) -> ConfigError:
    return ConfigError(f"the {split} split of {ref} is empty; nothing to evaluate on "
                       "(set evaluate.split, or publish the dataset with a dataset.split fraction for it)")


def check_split_not_empty(config: Config, dataset) -> None:
    """Refuse a dataset version with no rows in ``evaluate.split``, from its recorded counts."""
    if (dataset.metadata.get("num_rows") or {}).get(config.evaluate.split) == 0:
        raise _empty_split(dataset.ref, config.evaluate.split)


def check_evaluable(config: Config, dataset) -> None:
    """What evaluate would refuse about a model trained on this dataset version, asked of the version alone: rows in
    ``evaluate.split``, and a gate's ``min_class_recall`` naming only its labels (the model trained on it has them).
    `pipeline run` asks before finetune, so that no training is spent on a model the chain cannot evaluate."""
    check_split_not_empty(config, dataset)
    class_recall_minimums(config.evaluate.gate, list(dataset.metadata.get("label_names") or []))


def _read_split(data_dir: Path, split: str, ref: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir / f"{split}.parquet")
    if table.num_rows == 0:
        raise _empty_split(ref, split)
    return {c: table.column(c).to_pylist() for c in ("id", "text", "text_pair", "label", "label_id") if c in table.column_names}


def _log(run, prefix: str, s: Scored, rows: dict[str, list], max_rows: int) -> None:
    import wandb

    from pipeline.callbacks import confusion_chart, misclassified_rows

    data = {f"{prefix}/{k}": v for k, v in s.metrics.items()}
    per_class = wandb.Table(columns=["label", "precision", "recall", "f1", "support"],
                            data=[[n, v["precision"], v["recall"], v["f1"], v["support"]] for n, v in s.per_class.items()])
    data[f"{prefix}/per_class"] = per_class
    labels = s.refs
    preds = s.logp.argmax(axis=1)
    data[f"{prefix}/confusion_matrix"] = confusion_chart(labels, preds, s.label_names, f"Confusion matrix ({s.ref})")
    bins = [b for b in s.calibration["bins"] if b["count"]]
    reliability = wandb.Table(columns=["confidence", "accuracy", "count", "lower", "upper"],
                              data=[[b["confidence"], b["accuracy"], b["count"], b["lower"], b["upper"]] for b in bins])
    data[f"{prefix}/calibration"] = reliability
    data[f"{prefix}/reliability_diagram"] = wandb.plot.line(
        reliability, "confidence", "accuracy", title=f"Reliability diagram ({s.ref}, ECE {s.metrics['ece']:.3f}); "
                                                     "perfect calibration is the diagonal")
    if max_rows:
        cols, table_rows = misclassified_rows(s.logp, labels, s.label_names, rows["text"],
                                              rows.get("id"), rows.get("text_pair"), max_rows)
        data[f"{prefix}/misclassified"] = wandb.Table(columns=cols, data=table_rows)
    run.log(data)


def run(config: Config, *, group: str | None = None, model: str | None = None, dataset: str | None = None,
        promote: bool = True) -> StageResult:
    registry = open_registry(config.tracking, project=config.project, entity=config.entity, consuming=True)
    challenger = registry.resolve(model or f"{config.model.name}:candidate", type="model")
    recorded = (challenger.metadata.get("dataset") or {}).get("ref")
    ds_ref = dataset or recorded
    if not ds_ref:
        raise RefError(f"{challenger.ref} does not record the dataset it was trained on; pass --dataset NAME:vN")
    try:
        ds = registry.resolve(ds_ref, type="dataset")
    except RefError as e:
        if dataset:
            raise RefError(f"--dataset {ds_ref}: {e}") from None
        raise RefError(f"{challenger.ref} was trained on {ds_ref}, which cannot be found: {e}; evaluate it on another "
                       "dataset version with --dataset NAME:vN") from None
    label_names = list(challenger.metadata.get("label_names") or [])
    torch_threads_within_quota()  # called from Python, where no command line set OMP_NUM_THREADS from a CPU limit
    # Rows are matched to the model's labels by name: another dataset version may order them otherwise (its
    # class ids differ) or hold fewer, but not hold a label the model cannot predict.
    unknown = [n for n in ds.metadata.get("label_names") or [] if label_names and n not in label_names]
    if unknown:
        raise ConfigError(f"{ds.ref} has label(s) {unknown} that {challenger.ref} does not predict (it predicts "
                          f"{label_names}); evaluate it on a dataset version with its labels")
    takes, holds = _takes_pairs(challenger, registry), _takes_pairs(ds)
    if takes != holds:  # its inputs are not the rows' (it was Arrow's "No match for FieldRef" once the run had opened)
        kind = {True: "sentence pairs", False: "single texts"}
        raise ConfigError(f"{ds.ref} holds {kind[holds]} but {challenger.ref} classifies {kind[takes]}; evaluate it on "
                          f"a dataset version of {kind[takes]}")
    # Refused before a run is opened: an empty split, a gate naming labels the model does not have.
    check_split_not_empty(config, ds)
    class_recall_minimums(config.evaluate.gate, label_names or list(ds.metadata.get("label_names") or []))
    try:
        champion = registry.resolve(challenger.tagged(PRODUCTION), type="model")  # in the challenger's project
    except RefError:
        champion = None  # no production version yet: the first one passes on the minimums alone
    already = champion is not None and champion.ref == challenger.ref
    check_code_trusted(challenger, config.model.trust_remote_code)
    if champion is not None and not already:
        check_code_trusted(champion, config.model.trust_remote_code, f" (production, to compare {challenger.ref} with)")
    gate = config.evaluate.gate
    split = config.evaluate.split
    trained_on = (challenger.metadata.get("dataset") or {}).get("digest")
    if split == "validation" and trained_on == ds.digest:
        log.warning("evaluate.split=validation: %s is the checkpoint that scored best (by %s) on the validation split "
                    "of %s, so its scores there are biased upward and the gate is easier to pass; the test split is "
                    "the unbiased one", challenger.ref,
                    ((challenger.metadata.get("config") or {}).get("train") or {}).get("metric_for_best_model", "its metric"),
                    ds.ref)

    with tracked_run(config, STAGE, group=group) as trun:
        reg = trun.registry
        reg.use(challenger.ref, trun, type="model")
        reg.use(ds.ref, trun, type="dataset")
        rows = _read_split(reg.fetch(ds).path, split, ds.ref)
        label_names = label_names or list(ds.metadata["label_names"])
        seen = 0  # rows the challenger trained on: possible in a dataset version other than its own
        if trained_on != ds.digest:
            known = _seen_in_training(reg, challenger, rows, "the challenger")
            seen = int(known.sum()) if known is not None else 0
            if seen:
                log.warning("%d of %d %s rows of %s are texts %s trained on or chose its checkpoint on (the train and "
                            "validation splits of %s): its scores, and the gate's decision, are biased upward", seen,
                            len(known), split, ds.ref, challenger.ref, (challenger.metadata.get("dataset") or {}).get("ref"))
        e = config.evaluate
        ch = score(reg.fetch(challenger).path, rows, label_names, e.batch_size, e.calibration_bins, challenger.ref,
                   config.model.trust_remote_code)
        if ch.truncated:
            (log.warning if ch.truncated >= 0.01 * len(ch.refs) else log.info)(
                "%d of %d %s texts are longer than %s's max_length (%d tokens): only their beginning was scored, as "
                "predict will classify such texts", ch.truncated, len(ch.refs), split, challenger.ref, ch.max_length)
        _log(trun, split, ch, rows, e.misclassified_rows)
        scored: list[str] = []  # every production version this challenger was compared with
        for attempt in range(1, MAX_PROMOTION_ATTEMPTS + 1):
            cmp, skipped = None, None
            if champion is not None and not already:
                reg.use(champion.ref, trun, type="model")
                cmp, skipped = _compare_with(champion, ch, reg.fetch(champion).path, rows, label_names, e, reg,
                                             config.model.trust_remote_code)
                scored.append(champion.ref)
                if cmp is not None:
                    _log(trun, f"champion/{split}", cmp.champion, cmp.rows, 0)
                    _log_comparison(trun, cmp)
                else:
                    log.warning("%s: no regression check is possible; the gate decides on the minimums alone", skipped)
            cp = cmp.champion if cmp else None
            decision = decide(gate, ch, cmp, label_names)
            if already:
                outcome = "already production"
            elif not decision.passed:
                outcome = "rejected"
            elif not promote:
                outcome = "passed (not promoted: --no-promote)"
            else:
                # Moved only if production is still the version compared against: another evaluation
                # promoting in the meantime must not be overwritten by a challenger it never faced.
                try:
                    reg.set_alias(challenger.ref, PRODUCTION, expected=champion.ref if champion else None)
                    outcome = "promoted"
                except AliasMoved as moved:
                    if attempt == MAX_PROMOTION_ATTEMPTS:
                        raise StageFailed(f"{challenger.ref} passed the gate, but production kept moving while it was "
                                          f"compared ({moved}); nothing was promoted: run evaluate again") from None
                    log.warning("production moved to %s while %s was evaluated; comparing with it now",
                                moved.current or "no version", challenger.ref)
                    champion = reg.resolve(moved.current, type="model") if moved.current else None
                    already = champion is not None and champion.ref == challenger.ref
                    continue
            break
        status = "ok" if decision.passed or already else "gate_failed"
        record = {
            "run_id": trun.id,
            "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": ds.ref,
            "split": split,
            "metrics": ch.metrics,
            "per_class": ch.per_class,
            "truncated": ch.truncated,  # rows cut at the model's max_length
            **({"seen_in_training": seen} if seen else {}),  # rows the challenger trained on (another dataset version)
            "champion": ({"ref": cp.ref, "metrics": cp.metrics, "rows": len(cmp.rows["label"]),
                          **({"seen_in_training": cmp.seen} if cmp.seen else {}),
                          **({"seen_in_training_but_compared": cmp.seen_but_compared} if cmp.seen_but_compared else {}),
                          **({"labels": cp.label_names} if cp.label_names != label_names else {})} if cp else
                         {"ref": champion.ref, "not_compared": skipped} if skipped else None),
            "gate": {"passed": decision.passed, "outcome": outcome, "checks": decision.checks},
        }
        history = list(challenger.metadata.get("evaluations") or [])[-19:]  # keep the last 20
        reg.update_metadata(challenger.ref, {"evaluation": record, "evaluations": [*history, record]})
        trun.set_summary(**{
            "gate/passed": decision.passed,
            "gate/outcome": outcome,
            "gate/reasons": decision.reasons,
            "challenger": challenger.ref,
            f"{split}/truncated": ch.truncated,
            "champion": cp.ref if cp else (champion.ref if champion else None),
            "status": status,
        })
        (log.info if decision.passed else log.warning)(
            "%s: %s (%s)", challenger.ref, outcome, "; ".join(decision.failed or decision.reasons))
    return StageResult(
        stage=STAGE,
        status=status,
        run_id=trun.id,
        consumed=[challenger.ref, ds.ref, *scored],
        produced=[],
        metrics={**{f"{split}_{k}": v for k, v in ch.metrics.items()},
                 **({f"champion_{split}_{k}": v for k, v in cp.metrics.items()} if cp else {})},
        paths={"run_dir": str(trun.wandb_dir) if trun.wandb_dir else ""},
        message=f"{challenger.ref}: {outcome}" + (f" ({'; '.join(decision.failed)})" if decision.failed else ""),
        details={"model": challenger.ref, "production": challenger.ref if outcome in ("promoted", "already production")
                 else (champion.ref if champion else None), "gate": record["gate"], "per_class": ch.per_class},
        printed=challenger.ref,  # the exact version an alias such as clf:candidate stood for
    )


def _takes_pairs(version, registry=None) -> bool:
    """Whether a model version was trained on sentence pairs, or a dataset version holds them (the config it was
    published with). A model says so in its `inputs`; one made before they were recorded is asked through the dataset
    version it trained on (`registry`), which its own config need not describe (finetune --dataset), else its config."""
    if "inputs" in version.metadata:
        return "text_pair" in version.metadata["inputs"]
    trained_on = (version.metadata.get("dataset") or {}).get("ref")
    if registry is not None and version.type == "model" and trained_on:
        try:
            return _takes_pairs(registry.resolve(trained_on, type="dataset", include_deleted=True))
        except (RefError, RegistryError):  # gone from the catalog: its config is all there is
            pass
    return bool(((version.metadata.get("config") or {}).get("dataset") or {}).get("text_pair_column"))


def _compare_with(champion, ch: Scored, champion_dir: Path, rows: dict[str, list], label_names: list[str],
                  e, reg, trust_remote_code: bool = False) -> tuple[Comparison | None, str | None]:
    """`compare`, or why production cannot be compared with the challenger on these rows."""
    theirs_pairs, mine_pairs = _takes_pairs(champion, reg), "text_pair" in rows
    if theirs_pairs != mine_pairs:
        kind = {True: "sentence pairs", False: "single texts"}
        return None, f"production {champion.ref} classifies {kind[theirs_pairs]}, the challenger {kind[mine_pairs]}"
    theirs = list(champion.metadata.get("label_names") or label_names)
    if set(theirs) != set(label_names):
        log.warning("production %s predicts labels %s; the challenger predicts %s: the regression checks compare "
                    "them on the rows whose labels production knows", champion.ref, theirs, label_names)
    seen = _seen_in_training(reg, champion, rows)
    favoured = 0
    if seen is not None and seen.any():
        if seen.mean() > MAX_SEEN_SHARE:  # too few rows left to compare on: the old, cautious comparison
            log.warning("%d of %d rows of this split are texts production %s trained on (or chose its checkpoint on): "
                        "too few others to compare on, so the regression checks use every row, which favours "
                        "production", int(seen.sum()), len(seen), champion.ref)
            favoured, seen = int(seen.sum()), None
        else:
            log.info("%d of %d rows of this split are texts production %s trained on (or chose its checkpoint on); "
                     "the regression checks leave them out", int(seen.sum()), len(seen), champion.ref)
    try:
        cmp = compare(ch, champion_dir, champion.ref, theirs, rows, e.batch_size, e.calibration_bins, seen,
                      trust_remote_code)
    except BrokenScores as broken:  # a broken production is no bar to clear
        return None, f"production {champion.ref} cannot be compared with: {broken}"
    if cmp is not None:
        cmp.seen_but_compared = favoured
    return cmp, None if cmp else f"production {champion.ref} knows none of the labels in this split"


def _seen_in_training(reg, model, rows: dict[str, list], who: str = "production") -> np.ndarray | None:
    """Which rows `model` (`who`: production, or the challenger) trained on or chose its checkpoint on:
    texts (and pairs) in the train or validation split of the dataset version it was trained on, compared
    as dataset-publish compares copies (ignoring case and spacing). dataset-publish keeps a row in its
    split from one version to the next, but a version split another way (another seed or fractions, the
    user's own split files, or published before splits were stable) can hold a model's train rows in its
    test split, and a held-out set (`evaluate --dataset`) may hold them too: scored on them, the model
    would look better than it is. None (with a warning) when the model's dataset version cannot be read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import arrow
    from pipeline.data import Columns, copy_key

    recorded = (model.metadata.get("dataset") or {}).get("ref")
    try:
        if not recorded:
            raise RefError("it does not record one")
        folder = reg.fetch(reg.resolve(recorded, type="dataset")).path
    except (RefError, RegistryError) as e:
        log.warning("%s %s: the rows it trained on cannot be known (its dataset %s: %s); %s", who, model.ref,
                    recorded or "-", e, "the regression checks use every row of the split" if who == "production" else
                    "some of the rows scored may be among them")
        return None
    cols = Columns(text="text", label="label", text_pair="text_pair" if "text_pair" in rows else None)
    parts = [pq.read_table(folder / f"{split}.parquet", columns=cols.text_columns) for split in ("train", "validation")]
    trained = pa.concat_tables(parts)
    seen_keys = copy_key({c: trained.column(c) for c in cols.text_columns}, cols)
    keys = copy_key({c: pa.chunked_array([arrow.strings(rows[c])]) for c in cols.text_columns}, cols)
    value_set = seen_keys.combine_chunks() if isinstance(seen_keys, pa.ChunkedArray) else seen_keys
    return arrow.to_numpy(pc.is_in(keys, value_set=value_set), fill=False)


def _log_comparison(run, cmp: Comparison) -> None:
    import wandb

    ch, cp = cmp.challenger.metrics, cmp.champion.metrics
    rows = [[k, ch[k], cp[k], ch[k] - cp[k], *(cmp.intervals.get(k) or [None, None])] for k in (*SUMMARY_KEYS, "loss", "ece")]
    columns = ["metric", f"challenger {cmp.challenger.ref}", f"production {cmp.champion.ref}", "delta",
               "delta 95% CI low", "delta 95% CI high"]
    run.log({"gate/comparison": wandb.Table(columns=columns, data=rows), "gate/compared_rows": len(cmp.rows["label"])})
