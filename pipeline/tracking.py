"""Tracked runs: one W&B run per stage invocation, closed on every path.

`tracked_run` opens the run (offline, online or disabled), records it in the registry, and on
exit marks it finished, failed (an exception) or killed (Ctrl-C or SIGTERM) both in W&B and in
the registry, then re-raises so the command exits non-zero. Secrets are masked in everything
it hands to W&B or the registry.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets as _secrets
import string
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.errors import ConfigError, as_interrupt, sigterm_as_interrupt, signals_deferred
from pipeline.redact import redact

if TYPE_CHECKING:
    from pipeline.config import Config, TrackingConfig
    from pipeline.registry.base import ArtifactVersion, Registry

log = logging.getLogger(__name__)

_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def has_wandb_credentials() -> bool:
    """A W&B key in the environment or in ~/.netrc for the configured host (never read out)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(configured: str = "auto") -> str:
    """``online``, ``offline`` or ``disabled``: the config when set, else ``WANDB_MODE``, else by credentials."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _MODES:
            raise ConfigError(f"WANDB_MODE={env!r} is not one of online, offline, disabled (or run, dryrun)")
        return _MODES[env]
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if has_wandb_credentials() else "offline"


def open_registry(tracking: TrackingConfig, mode: str | None = None, *, project: str | None = None,
                  entity: str | None = None, scoped: bool = True, read_only: bool = False,
                  consuming: bool = False) -> Registry:
    """The registry for this mode: W&B when online (unless configured local), else local. A local registry is
    scoped to `project` (it refuses other projects' names) unless not `scoped`: for reading any version. With
    `read_only` (commands that only read), a local registry this user cannot write is read as it stands.
    `read_only` and `consuming` (a stage that reads a version before it records anything: finetune, evaluate,
    deploy-fetch, sweep, reproduce): where there is no local registry, none is made, and what the command looks up
    is not found there, saying so."""
    mode = mode or resolve_mode(tracking.mode)
    kind = tracking.registry
    if kind == "auto":
        kind = "wandb" if mode == "online" else "local"
    if kind == "wandb":
        if mode != "online":
            raise ConfigError(f"tracking.registry=wandb needs online mode, but the mode is {mode}")
        from pipeline.registry.wandb_registry import WandbRegistry

        wandb_home(tracking, mode)  # its downloads go through W&B's cache
        return WandbRegistry(project=project, entity=entity, link_registry=tracking.link_registry,
                             fetch_root=Path(tracking.dir) / "artifacts")  # where the local registry fetches too
    from pipeline.registry.local import LocalRegistry

    return LocalRegistry(Path(tracking.dir) / "registry", project=project if scoped else None, read_only=read_only,
                         consuming=consuming)


# W&B's folders outside its run folders, by the variable that moves each, and the name of its place under
# ``<W&B's root>/wandb-home`` when it moves: `wandb_home`.
_WANDB_HOME = {"WANDB_DATA_DIR": ("user_data_dir", "data"),  # staging: the files of tables and artifacts logged
               "WANDB_CACHE_DIR": ("user_cache_dir", "cache")}  # its artifact cache, and wandb-core's debug logs
_wandb_home_done: set[tuple[str, str]] = set()


def wandb_home(tracking: TrackingConfig, mode: str) -> None:
    """Where W&B keeps what is not in its run folders, set before it writes any (a variable the user set stays).

    W&B stages a copy of every table a run logs in its data folder (``~/.local/share/wandb``), and an offline run
    records where: `wandb sync` uploads the tables from there. Offline, that folder is ``wandb-home/data`` beside the
    run folders (``WANDB_DIR``, else ``tracking.dir``), so a run and its tables are kept, copied and deleted together:
    in the home folder they were lost with a container's home (the runs, on a volume, synced later without their
    tables), and stayed behind when run folders were deleted (32 files for the demo's four runs, each night).
    Online, the staged copies go once uploaded, and W&B's folders stay where W&B puts them, unless the home folder
    cannot be written (a container under another user id, a read-only root file system): each stage ended in a
    traceback at its first table there. Then they go under ``wandb-home`` too."""
    root = Path(_root_of(tracking)).absolute()
    if (str(root), mode) in _wandb_home_done:
        return
    _wandb_home_done.add((str(root), mode))
    for var, (kind, name) in _WANDB_HOME.items():
        if os.environ.get(var):
            continue
        moved = root / "wandb-home" / name
        if var == "WANDB_DATA_DIR" and mode == "offline":
            os.environ[var] = str(moved)
            continue
        from pipeline.homes import cannot_write

        default = _wandb_default(kind)
        problem = cannot_write(default)
        if problem is None:
            continue
        os.environ[var] = str(moved)
        log.info("W&B's folder %s cannot be written (%s): W&B uses %s instead (%s)", default, problem, moved, var)


def _wandb_default(kind: str) -> str:
    """The folder W&B takes by default (platformdirs' `user_data_dir` or `user_cache_dir` of "wandb"); on Linux read
    from the XDG variables as platformdirs reads them, without its import (8 ms of every stage's start)."""
    if sys.platform.startswith("linux"):
        from pipeline.homes import xdg_folder

        return os.path.join(xdg_folder(*{"user_data_dir": ("XDG_DATA_HOME", "~/.local/share"),
                                          "user_cache_dir": ("XDG_CACHE_HOME", "~/.cache")}[kind]), "wandb")
    import platformdirs  # W&B's own dependency

    return getattr(platformdirs, kind)("wandb")


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(_secrets.choice(alphabet) for _ in range(8))


@dataclass
class TrackedRun:
    """The handle a stage gets: log metrics, set summary values, and the registry to use."""

    id: str
    project: str
    job_type: str
    group: str | None
    mode: str
    config: dict[str, Any]
    registry: Registry
    wandb_run: Any = None
    wandb_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)
    # What the stage's failed result should tell besides the error (finetune: how to resume it)
    on_failure: dict[str, Any] = field(default_factory=dict)

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(dict(data), step=step)

    def set_summary(self, **values: Any) -> None:
        values = redact(values)
        self.summary.update(values)
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def note_consumed(self, ref: str) -> None:
        if ref not in self.consumed:
            self.consumed.append(ref)
            # W&B cannot record inputs of an offline run; the summary keeps them visible.
            self.set_summary(**{"artifacts/consumed": list(self.consumed)})

    def note_produced(self, ref: str) -> None:
        if ref not in self.produced:
            self.produced.append(ref)
            self.set_summary(**{"artifacts/produced": list(self.produced)})

    def log_artifact_files(self, version: ArtifactVersion, files: Mapping[str, Path],
                           references: Mapping[str, str] | None = None) -> None:
        """Log a locally stored version into this (offline) W&B run so `wandb sync` carries it.

        Files are added with ``policy="immutable"``: W&B points at the registry's read-only
        objects instead of copying them into its staging folder (wandb#7066).
        """
        if self.wandb_run is None or self.mode == "disabled":
            return
        from pipeline.registry.wandb_registry import make_wandb_artifact

        metadata = {**version.metadata, "registry": {"ref": version.ref, "digest": version.digest}}
        art = make_wandb_artifact(version.name, version.type, files, metadata, immutable=True, references=references)
        self.wandb_run.log_artifact(art, aliases=sorted(version.aliases))


def run_settings(config: Config):
    """The W&B settings of every run the pipeline opens: also for a run it opens itself (a sweep agent's trial),
    which would otherwise start from W&B's defaults (console capture on)."""
    _quicker_run_start()
    mode = resolve_mode(config.tracking.mode)
    wandb_home(config.tracking, mode)
    return _wandb_settings(mode)


def _wandb_settings(mode: str):
    import wandb

    # The console capture and code saving could copy secrets from argv or stdout into files.
    return wandb.Settings(mode=mode, silent=True, console="off", save_code=False, x_disable_meta=True)


def _no_pandas_import_to_spot_a_dataframe() -> None:
    """W&B asks of every logged value and table whether it is a pandas DataFrame, importing pandas to
    ask (0.2-0.5 s) wherever it is installed. No object is a DataFrame while pandas is not imported,
    so the question is answered from `sys.modules` instead; once anything imports pandas (datasets
    does, in finetune) the answer is the same as W&B's own."""
    import wandb.util

    if getattr(wandb.util, "is_pandas_data_frame", None) is None:  # a W&B without the hook: nothing to change
        return

    def is_pandas_data_frame(obj: Any) -> bool:
        frame = getattr(sys.modules.get("pandas"), "DataFrame", None)
        return isinstance(frame, type) and isinstance(obj, frame)

    wandb.util.is_pandas_data_frame = is_pandas_data_frame


def _installed_packages() -> Iterator[Any]:
    """What ``wandb.util.working_set`` lists (each installed distribution's name and version, for the run's
    requirements.txt), read from the metadata headers only. W&B's own parses every METADATA file in full, long
    description included, twice per package: 0.12 s of each run's start with 140 packages, against 0.01 s."""
    from importlib.metadata import distributions

    from wandb.util import InstalledDistribution

    for dist in distributions():
        try:
            text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        except (OSError, UnicodeDecodeError):
            continue
        found: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():  # the headers end at the first empty line
                break
            key, colon, value = line.partition(":")
            key = key.lower()
            if colon and not line[0].isspace() and key in ("name", "version") and key not in found:
                found[key] = value.strip()
                if len(found) == 2:
                    break
        if found.get("name") and found.get("version"):
            yield InstalledDistribution(key=found["name"], version=found["version"])


def _quick_package_list() -> None:
    """W&B lists the installed packages at each run's start with `_installed_packages` instead: the same list."""
    import wandb.util

    if callable(getattr(wandb.util, "working_set", None)) and hasattr(wandb.util, "InstalledDistribution"):
        wandb.util.working_set = _installed_packages


def _no_launch_import_without_launch_inputs() -> None:
    """Each ``wandb.init`` imports W&B Launch (its agent, its public API: 0.13 s of the run's start, 0.15-0.2 s of
    CPU) to apply the job inputs a process staged with ``wandb.sdk.launch.manage_config_file`` or
    ``manage_wandb_config``. Staging them imports that module, so where it is not imported there are none to
    apply, and the import is skipped; where it is (a Launch job that staged inputs), W&B's own method runs."""
    from wandb.sdk.wandb_run import Run

    apply = getattr(Run, "_detect_and_apply_job_inputs", None)
    if apply is None or getattr(apply, "_pipeline_wrapped", False):  # a W&B without it, or already wrapped
        return

    def detect_and_apply_job_inputs(self) -> None:
        if "wandb.sdk.launch.inputs.internal" in sys.modules:
            apply(self)

    detect_and_apply_job_inputs._pipeline_wrapped = True
    Run._detect_and_apply_job_inputs = detect_and_apply_job_inputs


def _quicker_run_start() -> None:
    """What W&B does at each run's start that the pipeline's runs do not need, done quicker or skipped; called
    before every run the pipeline opens (`tracked_run`, `run_settings`)."""
    _no_pandas_import_to_spot_a_dataframe()
    _quick_package_list()
    _no_launch_import_without_launch_inputs()


_warm_up: threading.Thread | None = None


def warm_up(config: Config) -> None:
    """Import W&B and start its service on another thread while the caller prepares its data.

    A cold ``import wandb`` plus its service start takes about a second of mostly Python work;
    dataset-publish spends as long in Arrow code that releases the GIL, so the two overlap.
    No run is opened here: a stage that stops on bad data still creates no run. Only the first
    stage of a process gains, so later calls do nothing; `tracked_run` waits for it to finish.
    """
    global _warm_up
    if _warm_up is not None or "wandb" in sys.modules:
        return
    mode = resolve_mode(config.tracking.mode)
    if mode == "disabled":
        return
    wandb_home(config.tracking, mode)  # before W&B's service starts: it opens its log there

    def work() -> None:
        try:
            import wandb

            wandb.setup(_wandb_settings(mode))  # starts W&B's service process and waits for it to listen
        except Exception:  # noqa: BLE001 - wandb.init reports any real problem when the run opens
            log.debug("W&B warm-up failed", exc_info=True)

    # Not a daemon: the interpreter waits for it before W&B's exit handlers run.
    _warm_up = threading.Thread(target=work, name="wandb-warm-up")
    _warm_up.start()


_watching: list[list[TrackedRun]] = []


@contextmanager
def runs_opened() -> Iterator[list[TrackedRun]]:
    """The runs `tracked_run` opens while inside, in order: what a stage that fails had opened and recorded
    (its run id, the versions it consumed), for its result file."""
    opened: list[TrackedRun] = []
    _watching.append(opened)
    try:
        yield opened
    finally:
        del _watching[next(i for i, w in enumerate(_watching) if w is opened)]  # by identity: empty lists are equal


def _tags(config: Config, tags) -> list[str]:
    """A stage run's tags: ``tracking.tags``, ``WANDB_TAGS`` (wandb.init's tags take the variable's place, and W&B
    users set it to tag every run) and the stage's own, once each, redacted."""
    from_env = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return redact(list(dict.fromkeys([*config.tracking.tags, *from_env, *tags])))


def _init(wandb, config, job_type, run, tags, notes, resolved, resume, root, mode):
    return wandb.init(
        project=config.project,
        entity=config.entity,
        job_type=job_type,
        group=run.group,
        tags=_tags(config, tags) or None,
        notes=redact(notes or config.tracking.notes),
        config=resolved,
        id=run.id,
        # said every time: each stage run has an id of its own, which WANDB_RESUME (meant for another script's run id)
        # must not decide on (online, `must` with a new id fails at init)
        resume="allow" if resume else "never",
        dir=root,
        settings=_wandb_settings(mode),
        # One stage run at a time, and it must be the global `wandb.run`: transformers'
        # WandbCallback logs through it (W&B does not support integrations with "create_new").
        reinit="finish_previous",
    )


# What the pipeline keeps under tracking.dir: the local registry (catalog and file store), its verified copies,
# finetune's checkpoints, the tokenisation cache, the sweeps' models, and W&B's staged tables of offline runs (and its
# cache where the home folder cannot be written: `wandb_home`); W&B's run folders go under `wandb_root`.
PIPELINE_FOLDERS = ("registry", "artifacts", "checkpoints", "cache", "sweeps", "wandb-home")


def _root_of(tracking: TrackingConfig) -> str:
    """``WANDB_DIR``, else ``tracking.dir``, ``~`` expanded as W&B reads it."""
    return os.path.expanduser(os.environ.get("WANDB_DIR") or str(tracking.dir))


def wandb_root(config: Config) -> str:
    """The folder W&B's run folders go under (made if missing): ``WANDB_DIR``, else ``tracking.dir``."""
    root = _root_of(config.tracking)
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = "WANDB_DIR" if os.environ.get("WANDB_DIR") else "tracking.dir"
        raise ConfigError(f"the W&B run folder {root} ({where}) cannot be created: {e.strerror}: {e.filename}") from None
    return root


@contextmanager
def tracked_run(
    config: Config,
    job_type: str,
    *,
    group: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    notes: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    registry: Registry | None = None,
    adopt: bool = False,
) -> Iterator[TrackedRun]:
    """Open one W&B run for a stage and close it on every path.

    Success marks it finished; an exception marks it failed (exit code 1); Ctrl-C or SIGTERM
    marks it killed (exit code 130). The exception is re-raised either way. With `adopt`, the
    W&B run already open in this process (a sweep agent's) is used and its id kept.
    """
    mode = resolve_mode(config.tracking.mode)
    registry = registry or open_registry(config.tracking, mode, project=config.project, entity=config.entity)
    resolved = redact(config.to_dict())
    run = TrackedRun(
        id=run_id or new_run_id(),
        project=config.project,
        job_type=job_type,
        group=redact(group or config.tracking.group),
        mode=mode,
        config=resolved,
        registry=registry,
    )
    if _warm_up is not None:
        _warm_up.join()
    if mode != "disabled":
        wandb_home(config.tracking, mode)
    import wandb

    _quicker_run_start()
    root = wandb_root(config)
    if adopt and wandb.run is not None:
        run.id = wandb.run.id
        run.wandb_run = wandb.run
        run.wandb_run.config.update(resolved, allow_val_change=True)
        # the tags the stage gives every run it opens: W&B's agent opened this one without them
        run.wandb_run.tags = tuple(dict.fromkeys([*_tags(config, tags), *(run.wandb_run.tags or ())]))
    else:
        run.wandb_run = _init(wandb, config, job_type, run, tags, notes, resolved, resume, root, mode)
    if mode != "disabled":
        run.wandb_dir = Path(run.wandb_run.dir).parent.resolve()
    for opened in _watching:
        opened.append(run)
    status, exit_code = "failed", 1
    try:
        registry.start_run(run)  # inside: a registry that cannot record the run (a full disk) still closes it
        with sigterm_as_interrupt():
            yield run
        status, exit_code = "finished", 0
    except KeyboardInterrupt:
        status, exit_code = "killed", 130
        raise
    finally:
        with signals_deferred() as signalled:  # the run is closed whole: see `signals_deferred`
            try:
                registry.finish_run(run, status)
            except Exception:
                if status == "finished":
                    status, exit_code = "failed", 1  # the stage fails with this error; W&B must not say finished
                    raise
                # The stage's own error is the one to report; this one would only hide it.
                log.warning("run %s could not be recorded as %s in the registry", run.id, status, exc_info=True)
            finally:
                run.wandb_run.finish(exit_code=exit_code)
                log.info("run %s (%s) %s", run.id, job_type, status)
        if signalled and status == "finished":  # asked to stop as the run ended: the command stops (the next stage
            raise as_interrupt(signalled[0])  # of `run` does not start); one that was ending anyway ends as it was
