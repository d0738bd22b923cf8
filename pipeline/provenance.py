"""What a model version records about how it was made: code version, packages, base model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = (
    "wandb-finetune-pipeline", "torch", "transformers", "tokenizers", "safetensors", "datasets", "evaluate",
    "accelerate", "wandb", "numpy", "pyarrow",
)
log = logging.getLogger(__name__)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


SIGNATURES_KEPT = 100  # per version: the input signatures it was made from (metadata["input_signatures"])


def code_and_packages() -> tuple[dict[str, Any], dict[str, str]]:
    """The pipeline's code version and the package versions, read once per run."""
    return code_version(), package_versions()


def signature(inputs: dict[str, Any]) -> str:
    """sha256 of `inputs` (JSON, keys sorted): what a stage's reuse finds a version made from them by."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def made_from(registry, name: str, type: str, signature: str | None):
    """The newest live version of `name` whose metadata records `signature` among its input signatures; None when
    there is none, or when some of its stored files are missing or damaged: making it again restores them (the same
    bytes published again; the local registry's `damaged_files`)."""
    if signature is None:
        return None
    version = registry.newest_where(name, type, lambda meta: signature in (meta.get("input_signatures") or []))
    damaged = registry.damaged_files(version) if version is not None and hasattr(registry, "damaged_files") else []
    if damaged:
        log.warning("%s was made from these same inputs, but its stored %s %s missing or damaged (`artifacts verify`); "
                    "it is made again, which restores %s when the bytes come out the same", version.ref,
                    ", ".join(damaged), "is" if len(damaged) == 1 else "are", "it" if len(damaged) == 1 else "them")
        return None
    return version


def add_signature(registry, version, signature: str | None) -> None:
    """Record that `version` (just published, or found to hold the same bytes) was made from the inputs `signature`
    names: more than one when other inputs (another commit, say) gave the same bytes."""
    known = list(version.metadata.get("input_signatures") or [])
    if signature and signature not in known:
        registry.update_metadata(version.ref, {"input_signatures": [*known, signature][-SIGNATURES_KEPT:]})


def code_version() -> dict[str, Any]:
    """The git commit of the pipeline's source and whether its files (the package) had uncommitted changes.

    ``git_commit`` is None when the package is not running from a git checkout of its own source
    (an installed wheel); ``package_digest`` (`package_digest`) then names the code, as the package's
    version cannot (every build of a branch says 0.1.0). That includes a wheel installed in a virtual
    environment inside another repository (a project's ``.venv``): git would answer with that
    repository's commit, so the package's files must be tracked there.
    """
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        tracked = commit.returncode == 0 and subprocess.run(
            ["git", "-C", str(src), "ls-files", "--error-unmatch", "--", Path(__file__).name],
            capture_output=True, text=True, timeout=10).returncode == 0
        if tracked:
            # the package's own files: an edited config or a new data file in the checkout is not a change of code
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                                    text=True, timeout=30)
            return {"git_commit": commit.stdout.strip(),
                    "git_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None, "package_digest": package_digest(src)}


def package_digest(package: Path) -> str:
    """sha256 over the sorted relative paths and contents of a package's Python files (``__pycache__`` aside):
    what names an installed pipeline's code exactly."""
    from pipeline.registry.local import hash_file, manifest_digest

    return manifest_digest({p.relative_to(package).as_posix(): hash_file(p)[0] for p in sorted(package.rglob("*.py"))
                            if "__pycache__" not in p.relative_to(package).parts})


def code_identity(code: dict[str, Any]) -> str | None:
    """What names a run's code in an input signature: its commit, or an installed package's `package_digest`."""
    return code.get("git_commit") or code.get("package_digest")


def folder_digest(folder: Path) -> str:
    """sha256 over the sorted relative paths and contents of every file in `folder` (hidden ones skipped)."""
    from pipeline.registry.local import hash_file, manifest_digest

    hashes = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            hashes[rel.as_posix()] = hash_file(p)[0]
    return manifest_digest(hashes)


def digest_text(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()
