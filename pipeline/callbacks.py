"""Trainer pieces: metrics from the evaluation's own predictions, and the misclassification tables.

`EvalCapture` is the Trainer's ``compute_metrics``: it scores the logits the evaluation loop
already produced and keeps them. `MisclassificationCallback` then builds its table and
confusion matrix from those same logits in ``on_evaluate``, so the tables cost no second pass
over the evaluation set. `PreferLowerLossOnTies` breaks the Trainer's ties for the best checkpoint.
`SweepMetricCallback` feeds a sweep's pruner at every evaluation. `CheckpointOnTerm` saves a checkpoint when
SIGTERM stops a training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import TrainerCallback

from pipeline.config import TABLE_ROWS
from pipeline.metrics import SUMMARY_KEYS, load_metric, log_softmax
from pipeline.printable import table_text

log = logging.getLogger(__name__)
STEP_METRIC = "train/global_step"  # the x-axis transformers' WandbCallback defines


class EvalCapture:
    """``compute_metrics`` for the Trainer; remembers the last evaluation's logits and labels."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.metric = load_metric()
        self.logits: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.calls = 0

    def __call__(self, eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, tuple):  # models that also return hidden states put logits first
            logits = logits[0]
        self.logits = np.asarray(logits, dtype=np.float32)
        self.labels = np.asarray(eval_pred.label_ids, dtype=np.int64)
        self.calls += 1
        preds = self.logits.argmax(axis=-1)
        out = self.metric.compute(predictions=preds, references=self.labels, num_labels=self.num_labels)
        return {k: float(out[k]) for k in SUMMARY_KEYS}


def misclassified_rows(
    logits: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    texts: Sequence[str],
    ids: Sequence[Any] | None = None,
    text_pairs: Sequence[str] | None = None,
    limit: int = 100,
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the misclassified examples, highest loss first, at most `limit`."""
    logp = log_softmax(logits)
    probs = np.exp(logp)
    preds = probs.argmax(axis=-1)
    loss = -logp[np.arange(len(labels)), labels]
    wrong = np.flatnonzero(preds != labels)
    # stable sort on -loss: equal losses keep dataset order, so the table is deterministic
    order = wrong[np.argsort(-loss[wrong], kind="stable")][:limit]
    k = min(3, probs.shape[1])
    columns = ["id", "text", *(["text_pair"] if text_pairs is not None else []), "label", "predicted", "confidence",
               "top3", "loss"]
    rows = []
    for i in order:
        top = np.argsort(-probs[i], kind="stable")[:k]
        top3 = ", ".join(f"{label_names[j]} {probs[i, j]:.3f}" for j in top)
        rows.append([
            str(ids[i]) if ids is not None else str(i),
            table_text(texts[i]),
            *([table_text(text_pairs[i])] if text_pairs is not None else []),
            label_names[labels[i]],
            label_names[preds[i]],
            round(float(probs[i, preds[i]]), 6),
            top3,
            round(float(loss[i]), 6),
        ])
    return columns, rows


DENSE_CONFUSION = 100  # up to this many labels, the chart gets every cell, zeros too (100 x 100 = TABLE_ROWS)


def confusion_chart(labels: np.ndarray, preds: np.ndarray, label_names: Sequence[str], title: str):
    """W&B's confusion-matrix chart (``wandb/confusion_matrix/v1``) of label ids `labels` against `preds`.

    `wandb.plot.confusion_matrix` writes a row for every cell: past 100 labels that is more than the
    10,000 rows W&B keeps of a logged table, so the rows of the later labels were silently dropped
    (and 1,000 labels took 23 s per chart). With more than `DENSE_CONFUSION` labels only the cells that
    hold a prediction are written (the others show empty, not 0), at most one per row. Should even
    those pass the limit, the correct cells and then the largest errors are kept, and a warning says
    how many were left out.
    """
    import wandb

    k = len(label_names)
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    counts = np.bincount(labels * k + preds, minlength=k * k)
    if k <= DENSE_CONFUSION:
        cells = np.arange(k * k)
    else:
        cells = np.flatnonzero(counts)
        if len(cells) > TABLE_ROWS:
            on_diagonal = cells // k == cells % k
            ranked = cells[np.lexsort((cells, -counts[cells], ~on_diagonal))]  # diagonal first, then by count
            log.warning(
                "%s: %d of %d non-empty cells of the confusion matrix left out (W&B keeps %d rows of a table); "
                "the correct predictions and the largest errors are kept", title, len(cells) - TABLE_ROWS,
                len(cells), TABLE_ROWS)
            cells = np.sort(ranked[:TABLE_ROWS])
    names = list(label_names)
    data = [[names[c // k], names[c % k], int(counts[c])] for c in cells.tolist()]
    return wandb.plot_table(
        vega_spec_name="wandb/confusion_matrix/v1",
        data_table=wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=data),
        fields={"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        string_fields={"title": title},
    )


class MisclassificationCallback(TrainerCallback):
    """At every evaluation: a table of the worst misclassified rows and a confusion matrix.

    Logged with the Trainer's ``train/global_step``, like its own metrics, so W&B keeps them on
    the same x-axis and never drops them as a non-monotonic step.
    """

    def __init__(self, run, capture: EvalCapture, label_names: Sequence[str], texts: Sequence[str],
                 ids: Sequence[Any] | None = None, text_pairs: Sequence[str] | None = None,
                 max_rows: int = 100, prefix: str = "eval"):
        self.run = run
        self.capture = capture
        self.label_names = list(label_names)
        self.texts = texts
        self.ids = ids
        self.text_pairs = text_pairs
        self.max_rows = max_rows
        self.prefix = prefix
        self.tables_logged = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or self.run is None or self.capture.logits is None:
            return
        import wandb

        logits, labels = self.capture.logits, self.capture.labels
        if len(labels) != len(self.texts):
            raise RuntimeError(f"evaluation returned {len(labels)} predictions for {len(self.texts)} validation rows")
        columns, rows = misclassified_rows(logits, labels, self.label_names, self.texts, self.ids, self.text_pairs,
                                           self.max_rows)
        preds = logits.argmax(axis=-1)
        self.run.log({
            f"{self.prefix}/misclassified": wandb.Table(columns=columns, data=rows),
            f"{self.prefix}/misclassified_count": int((preds != labels).sum()),
            f"{self.prefix}/confusion_matrix": confusion_chart(
                labels, preds, self.label_names, f"Confusion matrix ({self.prefix}, step {state.global_step})"),
            STEP_METRIC: state.global_step,
        })
        self.tables_logged += 1


class PreferLowerLossOnTies(TrainerCallback):
    """Of two evaluations with the same ``metric_for_best_model``, the one with the lower validation loss is the better.

    The Trainer keeps a checkpoint as the best only when its metric is strictly better than the best so
    far, so on a plateau (the same accuracy or F1 evaluation after evaluation, common on a small
    validation split, where one row moves the metric by 1/n) it keeps the first: the least trained,
    with the highest loss and the least confident predictions. On the demo it kept epoch 1 of 3 (loss
    0.70 against 0.26 at epoch 3, the same macro-F1): its test ECE was 0.44.

    In ``on_evaluate``, which runs after the evaluation is logged and before the Trainer compares it
    with the best, a tie with a lower loss than the best checkpoint's moves the recorded best metric
    down by the smallest float step, so the Trainer's strict comparison takes it, and records the
    metric's own value. Early stopping (a callback after this one) counts it as an improvement too.
    Nothing is changed when the metric is the loss itself. It keeps no state of its own: a resumed
    run reads the best checkpoint's loss from the Trainer's log history.
    """

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        if not metrics or name is None or state.best_metric is None or state.best_global_step is None:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key == "eval_loss" or metrics.get(key) != state.best_metric or "eval_loss" not in metrics:
            return
        best_loss = next((h["eval_loss"] for h in reversed(state.log_history)
                          if h.get("step") == state.best_global_step and "eval_loss" in h), None)
        if best_loss is not None and metrics["eval_loss"] < best_loss:
            state.best_metric = float(np.nextafter(state.best_metric, -np.inf if args.greater_is_better else np.inf))


class StopAtStep(TrainerCallback):
    """Stop training at step `step`, after that step's evaluation and checkpoint, as a callback that stopped it there
    in an evaluation did (a sweep's hyperband pruner): what `reproduce` rebuilds such a model with.

    `of`: the steps the stopped training had in all. A training of another length (``--set train.epochs=...``, another
    batch size or number of processes) is another schedule, where step `step` is not where it stopped: it trains in
    full, and `applied` says so."""

    def __init__(self, step: int, of: int | None = None):
        self.step, self.of = step, of
        self.applied = True

    def on_train_begin(self, args, state, control, **kwargs):
        if self.of is not None and state.max_steps != self.of:
            self.applied = False
            log.warning("the training has %d steps, the one it rebuilds had %d: the step that one stopped at (%d) is "
                        "another point of this schedule, so it trains in full", state.max_steps, self.of, self.step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.applied and state.global_step >= self.step:
            control.should_training_stop = True


class CheckpointOnTerm(TrainerCallback):
    """SIGTERM while training (an orchestrator stopping the task: a preempted node, a pod evicted, a spot instance
    reclaimed, with a grace period before SIGKILL) saves a checkpoint at the end of the step it arrives in, then stops
    the training; the stage then ends as on SIGTERM before (its run killed, exit 143), and `--resume` continues from
    that step instead of from the last evaluation's checkpoint, an epoch back by default. A second SIGTERM (a second
    or more after the first) or a Ctrl-C stops at once. `armed()` installs the handler for the training, in the main thread.

    With several processes (torchrun, accelerate launch: the launcher passes its SIGTERM on to each) every one sees
    the signal at a step of its own, or only some see it, and they must save the same step's checkpoint together:
    at each step's end they vote (a one-number all-reduce on the training's device, in the training's own process
    group: on a GPU the Trainer waits for the step's loss there already, to check it is finite) and all stop at the
    first step that any of them was signalled in. (A process group of their own, for a vote on the CPU, made a
    torchrun restart fail to meet: the address it found in the launcher's store was the last attempt's.)"""

    def __init__(self):
        self.signalled = False  # this process got SIGTERM
        self.stopping = False  # the training stops for it: every process agreed at a step's end
        self._vote_on = None  # the device the processes vote on, with several

    @property
    def stopped(self) -> bool:
        """The training ended for SIGTERM (here, or in another process at the same step)."""
        return self.signalled or self.stopping

    def armed(self):
        from pipeline.errors import interrupt, on_sigterm, repeated

        def handler(signum, frame):
            if self.signalled:  # asked again: stop at once, unless it repeats the first (accelerate launch passes
                interrupt(signum, frame)  # its SIGTERM on twice, 4 ms apart: the step's checkpoint went unsaved)
                return
            repeated(signum)  # the first: the window of its repeats counts from here
            self.signalled = True
            log.warning("SIGTERM: the training saves a checkpoint at the end of this step and stops (SIGTERM again, a "
                        "second or more later, stops at once)")

        return on_sigterm(handler)

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._vote_on = args.device

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = self._vote() if self._vote_on is not None else self.signalled
        if self.stopping and state.global_step < state.max_steps:  # at the last step the training ends as it would
            control.should_save = True
            control.should_training_stop = True
            # the step's checkpoint is what is needed; loading the best one back would only spend the grace period
            args.load_best_model_at_end = False

    def _vote(self) -> bool:
        import torch
        import torch.distributed as dist

        ballot = torch.tensor([int(self.signalled)], dtype=torch.int32, device=self._vote_on)
        dist.all_reduce(ballot, op=dist.ReduceOp.MAX)
        return bool(ballot.item())

    def on_epoch_end(self, args, state, control, **kwargs):
        # A stop within an epoch ends it early: the epoch's evaluation and checkpoint would come at the stop's step,
        # where the uninterrupted run makes none, and overwrite the step's checkpoint with the random state after that
        # evaluation (and record it): the resumed run would train on from another state. At an epoch's last step they
        # are the uninterrupted run's own, and stay. (What the processes agreed on, so that all of them skip it.)
        if self.stopping and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False
            control.should_save = False


class SweepMetricCallback(TrainerCallback):
    """At every evaluation: report the sweep metric to the pruner (hyperband) and stop the trial
    when it says so; online, also log the metric under the sweep file's own name for W&B's controller."""

    def __init__(self, metric: str, prune_trial=None, alias: str | None = None, run=None, maximize: bool = False):
        self.metric, self.prune_trial, self.alias, self.run, self.maximize = metric, prune_trial, alias, run, maximize
        self.evaluations = 0
        self.pruned = False
        self.values: list[float] = []

    def on_train_end(self, args, state, control, **kwargs):
        # W&B's controller reads the metric's summary: make it the trial's best, not its last value
        if self.run is not None and self.alias and self.values:
            self.run.summary[self.alias] = max(self.values) if self.maximize else min(self.values)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = float((metrics or {}).get(f"eval_{self.metric}", float("nan")))
        self.values.append(value)
        self.evaluations += 1
        if self.run is not None and self.alias and self.alias != f"eval/{self.metric}":
            self.run.log({self.alias: value, "train/global_step": state.global_step})
        if self.prune_trial is not None:
            self.prune_trial.report(value, step=self.evaluations)
            # At the last evaluation there is nothing left to stop: the trial ran in full and is complete.
            if state.global_step < state.max_steps and self.prune_trial.should_prune():
                self.pruned = True
                control.should_training_stop = True
