"""finetune on a tiny BERT built from a config, offline: artifact, lineage, run contents, resume."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from pipeline.commands.stage import run_stage
from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError, RefError, RegistryError, StageFailed
from pipeline.provenance import folder_digest
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish, finetune
from tests.conftest import (REPO, fill_disk, inspect_records, inspect_summary, offline, reg_runs, run_cli, torchrun,
                            write_yaml)
from tests.tiny import (write_separable_tickets, write_ticket_pairs, write_tickets, write_tiny_decoder,
                        write_tiny_model)

TRAIN = ["train.epochs=3", "train.batch_size=16", "train.learning_rate=3e-3", "train.logging_steps=2",
         "train.misclassified_rows=5"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="session")
def tickets_csv(tmp_path_factory) -> Path:
    return write_tickets(tmp_path_factory.mktemp("data") / "tickets.csv", rows=240)


def make_cfg(tmp_path: Path, tiny_model: Path, tickets_csv: Path, *extra: str):
    return load_config(None, [
        "dataset.name=tickets", f"dataset.source={tickets_csv}", "dataset.id_column=ticket_id",
        "model.name=clf", f"model.base={tiny_model}", "model.max_length=64", f"tracking.dir={tmp_path / 'track'}",
        *TRAIN, *extra,
    ])


def registry_of(cfg) -> LocalRegistry:
    return LocalRegistry(Path(cfg.tracking.dir) / "registry")


def publish_and_train(cfg) -> tuple:
    """dataset-publish then finetune with `cfg`: (finetune's result, the published model version's folder)."""
    dataset_publish.run(cfg)
    result = finetune.run(cfg)
    reg = registry_of(cfg)
    return result, reg.fetch(reg.resolve(result.produced[0])).path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tickets_csv):
    """One publish + finetune shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    with offline(tmp):
        cfg = make_cfg(tmp, tiny_model, tickets_csv)
        data = dataset_publish.run(cfg)
        result = finetune.run(cfg)
    return cfg, data, result


def test_model_artifact_carries_lineage_and_provenance(trained, tiny_model, tmp_path):
    cfg, data, result = trained
    reg = registry_of(cfg)
    assert result.status == "ok" and result.produced == ["clf:v0"] and result.consumed == ["tickets:v0"]
    model = reg.resolve("clf:candidate", type="model")
    assert model.ref == "clf:v0" and set(model.aliases) == {"latest", "candidate"}
    assert model.produced_by == result.run_id
    dataset = reg.resolve("tickets:v0")
    assert result.run_id in dataset.used_by  # the lineage edge dataset -> finetune run
    run = reg.get_run(result.run_id)
    assert run["status"] == "finished" and run["job_type"] == "finetune"
    assert run["consumed"] == ["tickets:v0"] and run["produced"] == ["clf:v0"]

    meta = model.metadata
    assert meta["dataset"] == {"ref": "tickets:v0", "digest": dataset.digest}
    assert meta["base_model"]["digest"] == folder_digest(tiny_model)
    assert meta["base_model"]["source"] == "local"
    assert meta["seed"] == 42 and meta["config"]["train"]["learning_rate"] == 3e-3
    assert meta["packages"]["torch"] and meta["packages"]["transformers"]
    assert set(meta["code"]) == {"git_commit", "git_dirty"}
    assert meta["label_names"] == dataset.metadata["label_names"]
    best, final = meta["metrics"]["best"], meta["metrics"]["final"]
    assert {"accuracy", "macro_f1", "macro_precision", "macro_recall", "loss", "step"} <= set(best)
    assert final["step"] >= best["step"]
    assert result.metrics["eval_macro_f1"] == best["macro_f1"]

    files = {f.path for f in model.files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "labels.json", "training_config.json",
            "metrics.json", "README.md"} <= files
    assert not any(n in f for f in files for n in ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state"))

    fetched = reg.fetch(model, tmp_path / "model").path
    training = json.loads((fetched / "training_config.json").read_text())
    assert "class_weights" not in training and "class_weights" not in training["train"] and "class_weights" not in meta
    assert meta["truncated"] == {"max_length": 64, "train": 0, "validation": 0}  # the tickets fit in 64 tokens
    card = (fetched / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert card.startswith("---\n") and "tickets:v0" in card and f"Base model: `{tiny_model}` (local" in card
    assert "base_model" not in front  # the Hub takes a model id there, never a local folder's path
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == "tickets:v0"
    assert "Intended use" in card and "cut to it" not in card
    rows = meta["num_rows"] if "num_rows" in meta else dataset.metadata["num_rows"]
    assert f"- Rows: train {rows['train']}, validation {rows['validation']}, test {rows['test']}\n" in card
    assert f"- epochs: {int(cfg.train.epochs)}\n" in card  # as written in the config, not 3.0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(fetched)
    assert list(clf.config.id2label.values()) == meta["label_names"]
    tok = AutoTokenizer.from_pretrained(fetched)
    logits = clf(**tok(["my invoice shows a double charge"], return_tensors="pt")).logits
    assert logits.shape == (1, len(meta["label_names"]))
    # the checkpoints were only for resuming: gone once the version is published
    assert not (Path(cfg.tracking.dir) / "checkpoints" / "clf" / result.run_id).exists()


def test_offline_run_holds_misclassification_tables_and_summaries(trained):
    cfg, data, result = trained
    run_dir = Path(result.paths["run_dir"])
    summary = inspect_summary(run_dir)["summary"]
    assert summary["eval/accuracy"] == {"max": pytest.approx(max_eval(run_dir, "eval/accuracy"))}
    assert set(summary["eval/macro_f1"]) == {"max"} and set(summary["eval/loss"]) == {"min"}
    assert summary["artifact"] == "clf:v0" and summary["dataset"] == "tickets:v0"
    assert summary["data/truncated_train"] == 0 and summary["data/truncated_validation"] == 0
    assert "eval/confusion_matrix_table" in summary

    tables = sorted((run_dir / "files" / "media" / "table" / "eval").glob("misclassified_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    assert len(tables) == 3  # one per evaluation (3 epochs)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["id", "text", "label", "predicted", "confidence", "top3", "loss"]
    assert 0 < len(last["data"]) <= 5  # capped by train.misclassified_rows
    losses = [row[-1] for row in last["data"]]
    assert losses == sorted(losses, reverse=True)  # the worst rows first
    for row in last["data"]:
        assert row[2] != row[3] and row[0].startswith("T")
        assert row[5].split(" ")[0] == row[3]  # top-3 starts with the prediction
    # the tables ride on the Trainer's step axis
    steps = [h["train/global_step"] for h in history(run_dir) if h.get("eval/misclassified._type") == "table-file"]
    assert steps == sorted(steps) and len(steps) == 3


def test_misclassified_tables_show_the_beginning_of_a_long_text():
    """The misclassified tables (every evaluation of finetune, and evaluate's) showed whole texts: 100 rows of
    1 MB documents put 100 MB into the run at each evaluation, for a model that reads its first max_length tokens."""
    import numpy as np

    from pipeline.callbacks import misclassified_rows
    from pipeline.printable import TABLE_TEXT

    long, pair = "word " * 1000, "topic " * 500
    columns, rows = misclassified_rows(np.array([[0.0, 2.0], [2.0, 0.0]]), np.array([0, 0]), ["a", "b"],
                                       [long, "short"], ids=["x", "y"], text_pairs=[pair, "p"])
    [row] = rows  # the second is right
    assert row[columns.index("text")] == f"{long[:TABLE_TEXT]}… [+{len(long) - TABLE_TEXT} characters]"
    assert row[columns.index("text_pair")] == f"{pair[:TABLE_TEXT]}… [+{len(pair) - TABLE_TEXT} characters]"
    _, short_rows = misclassified_rows(np.array([[0.0, 2.0]]), np.array([0]), ["a", "b"], ["short"])
    assert short_rows[0][1] == "short"


def history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in inspect_records(run_dir) if r["type"] == "history"]


def max_eval(run_dir: Path, key: str) -> float:
    return max(h[key] for h in history(run_dir) if key in h)


class CountEvalForwards(TrainerCallback):
    """Counts the model's forward calls made in eval mode (hooked at train start)."""

    def __init__(self):
        self.eval_forwards = 0
        self.evaluations = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if not module.training:
                self.eval_forwards += 1

        model.register_forward_hook(hook)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1


def test_tables_reuse_the_evaluation_predictions(tmp_path, tiny_model, tickets_csv):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_batch_size=5")
    dataset_publish.run(cfg)
    counter = CountEvalForwards()
    result = finetune.run(cfg, callbacks=(counter,))
    n_val = registry_of(cfg).resolve("tickets:v0").metadata["num_rows"]["validation"]
    assert counter.evaluations == 3
    assert counter.eval_forwards == counter.evaluations * math.ceil(n_val / 5)  # no second pass for the tables
    assert "eval/misclassified" in inspect_summary(Path(result.paths["run_dir"]))["summary"]


def test_second_run_reuses_tokenisation_and_reproduces_the_same_version(trained):
    cfg, data, first = trained
    assert first.details["tokenize_cache"] == "miss"
    again = finetune.run(cfg)
    assert again.details["tokenize_cache"] == "hit"
    # same data, base model, config and seed on the CPU: bit-identical files, so no new version
    assert again.status == "unchanged" and again.produced == ["clf:v0"]
    assert again.metrics == pytest.approx({**first.metrics, **{k: again.metrics[k] for k in ("train_runtime", "train_samples_per_second")}})
    assert registry_of(cfg).resolve("clf:latest").ref == "clf:v0"


class StopAt(TrainerCallback):
    """Sends this process SIGTERM at a step, as an orchestrator stopping the task would (or `sig`: SIGINT, Ctrl-C)."""

    def __init__(self, step: int, sig: int = signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def test_a_checkpoint_whose_save_was_cut_short_is_passed_over_for_the_one_before(tmp_path, tiny_model, tickets_csv,
                                                                                   caplog):
    """A crash or a full disk while the Trainer saved left a checkpoint whose files were cut short (trainer_state.json
    written empty, weights half written): `--resume` picked it, and the Trainer failed with a JSONDecodeError (or a
    safetensors error) at every retry. It is passed over, with a warning, for the checkpoint before it; resumed from
    there, the run ends bit for bit as the uninterrupted one."""
    steps = ["train.eval_strategy=steps", "train.eval_steps=5"]
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, *steps)
    dataset_publish.run(cfg)
    uninterrupted = finetune.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(12),))
    run_id = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    folder = Path(cfg.tracking.dir) / "checkpoints" / "clf" / run_id
    weights = folder / "checkpoint-12" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with caplog.at_level("WARNING", logger="pipeline.stages.finetune"):
        resumed = finetune.run(cfg, resume="latest")
    assert "checkpoint-12 is not whole (model.safetensors is shorter than its header says" in caplog.text
    assert "passed over for checkpoint-10" in caplog.text
    assert resumed.run_id == run_id and resumed.details["resumed_from"].endswith("checkpoint-10")
    assert resumed.status == "unchanged" and resumed.produced == uninterrupted.produced


_OPEN_RUN_THEN_WAIT = """
import sys, time
from pipeline.config import load_config
from pipeline.tracking import tracked_run
cfg = load_config(None, ["dataset.name=d", "dataset.source=s", "model.name=m", "tracking.mode=disabled",
                         "tracking.dir=" + sys.argv[1]])
with tracked_run(cfg, "finetune") as run:
    print(run.id, flush=True)
    time.sleep(120)
"""

_SAY_HOW_IT_ENDED = """
import logging, sys
from pathlib import Path
from pipeline.registry.local import LocalRegistry
from pipeline.stages import finetune
logging.basicConfig(level=logging.WARNING)
finetune._say_if_killed(LocalRegistry(Path(sys.argv[1]) / "registry"), sys.argv[2], Path("checkpoint-10"))
"""


def test_a_run_the_out_of_memory_killer_ended_is_said_so_when_it_is_continued(tmp_path):
    """Under a container's memory limit the kernel kills a training outright: no word, no result file, exit 137, and
    a retry with `--resume` ran out again near the same step, as silently. Continuing a run that ended so (crashed: its
    process gone without closing it) says so, and, where the container's memory cgroup recorded out-of-memory kills,
    that too, with what to lower. A real cgroup with a memory limit, a process it kills, a run whose process is
    killed, and the warning as a process in that container gives it; where the machine lets the test make one."""
    memory = Path("/sys/fs/cgroup/memory")
    folder = memory / f"pipeline-test-{os.getpid()}-oom"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(64 << 20))
    except OSError:
        pytest.skip("this machine lets the test make no cgroup v1 with a memory limit")
    inside = ["sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c"]
    try:
        grown = subprocess.run([*inside, "x = bytearray(256 << 20); x[::4096] = bytes(len(x[::4096]))"],
                               capture_output=True, timeout=60)
        assert grown.returncode == -9  # killed by the kernel at the cgroup's limit
        from pipeline.cpus import memory_kills

        proc = tmp_path / "cgroup"
        proc.write_text(f"4:memory:/{folder.name}\n")
        assert memory_kills(proc) == (1, 64 << 20)
        (folder / "memory.limit_in_bytes").write_text(str(2 << 30))  # room for the runs below; the count stays
        track = tmp_path / "track"
        opened = subprocess.Popen([*inside, _OPEN_RUN_THEN_WAIT, str(track)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        run_id = opened.stdout.readline().strip()
        opened.kill()
        opened.wait(timeout=60)
        said = subprocess.run([*inside, _SAY_HOW_IT_ENDED, str(track), run_id], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert said.returncode == 0, said.stderr[-2000:]
        assert (f"run {run_id} ended without closing its run (its process was killed outright: kill -9, a lost machine, "
                "or the kernel's out-of-memory killer, which has killed 1 process(es) under this container's memory "
                "limit of 2.0 GiB); it goes on from checkpoint-10. If that was this run, it runs out again near the "
                "same step: lower train.batch_size") in said.stderr
        # outside that cgroup (where this machine's own has recorded no kill): killed outright, nothing more known
        if memory_kills() is None:
            said = subprocess.run([sys.executable, "-c", _SAY_HOW_IT_ENDED, str(track), run_id], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            assert "or the kernel's out-of-memory killer); it goes on from checkpoint-10" in said.stderr
    finally:
        for _ in range(50):
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_damaged_checkpoint_is_told_by_its_headers_and_ends(tmp_path, caplog):
    """`checkpoint_damage` reads what a cut-short save leaves: JSON that does not parse, safetensors shorter than
    their header, torch's zip archives without their end; a whole checkpoint passes."""
    import torch
    from safetensors.torch import save_file

    from pipeline.stages.finetune import checkpoint_damage

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"w": torch.ones(64)}, ckpt / "model.safetensors")
    torch.save({"state": torch.zeros(64)}, ckpt / "optimizer.pt")
    assert checkpoint_damage(ckpt) is None
    whole = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for name, cut, said in (("trainer_state.json", 0, "trainer_state.json: Expecting value"),
                            ("model.safetensors", -10, "model.safetensors is shorter than its header says"),
                            ("model.safetensors", 4, "model.safetensors"),
                            ("optimizer.pt", -30, "optimizer.pt has no end")):
        (ckpt / name).write_bytes(whole[name][:cut])
        assert checkpoint_damage(ckpt).startswith(said), name
        (ckpt / name).write_bytes(whole[name])
    assert checkpoint_damage(ckpt) is None
    # the only checkpoint of a run, cut short: none to resume from, and the warning says so
    (ckpt / "trainer_state.json").write_text("")
    with caplog.at_level("WARNING", logger="pipeline.stages.finetune"):
        assert finetune._last_checkpoint(tmp_path) is None
    assert "passed over: no whole checkpoint is left before it" in caplog.text


def test_interrupted_run_resumes_into_the_same_run_with_the_same_result(tmp_path, tiny_model, tickets_csv, cli_here):
    steps = ["train.eval_strategy=steps", "train.eval_steps=5"]
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, *steps)
    dataset_publish.run(cfg)
    reg = registry_of(cfg)
    uninterrupted = finetune.run(cfg)

    # as the command runs it, with its result file
    result_json = tmp_path / "stopped.json"
    with pytest.raises(KeyboardInterrupt):
        run_stage("pipeline.stages.finetune", argparse.Namespace(result_json=str(result_json), group=None), config=cfg,
                  callbacks=(StopAt(12),))
    killed = [r for r in reg_runs(reg) if r["status"] == "killed"]
    assert len(killed) == 1 and killed[0]["job_type"] == "finetune"
    run_id = killed[0]["id"]
    ckpts = sorted(p.name for p in (Path(cfg.tracking.dir) / "checkpoints" / "clf" / run_id).glob("checkpoint-*"))
    # SIGTERM at step 12 saved that step before the run stopped (the last evaluation's was step 10): an orchestrator's
    # preemption loses no training done; two are kept (train.save_total_limit), the best among them
    assert ckpts == ["checkpoint-10", "checkpoint-12"]
    assert reg.resolve("clf:latest").ref == "clf:v0"  # nothing published by the stopped run
    # the result file names the stopped run, what it had consumed, and how to continue it
    stopped = json.loads(result_json.read_text())
    assert stopped["status"] == "failed" and stopped["message"] == "interrupted (signal 15)"
    assert stopped["run_id"] == run_id and stopped["consumed"] == ["tickets:v0"] and stopped["produced"] == []
    assert stopped["details"]["resume"] == run_id and stopped["details"]["checkpoint"].endswith(f"{run_id}/checkpoint-12")
    assert Path(stopped["paths"]["run_dir"]).name.endswith(run_id)
    # `artifacts list` shows the disk its checkpoints hold, and how to continue it
    track = f"tracking.dir={cfg.tracking.dir}"
    listed = cli_here("artifacts", "list", "--set", track).stdout
    assert "finetune checkpoints: " in listed and "finetune --resume RUN_ID" in listed
    row = next(line.split() for line in listed.splitlines() if run_id in line)
    assert row[:2] == ["clf", run_id] and row[4] == "checkpoint-12" and row[-1].endswith(f"checkpoints/clf/{run_id}")
    assert run_id not in cli_here("artifacts", "list", "--type", "dataset", "--set", track).stdout

    resumed = finetune.run(cfg, resume="latest")
    assert resumed.run_id == run_id and resumed.details["resumed_from"].endswith("checkpoint-12")
    assert "finetune checkpoints" not in cli_here("artifacts", "list", "--set", track).stdout  # a finished run leaves none
    assert reg.get_run(run_id)["status"] == "finished"
    wandb_dirs = list((Path(cfg.tracking.dir) / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(wandb_dirs) == 2  # the interrupted and the resumed part of one W&B run id
    # the same metrics as the uninterrupted run, and bit-identical weights: the same version
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert resumed.metrics[key] == uninterrupted.metrics[key]
    assert resumed.status == "unchanged" and resumed.produced == uninterrupted.produced


def test_the_same_training_makes_the_same_files_with_the_hub_offline_or_not(tmp_path, tiny_model, tickets_csv,
                                                                           monkeypatch):
    """transformers writes how the tokenizer was loaded into tokenizer_config.json (local_files_only: true where
    HF_HUB_OFFLINE=1), so a model trained with the variable was another version than the same training without it,
    and `reproduce` in the other setting said "other files differ (tokenizer_config.json)"."""
    import huggingface_hub.constants

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1")
    dataset_publish.run(cfg)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    online = finetune.run(cfg)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline_ = finetune.run(cfg)
    assert (online.produced, offline_.produced, offline_.status) == (["clf:v0"], ["clf:v0"], "unchanged")
    reg = registry_of(cfg)
    saved = json.loads((reg.fetch(reg.resolve("clf:v0"), tmp_path / "v0").path / "tokenizer_config.json").read_text())
    assert (saved["is_local"], saved["local_files_only"]) == (True, False)


@pytest.mark.parametrize("where", ["within the second epoch", "at the first epoch's end", "at the last step"])
def test_a_run_stopped_by_sigterm_anywhere_resumes_bit_for_bit(where, tmp_path, tiny_model, tickets_csv):
    """With evaluations at each epoch's end (the default), the checkpoint SIGTERM saves resumes to the uninterrupted
    run's weights wherever it lands. A stop within an epoch ended that epoch early, and the epoch's evaluation and
    checkpoint came at the stop's step and overwrote its checkpoint with the random state after an evaluation the
    uninterrupted run never made there (the dropout of every later step differed); and a run resumed from its last
    step, with no step left to train, wrote a config.json without problem_type (transformers sets it at the first
    forward pass with labels): the same weights, another version."""
    import math

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)
    dataset_publish.run(cfg)
    uninterrupted = finetune.run(cfg)
    per_epoch = math.ceil(registry_of(cfg).resolve("tickets:v0").metadata["num_rows"]["train"] / 16)
    step = {"within the second epoch": per_epoch + per_epoch // 2, "at the first epoch's end": per_epoch,
            "at the last step": 3 * per_epoch}[where]
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(step),))
    resumed = finetune.run(cfg, resume="latest")
    assert resumed.details["resumed_from"].endswith(f"checkpoint-{step}")
    assert (resumed.status, resumed.produced) == ("unchanged", uninterrupted.produced)


class Twice(StopAt):
    """SIGTERM twice at a step's end, `apart` seconds apart."""

    def __init__(self, step: int, apart: float):
        super().__init__(step)
        self.apart = apart

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(self.apart)
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_second_sigterm_stops_the_training_at_once(tmp_path, tiny_model, tickets_csv):
    """The first SIGTERM waits for its step's end to save a checkpoint; a second one a second or more later (an
    impatient operator, a grace period that is a second SIGTERM) stops at once, leaving the checkpoints the
    evaluations saved. One that comes with the first is the same request (accelerate launch passes its SIGTERM on
    twice, 4 ms apart, which stopped the training at once, its step's checkpoint unsaved)."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(Twice(12, apart=1.2),))
    [killed] = [r for r in reg_runs(registry_of(cfg)) if r["status"] == "killed"]
    folder = Path(cfg.tracking.dir) / "checkpoints" / "clf" / killed["id"]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(Twice(12, apart=0.004),))
    [_, again] = [r for r in reg_runs(registry_of(cfg)) if r["status"] == "killed"]
    folder = Path(cfg.tracking.dir) / "checkpoints" / "clf" / again["id"]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]


def test_the_dataset_an_interrupted_run_resumes_from_is_not_deleted_under_it(tmp_path, tiny_model, tickets_csv, cli_here):
    """A training stopped with checkpoints is continued with --resume on its dataset version; a nightly
    `artifacts prune` in between deleted that version, and with it the resume (and the data to train again from)."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    dataset_publish.run(make_cfg(tmp_path, tiny_model, tickets_csv, "dataset.split.seed=7"))  # tickets:v1, newer
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, dataset="tickets:v0", callbacks=(StopAt(6),))
    run_id = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    folder = Path(cfg.tracking.dir).resolve() / "checkpoints" / "clf" / run_id
    track = ("--set", f"tracking.dir={cfg.tracking.dir}")

    refused = cli_here("artifacts", "delete", "tickets:v0", *track)
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.strip() == (
        f"error: tickets:v0 is what interrupted finetune run {run_id} resumes from (its checkpoints: {folder}); "
        f"continue it (finetune --resume {run_id}) or delete that folder first, or pass --force")
    pruned = cli_here("artifacts", "prune", "tickets", "--keep", "1", *track)
    assert pruned.returncode == 0 and f"kept tickets:v0: tickets:v0 is what interrupted finetune run {run_id}" in pruned.stdout
    assert [v.ref for v in registry_of(cfg).list_versions(type="dataset")] == ["tickets:v0", "tickets:v1"]

    resumed = finetune.run(cfg, resume=run_id)  # what the kept version is for
    assert resumed.run_id == run_id and resumed.consumed == ["tickets:v0"]
    assert cli_here("artifacts", "prune", "tickets", "--keep", "1", *track).returncode == 0  # its model holds it now
    cli_here("artifacts", "delete", "clf:v0", "--delete-aliases", *track)
    assert cli_here("artifacts", "delete", "tickets:v0", *track).returncode == 0  # nothing needs it any more


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder_to_resume(tmp_path, tiny_model, tickets_csv,
                                                                             cli_here):
    """Stopped before its first checkpoint (Ctrl-C: SIGTERM saves one), a run left its folder (the state to resume it
    by, and nothing to resume from): `artifacts list` showed it as an interrupted run, "none (nothing to resume)",
    until it was deleted by hand. Nothing can continue it, so it goes, as a sweep trial's does."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)  # a checkpoint at each epoch's end (15 steps)
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(2, signal.SIGINT),))
    [killed] = [r for r in reg_runs(registry_of(cfg)) if r["status"] == "killed"]
    assert not (Path(cfg.tracking.dir) / "checkpoints" / "clf" / killed["id"]).exists()
    assert "finetune checkpoints" not in cli_here("artifacts", "list", "--set", f"tracking.dir={cfg.tracking.dir}").stdout
    with pytest.raises(PipelineError, match=r"nothing to resume: no interrupted finetune run of clf with a checkpoint"):
        finetune.run(cfg, resume="latest")


def test_resume_refuses_a_changed_config_and_says_what_changed(tmp_path, tiny_model, tickets_csv, caplog):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(7),))
    changed = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5",
                       "train.learning_rate=0.01")
    with pytest.raises(ConfigError, match=r"train.learning_rate \(0.003 -> 0.01\)"):
        finetune.run(changed, resume="latest")
    with pytest.raises(RefError, match="no interrupted finetune run 'nosuchrun'"):
        finetune.run(cfg, resume="nosuchrun")

    # --resume auto (an orchestrator's retry): that run when this call's config and dataset version are its own,
    # else a fresh run instead of an error
    killed = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    with caplog.at_level("INFO", logger="pipeline.stages.finetune"):
        assert finetune.plan(changed, resume="auto").resume_from is None
    assert (f"no interrupted run of clf is of this config and tickets:v0 ({killed}: config differs in "
            "train.learning_rate (0.003 -> 0.01)): training afresh") in caplog.text
    assert finetune.plan(cfg, resume="auto").run_id == killed
    # the dataset named as the first call named it, by an alias or by name (an orchestrator retrying the same
    # command line): the version it stands for is the run's, so the run goes on
    for named in ("tickets:latest", "tickets"):
        assert finetune.plan(cfg, dataset=named, resume="auto").run_id == killed
        assert finetune.plan(cfg, dataset=named, resume=killed).run_id == killed
    write_tickets(tmp_path / "more.csv", rows=260)
    dataset_publish.run(make_cfg(tmp_path, tiny_model, tmp_path / "more.csv"))  # tickets:latest moves to v1
    assert finetune.plan(cfg, resume="auto").resume_from is None
    with pytest.raises(ConfigError, match=rf"cannot resume run {killed} on tickets:latest \(tickets:v1\): it was "
                                          "training on tickets:v0"):
        finetune.plan(cfg, dataset="tickets:latest", resume=killed)
    continued = finetune.run(cfg, dataset="tickets:v0", resume="auto")
    assert continued.run_id == killed and continued.details["resumed_from"].endswith("checkpoint-7")
    assert finetune.plan(cfg, dataset="tickets:v0", resume="auto").resume_from is None  # nothing left to continue


def test_a_run_is_not_resumed_from_a_base_model_whose_files_changed(tmp_path, tiny_model, tickets_csv, caplog):
    """Its checkpoints were trained from the base as it was: going on from other files would publish a model that
    records a base it did not start from. `--resume` says so; `--resume auto` (a retry) trains afresh."""
    base = tmp_path / "bert"
    shutil.copytree(tiny_model, base)
    cfg = make_cfg(tmp_path, base, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(7),))
    killed = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    assert finetune.plan(cfg, resume="auto").run_id == killed  # the same files: it goes on
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attention_probs_dropout_prob": 0.3}))  # re-saved, other
    with pytest.raises(PipelineError, match=rf"cannot resume run {killed}: the base model {base} has other files now "
                                            r"\(digest \w{12}\) than the run began from \(\w{12}\)"):
        finetune.plan(cfg, resume=killed)
    with caplog.at_level("INFO", logger="pipeline.stages.finetune"):
        fresh = finetune.plan(cfg, resume="auto")
    assert fresh.resume_from is None and fresh.run_id != killed and "training afresh (--resume auto)" in caplog.text


def test_a_run_is_not_resumed_by_another_number_of_processes_or_in_other_arithmetic(tmp_path, tiny_model, tickets_csv,
                                                                                    caplog):
    """Each process takes a batch: a run begun by two processes (torchrun) and resumed by one goes on with half the
    rows a step, and its model would record one process, as if the config had trained it so (and a later finetune of
    that config reuse it). So would a run begun in bf16 on a GPU and resumed in fp32. `--resume` refuses;
    `--resume auto` trains afresh."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(7),))
    killed = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    state_file = tmp_path / "track" / "checkpoints" / "clf" / killed / finetune.RESUME_FILE
    state = json.loads(state_file.read_text())
    assert (state["processes"], state["precision"]) == (1, "fp32")  # what began it
    for began, said in (({"processes": 2}, "it began with 2 processes, this is 1 (each process takes a batch)"),
                        ({"precision": "bf16"}, "it began in bf16, this is fp32")):
        state_file.write_text(json.dumps({**state, **began}))
        with pytest.raises(ConfigError) as refused:
            finetune.plan(cfg, resume=killed)
        assert str(refused.value) == (f"cannot resume run {killed}: {said}; resume it as it began, or train afresh "
                                      "(without --resume)")
        with caplog.at_level("INFO", logger="pipeline.stages.finetune"):
            fresh = finetune.plan(cfg, resume="auto")
        assert fresh.resume_from is None and fresh.run_id != killed
        assert f"not continuing interrupted run {killed}: {said}; training afresh (--resume auto)" in caplog.text
    state_file.write_text(json.dumps(state))
    assert finetune.plan(cfg, resume="auto").run_id == killed  # as it began: it goes on


def test_run_again_continues_the_interrupted_finetune(tmp_path, tiny_model, tickets_csv, cli_here):
    """`pipeline run` after a stop in finetune continues that run, as `finetune --resume auto` does."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5",
                   "evaluate.gate.min_accuracy=1.0")  # the gate says no: nothing to deploy
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, group="first", callbacks=(StopAt(7),))
    killed = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    config, result = write_yaml(tmp_path, cfg), tmp_path / "run.json"
    out = cli_here("run", "--config", str(config), "--result-json", str(result))
    assert out.returncode == 3, out.stderr[-2000:]
    trained = json.loads(result.read_text())["stages"][1]
    assert trained["run_id"] == killed and trained["details"]["resumed_from"].endswith(f"{killed}/checkpoint-7")
    # one run, one group: the one it started in, in the registry and in the W&B records of its second part
    assert registry_of(cfg).get_run(killed)["run_group"] == "first"
    record = next(r for r in inspect_records(Path(trained["paths"]["run_dir"])) if r["type"] == "run")["run"]
    assert record["run_group"] == "first"


# Another process that continues a run and is training it now: it stays at its first step until it is killed.
TRAINING_NOW = """
import sys, time
from transformers import TrainerCallback
from pipeline.config import load_config
from pipeline.stages import finetune

class Stay(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print("training", flush=True)
        time.sleep(600)

finetune.run(load_config(sys.argv[1], []), resume=sys.argv[2], callbacks=(Stay(),))
"""


def test_a_run_training_in_another_process_is_not_continued_until_that_process_is_gone(tmp_path, tiny_model, tickets_csv,
                                                                                      cli_here, caplog):
    """An interrupted run's folder and a running one's look alike. A cron job that overlaps the one before, or an
    orchestrator's retry while the first attempt is alive, must not continue the same run in a second process."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.eval_strategy=steps", "train.eval_steps=5")
    dataset_publish.run(cfg)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=(StopAt(7),))
    run_id = next(r["id"] for r in reg_runs(registry_of(cfg)) if r["status"] == "killed")
    folder = Path(cfg.tracking.dir) / "checkpoints" / "clf" / run_id
    config = write_yaml(tmp_path, cfg)
    own_service = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # not this process's W&B service
    other = subprocess.Popen([sys.executable, "-c", TRAINING_NOW, str(config), run_id], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=REPO, env=own_service, text=True)
    guard = threading.Timer(300, other.kill)
    guard.start()
    try:
        assert "training\n" in iter(other.stdout.readline, ""), "the other process did not train"  # it trains the run now
        busy = cli_here("finetune", "--config", str(config), "--resume", run_id)
        assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr[-2000:]
        assert f"finetune run {run_id} is training now in another process (pid {other.pid} on " in busy.stderr
        listed = cli_here("artifacts", "list", "--set", f"tracking.dir={cfg.tracking.dir}").stdout
        row = next(line for line in listed.splitlines() if run_id in line)
        assert f"training now (pid {other.pid} on " in row
        caplog.set_level("INFO", logger="pipeline")
        fresh = finetune.run(cfg, resume="auto")  # not interrupted: passed over, and a run of its own trains
        assert fresh.run_id != run_id and fresh.details["resumed_from"] is None
        assert f"{run_id}: training now (pid {other.pid} on " in caplog.text
        assert (folder / finetune.RESUME_FILE).is_file() and list(folder.glob("checkpoint-*"))  # left as it was
    finally:
        guard.cancel()
        other.kill()  # SIGKILL: no handler runs, the kernel lets go of its lock
        other.wait()
    resumed = finetune.run(cfg, resume="auto")  # interrupted again: continued
    assert resumed.run_id == run_id and resumed.details["resumed_from"].endswith(f"{run_id}/checkpoint-7")


@pytest.mark.parametrize("extra, dataset, message", [
    ((), "tickets:v7", r"tickets has no version 'v7'; versions: v0"),
    ((), "other:latest", r"no artifact named 'other'.*known artifacts: tickets"),
    (("model.max_length=512",), None, r"model.max_length=512 is above what the base model .* accepts \(128 tokens\)"),
    (("model.base=/no/such/model",), None, r"model.base='/no/such/model': no such folder"),
    ((f"model.base={REPO / 'pyproject.toml'}",), None, r"pyproject.toml is a file; give the model's folder"),
    (("train.class_weights={billing: 2, nosuch: 3}",), None,
     r"train.class_weights names labels tickets:v0 does not have: 'nosuch'; labels: \['account_access'"),
    (("train.class_weights={Billing: 2, biling: 3}",), None,  # what each one probably means
     r"does not have: 'Billing' \(maybe 'billing'\), 'biling' \(maybe 'billing'\); labels: \['account_access'"),
])
def test_bad_input_fails_before_training_and_publishes_nothing(tmp_path, tiny_model, tickets_csv, extra, dataset, message):
    refused_before_a_run(make_cfg(tmp_path, tiny_model, tickets_csv, *extra), message, dataset)


def refused_before_a_run(cfg, message: str, dataset: str | None = None) -> None:
    """finetune on a freshly published dataset fails with `message`, having opened no run and written nothing."""
    dataset_publish.run(cfg)
    with pytest.raises((ConfigError, RefError), match=message):
        finetune.run(cfg, dataset=dataset)
    reg = registry_of(cfg)
    assert reg.list_versions(type="model") == []
    assert [r["job_type"] for r in reg_runs(reg)] == ["dataset-publish"]  # no finetune run was opened
    assert not (Path(cfg.tracking.dir) / "checkpoints").exists()


def test_a_dataset_without_test_rows_trains_and_evaluate_says_what_to_do(tmp_path, tiny_model, tickets_csv, caplog):
    """The test split is evaluate's: finetune needs train and validation only; reproduce compares on validation."""
    from pipeline import reproduce
    from pipeline.config import config_from_dict
    from pipeline.stages import evaluate

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "dataset.split.train=0.85", "dataset.split.validation=0.15",
                   "dataset.split.test=0", "train.epochs=1")
    dataset_publish.run(cfg)
    assert finetune.run(cfg).produced == ["clf:v0"]
    reg = registry_of(cfg)
    runs_before = len(reg_runs(reg))
    with pytest.raises(ConfigError, match=r"the test split of tickets:v0 is empty; nothing to evaluate on \(set evaluate.split"):
        evaluate.run(cfg)
    assert len(reg_runs(reg)) == runs_before  # refused before a run was opened
    # (a tiny model trained for one epoch: whether it beats chance is not the point here)
    scored = evaluate.run(config_from_dict(cfg.to_dict(), ["evaluate.split=validation",
                                                           "evaluate.gate.better_than_chance=false"]))
    assert scored.status == "ok"
    # the split the kept checkpoint was chosen on: allowed, with a warning that its scores there flatter it
    assert "clf:v0 is the checkpoint that scored best (by macro_f1) on the validation split of tickets:v0, so its " \
           "scores there are biased upward" in caplog.text
    again = reproduce.run(cfg, model="clf:v0", check=True)
    assert again.status == "ok" and again.details["test"]["split"] == "validation"
    assert again.details["test"]["rows"] == reg.resolve("tickets:v0").metadata["num_rows"]["validation"]


def test_cli_reports_bad_batch_size_and_unknown_reference(tmp_path, tiny_model, tickets_csv):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)
    dataset_publish.run(cfg)
    config = write_yaml(tmp_path, cfg)
    bad = run_cli("finetune", "--config", str(config), "--set", "train.batch_size=0")
    assert bad.returncode == 2 and "train.batch_size: Input should be greater than 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("finetune", "--config", str(config), "--dataset", "tickets:v3", "--result-json", str(tmp_path / "r.json"))
    assert missing.returncode == 2 and "tickets has no version 'v3'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "failed"
    assert registry_of(cfg).list_versions(type="model") == []


@pytest.fixture(scope="module")
def run_by_two(tmp_path_factory, tiny_model, tickets_csv):
    """`pipeline run` under torchrun, two processes: (config, its file, the finished command, its result), shared by
    the tests of several processes (each adds runs of its own; none removes or moves a version)."""
    tmp = tmp_path_factory.mktemp("two")
    # two epochs of a tiny model need not beat chance: the gate passes it, so that it is deployed
    cfg = make_cfg(tmp, tiny_model, tickets_csv, "train.epochs=2", "evaluate.gate.better_than_chance=false")
    config = write_yaml(tmp, cfg)
    with offline(tmp):
        done = torchrun("run", "--config", str(config), "--result-json", str(tmp / "r.json"), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, config, done, json.loads((tmp / "r.json").read_text())


@pytest.mark.slow
def test_two_processes_train_together_and_only_the_main_one_tracks(run_by_two, tmp_path):
    """`pipeline run` under torchrun: the main process publishes, trains with the other, evaluates and deploys; the
    other only trains (and so for `reproduce`). Before, each process ran every stage: both published, and evaluate
    failed in the other (an IndexError: it publishes no model), so torchrun failed a pipeline that had deployed."""
    cfg, config, done, outcome = run_by_two
    assert outcome["status"] == "ok" and outcome["produced"] == ["tickets:v0", "clf:v0"]
    assert done.stdout.strip() == "tickets:v0, clf:v0"  # said once, by the main process
    assert (Path(outcome["paths"]["deploy-fetch/model_dir"]) / "model.safetensors").is_file()
    result = outcome["stages"][1]
    assert result["stage"] == "finetune" and result["details"]["processes"] == 2
    train_rows = registry_of(cfg).resolve("tickets:v0").metadata["num_rows"]["train"]
    assert result["details"]["final"]["step"] == 2 * math.ceil(train_rows / (16 * 2))  # each process takes half a batch set
    assert result["metrics"]["eval_loss"] < 2.5  # a per-example mean, not multiplied by the process count
    reg = registry_of(cfg)
    # one run of each stage, from the main process
    assert [r["job_type"] for r in reg_runs(reg)][:5] == ["dataset-publish", "finetune", "evaluate", "deploy-fetch"]
    assert len(list((Path(cfg.tracking.dir) / "wandb").glob(f"offline-run-*-{result['run_id']}*"))) == 1
    assert [v.ref for v in reg.list_versions()] == ["clf:v0", "tickets:v0"]
    assert reg.resolve("clf:v0").metadata["training"]["processes"] == 2
    # reproduce rebuilds it with as many processes; the main one compares and records (the other failed on the
    # version it does not publish)
    again = torchrun("reproduce", "clf:v0", "--check", "--set", f"tracking.dir={cfg.tracking.dir}",
                     "--result-json", str(tmp_path / "again.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text())["details"]["same_digest"] is True
    assert again.stdout.strip() == "clf:v0"
    assert len(reg.resolve("clf:v0").metadata["reproductions"]) == 1
    # a bad reference stops both processes with the main one's message, instead of leaving one waiting
    bad = torchrun("finetune", "--config", str(config), "--dataset", "tickets:v9", cwd=tmp_path)
    assert bad.returncode != 0 and "tickets has no version 'v9'" in bad.stderr
    # so do data that cannot be published: the other process waited to train on them
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("text;label\nhello;greet\n", encoding="utf-8")
    unpublished = torchrun("run", "--config", str(config), "--set", f"dataset.source={semicolons}", cwd=tmp_path)
    assert unpublished.returncode != 0
    assert "error: the main process stopped before training: dataset-publish failed: " in unpublished.stderr
    assert [v.ref for v in reg.list_versions()] == ["clf:v0", "tickets:v0"]


TERM_WHILE_PREPARING = """\
import os, signal, sys, time
from pipeline import cli
from pipeline.stages import finetune

prepare = finetune._prepare
def slow_prepare(*args, **kwargs):  # the launcher is stopped while the main process prepares (tokenising, say)
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(60)
    return prepare(*args, **kwargs)

finetune._prepare = slow_prepare
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_processes_stopped_while_the_main_one_prepares_end_as_killed(tmp_path, tiny_model, tickets_csv):
    """The other processes wait for the main one to prepare; stopped then (torchrun passes its SIGTERM on to each),
    they were gone when the main process told them it stopped, and gloo's "Connection closed by peer" took the place
    of the SIGTERM: a traceback, and the run marked failed instead of killed."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)
    dataset_publish.run(cfg)
    script = tmp_path / "term_while_preparing.py"
    script.write_text(TERM_WHILE_PREPARING)
    stopped = torchrun("finetune", "--config", str(write_yaml(tmp_path, cfg)), cwd=tmp_path, script=script)
    assert stopped.returncode != 0 and "terminated (SIGTERM)" in stopped.stderr, stopped.stderr[-3000:]
    assert "Connection closed by peer" not in stopped.stderr
    assert [(r["job_type"], r["status"]) for r in reg_runs(registry_of(cfg))] == [("dataset-publish", "finished"),
                                                                                   ("finetune", "killed")]


SIGNAL_ONE_PROCESS = """\
import os, signal, sys
from transformers import TrainerCallback
from pipeline import cli
from pipeline.stages import finetune

class TermAt(TrainerCallback):  # a signal to this process alone, at a step's end (of torchrun's first attempt)
    def on_step_end(self, args, state, control, **kwargs):
        if (state.global_step == {step} and os.environ["RANK"] == "{rank}"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            os.kill(os.getpid(), signal.{signal})

command = finetune.run
finetune.run = lambda *a, callbacks=(), **k: command(*a, callbacks=(*callbacks, TermAt()), **k)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_processes_stopped_by_sigterm_save_the_same_step_together_and_resume_bit_for_bit(run_by_two, tmp_path):
    """Under torchrun each process gets SIGTERM at a step of its own (the launcher passes its own on to each), or only
    one gets it (a `kill` of one pid): they vote at each step's end and all save that step's checkpoint and stop.
    Before, the process that was not signalled failed at its next exchange with a gloo traceback ("Connection closed by
    peer"), and the run went back to the last evaluation's checkpoint. Here only the second process is signalled,
    within the second (last) epoch of the run `run_by_two` trained uninterrupted."""
    cfg, config, _, outcome = run_by_two
    uninterrupted = outcome["stages"][1]
    per_epoch = uninterrupted["details"]["final"]["step"] // 2
    step = per_epoch + per_epoch // 2
    script = tmp_path / "term_at.py"
    script.write_text(SIGNAL_ONE_PROCESS.format(step=step, rank=1, signal="SIGTERM"))
    # torchrun starts the processes again when one ends so (--max-restarts), and they go on with --resume auto
    restarted = torchrun("finetune", "--config", str(config), "--retrain", "--resume", "auto", "--result-json",
                         str(tmp_path / "r.json"), cwd=tmp_path, script=script, restarts=1)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert restarted.stderr.count("terminated (SIGTERM)") == 2  # both processes stopped, at one step
    assert "restarted this process" not in restarted.stderr  # the attempts' stores kept apart
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["details"]["resumed_from"].endswith(f"checkpoint-{step}")
    assert (resumed["status"], resumed["produced"]) == ("unchanged", uninterrupted["produced"])
    [killed] = [r for r in reg_runs(registry_of(cfg)) if r["id"] == resumed["run_id"]]
    assert killed["status"] == "finished"  # the run that was stopped, resumed to its end


def test_a_torchrun_restart_that_shares_its_store_says_how_to_keep_them_apart(monkeypatch):
    """A first attempt, or stores kept apart (TORCHELASTIC_USE_AGENT_STORE=False), says nothing."""
    from pipeline.stages.finetune import restart_store_hazard

    for shared, attempt in (("True", "0"), ("False", "1"), (None, "1")):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        if shared is None:
            monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        else:
            monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        assert restart_store_hazard() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    said = restart_store_hazard()
    assert said.startswith("torchrun restarted this process (restart 1) with the store its first attempt used")
    assert said.endswith("Start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment "
                         "(pytorch/pytorch#135712) for restarts that meet")


def test_more_processes_on_a_machine_than_its_gpus_are_refused_before_they_meet(monkeypatch):
    """tests/test_gpu.py launches them on a real GPU; here the check itself, wherever torch sees no GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^2 training processes on this machine but 1 CUDA GPU: .* --nproc_per_node 1\)"):
        finetune._check_gpu_per_process()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3")  # mpirun's name for it
    with pytest.raises(ConfigError, match=r"^3 training processes on this machine but 1 CUDA GPU"):
        finetune._check_gpu_per_process()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    finetune._check_gpu_per_process()  # a GPU each
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    finetune._check_gpu_per_process()  # on the CPU any number share it


def test_model_card_names_a_hub_base_model_in_its_metadata():
    from pipeline import modelcard

    def front(source: str, ident: str) -> dict:
        card = modelcard.render(model_name="clf", base={"id": ident, "source": source, "digest": "ab12"},
                                dataset_ref="tickets:v3", dataset_digest="cd34", label_names=["a", "b"],
                                num_rows={"train": 8, "validation": 2, "test": 2}, train={"epochs": 1}, max_length=32,
                                metrics={"best": {"accuracy": 0.5}}, best_metric="macro_f1")
        return yaml.safe_load(card.split("---\n")[1])

    assert front("packaged", "sentence-transformers/all-MiniLM-L6-v2")["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front("hub", "google-bert/bert-base-uncased")["base_model"] == "google-bert/bert-base-uncased"
    assert "base_model" not in front("local", "/home/me/models/bert")


def test_model_card_shows_labels_and_base_holding_backticks_as_written():
    """A label like ``a`b`` closed its code span early: the card showed `a` and a stray "b`"."""
    markdown_it = pytest.importorskip("markdown_it")
    from pipeline import modelcard

    labels = ["plain", "a`b", "``x", "ends`", "two\nlines"]
    card = modelcard.render(model_name="clf", base={"id": "/models/my`model", "source": "local", "digest": "ab12"},
                            dataset_ref="tickets:v3", dataset_digest="cd34", label_names=labels,
                            num_rows={"train": 8, "validation": 2, "test": 2}, train={"epochs": 1}, max_length=32,
                            metrics={"best": {"accuracy": 0.5}}, best_metric="macro_f1")
    body = card.split("---\n", 2)[2]
    spans = [t.content for block in markdown_it.MarkdownIt().parse(body) for t in (block.children or [])
             if t.type == "code_inline"]
    assert [*labels[:4], "two lines"] == spans[spans.index("plain"):spans.index("plain") + 5]
    assert spans.count("/models/my`model") == 2  # the opening line and the training procedure
    assert "`plain`" in card and "``/models/my`model``" in card  # a plain name is as it always was


def test_deleting_a_dataset_version_takes_its_cached_copies_and_a_republish_starts_afresh(tmp_path, tiny_model,
                                                                                         tickets_csv):
    with offline(tmp_path):
        cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1")
        dataset_publish.run(cfg)
        first = finetune.run(cfg)
        track = Path(cfg.tracking.dir)
        entries = [p.parent for p in (track / "cache" / "tokenized").glob(f"*/{finetune.CACHE_SOURCE}")]
        fetched = track / "artifacts" / "tickets" / "v0"
        assert len(entries) == 1 and fetched.is_dir() and first.details["tokenize_cache"] == "miss"
        cli = ("--set", f"tracking.dir={track}")

        refused = run_cli("artifacts", "delete", "tickets:v0", *cli)
        assert refused.returncode == 2 and "tickets:v0 is what clf:v0 was made from" in refused.stderr
        assert entries[0].is_dir() and fetched.is_dir()
        model = run_cli("artifacts", "delete", "clf:v0", "--delete-aliases", "--json", *cli)
        assert model.returncode == 0, model.stderr
        assert json.loads(model.stdout)["aliases_removed"] == ["candidate"]
        data = run_cli("artifacts", "delete", "tickets:v0", *cli)
        assert data.returncode == 0, data.stderr
        assert f"local copies removed: {fetched}, {entries[0]}" in data.stdout
        assert not entries[0].exists() and not fetched.exists()

        with pytest.raises(RefError, match="tickets has no alias 'latest'; versions: v0 \\(deleted\\)"):
            finetune.run(cfg)
        assert dataset_publish.run(cfg).produced == ["tickets:v1"]  # the same content, a new number
        again = finetune.run(cfg)
    assert again.details["tokenize_cache"] == "miss" and again.produced == ["clf:v1"]
    assert registry_of(cfg).resolve("clf:v1").metadata["dataset"]["ref"] == "tickets:v1"


def test_a_full_disk_while_training_is_one_message_and_training_again_publishes(small_disk, tiny_model, tickets_csv, cli_here):
    """torch.save says only "unexpected pos" on a full disk; the stage says what it is."""
    track = small_disk / "track"
    cli = ("--config", str(REPO / "configs" / "demo.yaml"), "--set", f"tracking.dir={track}",
           "--set", f"dataset.source={tickets_csv}", "--set", f"model.base={tiny_model}", "--set", "model.max_length=32",
           "--set", "train.epochs=1", "--set", "train.batch_size=16")
    assert cli_here("dataset-publish", *cli).returncode == 0
    filler = fill_disk(small_disk, 250)  # the data fits; a checkpoint (weights and optimizer state) does not

    full = cli_here("finetune", *cli)

    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert f"error: the disk is full ({track.resolve()}/checkpoints/" in full.stderr
    assert LocalRegistry(track / "registry").list_versions(type="model") == []
    filler.unlink()
    again = cli_here("finetune", *cli)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "intent-classifier:v0"


def test_balanced_class_weights_come_from_the_train_counts_and_are_recorded(tmp_path, tiny_model, tickets_csv):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.class_weights=balanced")
    with offline(tmp_path):
        dataset_publish.run(cfg)
        finetune.run(cfg)
    reg = registry_of(cfg)
    counts = json.loads((reg.fetch(reg.resolve("tickets:v0")).path / "dataset.json").read_text())["label_counts"]["train"]
    n, k = sum(counts.values()), len(counts)
    expected = {label: round(n / (k * c), 6) for label, c in counts.items()}
    assert len(set(expected.values())) > 1  # the labels' counts differ, so the weights do
    model = reg.resolve("clf:v0")
    assert model.metadata["class_weights"] == expected
    fetched = reg.fetch(model, tmp_path / "model").path
    training = json.loads((fetched / "training_config.json").read_text())
    assert training["class_weights"] == expected and training["train"]["class_weights"] == "balanced"
    assert sum(expected[label] * c for label, c in counts.items()) == pytest.approx(n, rel=1e-5)  # mean weight 1 per row
    assert "- class_weights: balanced (" in (fetched / "README.md").read_text()


def test_a_class_weighed_almost_nothing_is_not_learnt(tmp_path, tiny_model):
    """The weights reach the training loss: the tiny model learns every label of balanced tickets (see
    test_evaluate_deploy's GOOD settings), except the one weighed 1e-4."""
    from pipeline.predict import load

    csv = write_tickets(tmp_path / "tickets.csv", rows=480)
    cfg = make_cfg(tmp_path, tiny_model, csv, "train.epochs=20", "train.warmup_ratio=0",
                   "train.class_weights={billing: 0.0001}")
    with offline(tmp_path):
        dataset_publish.run(cfg)
        finetune.run(cfg)
    reg = registry_of(cfg)
    model = reg.resolve("clf:v0")
    assert model.metadata["class_weights"] == {n: (0.0001 if n == "billing" else 1.0) for n in model.metadata["label_names"]}
    import pyarrow.parquet as pq

    rows = pq.read_table(reg.fetch(reg.resolve("tickets:v0")).path / "train.parquet").to_pylist()
    preds = load(reg.fetch(model).path).predict([r["text"] for r in rows])
    recall = {label: sum(p.label == label for p, r in zip(preds, rows) if r["label"] == label)
                     / sum(r["label"] == label for r in rows) for label in model.metadata["label_names"]}
    assert recall["billing"] < 0.2, recall
    assert min(v for label, v in recall.items() if label != "billing") > 0.7, recall


def test_the_weighted_loss_is_a_per_row_mean_that_gradient_accumulation_adds_up():
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2, 1, 1])
    weights = [0.5, 2.0, 1.0]
    loss = finetune.weighted_loss(weights)
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    by_hand = sum(weights[y] * l for y, l in zip(labels.tolist(), per_row)) / 4
    assert float(loss({"logits": logits}, labels)) == pytest.approx(float(by_hand))
    # two micro-batches, each divided by the rows of the whole accumulated batch, add up to the full batch
    halves = [loss({"logits": logits[i:i + 2]}, labels[i:i + 2], num_items_in_batch=torch.tensor(4)) for i in (0, 2)]
    assert float(sum(halves)) == pytest.approx(float(by_hand))
    assert float(finetune.weighted_loss([1.0, 1.0, 1.0])({"logits": logits}, labels)) == pytest.approx(float(per_row.mean()))
    assert finetune.class_weights("none", ["a", "b"], {"a": 3, "b": 1}) is None
    assert finetune.class_weights("balanced", ["a", "b"], {"a": 3, "b": 1}) == [4 / 6, 4 / 2]
    assert finetune.class_weights({"b": 3.0}, ["a", "b"], {}) == [1.0, 3.0]
    with pytest.raises(ConfigError, match=r"names labels the dataset does not have: 'c'; labels: \['a', 'b'\]"):
        finetune.class_weights({"c": 2.0}, ["a", "b"], {})


def test_a_base_model_folder_that_is_not_there_names_a_close_one_beside_it(tiny_model, monkeypatch):
    """model.base with a typo in the folder's name: the message names the folder it probably means."""
    from pipeline.basemodel import resolve_base_model

    typo = tiny_model.parent / "berf"
    with pytest.raises(ConfigError, match=rf"model.base='{typo}': no such folder \({typo}\); did you mean {tiny_model}\?$"):
        resolve_base_model(str(typo))
    with pytest.raises(ConfigError, match=r"model.base='/no/such/model': no such folder \(/no/such/model\)$"):
        resolve_base_model("/no/such/model")
    # a bare name is a hub id unless it is a folder here: a typo of a folder beside, or of `minilm`, is named too
    monkeypatch.chdir(tiny_model.parent)
    with pytest.raises(ConfigError, match=r"^model.base='berf' is neither a local folder nor in the Hugging Face cache, "
                                          rf".*\(NAME:vN or NAME:ALIAS\); did you mean {tiny_model.name}\?$"):
        resolve_base_model("berf")
    with pytest.raises(ConfigError, match=r"; did you mean minilm\?$"):
        resolve_base_model("minlm")
    with pytest.raises(ConfigError, match=r"\(NAME:vN or NAME:ALIAS\)$"):
        resolve_base_model("nothing-like-it")


def test_a_base_model_without_its_vocabulary_is_refused_before_training(tmp_path, tiny_model, tickets_csv):
    """A base folder with no tokenizer files, or with tokenizer_config.json but not the vocabulary it goes with:
    transformers makes a tokenizer of its special tokens alone from the latter, every word of every text became
    [UNK], and the model trained on nothing but the texts' lengths. Both are refused before training, naming the
    folder; as is another model's tokenizer, with more tokens than the weights have embeddings."""
    from transformers import AutoTokenizer

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)
    with offline(tmp_path):
        dataset_publish.run(cfg)
    for name, kept in (("no-tokenizer", ()), ("config-only", ("tokenizer_config.json",))):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "model.safetensors", *kept):
            shutil.copy(tiny_model / f, folder / f)
        said = (rf"model.base='{folder}': {folder} has no tokenizer files \(tokenizer.json, " if not kept else
                rf"model.base='{folder}': its tokenizer has no vocabulary \(only its 5 special tokens\): the folder "
                r"lacks the tokenizer's vocabulary file \(tokenizer.json, vocab.txt, vocab.json and merges.txt, or a ")
        with offline(tmp_path), pytest.raises(ConfigError, match=said):
            finetune.plan(make_cfg(tmp_path, folder, tickets_csv))
    # another model's tokenizer beside these weights: its ids ran past the embeddings (an IndexError mid-training)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens([f"word{i}" for i in range(10)])
    tokenizer.save_pretrained(other)
    with offline(tmp_path), pytest.raises(ConfigError, match=rf"model.base='{other}': its tokenizer has (\d+) tokens, but "
                                                              r"the model has embeddings for (\d+) \(vocab_size\): the "
                                                              r"tokenizer files are another model's"):
        finetune.plan(make_cfg(tmp_path, other, tickets_csv))
    assert [v.ref for v in registry_of(cfg).list_versions(type="model")] == []


def test_a_base_checkpoint_whose_weights_the_architecture_does_not_find_is_refused(tmp_path, tiny_model, tickets_csv,
                                                                                   caplog):
    """A base checkpoint saved under a prefix (``module.``, from DistributedDataParallel) loaded as a model of random
    values: transformers' warning is silenced in finetune (a new head is expected), so it trained from scratch and
    recorded the base as its start. It is refused before a run opens (before tokenising, which can take minutes),
    naming what the checkpoint holds instead. A checkpoint without pooler weights (sentence-embedding models often
    have none) trains, with one warning."""
    from safetensors.torch import load_file, save_file

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1")
    with offline(tmp_path):
        dataset_publish.run(cfg)
    weights = load_file(tiny_model / "model.safetensors")
    for name, kept in (("prefixed", {f"module.{k}": v for k, v in weights.items()}),
                       ("no-pooler", {k: v for k, v in weights.items() if not k.startswith("pooler.")})):
        shutil.copytree(tiny_model, tmp_path / name)
        save_file(kept, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    with offline(tmp_path), pytest.raises(ConfigError, match=rf"model.base='{tmp_path / 'prefixed'}': (\d+) of its \1 "
                                                              r"weight tensors are not in the checkpoint \(bert\.embeddings\..*"
                                                              r"which holds \1 it does not use instead \(module\.embeddings.*; "
                                                              r"training would start from random values"):
        finetune.run(make_cfg(tmp_path, tmp_path / "prefixed", tickets_csv, "train.epochs=1"))
    assert registry_of(cfg).list_versions(type="model") == []
    assert [r["job_type"] for r in reg_runs(registry_of(cfg))] == ["dataset-publish"]  # refused before a run opened
    # a config.json whose sizes are not the checkpoint's: the embeddings were made afresh (as a new head may be)
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_model, reshaped)
    config = json.loads((reshaped / "config.json").read_text())
    rows = config["vocab_size"]
    (reshaped / "config.json").write_text(json.dumps({**config, "vocab_size": rows + 50}))
    with offline(tmp_path), pytest.raises(ConfigError, match=rf"model.base='{reshaped}': 1 of its weight tensors have other "
                                                              r"shapes in the checkpoint than its config.json gives \(bert\."
                                                              rf"embeddings.word_embeddings.weight: \[{rows}, 32\] in the "
                                                              rf"checkpoint, \[{rows + 50}, 32\] by config.json\)"):
        finetune.run(make_cfg(tmp_path, reshaped, tickets_csv, "train.epochs=1"))
    # a weights file cut short, or a shard its index names missing: a traceback from inside the run before
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model, cut)
    (cut / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:30_000])
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:10]}, sharded / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}))
    for folder, why in ((cut, r"SafetensorError: Error while deserializing header"),
                        (sharded, r"FileNotFoundError: .*model-00002-of-00002.safetensors")):
        with offline(tmp_path), pytest.raises(ConfigError, match=rf"model.base='{folder}': its weights do not load \({why}"):
            finetune.run(make_cfg(tmp_path, folder, tickets_csv, "train.epochs=1"))
    assert [r["job_type"] for r in reg_runs(registry_of(cfg))] == ["dataset-publish"]
    with offline(tmp_path), caplog.at_level("WARNING", logger="pipeline.basemodel"):
        result = finetune.run(make_cfg(tmp_path, tmp_path / "no-pooler", tickets_csv, "train.epochs=1"))
    assert result.produced == ["clf:v0"]
    assert caplog.text.count("the base model's checkpoint has no pooler weights (bert.pooler.dense.bias, "
                             "bert.pooler.dense.weight)") == 1


def test_a_new_cache_entry_retires_those_no_code_reads_again(tmp_path, tiny_model, tickets_csv, monkeypatch):
    """Entries of an older layout (no marker, or another format) and day-old half-written ones go when an
    entry is written; current entries, unreadable markers and fresh half-written ones stay. An entry made with
    other versions of the tokenizing packages is not read."""
    from pipeline.basemodel import resolve_base_model

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv)
    with offline(tmp_path):
        dataset_publish.run(cfg)
    reg = registry_of(cfg)
    version = reg.resolve("tickets:v0")
    data = reg.fetch(version).path
    base = resolve_base_model(str(tiny_model))
    cache = tmp_path / "cache"
    kept, _ = finetune.tokenize(data, version.digest, base, 32, cache)
    planted = {name: cache / name for name in ("unmarked", "format1", "damaged", ".x.old.tmp", ".y.new.tmp")}
    for folder in planted.values():
        folder.mkdir()
        (folder / "dataset_dict.json").write_text("{}")
    (planted["format1"] / finetune.CACHE_SOURCE).write_text(json.dumps({"dataset_digest": "d", "format": 1}))
    (planted["damaged"] / finetune.CACHE_SOURCE).write_text("{not json")
    os.utime(planted[".x.old.tmp"], (0, 0))
    assert finetune.tokenize(data, version.digest, base, 32, cache) == (kept, True)  # a hit writes nothing
    assert all(f.is_dir() for f in planted.values())
    made, hit = finetune.tokenize(data, version.digest, base, 48, cache)
    assert not hit and made.is_dir() and kept.is_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted([kept.name, made.name, "damaged", ".y.new.tmp"])
    # another release of tokenizers or transformers may split the same text otherwise: its entry is its own
    installed = finetune.tokenizing_packages()
    assert set(installed) == {"tokenizers", "transformers"}
    assert json.loads((kept / finetune.CACHE_SOURCE).read_text())["packages"] == installed
    monkeypatch.setattr(finetune, "tokenizing_packages", lambda: {**installed, "tokenizers": "0.0.1"})
    other, hit = finetune.tokenize(data, version.digest, base, 32, cache)
    assert not hit and other != kept and kept.is_dir()


def test_a_confusion_matrix_of_120_labels_reaches_the_run_whole(tmp_path, tiny_model):
    """W&B keeps 10,000 rows of a logged table; a cell for every pair of 120 labels is 14,400."""
    import csv

    words = ["invoice", "parcel", "password", "refund", "login", "order", "card", "delivery"]
    path = tmp_path / "many.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ticket_id", "text", "label"])
        for label in range(120):
            for j in range(4):
                w.writerow([f"T{label}-{j}", f"{words[label % 8]} {words[j]} question {label} {j}", f"intent_{label:03d}"])
    cfg = make_cfg(tmp_path, tiny_model, path, "train.epochs=1", "dataset.split.train=0.5", "dataset.split.validation=0.25",
                   "dataset.split.test=0.25")
    with offline(tmp_path):
        dataset_publish.run(cfg)
        result = finetune.run(cfg)
    n_val = registry_of(cfg).resolve("tickets:v0").metadata["num_rows"]["validation"]
    tables = list((Path(result.paths["run_dir"]) / "files" / "media" / "table" / "eval").glob("confusion_matrix_table_*.table.json"))
    assert len(tables) == 1
    rows = json.loads(tables[0].read_text())["data"]
    assert sum(n for _, _, n in rows) == n_val == 120  # one validation row per label, every one in the chart
    assert {actual for actual, _, _ in rows} == {f"intent_{i:03d}" for i in range(120)}


def test_a_diverged_training_fails_clearly_and_publishes_nothing(tmp_path, tiny_model, tickets_csv):
    from pipeline.runner import PipelineResult, run_all

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.learning_rate=1e4", "train.epochs=2")
    outcome = PipelineResult(group="diverged")
    with offline(tmp_path):
        with pytest.raises(StageFailed, match=r"the training diverged: the checkpoint it kept \(step \d+\) has "
                                              r"validation loss nan; nothing was published. Lower train.learning_rate"):
            run_all(cfg, result=outcome)
    reg = registry_of(cfg)
    assert reg.list_versions(type="model") == []
    failed = [r for r in reg_runs(reg) if r["job_type"] == "finetune"]
    assert [r["status"] for r in failed] == ["failed"]
    # the pipeline's result names the failed stage's run and what it consumed
    out = outcome.to_dict()
    assert out["status"] == "failed" and out["message"].startswith("finetune failed: the training diverged")
    assert [(s["stage"], s["status"]) for s in out["stages"]] == [("dataset-publish", "ok"), ("finetune", "failed")]
    assert out["stages"][1]["run_id"] == failed[0]["id"] and out["stages"][1]["consumed"] == ["tickets:v0"]
    assert out["produced"] == ["tickets:v0"] and out["consumed"] == []


def test_run_refuses_what_evaluate_would_refuse_before_training(tmp_path, tiny_model, tickets_csv):
    """`dataset.split.test: 0` with evaluate scoring the test split, or a gate naming a label the data lacks: the chain
    used to train, publish a model and only then fail in evaluate. The split is refused before the data is read; the
    label, which only the published data shows, before finetune opens a run, with evaluate's own message."""
    from pipeline.runner import PipelineResult, run_all

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "dataset.split.train=0.8", "dataset.split.validation=0.2",
                   "dataset.split.test=0")
    outcome = PipelineResult(group="no-test-rows")
    with offline(tmp_path):
        with pytest.raises(ConfigError, match=r"which would have no test rows \(dataset.split: train 0.8, validation "
                                              r"0.2, test 0\): evaluate scores it \(evaluate.split: test\)"):
            run_all(cfg, result=outcome)
    reg = registry_of(cfg)
    assert reg.list_versions() == [] and reg_runs(reg) == []  # nothing published, no run opened
    out = outcome.to_dict()
    assert [(s["stage"], s["status"]) for s in out["stages"]] == [("dataset-publish", "failed")]
    # likewise a gate that names a label the data does not have
    with offline(tmp_path), pytest.raises(ConfigError, match=r"evaluate.gate.min_class_recall names labels the model "
                                                             r"does not have: 'biling' \(maybe 'billing'\); labels"):
        run_all(make_cfg(tmp_path, tiny_model, tickets_csv, "evaluate.gate.min_class_recall={biling: 0.5}"))
    assert reg.list_versions(type="model") == [] and [r["job_type"] for r in reg_runs(reg)] == ["dataset-publish"]
    assert not list((Path(cfg.tracking.dir) / "checkpoints").glob("*/*"))  # nothing trained
    # scoring the validation split instead, a split without test rows goes through
    assert run_all(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"split": "validation"})}),
                   result=PipelineResult(group="validation")).status in ("ok", "gate_failed")


def test_running_out_of_memory_while_training_says_what_to_lower_and_publishes_nothing(tmp_path, tiny_model, tickets_csv):
    """A real allocation the CPU cannot make, in the middle of training (on a GPU: torch.OutOfMemoryError)."""
    import torch

    from pipeline.errors import OutOfMemory

    class Allocate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                torch.empty(2**60, dtype=torch.uint8)

    from tqdm import tqdm

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.gradient_accumulation_steps=2")
    dataset_publish.run(cfg)
    open_before = set(tqdm._instances)
    with pytest.raises(OutOfMemory) as raised:
        finetune.run(cfg, callbacks=(Allocate(),))
    # the training's progress bar is closed: left open, it was printed again, half-way, when Python collected it
    assert set(tqdm._instances) <= open_before
    assert str(raised.value) == (
        "out of memory on the CPU while training: lower train.batch_size (now 16) and raise "
        "train.gradient_accumulation_steps (now 2) to keep 32 rows per optimizer step; lower train.eval_batch_size "
        "(now 32) if it stopped while evaluating; lower model.max_length (now 64); set train.activation_checkpointing: "
        "true (less memory, about a third more compute). Nothing was published")
    assert raised.value.exit_code == 1 and "can't allocate memory" in str(raised.value.__cause__)
    reg = registry_of(cfg)
    assert reg.list_versions(type="model") == []
    assert [r["status"] for r in reg_runs(reg) if r["job_type"] == "finetune"] == ["failed"]


def test_running_out_of_memory_while_scoring_says_to_score_fewer_at_a_time(trained, monkeypatch):
    import torch

    from pipeline.errors import OutOfMemory
    from pipeline.predict import Classifier

    cfg, _, result = trained
    reg = registry_of(cfg)
    classifier = Classifier(reg.fetch(reg.resolve(result.produced[0])).path)

    def forward(*args, **kwargs):
        return torch.empty(2**60, dtype=torch.uint8)  # a real allocation the CPU cannot make

    monkeypatch.setattr(classifier, "model", forward)
    with pytest.raises(OutOfMemory, match=r"^out of memory on cpu scoring 2 texts at a time \(of up to \d+ tokens\) with "
                                          r".*: score fewer at a time \(evaluate.batch_size for evaluate and reproduce\)$"):
        classifier.logits(["my order never arrived", "refund please"])


def test_out_of_memory_where_no_stage_says_more_is_one_line_and_exit_1(trained, monkeypatch, cli_here):
    import torch

    import pipeline.predict

    cfg, _, result = trained
    reg = registry_of(cfg)

    def load(*args, **kwargs):  # as if the model did not fit where it was loaded: a real allocation that fails
        torch.empty(2**60, dtype=torch.uint8)

    monkeypatch.setattr(pipeline.predict, "load", load)
    out = cli_here("predict", "--model-dir", str(reg.fetch(reg.resolve(result.produced[0])).path), "hello")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: out of memory: [enforce fail at alloc_cpu.cpp") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_values_that_are_not_numbers_after_the_kept_checkpoint_are_recorded_as_null(caplog):
    best = {"accuracy": 0.9, "loss": 0.3, "step": 20}
    final = {"accuracy": 0.1, "loss": float("nan"), "macro_f1": float("inf"), "step": 40}
    finetune._check_finite(best, final)
    assert final == {"accuracy": 0.1, "loss": None, "macro_f1": None, "step": 40} and best["loss"] == 0.3
    assert "diverged after the checkpoint it kept (step 20): the last evaluation (step 40)" in caplog.text
    with pytest.raises(StageFailed, match=r"step 20\) has validation loss inf"):
        finetune._check_finite({**best, "loss": float("inf")}, {})


def test_texts_cut_at_max_length_are_counted_reported_and_recorded(tmp_path, tiny_model, tickets_csv, caplog):
    """A text longer than model.max_length is cut to it, so the model learns from its beginning only: the
    stage counts those per split (from the tokenizer, also when the tokenised splits come from the cache),
    warns, and records the counts in the run summary, the version's metadata and its model card."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "model.max_length=12", "train.max_steps=2")
    with offline(tmp_path):
        dataset_publish.run(cfg)
        data = registry_of(cfg).fetch(registry_of(cfg).resolve("tickets:v0")).path
        tok = AutoTokenizer.from_pretrained(tiny_model)
        expected = {s: sum(len(ids) > 12 for ids in tok(pq.read_table(data / f"{s}.parquet").column("text").to_pylist())["input_ids"])
                    for s in ("train", "validation")}
        assert 0 < expected["train"] < len(pq.read_table(data / "train.parquet"))  # some texts fit, some do not
        results = [finetune.run(cfg), finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "model.max_length=12",
                                                                "train.max_steps=2", "train.seed=3"))]
    assert [r.details["tokenize_cache"] for r in results] == ["miss", "hit"]
    for result in results:
        assert inspect_summary(Path(result.paths["run_dir"]))["summary"]["data/truncated_train"] == expected["train"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "model.max_length=12" in r.getMessage()]
    assert len(warnings) == 2 and f"{expected['train']} of " in warnings[0] and "raise model.max_length" in warnings[0]
    version = registry_of(cfg).resolve(results[0].produced[0])
    assert version.metadata["truncated"] == {"max_length": 12, **expected}
    card = (registry_of(cfg).fetch(version).path / "README.md").read_text()
    assert f"cut to it: train {expected['train']} of " in card
    entry = next((Path(cfg.tracking.dir) / "cache" / "tokenized").glob(f"*/{finetune.CACHE_SOURCE}")).parent
    assert finetune.truncation(entry)["train"] == {"rows": len(pq.read_table(data / "train.parquet")), "truncated": expected["train"]}
    (entry / finetune.CACHE_SOURCE).write_text("{damaged")  # not a reason to stop training: reported as unknown
    assert finetune.truncation(entry) == {} and "cannot be read" in caplog.text

    # evaluate scores the test texts as cut (as predict will classify them), and says how many were
    from pipeline.predict import load
    from pipeline.stages import evaluate

    test_texts = pq.read_table(data / "test.parquet").column("text").to_pylist()
    cut = sum(len(ids) > 12 for ids in tok(test_texts)["input_ids"])
    classifier = load(registry_of(cfg).fetch(version).path)
    classifier.logits(test_texts)  # the classifier counts the texts it cut as it tokenises them
    assert cut > 0 and classifier.truncated == cut
    with offline(tmp_path):
        scored = evaluate.run(cfg, model=version.ref)
    assert registry_of(cfg).resolve(version.ref).metadata["evaluation"]["truncated"] == cut
    assert inspect_summary(Path(scored.paths["run_dir"]))["summary"]["test/truncated"] == cut
    assert f"{cut} of {len(test_texts)} test texts are longer than {version.ref}'s max_length (12 tokens)" in caplog.text


def test_texts_cut_are_counted_alike_by_fast_and_slow_tokenizers(tiny_model):
    """A fast tokenizer tells what it cut off (`overflowing`); a slow one has no encodings to ask, and its
    texts are measured whole: the same count, and no failure for a model that ships only a slow tokenizer."""
    from transformers import BertTokenizer, BertTokenizerFast

    from pipeline.predict import count_cut

    texts = ["reset my password", "my parcel never arrived " * 5, "refund", "where is my order " * 3]
    pairs = ["billing", "shipping", "refund please now", "x"]
    for tokenizer in (BertTokenizerFast.from_pretrained(tiny_model), BertTokenizer.from_pretrained(tiny_model)):
        for p in (None, pairs):
            enc = tokenizer(texts, p, truncation=True, max_length=8)
            whole = tokenizer(texts, p)["input_ids"]
            assert count_cut(tokenizer, enc, texts, p, 8) == sum(len(ids) > 8 for ids in whole) > 0


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_decoder_base_without_a_padding_token_pads_with_its_end_token_and_predicts_alike_in_batches(
        tmp_path, tickets_csv, padding_side):
    """GPT-2, Llama and the like have no padding token: training in batches failed mid-run in the collator.
    Some decoders' tokenizers pad on the left, which moves a text's positions by its batch's longest text."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.predict import Classifier

    base = write_tiny_decoder(tmp_path / "gpt2", padding_side=padding_side)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    assert AutoTokenizer.from_pretrained(base).padding_side == padding_side
    result, model_dir = publish_and_train(make_cfg(tmp_path, base, tickets_csv))
    assert result.status == "ok" and result.metrics["eval_accuracy"] > 0
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["pad_token_id"] == saved["eos_token_id"] == 0  # the classifier finds the last real token by it
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["padding_side"] == "right"
    clf = Classifier(model_dir)
    assert clf.tokenizer.pad_token == "<|endoftext|>"
    texts = ["my parcel never arrived", "I was charged twice this month and nobody answers my emails", "reset password"]
    batched = clf.logits(texts)  # padded to the longest
    one_by_one = np.stack([clf.logits([t])[0] for t in texts])  # no padding at all
    assert np.abs(batched - one_by_one).max() < 1e-5

    # A decoder classifier made elsewhere (a hub one) may have no padding token either: predict pads the same way.
    import shutil

    hub_like = tmp_path / "hub-like"
    shutil.copytree(model_dir, hub_like)
    for name in ("config.json", "tokenizer_config.json"):
        settings = json.loads((hub_like / name).read_text())
        settings.pop("pad_token_id", None), settings.pop("pad_token", None)
        settings["padding_side"] = "left"
        (hub_like / name).write_text(json.dumps(settings))
    assert np.abs(Classifier(hub_like).logits(texts) - batched).max() < 1e-5


def _post_processors():
    from tokenizers import processors

    eos = {"eos_token": "<eos>"}
    return {  # (post-processor, the tokenizer's special tokens, the token put between, what "a b" + "c d" encodes to)
        "none (a word-level decoder)": (None, eos, "<eos>", [2, 3, 0, 4, 5]),
        "byte-level (GPT-2, Qwen2)": (processors.ByteLevel(trim_offsets=False), eos, "<eos>", [2, 3, 0, 4, 5]),
        "a template that ends with eos": (
            processors.TemplateProcessing(single="$A <eos>", pair="$A $B:1 <eos>", special_tokens=[("<eos>", 0)]),
            eos, "<eos>", [2, 3, 0, 4, 5, 0]),
        "byte-level then a bos template": (
            processors.Sequence([processors.ByteLevel(), processors.TemplateProcessing(
                single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 6)])]), eos, "<eos>", [6, 2, 3, 0, 4, 5]),
        "a separator token of its own": (None, {"sep_token": "[SEP]", **eos}, "[SEP]", [2, 3, 7, 4, 5]),
        # already separated: left exactly as they are
        "bos between (Llama)": (
            processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 6)]),
            eos, None, [6, 2, 3, 6, 4, 5]),
        "BERT": (processors.BertProcessing(("[SEP]", 7), ("[CLS]", 8)), {"sep_token": "[SEP]"}, None, [8, 2, 3, 7, 4, 5, 7]),
        # nothing to put there: run together, as before
        "no separator and no eos": (None, {}, None, [2, 3, 4, 5]),
    }


@pytest.mark.parametrize("kind", list(_post_processors()))
def test_a_pair_gets_a_token_between_its_texts_where_the_tokenizer_put_none(tmp_path, kind):
    """GPT-2's and Qwen2's tokenizers encode a pair as the two texts run together: the model cannot tell where the
    first ends. The separator (else the end-of-sequence token) goes between them, in the tokenizer's own template,
    so the saved tokenizer encodes pairs the same way when loaded again; single texts are unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pipeline.basemodel import separate_pairs

    post, special, separator, expected = _post_processors()[kind]
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "a", "b", "c", "d", "<bos>", "[SEP]", "[CLS]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = post
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)
    single = tokenizer("a b")["input_ids"]
    assert separate_pairs(tokenizer) == separator
    assert tokenizer("a b", "c d")["input_ids"] == expected
    assert tokenizer("a b")["input_ids"] == single
    assert separate_pairs(tokenizer) is None  # a second call changes nothing
    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a b", "c d")["input_ids"] == expected and again("a b")["input_ids"] == single


def test_a_decoder_trained_on_pairs_reads_them_with_its_end_token_between(tmp_path, tickets_csv, caplog):
    """A decoder base (GPT-2's tokenizer runs a pair together) trained on sentence pairs: what it trained on, its
    saved tokenizer, predict and transformers' pipeline all put the end-of-sequence token between the texts."""
    import logging

    import datasets
    import numpy as np
    from transformers import AutoTokenizer
    from transformers import pipeline as hf_pipeline

    from pipeline.predict import Classifier

    base = write_tiny_decoder(tmp_path / "gpt2")
    plain = AutoTokenizer.from_pretrained(base)
    ids = {t: plain(t)["input_ids"] for t in ("where is my parcel", "shipping")}
    assert plain("where is my parcel", "shipping")["input_ids"] == ids["where is my parcel"] + ids["shipping"]
    pairs = write_ticket_pairs(tickets_csv, tmp_path / "pairs.csv")
    cfg = make_cfg(tmp_path, base, pairs, "dataset.text_pair_column=topic", "dataset.label_column=verdict")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result, model_dir = publish_and_train(cfg)
    assert result.status == "ok"
    assert "each pair is encoded as text '<|endoftext|>' text_pair" in caplog.text
    training = json.loads((model_dir / "training_config.json").read_text())
    assert training["inputs"] == ["text", "text_pair"] and training["pair_separator"] == "<|endoftext|>"

    # what it trained on: every row is text, the end token, text_pair (no text holds that token itself)
    cache = Path(cfg.tracking.dir) / "cache" / "tokenized"
    (entry,) = [p for p in cache.iterdir() if (p / "dataset_dict.json").is_file()]
    train = datasets.load_from_disk(str(entry))["train"]
    assert all(row["input_ids"].count(0) == 1 for row in train)
    reg = registry_of(cfg)
    data = reg.fetch(reg.resolve("tickets:latest")).path
    import pyarrow.parquet as pq

    first = pq.read_table(data / "train.parquet").slice(0, 1).to_pylist()[0]
    assert train[0]["input_ids"] == plain(first["text"])["input_ids"] + [0] + plain(first["text_pair"])["input_ids"]

    # the saved tokenizer, loaded by transformers alone, encodes pairs the same way; single texts as before
    saved = AutoTokenizer.from_pretrained(model_dir)
    assert saved("where is my parcel", "shipping")["input_ids"] == ids["where is my parcel"] + [0] + ids["shipping"]
    assert saved("where is my parcel")["input_ids"] == ids["where is my parcel"]
    clf = Classifier(model_dir)
    texts, topics_given = ["where is my parcel", "I was charged twice this month", "reset password"], \
        ["shipping", "billing", "shipping"]
    batched = clf.logits(texts, topics_given)
    one_by_one = np.stack([clf.logits([t], [p])[0] for t, p in zip(texts, topics_given)])
    assert np.abs(batched - one_by_one).max() < 1e-5
    scored = hf_pipeline("text-classification", model=str(model_dir), top_k=None)(
        {"text": texts[0], "text_pair": topics_given[0]})
    probs = np.exp(batched[0]) / np.exp(batched[0]).sum()
    assert {s["label"]: s["score"] for s in scored} == pytest.approx(dict(zip(clf.label_names, probs.tolist())), abs=1e-5)

    # a tokenizer that comes back without the template (a tokenizer class that rebuilds its own on loading):
    # the model records the separator, and predict puts it back
    import shutil

    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(model_dir, rebuilt)
    state = json.loads((rebuilt / "tokenizer.json").read_text())
    state["post_processor"] = json.loads(plain.backend_tokenizer.post_processor.__getstate__())
    (rebuilt / "tokenizer.json").write_text(json.dumps(state))
    assert AutoTokenizer.from_pretrained(rebuilt)(texts[0], topics_given[0])["input_ids"] == \
        ids["where is my parcel"] + ids["shipping"]
    assert np.abs(Classifier(rebuilt).logits(texts, topics_given) - batched).max() < 1e-5


@pytest.mark.parametrize("extra, message", [
    ((), r"its tokenizer has no padding token and no end-of-sequence token to pad with"),
    # GPT-2's config names its positions n_positions; this tokenizer allows 1024
    (("model.max_length=200",), r"model.max_length=200 is above what the base model .* accepts \(128 tokens\)"),
])
def test_a_decoder_base_that_cannot_work_fails_before_a_run_opens(tmp_path, tickets_csv, extra, message):
    base = write_tiny_decoder(tmp_path / "gpt2", eos=bool(extra), tokenizer_limit=1024)  # the first case has no end token
    refused_before_a_run(make_cfg(tmp_path, base, tickets_csv, *extra), message)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "clip_text_model"}, r"its model type 'clip_text_model' has no sequence-classification head"),
    ({"model_type": "nosuchmodel"}, r"transformers cannot read its config.json \(.*model type `nosuchmodel`"),
    # transformers asks "Do you wish to run the custom code? [y/N]" on a terminal unless told not to
    ({"model_type": "custom_xyz", "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"}},
     r"its architecture is Python code shipped in the model's folder \(transformers' trust_remote_code\); it runs only "
     r"when trusted: model.trust_remote_code: true in the config"),
])
def test_a_base_model_with_no_classification_head_fails_before_a_run_opens(tmp_path, tiny_model, tickets_csv,
                                                                           config, message, capfd):
    import shutil

    from pipeline.errors import PipelineError
    from pipeline.predict import Classifier

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    refused_before_a_run(make_cfg(tmp_path, base, tickets_csv), message)
    with pytest.raises(PipelineError):  # nor does predict load it, or run its code
        Classifier(base)
    assert "Do you wish to run the custom code" not in capfd.readouterr().out


def test_on_a_plateau_of_the_best_metric_the_checkpoint_with_the_lower_loss_is_kept(tmp_path, tiny_model):
    """The Trainer keeps a checkpoint only when its metric is strictly better, so when macro-F1 stays the same
    epoch after epoch (the demo: 0.9751 at all three) it kept the first, least trained one. Of equal metrics, the
    lower validation loss now wins, for early stopping too."""
    evals = []

    class Evals(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evals.append((state.global_step, metrics["eval_macro_f1"], metrics["eval_loss"]))

    src = write_separable_tickets(tmp_path / "easy.csv")
    cfg = make_cfg(tmp_path, tiny_model, src, "train.epochs=4", "train.early_stopping_patience=1")
    dataset_publish.run(cfg)
    result = finetune.run(cfg, callbacks=(Evals(),))
    # early stopping (patience 1) took each tie with a lower loss for an improvement too: all four epochs ran
    assert result.status == "ok" and len(evals) == 4, evals
    top = max(f1 for _, f1, _ in evals)
    ties = [(step, loss) for step, f1, loss in evals if f1 == top]
    assert len(ties) >= 2 and min(ties, key=lambda t: t[1]) != ties[0]  # the case this is about: a later tie is better
    reg = registry_of(cfg)
    kept = json.loads((reg.fetch(reg.resolve(result.produced[0])).path / "metrics.json").read_text())["best"]
    assert (kept["step"], kept["loss"]) == pytest.approx(min(ties, key=lambda t: t[1]))
    assert kept["macro_f1"] == top


def test_a_half_precision_checkpoint_is_trained_and_published_in_float32(tmp_path, tiny_model, tickets_csv):
    """transformers keeps a checkpoint's own dtype (modern ones are often bf16): training bf16 weights loses
    the optimizer's small steps, and fp16 mixed precision refuses fp16 gradients."""
    import shutil

    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    base = tmp_path / "bf16"
    shutil.copytree(tiny_model, base)
    AutoModel.from_pretrained(tiny_model).to(torch.bfloat16).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    _, model_dir = publish_and_train(make_cfg(tmp_path, base, tickets_csv, "train.epochs=1"))
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}


@pytest.mark.parametrize("labels", [
    ["c", "a", "b"],  # the base's labels in another order
    ["b", "d", "a", "c"],  # and a new one
    ["x", "y"],  # none of them
])
def test_a_classifier_base_keeps_its_head_rows_by_label_name(tmp_path, tiny_model, labels):
    """Retraining a model this pipeline made on a dataset version whose labels are in another order
    (numeric order, dataset.labels) started each label from another label's weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.basemodel import load_classifier

    base_labels = ["a", "b", "c"]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=dict(enumerate(base_labels)), label2id={n: i for i, n in enumerate(base_labels)})
    torch.nn.init.normal_(base.classifier.weight, std=1.0)
    torch.nn.init.normal_(base.classifier.bias, std=1.0)
    base.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "base")

    model = load_classifier(tmp_path / "base", labels).eval()
    assert model.config.id2label == dict(enumerate(labels))
    enc = AutoTokenizer.from_pretrained(tiny_model)(["my parcel never arrived", "reset my password"], padding=True,
                                                   return_tensors="pt")
    with torch.no_grad():
        before, after = base.eval()(**enc).logits, model(**enc).logits
    for j, name in enumerate(labels):
        if name in base_labels:  # the same label scores the same
            torch.testing.assert_close(after[:, j], before[:, base_labels.index(name)])
        else:  # a new label starts afresh: a small initial row, not another label's
            assert model.classifier.weight[j].abs().max() < 0.2 and model.classifier.bias[j] == 0
    backbone = {k: v for k, v in base.state_dict().items() if k.startswith("bert.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())


def test_a_classifier_base_with_the_same_labels_keeps_its_head(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.basemodel import load_classifier

    names = ["a", "b", "c"]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    base.save_pretrained(tmp_path / "base")
    model = load_classifier(tmp_path / "base", names)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())


def test_a_multi_label_classifier_base_is_trained_as_a_single_label_one(tmp_path, tiny_model, tickets_csv):
    """The base's problem_type came along with its config: BCE on class ids failed mid-training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path / "multi-label"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, problem_type="multi_label_classification", id2label={0: "x", 1: "y", 2: "z"},
        label2id={"x": 0, "y": 1, "z": 2}).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    _, model_dir = publish_and_train(make_cfg(tmp_path, base, tickets_csv, "train.epochs=1"))
    assert json.loads((model_dir / "config.json").read_text())["problem_type"] == "single_label_classification"


@pytest.mark.parametrize("settings, kind", [
    ({"num_labels": 3, "problem_type": "multi_label_classification"}, "multi-label"),
    ({"num_labels": 1}, "regression"),
])
def test_predict_refuses_a_model_that_does_not_give_one_label_per_text(tmp_path, tiny_model, settings, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.errors import PipelineError
    from pipeline.predict import Classifier

    AutoModelForSequenceClassification.from_pretrained(tiny_model, **settings).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "m")
    with pytest.raises(PipelineError, match=f"is a {kind} model; predict gives one label per text"):
        Classifier(tmp_path / "m")


def test_a_run_from_a_registry_base_resumes_from_the_same_version_after_its_alias_moved(tmp_path, tiny_model,
                                                                                          tickets_csv):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1")
    dataset_publish.run(cfg)
    reg = registry_of(cfg)
    finetune.run(cfg, aliases=("production",))  # clf:v0
    further = make_cfg(tmp_path, tiny_model, tickets_csv, "model.base=clf:production", "model.name=further", "train.epochs=1",
                       "train.eval_strategy=steps", "train.eval_steps=5")
    with pytest.raises(KeyboardInterrupt):
        finetune.run(further, callbacks=(StopAt(7),))
    finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "train.seed=9"), aliases=("production",))  # clf:v1
    assert reg.resolve("clf:production").ref == "clf:v1"
    resumed = finetune.run(further, resume="latest")
    assert resumed.details["resumed_from"].endswith("checkpoint-7")
    assert reg.resolve(resumed.produced[0]).metadata["base_model"]["id"] == "clf:v0"
    assert sorted(reg.get_run(resumed.run_id)["consumed"]) == ["clf:v0", "tickets:v0"]


def test_a_version_trained_from_the_same_inputs_is_reused_not_trained_again(tmp_path, tiny_model, tickets_csv, monkeypatch,
                                                                            caplog):
    """finetune's command-line default (reuse): the same dataset version, base model, model and train config,
    code and libraries give the version trained before, status unchanged, without training; any of them
    changed trains. A source tree with uncommitted changes cannot be named, so it always trains."""
    from pipeline import provenance
    from pipeline.runner import run_all

    code = {"git_commit": "a" * 40, "git_dirty": False}
    monkeypatch.setattr(provenance, "code_version", lambda: dict(code))
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1")
    dataset_publish.run(cfg)
    first = finetune.run(cfg, reuse=True)
    other = finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1", "train.seed=7"), reuse=True)
    assert (first.produced, other.produced, other.status) == (["clf:v0"], ["clf:v1"], "ok")
    reg = registry_of(cfg)
    assert reg.resolve("clf:candidate").ref == "clf:v1"

    again = finetune.run(cfg, reuse=True)
    assert (again.status, again.produced, again.details["reused"]) == ("unchanged", ["clf:v0"], True)
    assert again.details["trained_by"] == first.run_id and again.run_id != first.run_id
    assert again.metrics["eval_accuracy"] == first.metrics["eval_accuracy"]
    assert reg.resolve("clf:candidate").ref == "clf:v0"  # as publishing the same content again would
    assert reg.resolve("clf:latest").ref == "clf:v0" and reg.resolve("clf:v1").aliases == []  # and `latest` too
    assert reg.get_run(again.run_id)["consumed"] == ["tickets:v0"] and reg.get_run(again.run_id)["produced"] == ["clf:v0"]
    assert not (tmp_path / "track" / "checkpoints" / "clf" / again.run_id).exists()  # nothing was trained
    assert inspect_summary(Path(again.paths["run_dir"]))["summary"]["status"] == "unchanged"
    from pipeline.lineage import build, render

    shown = render(build(reg, "tickets:v0"), "text")
    assert f"{again.run_id}  finetune  finished" in shown and "reused clf:v0 (trained before from the same inputs)" in shown
    assert [v.ref for v in reg.list_versions(type="model")] == ["clf:v0", "clf:v1"]

    # the same base model spelled another way (a copy of its folder) is the same input
    copy = tmp_path / "copy-of-base"
    shutil.copytree(tiny_model, copy)
    assert finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1", f"model.base={copy}"),
                        reuse=True).details.get("reused")
    # a config key the model depends on, the code, or a library version: trained again
    changed = finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1", "model.max_length=32"), reuse=True)
    assert "reused" not in changed.details and changed.produced == ["clf:v2"]
    code["git_commit"] = "b" * 40
    retrained = finetune.run(cfg, reuse=True)
    # the same bytes as clf:v0 (training is deterministic here): no new version, but v0 now names these inputs too
    assert "reused" not in retrained.details and (retrained.status, retrained.produced) == ("unchanged", ["clf:v0"])
    assert retrained.message == ("trained, and the files are clf:v0's byte for byte: no new version; clf:latest is clf:v0 "
                                 "again (it was clf:v2)")  # as on W&B: what model.base: clf:latest reads
    assert len(reg.resolve("clf:v0").metadata["input_signatures"]) == 2
    assert finetune.run(cfg, reuse=True).details.get("reused")
    # a version whose stored weights went missing is not reused: trained again, the same bytes restore them
    weights = next(f for f in reg.resolve("clf:v0").files if f.path == "model.safetensors")
    reg.object_path(weights.digest).unlink()
    restored = finetune.run(cfg, reuse=True)
    assert "reused" not in restored.details and (restored.status, restored.produced) == ("unchanged", ["clf:v0"])
    assert reg.verify().ok
    real_versions = provenance.package_versions
    monkeypatch.setattr(provenance, "package_versions", lambda: {**real_versions(), "torch": "99.0"})
    assert "reused" not in finetune.run(cfg, reuse=True).details
    monkeypatch.setattr(provenance, "package_versions", real_versions)
    code["git_commit"] = "a" * 40
    assert finetune.run(cfg, reuse=True).details.get("reused")
    code["git_dirty"] = True
    assert "reused" not in finetune.run(cfg, reuse=True).details
    # an installed package: the digest of its files names its code, and another build of it trains again
    code.update(git_commit=None, git_dirty=None, package_digest="c" * 64)
    assert "reused" not in finetune.run(cfg, reuse=True).details
    assert finetune.run(cfg, reuse=True).details.get("reused")
    code["package_digest"] = "d" * 64
    assert "reused" not in finetune.run(cfg, reuse=True).details
    code.update(git_commit="a" * 40, git_dirty=False)
    del code["package_digest"]
    # without reuse (the library's default, reproduce's and a sweep's), and `run --retrain`: trained
    assert "reused" not in finetune.run(cfg).details
    deploying = make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1", f"deploy.dir={tmp_path / 'deploy'}")
    assert run_all(deploying, reuse=True).stages[1].details.get("reused")
    assert "reused" not in run_all(deploying).stages[1].details
    # a registry that refuses to move `latest` (online, W&B manages it): the reused version is the result all the same
    from pipeline.registry.local import LocalRegistry

    reg.mark_latest("clf:v0")
    def refuse(self, ref):
        raise RegistryError("managed")

    monkeypatch.setattr(LocalRegistry, "mark_latest", refuse)
    seven = finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, "train.epochs=1", "train.seed=7"), reuse=True)
    assert (seven.status, seven.produced, seven.details.get("reused")) == ("unchanged", ["clf:v1"], True)
    assert "clf:latest did not move to clf:v1: managed" in caplog.text and reg.resolve("clf:latest").ref == "clf:v0"


class RecordTraining(TrainerCallback):
    """What the Trainer trained with: gradient checkpointing on the model, the learning rate at each step."""

    def __init__(self):
        self.checkpointing = None
        self.rates = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing = model.is_activation_checkpointing

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.rates.append(lr_scheduler.get_last_lr()[0])


def test_scheduler_clipping_smoothing_and_checkpointing_are_trained_with_and_recorded(tmp_path, tiny_model, tickets_csv):
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "train.lr_scheduler=constant", "train.warmup_ratio=0.2",
                   "train.max_grad_norm=null", "train.label_smoothing=0.2", "train.activation_checkpointing=true")
    dataset_publish.run(cfg)
    seen = RecordTraining()
    result = finetune.run(cfg, callbacks=(seen,))
    assert seen.checkpointing is True
    steps = len(seen.rates)
    warm = math.ceil(0.2 * steps)
    # constant after the warmup (transformers' own "constant" would skip the warmup without a word)
    assert seen.rates[warm:] == pytest.approx([3e-3] * (steps - warm)) and seen.rates[0] < 3e-3
    args = finetune._training_args(cfg, tmp_path / "out", "r", report=False)
    assert args.max_grad_norm == 0  # not clipped
    reg = registry_of(cfg)
    folder = reg.fetch(reg.resolve(result.produced[0])).path
    recorded = json.loads((folder / "training_config.json").read_text())["train"]
    assert {k: recorded[k] for k in finetune.LATER_SETTINGS} == {
        "lr_scheduler": "constant", "max_grad_norm": None, "label_smoothing": 0.2, "activation_checkpointing": True}
    card = (folder / "README.md").read_text()
    assert "- lr_scheduler: constant\n" in card and "- label_smoothing: 0.2\n" in card

    # cosine falls along a half cosine; the default (linear) is the straight line to 0
    cosine, linear = (RecordTraining(), RecordTraining())
    for how, rec in (("cosine", cosine), ("linear", linear)):
        finetune.run(make_cfg(tmp_path, tiny_model, tickets_csv, f"train.lr_scheduler={how}", "train.warmup_ratio=0",
                              "train.epochs=1"), callbacks=(rec,))
    n = len(linear.rates)
    assert linear.rates == pytest.approx([3e-3 * (n - i - 1) / n for i in range(n)])
    assert cosine.rates == pytest.approx([3e-3 * 0.5 * (1 + math.cos(math.pi * (i + 1) / n)) for i in range(n)])


def test_settings_at_their_defaults_leave_the_model_files_as_they_were(trained):
    """A model trained without the later settings has the training_config.json it always had, so a reproduction
    of a version made before them compares equal file by file."""
    cfg, _, result = trained
    reg = registry_of(cfg)
    recorded = json.loads((reg.fetch(reg.resolve(result.produced[0])).path / "training_config.json").read_text())
    assert not set(finetune.LATER_SETTINGS) & set(recorded["train"])


def test_label_smoothing_is_torch_s_with_and_without_class_weights():
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    logp = torch.log_softmax(logits, dim=-1)
    eps = 0.3
    by_hand = (1 - eps) * -logp[torch.arange(3), labels] + eps * -logp.mean(dim=-1)
    assert finetune.weighted_loss(None, eps)({"logits": logits}, labels).item() == pytest.approx(by_hand.mean().item())
    # with weights, each row's smoothed loss weighs as its label (torch's weighted mean)
    w = torch.tensor([1.0, 2.0, 0.5])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=w, label_smoothing=eps, reduction="sum") / 3
    assert finetune.weighted_loss(w.tolist(), eps)({"logits": logits}, labels).item() == pytest.approx(expected.item())
    assert finetune.weighted_loss(None)({"logits": logits}, labels).item() == pytest.approx(-logp[torch.arange(3), labels].mean().item())


def test_activation_checkpointing_is_refused_before_a_run_for_an_architecture_without_it(tmp_path, tiny_model, tickets_csv):
    from transformers import MPNetConfig, MPNetModel

    mpnet = tmp_path / "mpnet"
    vocab = json.loads((tiny_model / "tokenizer.json").read_text())["model"]["vocab"]
    MPNetModel(MPNetConfig(vocab_size=len(vocab) + 2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37, max_position_embeddings=130)).save_pretrained(mpnet)
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, mpnet / f.name)
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, f"model.base={mpnet}", "train.activation_checkpointing=true")
    dataset_publish.run(cfg)
    runs = set((Path(cfg.tracking.dir) / "wandb").glob("offline-run-*"))
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: transformers' MPNetForSequenceClassification "
                                          r"\(model.base=.*, model type 'mpnet'\) does not support it; leave it off"):
        finetune.run(cfg)
    assert set((Path(cfg.tracking.dir) / "wandb").glob("offline-run-*")) == runs  # no run opened
    assert registry_of(cfg).list_versions(type="model") == []


def test_a_dataset_version_without_validation_rows_is_refused_before_a_run(tmp_path, tiny_model, tickets_csv):
    """A version published with `dataset.split.validation: 0` (for evaluation elsewhere, say) cannot pick the
    checkpoint to keep: refused naming the setting, before a run opens."""
    cfg = make_cfg(tmp_path, tiny_model, tickets_csv, "dataset.split.validation=0", "dataset.split.train=0.9")
    assert dataset_publish.run(cfg).produced == ["tickets:v0"]
    runs = set((Path(cfg.tracking.dir) / "wandb").glob("offline-run-*"))
    with pytest.raises(ConfigError, match=r"^tickets:v0 has no validation rows; finetune evaluates on the validation "
                                          r"split \(set dataset.split.validation above 0 and publish again\)$"):
        finetune.run(cfg)
    assert set((Path(cfg.tracking.dir) / "wandb").glob("offline-run-*")) == runs
    assert registry_of(cfg).list_versions(type="model") == []
