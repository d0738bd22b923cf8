"""Errors a user can act on.

A `PipelineError` is a user-facing problem (bad config, unknown reference, tampered file):
the CLI prints its message without a traceback and exits with its `exit_code`. Anything else
is a bug and keeps its full traceback.
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PipelineError(Exception):
    """A problem the user can fix; printed as one message, no traceback."""

    exit_code = 2


class ConfigError(PipelineError):
    """The config file, an override or an environment variable is invalid."""


class RefError(PipelineError):
    """An artifact reference cannot be parsed or does not resolve."""


class RegistryError(PipelineError):
    """The registry refused an operation (bad name, path escaping the target, ...)."""


class ProjectMismatch(RefError):
    """An artifact name of another W&B project, in a local registry that several projects share."""


class AliasMoved(RegistryError):
    """A conditional alias move found the alias on another version than expected (a concurrent writer)."""

    def __init__(self, name: str, alias: str, current: str | None, expected: str | None):
        super().__init__(f"{name}:{alias} is on {current or 'no version'} now, not on {expected or 'no version'}; "
                         "it was not moved")
        self.current = current  # the exact name:vN the alias points at now; None when it is on no version


class DiskFull(PipelineError):
    """No space left where the pipeline writes; nothing half-written was published."""

    exit_code = 1

    def __init__(self, where: str | None = None):
        super().__init__(
            f"the disk is full{f' ({where})' if where else ''}: free space (tracking.dir holds the registry, runs and "
            "caches; `artifacts prune` deletes old versions) and run again. The registry publishes a version only "
            "once all its files are stored, so nothing half-written was published")


class OutOfMemory(PipelineError):
    """Training or scoring needed more memory than the device has: the message says which settings to lower.
    Nothing half-made was published."""

    exit_code = 1


# How torch words an allocation that failed: CUDA's and ROCm's (torch.OutOfMemoryError), Apple's MPS, the CPU's.
_OUT_OF_MEMORY_WORDS = ("CUDA out of memory", "HIP out of memory", "MPS backend out of memory",
                        "DefaultCPUAllocator: can't allocate memory")


TERMINATED = f"signal {int(signal.SIGTERM)}"  # the KeyboardInterrupt that SIGTERM becomes (`sigterm_as_interrupt`)


# A signal this soon after the same one is the same request: accelerate launch passes its SIGTERM on twice, 4 ms
# apart. Raised again, the second cut short what the first set going (a cleanup on the way out, a run being closed).
REPEATED_WITHIN_S = 1.0
_requested_at: dict[int, float] = {}


def repeated(signum: int) -> bool:
    """Whether `signum` is the same request as the one before it (within `REPEATED_WITHIN_S`); when not, the window
    counts from now. Every handler of the pipeline's asks it first."""
    now = time.monotonic()
    if now - _requested_at.get(signum, -math.inf) < REPEATED_WITHIN_S:
        return True
    _requested_at[signum] = now
    return False


def as_interrupt(signum: int) -> KeyboardInterrupt:
    """The KeyboardInterrupt that ends a stage for a signal (`TERMINATED` for SIGTERM; for SIGINT, Ctrl-C, the bare
    one Python's own handler raises)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else KeyboardInterrupt(f"signal {signum}")


def interrupt(signum, frame) -> None:
    """A signal handler: the signal as the KeyboardInterrupt that ends a stage, unless it repeats the one before."""
    if not repeated(signum):
        raise as_interrupt(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _answered_by(handler, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """`handler` answers `signals` while inside, then the ones before again; in the main thread only (Python runs
    signal handlers there, and only there may they be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def on_sigterm(handler):
    """`handler` answers SIGTERM while inside, then the one before again; in the main thread only."""
    return _answered_by(handler, (signal.SIGTERM,))


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """While inside (a run being closed), the first SIGINT or SIGTERM waits: it is noted in the list yielded, for the
    caller to act on once out; a second one stops at once, unless it repeats the one before (`repeated`). A signal
    that came while W&B wrote a run's end interrupted it, and W&B's exit hook then wrote a second end, exit 0, so that
    a killed run read as finished: accelerate launch passes its SIGTERM on twice, 4 ms apart (the second came as the
    first closed the run), and so do two Ctrl-Cs. In the main thread only, as `on_sigterm`."""
    got: list[int] = []

    def handler(signum, frame):
        if repeated(signum):
            return
        if got:
            raise as_interrupt(signum)
        got.append(signum)

    with _answered_by(handler):
        yield got


def sigterm_as_interrupt():
    """Turn SIGTERM (an orchestrator stopping the task) into KeyboardInterrupt while inside, so that a stage ends
    as on Ctrl-C: its W&B run marked killed, a finetune's checkpoints kept, nothing half-published."""
    return on_sigterm(interrupt)


def signals_as_interrupt():
    """The command line's: SIGTERM as KeyboardInterrupt (`sigterm_as_interrupt`), and Ctrl-C answered by the same
    handler, so that a second Ctrl-C within a second of the first is the same request (`repeated`), as a repeated
    SIGTERM is. Python's own handler raised KeyboardInterrupt again in whatever the first had set going (a cleanup on
    the way out, the result file), and the process then died of the signal, or printed a traceback. In the main
    thread only, as `on_sigterm`."""
    return _answered_by(interrupt)


def exit_on_signal() -> None:
    """For the rest of the process (the interpreter's exit: W&B's teardown, torch's finalizers), after the command is
    done: SIGINT or SIGTERM repeating the one that stopped it passes (`repeated`), and another ends the process at
    once (128 + the signal), where Python's handler printed a KeyboardInterrupt traceback from an exit handler. The
    command closed its runs, files and registry connections itself before this point."""
    def handler(signum, frame):
        if not repeated(signum):
            os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, handler)


def ignore_signals() -> None:
    """SIGINT and SIGTERM ignored, for the interpreter's last moments, once every exit handler has run: Python puts
    their default action back then, under which a Ctrl-C repeating the one that stopped the command (pressed twice,
    50 ms apart) killed the process by the signal instead of letting it end with its code (130). An exit handler
    registered before any other (`pipeline.cli.run`), so that it runs last."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then what caused it (``__cause__``, else ``__context__``), and so on; each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def out_of_memory(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is an allocation the device could not make (without importing torch)."""
    return any(isinstance(c, MemoryError) or type(c).__name__ == "OutOfMemoryError"
               or any(w in str(c) for w in _OUT_OF_MEMORY_WORDS) for c in _causes(e))


# How libraries word ENOSPC/EDQUOT when they do not raise an OSError (safetensors' Rust errors, among others).
_NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# Errors that do not say why, and mean a full disk when the disk has (almost) no room left: torch.save's
# stream writer ("unexpected pos ...", "failed writing file"), SQLite's WAL shared memory ("disk I/O error").
_UNSAID_WRITE_FAILURES = ("unexpected pos", "failed writing file", "disk I/O error")


def no_space_left(e: BaseException | None, where: str | os.PathLike | None = None) -> bool:
    """Whether `e` (or what caused it) is a full disk or quota. With `where`, a write failure that gives no
    reason counts too when the disk holding `where` has less than 1 MiB free."""
    for c in _causes(e):
        if isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(c)
        if any(w in text for w in _NO_SPACE_WORDS) or "database or disk is full" in text:
            return True
        if where is not None and any(w in text for w in _UNSAID_WRITE_FAILURES) and _nearly_full(where):
            return True
    return False


def full_path(e: BaseException) -> str | None:
    """The path on the full disk that `e` (a `no_space_left` error, or what caused it) names: a copy's or a
    rename's destination (``filename2``; its ``filename`` is the source, which may be on another disk), else the
    file written."""
    named = [c for c in _causes(e) if isinstance(c, OSError) and (c.filename2 or c.filename)]
    if not named:
        return None
    said = min(named, key=lambda c: c.errno not in (errno.ENOSPC, errno.EDQUOT))  # the first that said "no space"
    return str(said.filename2 or said.filename)


def _nearly_full(where: str | os.PathLike) -> bool:
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


class IntegrityError(PipelineError):
    """Stored bytes no longer match their recorded hash."""

    exit_code = 1


class StageFailed(PipelineError):
    """A stage finished with a non-ok status; `exit_code` says which."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def near_name(path: Path, looked_at: int = 10_000) -> str:
    """``; did you mean NAME?`` for a file or folder beside `path` whose name is close to its name, or nothing.
    Only the first `looked_at` entries of a huge folder are compared."""
    try:
        with os.scandir(path.parent) as entries:  # a dangling link's own name is not offered for it
            names = [e.name for _, e in zip(range(looked_at), entries) if not e.name.startswith(".") and e.name != path.name]
    except OSError:  # no such folder, or not one this user may list
        return ""
    close = closest(path.name, names)
    return f"; did you mean {path.parent / close if str(path.parent) != '.' else close}?" if close else ""


def did_you_mean(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'NAME'?)`` for the candidate closest to `word` in spelling, or nothing."""
    close = closest(word, candidates)
    return f" (did you mean {close!r}?)" if close else ""


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate a misspelt `word` probably is (difflib's ratio at least 0.75), or None: what every "did you
    mean" of the pipeline offers."""
    return next(iter(difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)), None)


def likely_match(name: str, candidates: list[str]) -> str | None:
    """The candidate `name` probably means: the same but for case or spacing, else a close spelling."""
    same = [c for c in candidates if " ".join(c.casefold().split()) == " ".join(name.casefold().split())]
    return same[0] if same else closest(name, candidates)


def near_label(found: str, listed: list[str]) -> str:
    """`found`, quoted, with the listed label it is probably meant to be."""
    near = likely_match(found, listed)
    return f"{found!r} (maybe {near!r})" if near else repr(found)
