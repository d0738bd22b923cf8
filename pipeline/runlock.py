"""Which finetune runs (and offline sweeps) are running now: the process holds a lock on the run's folder.

An interrupted run's folder and a running one's look alike (both hold checkpoints and a resume state
file), so without this a ``finetune --resume auto`` started while the run is still training (a cron
job that overlaps last night's, an orchestrator's retry while the first attempt is alive) would
continue the same run in a second process: two trainers rotating each other's checkpoints and
resuming one W&B run twice. The lock is an advisory ``flock`` on ``<folder>/training.lock``, taken
before the run's W&B run opens and held until the process ends; the kernel releases it however the
process ends (SIGKILL included), so a folder whose lock is free was left by a process that is gone.
An offline sweep holds the same lock on ``<tracking.dir>/sweeps/<id>`` for as long as it runs, so that no
second process goes on with it; an online sweep's agent holds it on a folder of its own
(``<tracking.dir>/sweeps/<id>.agent-<token>``), as several agents of one W&B sweep may run at once.
Where ``fcntl`` is missing (Windows), or the file system has no locks (Lustre without ``-o flock``), no run
counts as running, and nothing is refused for a lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

LOCK_FILE = "training.lock"
log = logging.getLogger(__name__)

# what flock answers, with LOCK_NB, when another process holds the lock
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
# what a file system without locks answers: Lustre mounted without -o flock ("Function not implemented"), some
# network mounts; 524 is the kernel's own ENOTSUPP, which Lustre has let through to user space
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, 524}
_said_no_locks = False


def flock(fd: int, operation: int) -> bool | None:
    """``fcntl.flock``: True when the lock is taken, False when another process holds it (with ``LOCK_NB``), None
    where the file system has no locks. There nothing is locked and nothing is refused for a lock, as where fcntl
    is missing (said once per process)."""
    import fcntl

    global _said_no_locks
    try:
        fcntl.flock(fd, operation)
    except OSError as e:
        if e.errno in _HELD:
            return False
        if e.errno not in _NO_LOCKS:
            raise
        if not _said_no_locks:
            _said_no_locks = True
            log.warning("this file system has no file locks (%s): a second process on the same run, sweep or "
                        "folder is not detected here", os.strerror(e.errno))
        return None
    return True


class RunBusy(PipelineError):
    """The run is training in another process now."""

    exit_code = 1

    def __init__(self, what: str, found: dict[str, Any], doing: str = "training"):
        super().__init__(f"{what} is {doing} now in another process ({describe(found)}); wait for it to end "
                         "(or stop it) before continuing it")


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h, since 2026-11-27T20:01:02+00:00``, from what `holder` found."""
    parts = [f"pid {holder['pid']}" if holder.get("pid") else "another process"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    said = " ".join(parts)
    return f"{said}, since {holder['since']}" if holder.get("since") else said


def holder(folder: Path | str) -> dict[str, Any] | None:
    """Who trains the run in `folder` now (``pid``, ``host``, ``since``; empty when it could not be read), or
    None when no process does."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # never locked, or its folder is being removed
        return None
    try:
        taken = flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if taken is False:  # held: the process training the run is alive
            return _read(fd)
        if taken:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(folder: Path | str, what: str, doing: str = "training") -> Iterator[None]:
    """Hold `folder`'s lock while the block runs (`what` and `doing`: the run and what it does, as a message says
    them); `RunBusy` when another process holds it. A folder that holds nothing but the lock when the block ends
    (the run stopped before it wrote anything, or removed its files when done) is removed, with the parents made
    for it that are empty."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # this folder and the parents made for it
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        taken = flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if taken is False:
            raise RunBusy(what, _read(fd), doing)
        if taken is None:  # no locks here: no lock file claims one
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK_FILE)
        else:
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with contextlib.suppress(OSError):  # who holds it is for messages only (a full disk may refuse even this)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            if only_the_lock(folder) or _empty(folder):  # empty: no locks here, so no lock file was left
                shutil.rmtree(folder, ignore_errors=True)
                for parent in made[1:]:  # those another process has put something in meanwhile stay
                    try:
                        parent.rmdir()
                    except OSError:
                        break
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(folder: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself (made when missing) while the block runs, waiting for as long as
    another process holds it: one step at a time across the processes of this machine that share the folder. A
    lock on the folder, not on a file in it, leaves nothing behind."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def remove_if_abandoned(folder: Path | str) -> bool:
    """Remove `folder` when it holds nothing but a lock that no process holds: what a process killed outright
    (SIGKILL runs no ``finally``) before it wrote anything leaves. Whether it did; it takes the lock first, so a
    process that holds it keeps its folder."""
    try:
        import fcntl
    except ImportError:
        return False
    folder = Path(folder)
    if not only_the_lock(folder):
        return False
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        if not flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):  # held (its process is alive, about to write there), or
            return False  # no locks here to tell
        if not only_the_lock(folder):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any]:
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def only_the_lock(folder: Path) -> bool:
    """Whether `folder` holds the lock file and nothing else."""
    try:
        return [p.name for p in folder.iterdir()] == [LOCK_FILE]
    except OSError:
        return False
