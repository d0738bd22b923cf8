"""Benchmark: the finetune stage against a plain Hugging Face Trainer on the same work.

    python scripts/bench_finetune.py [--config configs/demo.yaml] [--repeat 1] [--set train.epochs=1 ...]

Both sides train the same base model on the same dataset version with the same
`TrainingArguments` (the stage's, built from the config), evaluate on the validation split at
the same points and keep the best checkpoint. The plain side reports to nothing
(``report_to="none"``) and saves the model with ``save_model``; the stage adds its W&B run,
misclassification tables, the dataset fetch, provenance and publishing the model version.
Wall time counts everything each side does from data on disk to a saved model, including
tokenisation (the stage's tokenisation cache is cleared before each of its runs). The runs
are interleaved (plain, stage, plain, stage, ...) so drift on a shared machine hits both.
Both sides run after an untimed warm-up (``--no-warmup`` skips it), so that the first of them does not
pay alone for what a process loads once (on a GPU, CUDA's start).
Target (issue 4): the stage within 1.05x of the plain Trainer on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_trainer(config, data_dir: Path, label_names: list[str], out: Path) -> dict:
    """What a user would write by hand: tokenise, Trainer(report_to="none"), train, save."""
    import datasets
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              set_seed)

    from pipeline.basemodel import resolve_base_model
    from pipeline.metrics import load_metric
    from pipeline.stages.finetune import _training_args

    start = time.perf_counter()
    base = resolve_base_model(config.model.base)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    splits = {s: datasets.Dataset(pq.read_table(data_dir / f"{s}.parquet").select(["text", "label_id"]))
              for s in ("train", "validation")}

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=config.model.max_length)
        enc["labels"] = batch["label_id"]
        return enc

    dd = datasets.DatasetDict(splits).map(encode, batched=True, remove_columns=["text", "label_id"])
    set_seed(config.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)})
    metric = load_metric()

    def compute_metrics(p):
        return metric.compute(predictions=np.argmax(p.predictions, -1), references=p.label_ids,
                              num_labels=len(label_names))

    args = _training_args(config, out / "checkpoints", "plain", report=False)
    trainer = Trainer(model=model, args=args, train_dataset=dd["train"], eval_dataset=dd["validation"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics)
    output = trainer.train()
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - start
    best = trainer.state.best_metric
    return {"wall_s": wall, "train_samples_per_second": output.metrics["train_samples_per_second"],
            "train_runtime": output.metrics["train_runtime"], "best_metric": best}


def stage(config) -> dict:
    from pipeline.stages import finetune

    shutil.rmtree(Path(config.tracking.dir) / "cache", ignore_errors=True)  # tokenise from scratch, like the plain side
    start = time.perf_counter()
    result = finetune.run(config)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_samples_per_second": result.metrics["train_samples_per_second"],
            "train_runtime": result.metrics["train_runtime"],
            "best_metric": result.metrics[f"eval_{config.train.metric_for_best_model}"], "status": result.status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="train 4 steps untimed first (default): the first training in a process pays for what it "
                         "loads once, on a GPU CUDA's start (about 10 s on an H200)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    from pipeline.config import load_config
    from pipeline.registry.local import LocalRegistry
    from pipeline.stages import dataset_publish

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        config = load_config(args.config, [*args.overrides, f"tracking.dir={work / 'track'}"])
        published = dataset_publish.run(config)
        registry = LocalRegistry(work / "track" / "registry")
        fetched = registry.fetch(registry.resolve(published.produced[0]), work / "data")
        label_names = json.loads((fetched.path / "dataset.json").read_text())["label_names"]
        rows = json.loads((fetched.path / "dataset.json").read_text())["num_rows"]
        print(f"data: {published.produced[0]} ({rows}); base: {config.model.base}; epochs {config.train.epochs}, "
              f"batch {config.train.batch_size}, max_length {config.model.max_length}; torch threads "
              f"{__import__('torch').get_num_threads()}", flush=True)
        if args.warmup:
            warm = load_config(args.config, [*args.overrides, f"tracking.dir={work / 'track'}", "train.max_steps=4"])
            start = time.perf_counter()
            plain_trainer(warm, fetched.path, label_names, work / "warmup")
            shutil.rmtree(work / "warmup", ignore_errors=True)
            print(f"  warm-up (4 steps, untimed): {time.perf_counter() - start:.1f} s", flush=True)
        plain_runs, stage_runs = [], []
        for i in range(args.repeat):
            out = work / f"plain-{i}"
            plain_runs.append(plain_trainer(config, fetched.path, label_names, out))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  plain Trainer run {i}: {plain_runs[-1]}", flush=True)
            stage_runs.append(stage(config))
            print(f"  finetune stage run {i}: {stage_runs[-1]}", flush=True)
        p = statistics.median(r["wall_s"] for r in plain_runs)
        s = statistics.median(r["wall_s"] for r in stage_runs)
        ps = statistics.median(r["train_samples_per_second"] for r in plain_runs)
        ss = statistics.median(r["train_samples_per_second"] for r in stage_runs)
        print(f"plain Trainer (report_to=none): {p:.1f} s wall, {ps:.1f} train samples/s")
        print(f"finetune stage (W&B offline):   {s:.1f} s wall, {ss:.1f} train samples/s")
        print(f"ratio stage / plain: {s / p:.3f}x wall (target <= 1.05x); train loop {ps / ss:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
