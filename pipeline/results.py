"""The result file an orchestrator reads (``--result-json PATH``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.redact import redact

if TYPE_CHECKING:
    from pipeline.tracking import TrackedRun

STATUSES = ("ok", "failed", "gate_failed", "unchanged")


@dataclass
class StageResult:
    stage: str
    status: str = "ok"
    run_id: str | None = None
    consumed: list[str] = field(default_factory=list)  # exact name:vN references
    produced: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # what the command prints on stdout instead of the versions produced (`stdout_line`); not in the result file
    printed: str | None = None

    def stdout_line(self) -> str:
        """What the command prints on stdout, for a script's ``$(...)``: the versions it produced, or what the stage
        says instead (deploy-fetch: the folder it deployed to; evaluate: the model version it judged). Empty: the
        command prints nothing there."""
        return self.printed if self.printed is not None else ", ".join(self.produced)

    def summary_line(self) -> str:
        """What a person reads when the stage ends: ``finetune: ok (clf:v4)``, ``evaluate: ok: clf:v4: promoted``."""
        made = f" ({', '.join(self.produced)})" if self.produced else ""
        return f"{self.stage}: {self.status}{made}" + (f": {self.message}" if self.message else "")

    def to_dict(self) -> dict[str, Any]:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        return redact(
            {
                "stage": self.stage,
                "status": self.status,
                "run_id": self.run_id,
                "consumed": list(self.consumed),
                "produced": list(self.produced),
                "metrics": {k: float(v) for k, v in self.metrics.items()},
                "paths": {k: str(v) for k, v in self.paths.items()},
                "message": self.message,
                **({"details": self.details} if self.details else {}),
            }
        )


def failed(stage: str, error: BaseException, runs: Sequence[TrackedRun] = ()) -> StageResult:
    """The result of a stage that stopped with `error`. When it had opened its run (the last of `runs`, from
    `tracking.runs_opened`), the result names that run, the versions it consumed (and any it produced), its
    folder, and what the stage added for a failure (finetune: the run id to resume)."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C says nothing; SIGTERM says "signal 15"
        message = f"interrupted ({error})" if str(error) else "interrupted"
    else:
        message = str(error) or type(error).__name__
    if not runs:
        return StageResult(stage=stage, status="failed", message=message)
    run = runs[-1]
    return StageResult(stage=stage, status="failed", run_id=run.id, consumed=list(run.consumed),
                       produced=list(run.produced), paths={"run_dir": str(run.wandb_dir)} if run.wandb_dir else {},
                       message=message, details=dict(run.on_failure))


def replaced_whole(path: Path) -> bool:
    """Whether a file written whole into a new file renamed over `path` takes its place as the caller means: not
    when `path` is a link, a device or a pipe (/dev/stdout), which the rename would replace (as root, the system's)
    instead of writing through it."""
    return not ((path.exists() and not path.is_file()) or path.is_symlink())


def check_writable(path: str | Path, option: str = "--result-json") -> None:
    """Refuse a path that cannot be written, before any work: a stage's result (or predict's table, `option`
    ``--output``) is not lost at the end."""
    from pipeline.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path")
    if not replaced_whole(path):
        raise ConfigError(f"{option} {path} is not a regular file (a link, a device or a pipe); give the path of "
                          "a file, which is replaced whole")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{option} {path} cannot be written: {e.strerror}: {e.filename}") from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(redact(data), f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
