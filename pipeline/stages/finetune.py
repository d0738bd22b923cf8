"""finetune: an exact dataset version + a base model -> a classifier published as MODEL:vM.

Everything that can be wrong with the inputs (dataset reference, base model, max length,
splits) is checked before a run opens or training starts. Training is a plain Hugging Face
`Trainer` reporting to the stage's W&B run; a callback logs misclassification tables from
the evaluation's own predictions. The published version holds weights, tokenizer, label map,
training config, metrics and a model card, all of them pure functions of what made the model,
and its metadata records the dataset reference and digest, base model digest, seed, code and
package versions. Interrupted runs keep their checkpoints and continue with ``resume``.

With several processes (``accelerate launch`` or ``torchrun``) the main process does every
registry and W&B operation and shares what the others need; they only train.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.basemodel import (BaseModel, check_architecture, check_base_weights, check_max_length, load_classifier,
                                load_tokenizer, match_padding, resolve_base_model, separate_pairs)
from pipeline import provenance, runlock
from pipeline.cpus import memory_kills, torch_threads_within_quota
from pipeline.config import Config, describe_diff, model_config_diff
from pipeline.errors import (TERMINATED, ConfigError, DiskFull, OutOfMemory, PipelineError, RefError, StageFailed,
                             near_label, no_space_left, out_of_memory)
from pipeline.launch import launched_processes
from pipeline.registry.base import put_latest
from pipeline.results import StageResult
from pipeline.tracking import new_run_id, open_registry, tracked_run

STAGE = "finetune"
TOKENIZE_FORMAT = 4  # bump when the tokenised layout changes, to retire old cache entries (3: truncation counts,
# 4: a token between the texts of a pair where the tokenizer put none)
CACHE_SOURCE = "made_from.json"  # in each tokenised cache entry: the dataset digest, tokenizer and length
TRAINED_ON = ("train", "validation")  # the test split is evaluate's; it may be empty
RESUME_FILE = "resume.json"
TRIAL_FILE = "sweep-trial.json"  # a sweep trial's run: the same state, but nothing resumes it (a sweep runs it anew)
log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run will use, fixed and checked before anything starts."""

    dataset_ref: str  # exact name:vN
    dataset_digest: str
    base: BaseModel
    run_id: str
    output_dir: Path  # this run's checkpoints
    group: str | None
    resume_from: Path | None = None
    registry: Any = field(default=None, repr=False, compare=False)  # the one the inputs were resolved in: the run's too

    @property
    def base_version(self) -> str | None:
        """The exact ``name:vN`` of the base when it is a model version in the registry (an input of the run)."""
        return self.base.id if self.base.source == "registry" else None

    @property
    def consumed(self) -> list[str]:
        return [self.dataset_ref, *([self.base_version] if self.base_version else [])]

    def use_inputs(self, trun):
        """Record the run's inputs (lineage): the dataset version, which comes back, and a registry base."""
        version = trun.registry.use(self.dataset_ref, trun, type="dataset")
        if self.base_version:  # a model version this trains further
            trun.registry.use(self.base_version, trun, type="model")
        return version


# -- checks and planning ---------------------------------------------------------------------
def _checkpoint_root(config: Config) -> Path:
    return Path(config.tracking.dir).resolve() / "checkpoints" / config.model.name


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), passing over one whose files are cut
    short (`checkpoint_damage`), with a warning: a save that a crash or a full disk cut short left a checkpoint that
    the Trainer failed to resume from, with a traceback, at every retry."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()]
    damaged = []
    whole = None
    for checkpoint in sorted(done, key=lambda p: int(p.name[11:]), reverse=True):
        if (damage := checkpoint_damage(checkpoint)) is None:
            whole = checkpoint
            break
        damaged.append((checkpoint, damage))
    for checkpoint, damage in damaged:
        if checkpoint not in _WARNED_DAMAGED:
            _WARNED_DAMAGED.add(checkpoint)
            log.warning("%s is not whole (%s: its save was cut short, by a crash or a full disk, say); passed over%s",
                        checkpoint, damage, f" for {whole.name}" if whole else ": no whole checkpoint is left before it")
    return whole


_WARNED_DAMAGED: set[Path] = set()


# The JSON files of a checkpoint that resuming reads (the tokenizer's are not: it comes from the base model), so the
# check parses no tokenizer.json of megabytes for each run `artifacts list` shows
RESUMED_JSON = ("trainer_state.json", "config.json")


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is cut short in a checkpoint folder, or None: a JSON file resuming reads that does not parse
    (`RESUMED_JSON`), a safetensors file shorter than its header says, a torch file (optimizer, scheduler, RNG states:
    zip archives) without its end. Read in part: the headers and the ends, not the weights."""
    import zipfile

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.name in RESUMED_JSON:
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size)) if size else None
                ends = [t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"]
                if header is None or path.stat().st_size != 8 + size + max(ends, default=0):
                    return f"{path.name} is shorter than its header says"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with open(path, "rb") as f:
                    zipped = f.read(2) == b"PK"  # torch.save's format (an older pickle is not checked)
                if zipped and not zipfile.is_zipfile(path):
                    return f"{path.name} has no end"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            return f"{path.name}: {e}"
    return None


def _stopped_runs(config: Config) -> list[Path]:
    """The resume state files of this model's runs whose checkpoints are kept, newest first (one whose run finishes
    meanwhile, removing its folder, is left out)."""
    dated = []
    for state_file in _checkpoint_root(config).glob(f"*/{RESUME_FILE}"):
        try:
            dated.append((state_file.stat().st_mtime, state_file))
        except FileNotFoundError:
            continue
    return [f for _, f in sorted(dated, reverse=True)]


def _find_resumable(config: Config, run_id: str | None) -> tuple[dict[str, Any], Path]:
    root = _checkpoint_root(config)
    if run_id:
        state_file = root / run_id / RESUME_FILE
        if not state_file.is_file():
            known = sorted(p.parent.name for p in _stopped_runs(config))
            raise RefError(f"no interrupted finetune run {run_id!r} of {config.model.name} under {root}; "
                           f"resumable runs: {', '.join(known) or 'none'}")
        if (busy := runlock.holder(state_file.parent)) is not None:
            raise runlock.RunBusy(f"finetune run {run_id}", busy)
        candidates = [state_file]
    else:  # latest: the newest run that is not training now
        candidates = [f for f in _stopped_runs(config) if runlock.holder(f.parent) is None]
    for state_file in candidates:
        ckpt = _last_checkpoint(state_file.parent)
        if ckpt is not None:
            return json.loads(state_file.read_text(encoding="utf-8")), ckpt
        if run_id:
            said = ("has no whole checkpoint (each one's save was cut short)" if any(state_file.parent.glob("checkpoint-*"))
                    else "stopped before its first checkpoint")
            raise PipelineError(f"run {run_id} {said}; start it again without --resume")
    raise PipelineError(f"nothing to resume: no interrupted finetune run of {config.model.name} with a checkpoint "
                        f"under {root}")


def remove_trial_leftovers(config: Config, sweep: str | None = None) -> list[tuple[str, str | None]]:
    """Remove the checkpoint folders that killed processes left of sweep trials of this model (a trial that stops
    otherwise removes its own; none is ever resumed: a sweep that goes on runs a new trial): `sweep`'s, or with
    None every sweep's. A trial training now keeps its folder. The (run id, sweep id) of each folder removed."""
    removed = []
    for state_file in _checkpoint_root(config).glob(f"*/{TRIAL_FILE}"):
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if sweep not in (None, state.get("sweep")) or runlock.holder(state_file.parent) is not None:  # training now
            continue
        shutil.rmtree(state_file.parent, ignore_errors=True)
        removed.append((state_file.parent.name, state.get("sweep")))
    return removed


def interrupted_runs(tracking_dir: Path | str) -> list[dict[str, Any]]:
    """The finetune runs whose checkpoints are on disk, for ``--resume`` (a finished run removes its own; one
    training now has them too), newest first: model, run id, folder, bytes on disk, last complete checkpoint
    (None: stopped before the first), when it was last written, whether it is a sweep trial's (not resumable:
    a stopped trial removes its own, but not when its process was killed outright), and who trains it now
    (`runlock.holder`; None: nobody, it was interrupted)."""
    out = []
    for folder in Path(tracking_dir).resolve().glob("checkpoints/*/*"):
        trial = (folder / TRIAL_FILE).is_file()
        if not trial and not (folder / RESUME_FILE).is_file():
            continue
        if (usage := disk_usage(folder)) is None:
            continue
        last = _last_checkpoint(folder)
        out.append({"model": folder.parent.name, "run_id": folder.name, "path": str(folder), "sweep_trial": trial,
                    "checkpoint": last.name if last else None, "training": runlock.holder(folder), **usage})
    return sorted(out, key=lambda r: r["modified"], reverse=True)


def disk_usage(folder: Path) -> dict[str, Any] | None:
    """``bytes`` the folder's files hold and when one was last written (``modified``, ISO UTC); None when it holds
    none. A file deleted while it is listed (a run training now rotates its checkpoints) is skipped."""
    from datetime import datetime, timezone

    stats = []
    for f in folder.rglob("*"):
        try:
            if f.is_file():
                stats.append(f.stat())
        except FileNotFoundError:
            continue
    if not stats:
        return None
    return {"bytes": sum(st.st_size for st in stats),
            "modified": datetime.fromtimestamp(max(st.st_mtime for st in stats), timezone.utc).isoformat(timespec="seconds")}


def _run_to_continue(config: Config, registry, dataset: str | None) -> str | None:
    """`--resume auto` (an orchestrator's retry of the same command): the newest interrupted run of this model with
    a checkpoint, this model and train config, and the dataset version this call would train on (`dataset`, else
    ``<dataset.name>:latest`` as it is now, with the digest the run recorded). None: train afresh."""
    found = _stopped_runs(config)
    if not found:
        return None
    target = registry.resolve(dataset or f"{config.dataset.name}:latest", type="dataset")  # unknown: as a fresh run says
    passed = []  # why each stopped run is not this call's: said when none is
    for state_file in found:
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        changed = model_config_diff(saved.get("config") or {}, config.to_dict())
        if (busy := runlock.holder(state_file.parent)) is not None:  # not interrupted: another process trains it
            passed.append(f"{saved.get('run_id')}: training now ({runlock.describe(busy)})")
        elif _last_checkpoint(state_file.parent) is None:
            passed.append(f"{saved.get('run_id')}: no checkpoint")
        elif saved.get("dataset") != target.ref or saved.get("dataset_digest") not in (None, target.digest):
            passed.append(f"{saved.get('run_id')}: trained on {saved.get('dataset')}")
        elif changed:
            passed.append(f"{saved.get('run_id')}: config differs in {describe_diff(changed)}")
        else:
            log.info("continuing interrupted run %s (--resume auto)", saved["run_id"])
            return saved["run_id"]
    log.info("no interrupted run of %s is of this config and %s%s: training afresh (--resume auto)",
             config.model.name, target.ref, f" ({'; '.join(passed)})" if passed else "")
    return None


def _not_as_it_began(saved: dict[str, Any], base: BaseModel, config: Config) -> tuple[type, str, str] | None:
    """Why an interrupted run cannot go on here as it began: (error, what differs, what to do), or None. Its
    checkpoints were trained from the base model's files as they were, by as many processes (each takes a batch), in
    one arithmetic; the model it publishes records those of the part that finishes it."""
    if saved.get("base_digest") not in (None, base.digest):
        return (PipelineError, f"the base model {base.id} has other files now (digest {base.digest[:12]}) than the run "
                               f"began from ({saved['base_digest'][:12]})", "put those files back")
    now = trained_on(config.train.precision)
    if saved.get("processes") not in (None, now["processes"]):
        n = saved["processes"]
        return (ConfigError, f"it began with {n} process{'es' if n != 1 else ''}, this is {now['processes']} (each "
                             "process takes a batch)", "resume it as it began")
    if saved.get("precision") not in (None, now["precision"]):
        return ConfigError, f"it began in {saved['precision']}, this is {now['precision']}", "resume it as it began"
    return None


def check_trainable(version) -> None:
    """A dataset version finetune can train on: it has train rows, and validation rows to evaluate on."""
    rows = version.metadata.get("num_rows", {})
    if rows and not rows.get("train"):
        raise ConfigError(f"{version.ref} has no train rows: it was published for evaluation only "
                          "(dataset.split.train = 0); evaluate a model on it with `evaluate --dataset "
                          f"{version.ref}`, or publish the data with dataset.split.train above 0 to train on it")
    if rows and not rows.get("validation"):
        raise ConfigError(f"{version.ref} has no validation rows; finetune evaluates on the validation split "
                          "(set dataset.split.validation above 0 and publish again)")


def plan(config: Config, dataset: str | None = None, resume: str | None = None, base: str | None = None) -> Plan:
    """Resolve and check every input; raises a PipelineError naming the problem, and writes nothing (but a
    verified copy of a base model version from the registry). `base`: the exact ``name:vN`` a registry
    reference in ``model.base`` is pinned to (a reproduction, a sweep's trials), or the absolute folder a
    relative local path stood for when the model being reproduced was trained (`resolve_base_model`).

    `resume` ``"auto"``: the interrupted run that `_run_to_continue` finds, else a fresh run."""
    registry = open_registry(config.tracking, project=config.project, entity=config.entity, consuming=True)
    registry.check_project(config.model.name)  # the name it will publish: another project's, refused before training
    auto = resume == "auto"
    if auto:
        resume = _run_to_continue(config, registry, dataset)
    if resume is not None:
        saved, ckpt = _find_resumable(config, None if resume in ("", "latest") else resume)
        changed = model_config_diff(saved["config"], config.to_dict())
        if changed:
            raise ConfigError(
                f"cannot resume run {saved['run_id']}: the config differs from the interrupted run's in "
                + describe_diff(changed)
            )
        if dataset is not None:  # named as the first call may have named it (`tickets:latest`): by the version
            asked = registry.resolve(dataset, type="dataset").ref
            if asked != saved["dataset"]:
                said = dataset if asked == dataset else f"{dataset} ({asked})"
                raise ConfigError(f"cannot resume run {saved['run_id']} on {said}: it was training on {saved['dataset']}")
        dataset = saved["dataset"]
        # the base version the run started from, wherever its alias is now; or the hub commit it began from
        base = saved.get("base") or saved.get("base_revision") or base
    ref = dataset or f"{config.dataset.name}:latest"
    version = registry.resolve(ref, type="dataset")
    check_trainable(version)
    if isinstance(config.train.class_weights, dict) and version.metadata.get("label_names"):
        class_weights(config.train.class_weights, version.metadata["label_names"], {}, version.ref)  # labels it lacks
    trust = config.model.trust_remote_code
    base = resolve_base_model(config.model.base, registry, pinned=base, trust_remote_code=trust)
    check_max_length(base, config.model.max_length)
    _precision_flags(config.train.precision)  # fp16 without a GPU fails here, not mid-run
    check_architecture(base, trust_remote_code=trust, activation_checkpointing=config.train.activation_checkpointing)
    load_tokenizer(base.path, base.id, announce=True, trust_remote_code=trust)  # a tokenizer that cannot pad fails here
    check_base_weights(base, trust_remote_code=trust)  # a checkpoint the architecture does not find itself in too
    if resume is not None:
        run_id, group = saved["run_id"], saved.get("group")
        if saved.get("dataset_digest") and saved["dataset_digest"] != version.digest:
            raise PipelineError(f"{version.ref} no longer has the digest run {run_id} trained on")
        refused = _not_as_it_began(saved, base, config)  # its model would record what it was not trained with
        if refused is not None:
            error, changed, fix = refused
            if not auto:
                raise error(f"cannot resume run {run_id}: {changed}; {fix}, or train afresh (without --resume)")
            log.info("not continuing interrupted run %s: %s; training afresh (--resume auto)", run_id, changed)
            resume = None
    if resume is None:
        run_id, group, ckpt = new_run_id(), None, None
    else:
        _say_if_killed(registry, run_id, ckpt)
    return Plan(dataset_ref=version.ref, dataset_digest=version.digest, base=base, run_id=run_id,
                output_dir=_checkpoint_root(config) / run_id, group=group, resume_from=ckpt, registry=registry)


def _say_if_killed(registry, run_id: str, checkpoint: Path) -> None:
    """A warning when the run to continue was ended outright (``crashed``: its process gone without closing the run),
    with what the container's memory cgroup says of out-of-memory kills (`memory_kills`): a training the kernel killed
    for memory says nothing as it goes, and a retry from its checkpoint runs out again near the same step."""
    try:
        if registry.get_run(run_id).get("status") != "crashed":
            return
    except Exception:  # online, W&B may not answer: nothing to add then
        log.debug("the status of run %s could not be read", run_id, exc_info=True)
        return
    said = f"run {run_id} ended without closing its run (its process was killed outright: kill -9, a lost machine"
    if (killed := memory_kills()) is None:
        log.warning("%s, or the kernel's out-of-memory killer); it goes on from %s", said, checkpoint.name)
        return
    kills, limit = killed
    log.warning("%s, or the kernel's out-of-memory killer, which has killed %d process(es) under this container's "
                "memory limit%s); it goes on from %s. If that was this run, it runs out again near the same step: "
                "lower train.batch_size (raising train.gradient_accumulation_steps to keep the rows per step), "
                "train.eval_batch_size or model.max_length, or give the container more memory", said, kills,
                f" of {limit / (1 << 30):.1f} GiB" if limit else "", checkpoint.name)


def _precision_flags(precision: str) -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return {}
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use auto, fp32 or bf16 on the CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _out_of_memory(config: Config) -> OutOfMemory:
    """What to change when training ran out of memory, with the settings it ran with."""
    import torch

    t = config.train
    if torch.cuda.is_available():
        where = (f"the GPU ({torch.cuda.get_device_name()}, "
                 f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.0f} GiB)")
    else:
        where = "the CPU"
    advice = [f"lower train.batch_size (now {t.batch_size}) and raise train.gradient_accumulation_steps (now "
              f"{t.gradient_accumulation_steps}) to keep {t.batch_size * t.gradient_accumulation_steps} rows per "
              f"optimizer step", f"lower train.eval_batch_size (now {t.eval_batch()}) if it stopped while evaluating",
              f"lower model.max_length (now {config.model.max_length})"]
    if not t.activation_checkpointing:
        advice.append("set train.activation_checkpointing: true (less memory, about a third more compute)")
    if torch.cuda.is_available() and not _mixed_precision(t.precision):  # fp32 on a GPU
        advice.append("train in mixed precision (train.precision: auto)")
    return OutOfMemory(f"out of memory on {where} while training: " + "; ".join(advice) + ". Nothing was published")


def trained_on(precision: str) -> dict[str, Any]:
    """The processes, arithmetic and device that train here (`_hardware`), and torch's CPU threads (how each sum is
    split: on the CPU another number gives other last bits): what a version's metadata records in ``training``, and
    what `reproduce` compares with it (and trains with: the threads)."""
    import torch

    return {"processes": launched_processes(), **_hardware(precision), "threads": torch.get_num_threads()}


def _hardware(precision: str) -> dict[str, str]:
    """What trained the weights, for the version's metadata: the arithmetic ``train.precision`` resolved to
    (``auto`` is bf16 or fp16 on a GPU, fp32 on the CPU) and the device's name."""
    import torch

    used = _mixed_precision(precision)
    device = f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu:{_cpu_name()}"
    return {"precision": used[0] if used else "fp32", "device": device}


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows): a CPU with other vector
    instructions sums in another order, so a rebuild on it is not bit for bit."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _mixed_precision(precision: str) -> list[str]:
    """What ``train.precision`` resolves to on this machine: ``["bf16"]``, ``["fp16"]``, or ``[]`` for fp32."""
    return sorted(k for k, on in _precision_flags(precision).items() if on)


# -- data ------------------------------------------------------------------------------------
def tokenizing_packages() -> dict[str, str]:
    """The versions of the packages that turn text into token ids: a tokenised cache entry is theirs alone."""
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("tokenizers", "transformers")}


def tokenize(data_dir: Path, dataset_digest: str, base: BaseModel, max_length: int, cache_root: Path,
             trust_remote_code: bool = False) -> tuple[Path, bool]:
    """The train and validation splits tokenised and saved with ``save_to_disk``; (folder, reused from the cache)."""
    from pipeline.provenance import digest_text

    # a trusted tokenizer's own code is in the base's folder, beyond the tokenizer files: the whole folder counts
    packages = tokenizing_packages()  # another release may split the same text otherwise
    key = digest_text("tokenized", TOKENIZE_FORMAT, dataset_digest, base.tokenizer_digest, max_length,
                      *([base.digest] if trust_remote_code else []), *sorted(packages.items()))[:24]
    out = cache_root / key
    if (out / "dataset_dict.json").is_file():
        return out, True
    import datasets
    import pyarrow.parquet as pq

    from pipeline.predict import count_cut

    parts = {}
    for split in TRAINED_ON:
        table = pq.read_table(data_dir / f"{split}.parquet")
        keep = [c for c in ("text", "text_pair", "label_id") if c in table.column_names]
        parts[split] = datasets.Dataset(table.select(keep))
    pair = "text_pair" in parts["train"].column_names
    tokenizer = load_tokenizer(base.path, base.id, pairs=pair, trust_remote_code=trust_remote_code)
    truncated = dict.fromkeys(parts, 0)

    def encode(batch, split):
        pairs = batch["text_pair"] if pair else None
        enc = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
        truncated[split] += count_cut(tokenizer, enc, batch["text"], pairs, max_length)
        enc["labels"] = batch["label_id"]
        return enc

    dd = datasets.DatasetDict({
        split: part.map(encode, fn_kwargs={"split": split}, batched=True, batch_size=1000,
                        remove_columns=part.column_names, desc="tokenizing")
        for split, part in parts.items()
    })
    cache_root.mkdir(parents=True, exist_ok=True)
    _retire_stale_entries(cache_root)
    tmp = cache_root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        dd.save_to_disk(str(tmp))
        # What the entry was made from, so deleting a dataset version can drop its tokenised copies.
        (tmp / CACHE_SOURCE).write_text(json.dumps({"dataset_digest": dataset_digest, "tokenizer_digest": base.tokenizer_digest,
                                                    "max_length": max_length, "format": TOKENIZE_FORMAT,
                                                    "packages": packages,
                                                    "rows": {s: len(d) for s, d in dd.items()},
                                                    "truncated": truncated}) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process cached the same key first: theirs is identical
            if not (out / "dataset_dict.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False


def truncation(tokenized: Path) -> dict[str, dict[str, int]]:
    """Per split of a tokenised cache entry: its rows, and how many of them were cut at the max length
    (empty when the entry's record of them cannot be read: a damaged marker does not stop training)."""
    try:
        made = json.loads((tokenized / CACHE_SOURCE).read_text(encoding="utf-8"))
        return {s: {"rows": int(made["rows"][s]), "truncated": int(made["truncated"][s])} for s in made["rows"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: the record of how many texts were cut at model.max_length cannot be read (%s); "
                    "they are not reported", tokenized, CACHE_SOURCE)
        return {}


def _report_truncation(counts: dict[str, dict[str, int]], max_length: int, base: BaseModel) -> None:
    """Say how many texts were cut at `model.max_length`: a warning from 1% of the train texts, as the
    model then learns from their beginnings only (and predicts from them too)."""
    train = counts.get("train", {"rows": 0, "truncated": 0})
    shown = ", ".join(f"{c['truncated']} of {c['rows']} {s}" for s, c in counts.items())
    if train["rows"] and train["truncated"] / train["rows"] >= 0.01:
        if base.max_positions is not None and max_length >= base.max_positions:
            fix = f"it is the most {base.id} takes: shorten the texts, or split them, to classify all of each"
        else:
            fix = "raise model.max_length" + (f" ({base.id} takes up to {base.max_positions})" if base.max_positions else "")
        log.warning("%s texts are longer than model.max_length=%d tokens and are cut to it (%.1f%% of train): the "
                    "model sees only their beginning; %s", shown, max_length, 100 * train["truncated"] / train["rows"], fix)
    elif any(c["truncated"] for c in counts.values()):
        log.info("%s texts are longer than model.max_length=%d tokens and are cut to it", shown, max_length)


STALE_TMP_SECONDS = 24 * 3600


def _retire_stale_entries(cache_root: Path) -> None:
    """Entries no version of this code reads again, removed when a new entry is written: those of an older
    layout (`TOKENIZE_FORMAT`, or no `CACHE_SOURCE` marker: the marker goes in before an entry gets its
    name) and a day-old half-written one (a process killed while saving)."""
    import time

    for entry in cache_root.iterdir():
        if not entry.is_dir():
            continue
        if entry.name.startswith("."):
            try:
                stale = time.time() - entry.stat().st_mtime > STALE_TMP_SECONDS
            except OSError:
                continue
        else:
            try:
                stale = json.loads((entry / CACHE_SOURCE).read_text()).get("format") != TOKENIZE_FORMAT
            except FileNotFoundError:
                stale = True
            except (OSError, ValueError):
                continue  # unreadable: left as it is
        if stale:
            log.info("removing a stale tokenised cache entry: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def drop_tokenized(cache_root: Path, dataset_digest: str) -> list[Path]:
    """Remove the cached tokenisations of one dataset content (any tokenizer or length); returns them."""
    removed = []
    for marker in sorted(Path(cache_root).glob(f"*/{CACHE_SOURCE}")):
        try:
            made_from = json.loads(marker.read_text()).get("dataset_digest")
        except (OSError, ValueError):
            continue  # a damaged marker: leave the entry, it is re-made when it is needed
        if made_from == dataset_digest:
            shutil.rmtree(marker.parent, ignore_errors=True)
            removed.append(marker.parent)
    return removed


def _validation_rows(data_dir: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir / "validation.parquet")
    return {c: table.column(c).to_pylist() for c in ("id", "text", "text_pair") if c in table.column_names}


def class_weights(setting: str | dict[str, float], label_names: list[str], train_counts: dict[str, int],
                  dataset: str = "the dataset") -> list[float] | None:
    """Each label's weight in the training loss, in label-id order; None: unweighted (``none``).

    ``balanced`` is scikit-learn's rule, n_train / (classes x the label's train rows): the mean weight
    per train row is 1, so the loss keeps its scale. A dict weighs the labels it names, the others 1.
    """
    if setting == "none":
        return None
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(label_names))
        if unknown:
            raise ConfigError(f"train.class_weights names labels {dataset} does not have: "
                              f"{', '.join(near_label(u, label_names) for u in unknown)}; labels: {label_names}")
        return [float(setting.get(name, 1.0)) for name in label_names]
    counts = [int(train_counts.get(name, 0)) for name in label_names]
    total = sum(counts)
    # a label without train rows (possible with the user's own split files) never appears in the loss
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


# train settings added after the first model versions; their defaults are how those versions were trained
LATER_SETTINGS = ("lr_scheduler", "max_grad_norm", "label_smoothing", "activation_checkpointing")

# train.lr_scheduler -> the Trainer's: "constant" keeps the warmup (transformers' own "constant" skips it silently)
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def weighted_loss(weights: list[float] | None, smoothing: float = 0.0):
    """A `Trainer` ``compute_loss_func``: cross-entropy with each row weighted by its label's weight (None: all 1),
    and `smoothing` (``train.label_smoothing``) as torch's ``label_smoothing`` applies it.

    Summed and divided by the number of rows in the whole accumulated batch when the Trainer gives it
    (``num_items_in_batch``), as the Trainer expects of a loss function, so gradient accumulation gives
    the gradient of the full batch; else the mean over the batch's rows. (The Trainer's own
    ``label_smoothing_factor`` is not used: it does not reach a ``compute_loss_func``.)
    """
    import torch

    table = torch.tensor(weights, dtype=torch.float32) if weights is not None else None

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = table.to(logits.device) if table is not None else None
        total = torch.nn.functional.cross_entropy(logits.float(), labels, weight=w, reduction="sum",
                                                  label_smoothing=smoothing)
        rows = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        if isinstance(rows, torch.Tensor):
            rows = rows.to(total.device)
        return total / rows

    return loss


# -- several processes -----------------------------------------------------------------------
def _launched_alone() -> bool:
    """No launcher started this process as one of several."""
    return launched_processes() <= 1


def stop_followers(reason: str) -> None:
    """The main process of several, stopped before `run` (`pipeline run`'s dataset-publish failed, say): the others
    wait in `_follow` for what to train, and stop with `reason` instead of waiting on."""
    if not _launched_alone():
        _stop_following(_process_state(), reason)


def _stop_following(state, error: BaseException | str) -> None:
    """The main process failed before training: the others, waiting for what to train, stop with its message. Those
    already gone (the launcher passed its SIGTERM on to every process) cannot be told: the main process's own error
    stands, not gloo's "Connection closed by peer" from telling them."""
    try:
        _share(state, {"error": str(error)})
    except Exception:
        log.debug("the other processes could not be told that the main one stopped (gone already?)", exc_info=True)


def _process_state():
    from accelerate import PartialState

    _check_gpu_per_process()
    if (hazard := restart_store_hazard()) is not None and not _distributed_ready():
        log.warning("%s", hazard)  # before the processes meet, where it fails or waits
    return PartialState(cpu=not _cuda_available())


def _distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def restart_store_hazard() -> str | None:
    """What to say when torchrun restarts its processes (``--max-restarts``) with the store their last attempt used:
    torch then hands them the last attempt's addresses at times, and they fail to meet (pytorch/pytorch#135712;
    here, 3 restarts out of 4 ended in "Gloo connectFullMesh failed ... Connection refused" with torch 2.13, and one
    waited until killed). None for a first attempt, or where torchrun keeps the stores apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not attempt.isdigit() or int(attempt) == 0:
        return None
    return (f"torchrun restarted this process (restart {attempt}) with the store its first attempt used, where torch "
            "can hand the processes the last attempt's addresses: they then fail to meet ('Gloo connectFullMesh failed "
            "... Connection refused' on the CPU) or wait on. Start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (pytorch/pytorch#135712) for restarts that meet")


_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")  # torchrun and accelerate launch; mpirun


def _check_gpu_per_process() -> None:
    """On CUDA each process on a machine trains on a GPU of its own. Launched with more processes than GPUs, NCCL
    refuses them only at the first collective ("Duplicate GPU detected"), deep in each process's traceback."""
    import torch

    if not torch.cuda.is_available():
        return
    local = max((int(v) for v in map(os.environ.get, _LOCAL_SIZE_VARS) if v and v.isdigit()), default=1)
    gpus = torch.cuda.device_count()
    if local > gpus:
        raise ConfigError(
            f"{local} training processes on this machine but {gpus} CUDA GPU{'s' if gpus != 1 else ''}: each process "
            f"trains on a GPU of its own. Launch at most {gpus} per machine (torchrun --nproc_per_node {gpus}), or train "
            "on the CPU with CUDA_VISIBLE_DEVICES=\"\"")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _share(state, payload: dict[str, Any] | None) -> dict[str, Any]:
    """The main process hands `payload` to every other process (a no-op with one process)."""
    if state.num_processes == 1:
        return payload or {}
    from accelerate.utils import broadcast_object_list

    box = [payload]
    broadcast_object_list(box, from_process=0)
    return box[0]


# -- training --------------------------------------------------------------------------------
def _training_args(config: Config, output_dir: Path, run_id: str, report: bool):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import TrainingArguments

    t = config.train
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch(),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        # Token-count averaging is for token-level losses; with a per-example classification loss it
        # would report the loss multiplied by the number of processes.
        average_tokens_across_devices=False,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        lr_scheduler_type=LR_SCHEDULERS[t.lr_scheduler],
        max_grad_norm=t.max_grad_norm or 0.0,  # 0: the Trainer does not clip
        activation_checkpointing=t.activation_checkpointing,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.eval_strategy,  # checkpoints where evaluations are, so the best one can be kept
        save_steps=t.eval_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.metric_for_best_model != "loss",
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        report_to=["wandb"] if report else "none",
        run_name=run_id,
        seed=t.seed,
        dataloader_num_workers=t.dataloader_workers,
        use_cpu=not _cuda_available(),
        disable_tqdm=are_progress_bars_disabled(),  # off in logs (see cli.main) and with HF_HUB_DISABLE_PROGRESS_BARS
        **_precision_flags(t.precision),
    )


@contextlib.contextmanager
def _trainer_model_upload_off():
    """transformers' own ``WANDB_LOG_MODEL`` upload stays off: it would add optimizer state and
    name artifacts by run id. This stage publishes the one model artifact itself."""
    previous = os.environ.get("WANDB_LOG_MODEL")
    if previous and previous.lower() not in ("false", "0", ""):
        log.warning("WANDB_LOG_MODEL=%s is ignored: the finetune stage publishes the model artifact itself", previous)
    os.environ["WANDB_LOG_MODEL"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("WANDB_LOG_MODEL", None)
        else:
            os.environ["WANDB_LOG_MODEL"] = previous


def _build_trainer(config: Config, shared: dict[str, Any], run, extra_callbacks) -> tuple[Any, Any]:
    import datasets
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    from pipeline.callbacks import EvalCapture, MisclassificationCallback, PreferLowerLossOnTies

    label_names = shared["label_names"]
    tokenized = datasets.load_from_disk(shared["tokenized"])
    trust = config.model.trust_remote_code
    pairs = "text_pair" in shared["validation_rows"]
    tokenizer = load_tokenizer(shared["base_path"], pairs=pairs, trust_remote_code=trust)
    set_seed(config.train.seed)  # before the head is initialised
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights": expected, we train them
    try:
        model = load_classifier(shared["base_path"], label_names, trust_remote_code=trust)
    finally:
        hf_logging.set_verbosity(verbosity)
    match_padding(model, tokenizer)
    capture = EvalCapture(len(label_names))
    # before early stopping, which reads the best metric; None: no CheckpointOnTerm (`_checkpoint_on_term`)
    callbacks = [PreferLowerLossOnTies(), *(c for c in extra_callbacks if c is not None)]
    if config.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    if run is not None and config.train.misclassified_rows > 0:
        rows = shared["validation_rows"]
        callbacks.append(MisclassificationCallback(
            run, capture, label_names, rows["text"], ids=rows.get("id"), text_pairs=rows.get("text_pair"),
            max_rows=config.train.misclassified_rows,
        ))
    args = _training_args(config, Path(shared["output_dir"]), shared["run_id"], report=run is not None)
    with _trainer_model_upload_off():
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"],
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=capture,
            callbacks=callbacks,
            compute_loss_func=weighted_loss(shared.get("class_weights"), config.train.label_smoothing)
            if shared.get("class_weights") or config.train.label_smoothing else None,
        )
    return trainer, tokenizer


def _define_summaries(run) -> None:
    """Best validation accuracy and F1 as max, loss as min, on the Trainer's step axis."""
    from pipeline.callbacks import STEP_METRIC

    run.define_metric(STEP_METRIC)
    for key in ("accuracy", "macro_f1"):
        run.define_metric(f"eval/{key}", step_metric=STEP_METRIC, summary="max")
    run.define_metric("eval/loss", step_metric=STEP_METRIC, summary="min")


def _close_progress_bars(trainer) -> None:
    """The progress bars of a training that raised: transformers closes them when training ends, which it did not.
    In a process that goes on (a sweep's next trial, a notebook, an orchestrator's Python task), an open bar
    stayed on the screen and was printed again, half-way, when Python collected it."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):  # transformers' ProgressCallback
            if (bar := getattr(callback, name, None)) is not None:
                bar.close()
                setattr(callback, name, None)


def _eval_history(state) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics of the kept checkpoint, metrics of the last evaluation), keys without ``eval_``."""
    evals = [h for h in state.log_history if "eval_loss" in h]
    if not evals:
        return {}, {}

    def clean(h):
        return {k[5:]: float(v) for k, v in h.items() if k.startswith("eval_") and isinstance(v, (int, float))
                and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")} | {"step": h["step"]}

    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    best = next((h for h in reversed(evals) if h["step"] == best_step), evals[-1])
    return clean(best), clean(evals[-1])


def _check_finite(best: dict[str, float], final: dict[str, float]) -> None:
    """A kept checkpoint with a validation metric that is not a number (NaN or infinite: the training
    diverged) is no model to publish: a StageFailed that says so. A later evaluation's such values (it
    diverged after the kept checkpoint, which is what is published) are recorded as null, with a warning."""
    def bad(metrics):
        return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]

    if bad(best):
        shown = ", ".join(f"{k} {best[k]}" for k in bad(best))
        raise StageFailed(f"the training diverged: the checkpoint it kept (step {best.get('step')}) has validation "
                          f"{shown}; nothing was published. Lower train.learning_rate, or train in fp32 "
                          "(train.precision=fp32) if it ran in fp16")
    if bad(final):
        log.warning("the training diverged after the checkpoint it kept (step %s): the last evaluation (step %s) has "
                    "validation %s, recorded as null; the kept checkpoint is the one published", best.get("step"),
                    final.get("step"), ", ".join(f"{k} {final[k]}" for k in bad(final)))
        final.update(dict.fromkeys(bad(final)))


# How the tokenizer was loaded, which transformers keeps and save_pretrained writes into tokenizer_config.json:
# local_files_only is true where the hub is offline (HF_HUB_OFFLINE=1), so the same training made two versions,
# with and without it, and `reproduce` of one in the other's setting said "other files differ". Written as a load
# from a folder with the hub online writes them (the base model is always a folder here), as every version had them
# that was trained without the variable: theirs stay byte for byte.
TOKENIZER_LOADED_AS = {"is_local": True, "local_files_only": False}


def _write_model_dir(out: Path, trainer, tokenizer, config: Config, plan_: Plan, shared: dict[str, Any],
                     num_rows: dict[str, int], metrics: dict[str, Any]) -> None:
    """The version's files; none depends on the run id, the clock or a path."""
    from pipeline import modelcard

    label_names = shared["label_names"]
    text_pair = "text_pair" in shared["validation_rows"]  # trained on sentence pairs

    trainer.model.save_pretrained(out)  # safetensors weights and config.json with id2label; no optimizer state
    for key, value in TOKENIZER_LOADED_AS.items():
        if key in tokenizer.init_kwargs:
            tokenizer.init_kwargs[key] = value
    tokenizer.save_pretrained(out)
    weights = _weights_by_label(shared)
    # settings added since the first versions are written only when set, so a model trained as before has the
    # files it had (a reproduction of an older version is compared file by file)
    train = config.train.model_dump(mode="json", exclude=({"class_weights"} if not weights else set()) | {
        k for k in LATER_SETTINGS if getattr(config.train, k) == type(config.train).model_fields[k].default})
    labels = {"label_names": label_names, "id2label": dict(enumerate(label_names))}
    if shared.get("label_type"):  # only then: a model of text labels has the file it always had
        labels["label_type"] = shared["label_type"]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    training = {
        "dataset": {"ref": plan_.dataset_ref, "digest": plan_.dataset_digest},
        "base_model": {k: v for k, v in plan_.base.to_dict().items() if k != "spec"},
        "model": config.model.model_dump(mode="json"),
        "train": train,
    }
    if text_pair:  # read by pipeline.predict; single-text models keep the files they always had
        training["inputs"] = ["text", "text_pair"]
        if shared["pair_separator"]:  # the token put between a pair's texts (`separate_pairs`); predict puts it too
            training["pair_separator"] = shared["pair_separator"]
    if weights:  # likewise
        training["class_weights"] = weights
    (out / "training_config.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shown = {k: train[k] for k in ("epochs", "max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps",
                                   "warmup_ratio", "weight_decay", *LATER_SETTINGS, "seed") if k in train}
    if weights:
        how = train["class_weights"] if isinstance(train["class_weights"], str) else "by label"
        shown["class_weights"] = f"{how} ({', '.join(f'{n} {w:.3g}' for n, w in weights.items())})"
    card = modelcard.render(
        model_name=config.model.name, base=plan_.base.to_dict(), dataset_ref=plan_.dataset_ref,
        dataset_digest=plan_.dataset_digest, label_names=label_names, num_rows=num_rows, train=shown,
        max_length=config.model.max_length, metrics=metrics, best_metric=config.train.metric_for_best_model,
        text_pair=text_pair, truncated=shared.get("truncated"),
        # the architecture is code saved with the weights (a trusted base's auto_map): loading it needs trust too
        remote_code=bool(json.loads((out / "config.json").read_text(encoding="utf-8")).get("auto_map")),
    )
    (out / "README.md").write_text(card, encoding="utf-8")


def _weights_by_label(shared: dict[str, Any]) -> dict[str, float] | None:
    weights = shared.get("class_weights")
    return {n: round(w, 6) for n, w in zip(shared["label_names"], weights)} if weights else None


def _prepare(config: Config, plan_: Plan, trun, sweep: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Main process, inside the run: record the input, fetch and tokenise. (shared, details)"""
    from pipeline.data import typed_labels

    registry = trun.registry
    version = plan_.use_inputs(trun)
    fetched = registry.fetch(version)
    manifest = json.loads((fetched.path / "dataset.json").read_text(encoding="utf-8"))
    label_names = list(manifest["label_names"])
    cache_root = Path(config.tracking.dir).resolve() / "cache" / "tokenized"
    trust = config.model.trust_remote_code
    tokenized, hit = tokenize(fetched.path, version.digest, plan_.base, config.model.max_length, cache_root,
                              trust_remote_code=trust)
    log.info("%s: tokenised splits %s (%s)", version.ref, tokenized, "cached" if hit else "new")
    truncated = truncation(tokenized)
    _report_truncation(truncated, config.model.max_length, plan_.base)
    validation_rows = _validation_rows(fetched.path)
    separator = None  # the token put between a pair's texts; None: single texts, or a tokenizer that separates them
    if "text_pair" in validation_rows:
        separator = separate_pairs(load_tokenizer(plan_.base.path, plan_.base.id, trust_remote_code=trust), plan_.base.id)
        if separator:
            log.info("the base model's tokenizer puts nothing between the two texts of a pair; each pair is encoded "
                     "as text %r text_pair", separator)
    plan_.output_dir.mkdir(parents=True, exist_ok=True)
    state = {"run_id": plan_.run_id, "dataset": version.ref, "dataset_digest": version.digest,
             "base_digest": plan_.base.digest, **{k: v for k, v in trained_on(config.train.precision).items()
                                                  if k in ("processes", "precision")},  # what resuming must keep
             "config": trun.config, "group": trun.group,
             **({"base": plan_.base_version} if plan_.base_version else {}), **({"sweep": sweep} if sweep else {}),
             # the hub commit it began from: resuming takes that one, not the newest
             **({"base_revision": plan_.base.revision} if plan_.base.source == "hub" and plan_.base.revision else {})}
    (plan_.output_dir / (TRIAL_FILE if sweep else RESUME_FILE)).write_text(json.dumps(state, indent=2) + "\n",
                                                                           encoding="utf-8")
    shared = {
        "run_id": plan_.run_id,
        "output_dir": str(plan_.output_dir),
        "base_path": str(plan_.base.path),
        "tokenized": str(tokenized),
        "label_names": label_names,
        # numbers or booleans in the data's source ("0", "1" were 0, 1): predict gives them back so
        "label_type": manifest.get("label_type") if typed_labels(label_names, manifest.get("label_type")) else None,
        "validation_rows": validation_rows,
        "resume_from": str(plan_.resume_from) if plan_.resume_from else None,
        "class_weights": class_weights(config.train.class_weights, label_names, manifest["label_counts"]["train"]),
        "truncated": {s: c["truncated"] for s, c in truncated.items()},  # rows cut at model.max_length
        "pair_separator": separator,
    }
    if shared["class_weights"]:
        log.info("class weights in the loss: %s",
                 ", ".join(f"{n} {w:.3g}" for n, w in zip(label_names, shared["class_weights"])))
    details = {"tokenize_cache": "hit" if hit else "miss", "num_rows": manifest["num_rows"], "data_dir": str(fetched.path)}
    return shared, details


def run(config: Config, *, group: str | None = None, dataset: str | None = None, resume: str | None = None,
        callbacks: tuple = (), aliases: tuple[str, ...] = ("candidate",), tags: tuple[str, ...] = (),
        summary: dict[str, Any] | None = None, keep_model: Path | None = None,
        adopt_wandb_run: bool = False, base: str | None = None, reuse: bool = False,
        sweep: str | None = None) -> StageResult:
    """Train on an exact dataset version and publish the model; see the module docstring.

    `resume`: None trains afresh; ``"latest"`` continues the newest interrupted run of this
    model; a run id continues that run; ``"auto"`` continues the interrupted run of this config and
    dataset version when there is one, else trains afresh. `callbacks` are extra ``TrainerCallback`` objects;
    `aliases` go on the published version (besides ``latest``); `tags` and `summary` are added
    to the W&B run. With `keep_model` (a folder) nothing is published: the version's files go
    there, and its metadata to ``metadata.json`` beside them, for a sweep to publish its best.
    `adopt_wandb_run`: log into the W&B run already open (a sweep agent's) instead of a new one.
    `base`: the exact ``name:vN`` that a registry reference in ``model.base`` stands for (`plan`).
    `reuse` (the command line's default; not with `resume` or `keep_model`): a live version trained from
    exactly these inputs (`trained_before`) is the result, status ``unchanged``, and nothing is trained.
    `sweep`: the id of the sweep this run is a trial of. A resumed sweep runs a new trial instead of continuing
    one, so such a run is never resumed: one that stops leaves no checkpoints (`remove_trial_leftovers`).
    """
    # One process: a bad dataset reference or base model is said before torch loads (seconds) for accelerate.
    early = plan(config, dataset, resume, base) if _launched_alone() else None
    torch_threads_within_quota()  # where no command line set OMP_NUM_THREADS from a container's CPU limit
    state = _process_state()
    if not state.is_main_process:
        return _follow(config, state, callbacks, sweep)
    try:
        plan_ = early or plan(config, dataset, resume, base)
        code, packages = provenance.code_and_packages()
        signature = input_signature(config, plan_, code, packages)
        reuse = reuse and plan_.resume_from is None and keep_model is None and not adopt_wandb_run
        earlier = trained_before(config, signature, plan_.registry) if reuse else None
        if reuse and signature is None:
            log.info("the pipeline's package has uncommitted changes, so no version trained before is known to come "
                     "from this code: training")
    except BaseException as e:
        _stop_following(state, e)
        raise
    if earlier is not None:
        _share(state, {"reused": earlier.ref})
        return _reuse(config, plan_, earlier, group=group, aliases=aliases, tags=tags, summary=summary)
    tags = [*tags, *(["resumed"] if plan_.resume_from else [])]
    # A resumed run stays in the group it started in (one W&B run, one group), also when a later pipeline resumes it
    # Held until the folder goes: a second process (an overlapping cron job, a retry while this one is alive)
    # neither continues this run nor removes its folder (`runlock`).
    with runlock.hold(plan_.output_dir, f"finetune run {plan_.run_id}"):
        with tracked_run(config, STAGE, group=plan_.group if plan_.resume_from is not None else group,
                         run_id=plan_.run_id, resume=plan_.resume_from is not None,
                         tags=tags, adopt=adopt_wandb_run, registry=plan_.registry) as trun:
            if summary:
                trun.set_summary(**summary)
            try:
                shared, details = _prepare(config, plan_, trun, sweep)
            except BaseException as e:
                _stop_following(state, e)
                raise
            _share(state, shared)
            trun.set_summary(**{"dataset": plan_.dataset_ref, "base_model": plan_.base.id,
                                "data/tokenize_cache": details["tokenize_cache"],
                                **{f"data/truncated_{s}": n for s, n in shared["truncated"].items()}})
            on_term = _checkpoint_on_term(sweep)
            trainer, tokenizer = _build_trainer(config, shared, trun.wandb_run, (*callbacks, on_term))
            if trun.wandb_run is not None:
                _define_summaries(trun.wandb_run)
            try:
                output = _train(trainer, shared["resume_from"], on_term)
            except BaseException as e:
                _close_progress_bars(trainer)
                full = isinstance(e, Exception) and no_space_left(e, plan_.output_dir)  # torch.save does not say so itself
                checkpoint = _last_checkpoint(plan_.output_dir) if sweep is None else None
                if sweep is not None:  # nothing will continue it: its checkpoints (hundreds of MB) go
                    shutil.rmtree(plan_.output_dir, ignore_errors=True)
                elif checkpoint is not None:
                    log.error("finetune run %s stopped; its last checkpoint is %s. Continue it with: "
                              "python -m pipeline finetune --config ... --resume %s", plan_.run_id, checkpoint, plan_.run_id)
                    trun.on_failure.update(resume=plan_.run_id, checkpoint=str(checkpoint))  # for the result file
                else:  # nothing to continue it from: its folder (the state to resume it by) goes
                    shutil.rmtree(plan_.output_dir, ignore_errors=True)
                    log.error("finetune run %s stopped before its first checkpoint; start it again", plan_.run_id)
                if full:
                    raise DiskFull(str(plan_.output_dir)) from e
                if out_of_memory(e):
                    raise _out_of_memory(config) from e
                raise
            best, final = _eval_history(trainer.state)
            _check_finite(best, final)
            metrics = {"best": best, "final": final, "best_metric": config.train.metric_for_best_model}
            if _stopped_outside_config(trainer):  # not what this config trains: no signature for `trained_before`
                log.info("training stopped at step %d of %d, by a callback the config does not name (a sweep's pruner): "
                         "the model records no input signature, so a finetune of this config does not reuse it",
                         trainer.state.global_step, trainer.state.max_steps)
                signature = None
            metadata = _metadata(config, plan_, trun, shared, metrics, signature, code, packages, trainer.state)
            if keep_model is not None:
                _keep(Path(keep_model), trainer, tokenizer, config, plan_, shared, details, metrics, metadata)
                status, produced, digest = "ok", [], None
                trun.set_summary(status="ok", kept_model=str(keep_model))
            else:
                published = _publish(config, plan_, trun, trainer, tokenizer, shared, details, metrics, metadata, aliases)
                status = "ok" if published.created else "unchanged"
                if (moved := published.latest_again()) is not None:  # as on W&B; what `model.base: NAME:latest` reads
                    log.info("%s", moved)
                    details["latest_again"] = moved
                provenance.add_signature(trun.registry, published.version, signature)
                produced, digest = [published.ref], published.version.digest
                trun.set_summary(**{"artifact": published.ref, "status": status})
            trun.set_summary(**{f"best/{k}": v for k, v in best.items()})
            train_metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        shutil.rmtree(plan_.output_dir, ignore_errors=True)  # the version holds the model; checkpoints were for resuming
    return StageResult(
        stage=STAGE,
        status=status,
        run_id=trun.id,
        consumed=plan_.consumed,
        produced=produced,
        message=(f"trained, and the files are {produced[0]}'s byte for byte: no new version"
                 + (f"; {details['latest_again']}" if details.get("latest_again") else "")) if status == "unchanged" else None,
        metrics={
            **{f"eval_{k}": v for k, v in best.items() if k != "step"},
            **{k: train_metrics[k] for k in ("train_loss", "train_runtime", "train_samples_per_second") if k in train_metrics},
        },
        paths={"run_dir": str(trun.wandb_dir) if trun.wandb_dir else "",
               **({"model_dir": str(keep_model)} if keep_model is not None else {})},
        details={**details, "best_step": best.get("step"), "final": final, "resumed_from": shared["resume_from"],
                 "processes": state.num_processes, "digest": digest, "stopped_early": trainer.state.global_step < trainer.state.max_steps},
    )


# Besides the inputs, what computes the weights: a version made with other versions of these is trained again.
REUSE_PACKAGES = ("wandb-finetune-pipeline", "torch", "transformers", "tokenizers", "accelerate")
def input_signature(config: Config, plan_: Plan, code: dict[str, Any], packages: dict[str, str]) -> str | None:
    """sha256 of what a model is trained from: the dataset version's digest, the base model's weights and
    tokenizer digests, the model and train config (``model.name`` and how ``model.base`` is spelled aside),
    the mixed precision it resolves to, the pipeline's commit (or an installed package's digest), the versions
    of `REUSE_PACKAGES` and the number of processes. None when the pipeline's package has uncommitted
    changes: code that cannot be named is never the same code."""
    if code.get("git_dirty"):
        return None
    now = config.to_dict()
    inputs = {
        "dataset": plan_.dataset_digest,
        "base": [plan_.base.digest, plan_.base.tokenizer_digest],
        "model": {k: v for k, v in now["model"].items() if k not in ("name", "base")},
        "train": now["train"],
        "code": provenance.code_identity(code),
        "packages": {p: packages.get(p) for p in REUSE_PACKAGES},
        "processes": launched_processes(),
        # train.precision=auto is bf16 or fp16 on a GPU and fp32 on the CPU: what it became is the input
        "mixed_precision": _mixed_precision(config.train.precision),
    }
    return provenance.signature(inputs)


def trained_before(config: Config, signature: str | None, registry):
    """The newest live version of this model trained from the inputs `signature` names: training again would
    only repeat it. Each version records the signatures it was trained from (more than one when training
    from other inputs, another commit say, gave the same bytes)."""
    return provenance.made_from(registry, config.model.name, "model", signature)


def _reuse(config: Config, plan_: Plan, earlier, *, group, aliases, tags, summary) -> StageResult:
    """The stage's run for a version trained before from the same inputs: it records the inputs it was
    given, moves `aliases` and ``latest`` to that version (as publishing its content again would) and trains nothing."""
    with tracked_run(config, STAGE, group=group or plan_.group, run_id=plan_.run_id, tags=[*tags, "reused"],
                     registry=plan_.registry) as trun:
        if summary:
            trun.set_summary(**summary)
        plan_.use_inputs(trun)
        for alias in aliases:
            trun.registry.set_alias(earlier.ref, alias)
        if "latest" not in earlier.aliases:
            refused = put_latest(trun.registry, earlier.ref)
            if refused:
                log.warning("%s did not move to %s: %s", earlier.tagged("latest"), earlier.ref, refused)
            else:
                log.info("%s is %s again", earlier.tagged("latest"), earlier.ref)
        trun.note_produced(earlier.ref)
        trun.set_summary(artifact=earlier.ref, status="unchanged", reused=earlier.ref, trained_by=earlier.produced_by)
        log.info("%s was already trained from these same inputs (dataset %s, base model, model and train config, code "
                 "and libraries): it is the result, and nothing is trained (--retrain trains again)",
                 earlier.ref, plan_.dataset_ref)
    best = (earlier.metadata.get("metrics") or {}).get("best") or {}
    return StageResult(
        stage=STAGE,
        status="unchanged",
        run_id=trun.id,
        consumed=plan_.consumed,
        produced=[earlier.ref],
        metrics={f"eval_{k}": v for k, v in best.items() if k != "step" and isinstance(v, (int, float))},
        paths={"run_dir": str(trun.wandb_dir) if trun.wandb_dir else ""},
        message=f"{earlier.ref} was already trained from the same inputs; reused",
        details={"reused": True, "trained_by": earlier.produced_by, "digest": earlier.digest},
    )


def _stopped_outside_config(trainer) -> bool:
    """Training ended before its last step, and not by the early stopping its config asks for: a callback that the
    config does not name stopped it (a sweep's hyperband pruner, a caller's own callback)."""
    from transformers import EarlyStoppingCallback

    state = trainer.state
    if state.global_step >= state.max_steps:
        return False
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    return early is None or early.early_stopping_patience_counter < early.early_stopping_patience


def _metadata(config: Config, plan_: Plan, trun, shared, metrics, signature: str | None, code: dict[str, Any],
              packages: dict[str, str], state) -> dict[str, Any]:
    if code.get("git_dirty"):
        log.warning("the pipeline's package has uncommitted changes; the model records git_dirty=true")
    return {
        "dataset": {"ref": plan_.dataset_ref, "digest": plan_.dataset_digest},
        "base_model": plan_.base.to_dict(),
        "label_names": shared["label_names"],
        **({"label_type": shared["label_type"]} if shared.get("label_type") else {}),
        # what it classifies, from the dataset version it trained on: the config's dataset.* need not describe that
        # version (finetune --dataset names any), so evaluate asks this
        "inputs": ["text", "text_pair"] if "text_pair" in shared["validation_rows"] else ["text"],
        "metrics": metrics,
        "seed": config.train.seed,
        "config": trun.config,
        "code": code,
        "packages": packages,
        # the W&B run that trained it: a sweep agent's own run when adopted, not the id of its checkpoint folder
        "training": {"run_id": trun.id, "resumed_from": shared["resume_from"], **trained_on(config.train.precision),
                     # stopped before its last step (early stopping, or a sweep's pruner, which the config does not
                     # name): `reproduce` stops there too
                     **({"stopped_at_step": state.global_step, "max_steps": state.max_steps}
                        if state.global_step < state.max_steps else {})},
        **({"input_signatures": [signature]} if signature else {}),  # see `input_signature`
        **({"class_weights": _weights_by_label(shared)} if shared.get("class_weights") else {}),
        **({"truncated": {"max_length": config.model.max_length, **shared["truncated"]}}  # rows cut to it, per split
           if shared["truncated"] else {}),
    }


def _publish(config: Config, plan_: Plan, trun, trainer, tokenizer, shared, details, metrics, metadata, aliases):
    with tempfile.TemporaryDirectory(prefix="model-", dir=plan_.output_dir) as tmp:
        out = Path(tmp)
        _write_model_dir(out, trainer, tokenizer, config, plan_, shared, details["num_rows"], metrics)
        return trun.registry.publish(config.model.name, "model", out, metadata=metadata, aliases=list(aliases), run=trun)


def _keep(dest: Path, trainer, tokenizer, config, plan_, shared, details, metrics, metadata) -> None:
    """Write the version's files to `dest/model` and its metadata to `dest/metadata.json`, atomically."""
    from pipeline.registry.base import swap_into_place
    from pipeline.results import write_json_atomic

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        (staging / "model").mkdir(parents=True)
        _write_model_dir(staging / "model", trainer, tokenizer, config, plan_, shared, details["num_rows"], metrics)
        write_json_atomic(staging / "metadata.json", metadata)
        swap_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_on_term(sweep: str | None):
    """The `CheckpointOnTerm` of a training: SIGTERM saves a checkpoint at the end of its step, then stops it. Every
    process of several has one (they agree on the step, and each waits for the others' votes), or none does: not a
    sweep's trial, whose checkpoints go as it stops."""
    if sweep is not None:
        return None
    from pipeline.callbacks import CheckpointOnTerm

    return CheckpointOnTerm()


def _train(trainer, resume_from: str | None, on_term):
    """``trainer.train``, `on_term` armed; stopped by SIGTERM (its step's checkpoint saved), it ends as SIGTERM ends a
    stage: KeyboardInterrupt(TERMINATED)."""
    with on_term.armed() if on_term is not None else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=resume_from)
    if on_term is not None and on_term.stopped:
        raise KeyboardInterrupt(TERMINATED)
    return output


def _follow(config: Config, state, callbacks, sweep: str | None) -> StageResult:
    """A non-main process: wait for the main one to prepare, then train alongside it (and stop with it for SIGTERM:
    `_checkpoint_on_term`)."""
    shared = _share(state, None)
    if "error" in shared:
        raise PipelineError(f"the main process stopped before training: {shared['error']}")
    if "reused" in shared:
        return StageResult(stage=STAGE, status="unchanged", produced=[shared["reused"]], details={"process": state.process_index})
    on_term = _checkpoint_on_term(sweep)
    trainer, _ = _build_trainer(config, shared, None, (*callbacks, on_term))
    _train(trainer, shared["resume_from"], on_term)
    return StageResult(stage=STAGE, status="ok", run_id=shared["run_id"], details={"process": state.process_index})
