"""The GPU path, on a tiny BERT built from a config: mixed precision as ``train.precision`` resolves it,
float32 weights published, the version recording what trained it, a model trained on the GPU predicting
alike there and on the CPU, more training processes than GPUs refused at once, and a sweep's trials
freed from the GPU one by one. Skipped where torch sees no CUDA GPU (CI's machines); run it on one with
``pytest tests/test_gpu.py`` (or ``bash scripts/gpu_check.sh tests``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.predict import Classifier
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish, finetune
from tests.conftest import inspect_summary, reg_runs, torchrun, write_yaml
from tests.tiny import write_separable_tickets, write_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "bert")


def _config(tmp: Path, tiny_model: Path, precision: str = "auto"):
    src = write_separable_tickets(tmp / "easy.csv")
    return load_config(None, [
        "dataset.name=easy", f"dataset.source={src}", "dataset.id_column=ticket_id", "model.name=clf",
        f"model.base={tiny_model}", "model.max_length=32", f"tracking.dir={tmp / 'track'}", "train.epochs=4",
        "train.batch_size=16", "train.learning_rate=3e-3", "train.logging_steps=2", f"train.precision={precision}",
    ])


def _train(tmp: Path, tiny_model: Path, precision: str):
    cfg = _config(tmp, tiny_model, precision)
    dataset_publish.run(cfg)
    result = finetune.run(cfg)
    reg = LocalRegistry(tmp / "track" / "registry")
    version = reg.resolve(result.produced[0])
    return result, version, reg.fetch(version).path


def _resolved(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_each_precision_trains_on_the_gpu_and_publishes_float32_weights(tmp_path, tiny_model, precision):
    from safetensors import safe_open

    result, version, model_dir = _train(tmp_path, tiny_model, precision)
    training = version.metadata["training"]
    assert training["precision"] == _resolved(precision)
    assert training["device"] == f"cuda:{torch.cuda.get_device_name()}"
    # two labels whose texts share no word: learnt whatever the arithmetic (fp16's loss scaling included)
    assert result.metrics["eval_accuracy"] == 1.0
    summary = inspect_summary(Path(result.paths["run_dir"]))
    loss = summary["summary"]["train/loss"]  # the last logged training loss
    assert math.isfinite(loss) and loss < math.log(2)  # below a coin toss's
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"


def test_a_model_trained_on_the_gpu_predicts_alike_on_the_gpu_and_the_cpu(tmp_path, tiny_model):
    _, _, model_dir = _train(tmp_path, tiny_model, "auto")
    texts = [f"refund charged invoice {i}" for i in range(40)] + [f"parcel delivery arrived late {i}" for i in range(40)]
    gpu, cpu = Classifier(model_dir, device="cuda"), Classifier(model_dir, device="cpu")
    assert gpu.device == "cuda" and next(gpu.model.parameters()).is_cuda
    on_gpu, on_cpu = gpu.logits(texts), cpu.logits(texts)
    assert on_gpu.shape == on_cpu.shape == (80, 2)
    assert abs(on_gpu - on_cpu).max() < 1e-3  # float32 on both; only the kernels' summation order differs
    assert [p.label for p in gpu.predict(texts)] == ["billing"] * 40 + ["shipping"] * 40


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="two GPUs or more: two processes get one each")
def test_more_training_processes_than_gpus_fail_at_once_with_one_message(tmp_path, tiny_model):
    """NCCL refuses two processes on one GPU only at their first collective, in a traceback per process."""
    cfg = _config(tmp_path, tiny_model)
    dataset_publish.run(cfg)
    done = torchrun("finetune", "--config", str(write_yaml(tmp_path, cfg)), cwd=tmp_path, cpu=False)
    assert done.returncode != 0
    assert ("2 training processes on this machine but 1 CUDA GPU: each process trains on a GPU of its own. Launch at "
            "most 1 per machine (torchrun --nproc_per_node 1)") in done.stderr
    assert "Duplicate GPU" not in done.stderr and "ncclInvalidUsage" not in done.stderr
    reg = LocalRegistry(tmp_path / "track" / "registry")
    assert [r["job_type"] for r in reg_runs(reg)] == ["dataset-publish"] and reg.list_versions(type="model") == []


def test_a_sweep_frees_each_trial_from_the_gpu_before_the_next(tmp_path, tiny_model):
    """A sweep's trials train one after another in one process: a trial whose model, optimizer state or gradients
    stayed on the GPU would add up over a long sweep of a big model until one ran out of memory."""
    from transformers import TrainerCallback

    from pipeline import sweep as sweeps

    allocated, sizes = [], []

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            allocated.append(torch.cuda.memory_allocated())
            sizes.append(sum(p.numel() * p.element_size() for p in model.parameters()))

    cfg = _config(tmp_path, tiny_model)
    dataset_publish.run(cfg)
    spec = sweeps.parse_sweep({"method": "grid", "metric": {"name": "val/accuracy", "goal": "maximize"},
                               "parameters": {"learning_rate": {"values": [1e-3, 3e-3, 1e-2]}}})
    out = sweeps.run(cfg, sweep=spec, count=3, callbacks=(Measure(),))
    assert [t.state for t in out.trials] == ["complete"] * 3 and out.best_model == "clf:v0"
    # The first trial also pays for what CUDA allocates once (cuBLAS's workspace); from the second on, each starts
    # where the one before did: anything left of a trial would be at least its weights
    assert len(allocated) == 3 and abs(allocated[2] - allocated[1]) < sizes[0], (allocated, sizes)
