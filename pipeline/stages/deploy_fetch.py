"""deploy-fetch: a verified local copy of a model version (default ``<model.name>:production``).

The version is first fetched into the registry's own verified copy and smoke-tested there (a
prediction must load the weights and give a known label with probabilities summing to one).
Only then is it copied into the target folder: built next to it, every file's hash checked,
and renamed into place with ``manifest.json``, so the target is never half-written and a
tampered or broken version leaves the old deployment untouched. The same verified version
already in place means no copy at all.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.basemodel import check_code_trusted
from pipeline.config import Config
from pipeline.errors import ConfigError, StageFailed
from pipeline.results import StageResult
from pipeline.tracking import PIPELINE_FOLDERS, open_registry, tracked_run, wandb_root

STAGE = "deploy-fetch"
MANIFEST = "manifest.json"
SMOKE_TEXT = "hello, I need some help with my account"
SMOKE_PAIR = "account access"  # the second text, for a sentence-pair model
log = logging.getLogger(__name__)


def smoke_test(model_dir: Path, label_names: list[str], trust_remote_code: bool = False) -> dict[str, Any]:
    from pipeline.predict import load

    pair = None
    try:
        classifier = load(model_dir, trust_remote_code=trust_remote_code)
        pair = [SMOKE_PAIR] if classifier.takes_pairs else None
        prediction = classifier.predict([SMOKE_TEXT], pair, top_k=len(label_names) or 3)[0]
    except Exception as e:  # noqa: BLE001 - any failure to load or run the model fails the smoke test
        raise StageFailed(f"smoke prediction failed on {model_dir}: {type(e).__name__}: {e}", exit_code=1) from e
    total = sum(p for _, p in prediction.top)
    if not math.isfinite(total):  # NaN would pass every comparison below
        raise StageFailed(f"smoke prediction gave probabilities that are not numbers ({total}): the weights are broken",
                          exit_code=1)
    # the label's name: predictions give 0 for "0" where the training data's source had numbers (labels.json)
    name = dict(zip(classifier.labels, classifier.label_names)).get(prediction.label, prediction.label)
    if label_names and name not in label_names:
        raise StageFailed(f"smoke prediction gave unknown label {name!r}; expected one of {label_names}", exit_code=1)
    if label_names and len(prediction.top) == len(label_names) and abs(total - 1.0) > 1e-3:
        raise StageFailed(f"smoke prediction probabilities sum to {total:.4f}, not 1", exit_code=1)
    return {"text": SMOKE_TEXT, **({"text_pair": SMOKE_PAIR} if pair else {}), "label": name,
            "confidence": round(prediction.confidence, 6)}


def run(config: Config, *, group: str | None = None, model: str | None = None, to: str | Path | None = None,
        force: bool = False) -> StageResult:
    registry = open_registry(config.tracking, project=config.project, entity=config.entity, consuming=True)
    version = registry.resolve(model or f"{config.model.name}:production", type="model")
    check_code_trusted(version, config.model.trust_remote_code)  # the smoke test would run its code
    dest = Path(to or config.deploy.dir).resolve()
    existing = _check_destination(dest, force, Path(config.tracking.dir).resolve(),
                                  Path(wandb_root(config)).resolve() / "wandb")
    with tracked_run(config, STAGE, group=group) as trun:
        reg = trun.registry
        version = reg.use(version.ref, trun, type="model")
        label_names = list(version.metadata.get("label_names") or [])
        evaluation = version.metadata.get("evaluation") or {}
        # replacing an earlier deployment of this model needs no --force; anything else does
        overwrite = force or bool(existing and existing.get("name") == version.name and "digest" in existing)
        in_place = bool(existing and existing.get("digest") == version.digest)  # this version, deployed before
        if in_place and existing.get("smoke"):
            smoke = existing["smoke"]  # these exact bytes passed the smoke test when first deployed
        else:
            verified = reg.fetch(version)  # the registry's verified copy: smoke-test it before deploying
            smoke = smoke_test(verified.path, label_names, config.model.trust_remote_code)
        manifest = {
            "ref": version.ref,
            "name": version.name,
            "version": f"v{version.version}",
            "digest": version.digest,
            "aliases": sorted(version.aliases),
            "dataset": version.metadata.get("dataset"),
            "input_columns": _input_columns(reg, version),
            "training_run": version.produced_by,
            "evaluation": {k: evaluation.get(k) for k in ("run_id", "dataset", "split", "metrics", "gate")} if evaluation else None,
            "base_model": (version.metadata.get("base_model") or {}).get("id"),
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "deploy_run": trun.id,
            **({k: existing[k] for k in ("fetched_at", "deploy_run") if existing.get(k)} if in_place else {}),
            "smoke": smoke,
            "files": [{"path": f.path, "sha256": f.digest, "size": f.size} for f in version.files],
        }
        # A verified copy of this version already in place is reused: its files as they are, its manifest brought
        # up to date (aliases and evaluation move on after a deployment) but still saying when and by which run
        # the files were fetched.
        fetched = reg.fetch(version, dest, overwrite=overwrite, extras={MANIFEST: _manifest_bytes(manifest)})
        if in_place and not fetched.reused:  # changed by hand, so fetched again now
            manifest |= {"fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "deploy_run": trun.id}
            reg.fetch(version, dest, overwrite=True, extras={MANIFEST: _manifest_bytes(manifest)})  # only the manifest
        trun.set_summary(**{"deployed": version.ref, "deploy/reused": fetched.reused, "deploy/dir": str(dest), "deploy/smoke_label": smoke and smoke.get("label")})
        log.info("%s %s %s", version.ref, "already in place at" if fetched.reused else "deployed to", dest)
    return StageResult(
        stage=STAGE,
        status="ok",
        run_id=trun.id,
        consumed=[version.ref],
        metrics={f"test_{k}": v for k, v in (evaluation.get("metrics") or {}).items() if isinstance(v, (int, float))},
        paths={"model_dir": str(dest), "manifest": str(dest / MANIFEST),
               "run_dir": str(trun.wandb_dir) if trun.wandb_dir else ""},
        message=f"{version.ref} {'already in place' if fetched.reused else 'deployed'} at {dest}",
        details={"reused": fetched.reused, "digest": version.digest, "smoke": smoke},
        printed=str(dest),  # DIR=$(python -m pipeline deploy-fetch ...)
    )


def _input_columns(reg, version) -> dict[str, str] | None:
    """The columns of the training data that held the model's inputs (and the row ids), read from its
    dataset version: `predict --input` reads files of the same shape without naming them. None when the
    version records no dataset, or it is gone or changed."""
    recorded = version.metadata.get("dataset") or {}
    if not recorded.get("ref"):
        return None
    try:
        dataset = reg.resolve(recorded["ref"], type="dataset")
    except Exception as e:  # noqa: BLE001 - deleted, or W&B unreachable: a convenience, never a failed deployment
        log.info("%s: its dataset %s cannot be read (%s); predict --input will need the column names", version.ref,
                 recorded["ref"], e)
        return None
    published = (dataset.metadata.get("config") or {}).get("dataset")  # the config it was published with
    if (recorded.get("digest") and dataset.digest != recorded["digest"]) or not isinstance(published, dict):
        return None
    columns = {k: published.get(f"{k}_column") for k in ("text", "text_pair", "id")}
    return {k: v for k, v in columns.items() if isinstance(v, str)} or None


def _check_destination(dest: Path, force: bool, tracking_dir: Path, wandb_runs: Path) -> dict[str, Any] | None:
    """The deployment now in `dest` (its manifest), after the checks made before a run is opened:
    it is not a folder whose replacement would take the registry, the current folder or the home
    folder with it (not even with --force), its parent can be created, it is not a file, and a folder
    holding something other than a deployment is replaced only with --force. A refusal here leaves no
    failed run in the model's lineage."""
    where = f"deploy folder {dest} (--to or deploy.dir)"
    for what, folder in (("the tracking folder (tracking.dir), which holds the registry", tracking_dir),
                         ("the current folder", Path.cwd().resolve()), ("your home folder", Path.home().resolve())):
        if dest == folder or dest in folder.parents:
            raise ConfigError(f"{where} is {what}, or holds it; deploy-fetch replaces the whole folder it deploys to, "
                              "so name a folder of its own, e.g. deploy/")
    # and not a folder the pipeline keeps: with --force, `--to .pipeline/registry` took the catalog of every version
    for kept in (*(tracking_dir / name for name in PIPELINE_FOLDERS), wandb_runs):
        if dest == kept or kept in dest.parents:
            raise ConfigError(f"{where} is inside {kept}, which the pipeline keeps (the registry, its copies, "
                              "checkpoints, caches, sweeps and W&B runs live under tracking.dir); deploy-fetch replaces "
                              "the whole folder it deploys to, so name a folder of its own, e.g. deploy/")
    try:  # where the copy is staged and renamed into place
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{where} cannot be created: {e.strerror}: {e.filename}") from None
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{where} is a file; name a folder")
    existing = _current(dest)
    if not force and existing is None and dest.is_dir() and any(dest.iterdir()):
        raise ConfigError(f"{where} already holds files that are not a deployment (no {MANIFEST}); pass --force to "
                          "replace them, or name another folder")
    return existing


def _current(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
