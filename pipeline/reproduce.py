"""Rebuild a model version from what it recorded, and say how close the rebuild came.

The model version's metadata holds the resolved config, the exact dataset version and its
digest, the base model and its digest, the seed, the code version and the package versions.
`reproduce` checks that the inputs still exist and are the same bytes, re-runs finetune on
that exact dataset version (never ``latest``) as a new run tagged as a reproduction, and
compares config, inputs, code, packages, validation metrics and test-split predictions with
the original. Bit-identical weights give the same digest, so the registry keeps one version.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.config import Config, TrackingConfig, config_from_dict, model_config_diff
from pipeline.cpus import torch_threads_within_quota
from pipeline.errors import ConfigError, PipelineError, RefError
from pipeline.results import StageResult
from pipeline.tracking import open_registry

STAGE = "reproduce"
log = logging.getLogger(__name__)


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Keys of the groups that shape a model whose values differ: {key: {"original", "reproduction"}}."""
    return {k: {"original": a, "reproduction": b} for k, (a, b) in model_config_diff(before, after).items()}


def _metric_diff(original: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for k in sorted(original.keys() & new.keys()):
        if k == "step" or not isinstance(original[k], (int, float)):
            continue
        out[k] = {"original": float(original[k]), "reproduction": float(new[k]), "delta": float(new[k]) - float(original[k])}
    return out


def reproduction_config(registry, ref: str, tracking: dict[str, Any], overrides: tuple[str, ...] = ()) -> tuple[Any, Config]:
    """(model version, the config to retrain it with): its recorded config, today's tracking, and overrides."""
    model = registry.resolve(ref)
    if model.type != "model":
        raise RefError(f"{model.ref} is a {model.type!r} artifact; reproduce takes a model version")
    recorded = model.metadata.get("config")
    if not isinstance(recorded, dict) or not model.metadata.get("dataset"):
        raise RefError(f"{model.ref} does not record the config and dataset that made it, so it cannot be rebuilt")
    return model, config_from_dict({**recorded, "tracking": tracking}, overrides, origin=f"the config recorded by {model.ref}")


def within(worst: float, tolerance: float, predictions_differ: int) -> bool:
    """Whether a rebuild matches: its largest metric difference is within `tolerance` (exactly at it counts, though
    0.92 - 0.91 is 0.010000000000000009 in floating point), and with no tolerance, no test prediction differs."""
    from pipeline.stages.evaluate import AT_THRESHOLD

    return worst <= tolerance + AT_THRESHOLD and (tolerance > 0 or predictions_differ == 0)


def run(config: Config | TrackingConfig, *, group: str | None = None, model: str, overrides: tuple[str, ...] = (),
        check: bool = False, tolerance: float = 0.0, trust_remote_code: bool = False) -> StageResult:
    """Reproduce `model`. `config` supplies the tracking settings (a full config, or just tracking);
    `overrides` change the recorded config on purpose (``--set train.seed=1``). A model trained with
    ``model.trust_remote_code`` is rebuilt only with `trust_remote_code` (``--trust-remote-code``): the
    recorded config alone does not run the code in its base model's folder."""
    from pipeline.basemodel import resolve_base_model
    from pipeline.provenance import code_identity, code_version, package_versions
    from pipeline.launch import is_follower
    from pipeline.stages import finetune

    if isinstance(config, Config):
        tracking, project, entity = config.tracking, config.project, config.entity
    else:
        tracking, project, entity = config, os.environ.get("WANDB_PROJECT") or Config.model_fields["project"].default, \
            os.environ.get("WANDB_ENTITY")
    registry = open_registry(tracking, project=project, entity=entity, scoped=False, consuming=True)  # any project's version; its
    # rebuild runs in the project it recorded (finetune's own registry is scoped to it)
    original, cfg = reproduction_config(registry, model, tracking.model_dump(mode="json"), overrides)
    meta = original.metadata
    if cfg.model.trust_remote_code and not trust_remote_code:
        where = (meta.get("base_model") or {}).get("id", cfg.model.base)
        raise ConfigError(f"{original.ref} was trained with model.trust_remote_code: rebuilding it runs the Python "
                          f"code in its base model's folder ({where}); read that code, then pass --trust-remote-code")
    ds_ref, ds_digest = meta["dataset"]["ref"], meta["dataset"].get("digest")
    try:
        dataset = registry.resolve(ds_ref, type="dataset")
    except RefError as e:
        raise RefError(f"{original.ref} was trained on {ds_ref}, which is gone: {e}") from None
    if ds_digest and dataset.digest != ds_digest:
        raise PipelineError(f"{ds_ref} has digest {dataset.digest[:12]} now, but {original.ref} was trained on "
                            f"{ds_digest[:12]}: the recorded data is not there to rebuild from")
    recorded_base = meta.get("base_model") or {}
    # A model version it was trained from further: that exact version, wherever the alias written in model.base is now;
    # a local folder: the one it was, also when model.base is a relative path and this runs elsewhere; a hub id: the
    # commit it was at, not the newest (unless --set gave model.base another value)
    same_spec = cfg.model.base == ((meta.get("config") or {}).get("model") or {}).get("base")
    pinned = {"registry": recorded_base.get("id"), "local": recorded_base.get("id"),
              "hub": recorded_base.get("revision")}.get(recorded_base.get("source")) if same_spec else None
    try:
        base = resolve_base_model(cfg.model.base, registry, pinned=pinned,
                                  trust_remote_code=cfg.model.trust_remote_code)
    except (ConfigError, RefError) as e:
        raise type(e)(f"the base model {original.ref} recorded ({recorded_base.get('id', cfg.model.base)}) "
                          f"cannot be found: {e}") from None

    warnings = []
    if recorded_base.get("digest") and recorded_base["digest"] != base.digest:
        changed = (f"base model {base.id} has different files now (digest {recorded_base['digest'][:12]} -> "
                   f"{base.digest[:12]})")
        if not any(o.partition("=")[0].strip() == "model.base" for o in overrides):
            # as for the dataset: the recorded input is not there, so the rebuild could not give the model back
            raise PipelineError(f"the base model {base.id} has other files now (digest {base.digest[:12]}), but "
                                f"{original.ref} was trained from {recorded_base['digest'][:12]}: the recorded base is "
                                f"not there to rebuild from; put its files back, or rebuild from this base on purpose "
                                f"with --set model.base={cfg.model.base}")
        warnings.append(changed)  # another base on purpose (--set model.base=...)
    code_then, code_now = meta.get("code") or {}, code_version()
    if code_identity(code_then) != code_identity(code_now):
        warnings.append(f"code version differs: {original.ref} was made at {_code_named(code_then)}, this is "
                        f"{_code_named(code_now)}")
    if code_then.get("git_dirty"):
        warnings.append(f"{original.ref} was made from a tree with uncommitted changes: its code cannot be pinned exactly")
    if code_now.get("git_dirty"):
        warnings.append("this tree has uncommitted changes")
    pk_then, pk_now = meta.get("packages") or {}, package_versions()
    packages = {k: {"original": pk_then.get(k), "reproduction": pk_now.get(k)}
                for k in sorted(pk_then.keys() | pk_now.keys()) if pk_then.get(k) != pk_now.get(k)}
    if packages:
        warnings.append("package versions differ: " + ", ".join(f"{k} {v['original']} -> {v['reproduction']}" for k, v in packages.items()))
    if (setup := _other_setup(original.ref, meta.get("training") or {}, finetune.trained_on(cfg.train.precision))):
        warnings.append(setup)
    diff = config_diff(meta["config"], cfg.to_dict())
    # Under torchrun (a model trained by several processes is rebuilt by as many) the others only train, with the main
    # process, which says what differs, compares and records; they failed on the version they do not publish before.
    follower = is_follower()
    for w in warnings if not follower else ():
        log.warning(w)

    stop, stopper = (meta.get("training") or {}).get("stopped_at_step"), None
    if stop is not None:  # stopped by a callback its config does not name, maybe: the rebuild stops where it did
        from pipeline.callbacks import StopAtStep

        of = meta["training"].get("max_steps")
        stopper = StopAtStep(stop, of=of)
        log.info("%s stopped training at step %d of %s (early stopping, or a sweep's pruner, which its config does not "
                 "name): the rebuild stops there too, if it has as many steps", original.ref, stop, of or "?")
    torch_threads_within_quota()  # first: the rebuild trains with the original's threads, whatever the quota
    with _threads_of(meta.get("training") or {}, original.ref):
        new = finetune.run(cfg, group=group, dataset=dataset.ref, aliases=(), base=pinned, tags=("reproduction",),
                           summary={"reproduces": original.ref}, callbacks=(stopper,) if stopper else ())
    if follower:
        return new
    if stopper is not None and not stopper.applied:
        stop = None  # another schedule (--set train.epochs=...): trained in full
    rebuilt = registry.resolve(new.produced[0])
    same_digest = rebuilt.digest == original.digest
    files_then, files_now = _files(original), _files(rebuilt)
    differ = sorted(p for p in files_then.keys() | files_now.keys() if files_then.get(p) != files_now.get(p))
    # e.g. a renamed model (--set model.name=...): the same weights, but training_config.json and the card differ
    same_weights = any(p.endswith(WEIGHT_SUFFIXES) for p in files_then) and not any(p.endswith(WEIGHT_SUFFIXES) for p in differ)
    validation = _metric_diff((meta.get("metrics") or {}).get("best") or {},
                              (rebuilt.metadata.get("metrics") or {}).get("best") or {})
    test = _compare_test(registry, dataset, original, rebuilt, cfg)
    worst = max([abs(v["delta"]) for v in validation.values()] + [abs(v["delta"]) for v in test["metrics"].values()],
                default=0.0)
    matches = within(worst, tolerance, test["predictions_differ"])
    status = "failed" if check and not matches else "ok"
    if same_digest:
        summary = f"{rebuilt.ref} reproduces {original.ref} bit for bit: same digest, so the registry kept one version"
        if new.details.get("latest_again"):  # publishing its content again put `latest` on it, as on W&B
            summary += f"; {new.details['latest_again']}"
    elif same_weights and matches:
        summary = (f"{rebuilt.ref} has the same weights as {original.ref}, bit for bit; other files differ "
                   f"({', '.join(differ)}), so it is a new version")
    elif matches:
        summary = f"{rebuilt.ref} matches {original.ref} within {tolerance} (weights differ: new version {rebuilt.ref})"
    else:
        summary = (f"{rebuilt.ref} differs from {original.ref}: largest metric difference {worst:.6g} > {tolerance}; "
                   f"{test['predictions_differ']} of {test['rows']} {test['split']} predictions differ")
    _record(registry, original.ref, {
        "run": new.run_id, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": rebuilt.ref,
        "same_digest": same_digest, "same_weights": same_weights, "matches": matches, "tolerance": tolerance,
        "max_abs_metric_delta": worst, "test_predictions_differ": test["predictions_differ"], "test_rows": test["rows"],
        "split": test["split"]})
    return StageResult(
        stage=STAGE,
        status=status,
        run_id=new.run_id,
        consumed=[original.ref, dataset.ref],
        produced=new.produced,
        metrics={"max_abs_metric_delta": worst, "test_predictions_differ": float(test["predictions_differ"]),
                 **{f"reproduction_eval_{k}": v["reproduction"] for k, v in validation.items()}},
        paths=new.paths,
        message=summary,
        details={
            "original": original.ref,
            "reproduction": rebuilt.ref,
            "same_digest": same_digest,
            "same_weights": same_weights,
            "files_differ": differ,
            "matches": matches,
            "tolerance": tolerance,
            "stopped_at_step": stop,
            "config_diff": diff,
            "dataset": {"ref": dataset.ref, "recorded_digest": ds_digest, "digest": dataset.digest,
                        "same": ds_digest == dataset.digest},
            "base_model": {"id": base.id, "recorded_digest": recorded_base.get("digest"), "digest": base.digest,
                           "same": recorded_base.get("digest") == base.digest},
            "code": {"original": code_then, "reproduction": code_now},
            "packages_differ": packages,
            "validation_metrics": validation,
            "test": test,
            "warnings": warnings,
        },
    )


@contextlib.contextmanager
def _threads_of(training: dict[str, Any], ref: str) -> Iterator[None]:
    """torch's CPU threads set to those a CPU-trained original recorded, while the rebuild trains: the number of
    threads decides how each sum is split, and another number gives other last bits of the weights."""
    import torch

    threads, before = training.get("threads"), torch.get_num_threads()
    if not str(training.get("device")).startswith("cpu") or not threads or threads == before:
        yield
        return
    log.info("%s was trained with %d CPU threads; the rebuild trains with as many (this machine's default: %d)", ref,
             threads, before)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _other_setup(ref: str, then: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What a rebuild cannot make the same about how the original was trained: another device, precision or number of
    processes (each takes a batch: two processes train on twice the rows a step); None when the original recorded the
    same (or, made before they were recorded, nothing)."""
    keys = ("device", "precision", "processes")
    if then.get("device") == "cpu" and now["device"].startswith("cpu:"):  # recorded before the CPU was named
        then = {**then, "device": now["device"]}
    if not any(k in then for k in keys) or all(then.get(k, now[k]) == now[k] for k in keys):
        return None

    def said(t: dict[str, Any]) -> str:
        n = t.get("processes", 1)
        return f"on {t.get('device', '?')} in {t.get('precision', '?')} by {n} process{'es' if n != 1 else ''}"

    return (f"{ref} was trained {said(then)}; this rebuild runs {said(now)}: another device, precision or number of "
            "processes (each takes a batch) gives other weights")


def _code_named(code: dict[str, Any]) -> str:
    """A code version as a warning names it: its commit, or an installed package by the digest of its files."""
    if code.get("git_commit"):
        return f"commit {code['git_commit']}"
    if code.get("package_digest"):
        return f"an installed package (files {code['package_digest'][:12]})"
    return "code that recorded no version"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _record(registry, ref: str, record: dict[str, Any]) -> None:
    """Add a reproduction's outcome to the original version's metadata (``reproductions``), which `artifacts show`
    and `lineage` read: a model that was rebuilt says so, and how closely. (The rebuild may have published to this
    very version, the same digest: `append_record` reads the metadata as it is then.)"""
    from pipeline.registry.base import append_record

    try:
        append_record(registry, ref, "reproductions", record)
    except Exception as e:  # noqa: BLE001 - online, another project's version this key may not write: the outcome stands
        log.warning("the reproduction's outcome could not be recorded on %s: %s", ref, e)


def _files(version) -> dict[str, str]:
    """A version's files, path -> content digest."""
    return {f.path: f.digest for f in version.files}


def _compare_test(registry, dataset, original, rebuilt, cfg: Config) -> dict[str, Any]:
    """Both models on the dataset's test split (validation where it has no test rows): metrics and differing predictions."""
    from pipeline.stages.evaluate import _read_split, score

    split = "test" if (dataset.metadata.get("num_rows") or {}).get("test", 1) else "validation"
    rows = _read_split(registry.fetch(dataset).path, split, dataset.ref)
    labels = list(original.metadata.get("label_names") or dataset.metadata["label_names"])
    e = cfg.evaluate
    trust = cfg.model.trust_remote_code
    a = score(registry.fetch(original).path, rows, labels, e.batch_size, e.calibration_bins, original.ref, trust)
    b = a if rebuilt.ref == original.ref else score(registry.fetch(rebuilt).path, rows, labels, e.batch_size,
                                                    e.calibration_bins, rebuilt.ref, trust)
    differ = int((a.probs.argmax(axis=1) != b.probs.argmax(axis=1)).sum())
    return {
        "split": split,
        "rows": len(rows["text"]),
        "predictions_differ": differ,
        "max_abs_probability_delta": float(np.abs(a.probs - b.probs).max()) if len(a.probs) else 0.0,
        "metrics": _metric_diff(a.metrics, b.metrics),
    }
