from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SYSTEM_TMP = tempfile.gettempdir()  # the machine's, before `scratch_under_pytest` points temporary files elsewhere


@pytest.fixture(scope="session", autouse=True)
def scratch_under_pytest(tmp_path_factory) -> Iterator[Path]:
    """Temporary files of the code under test go under pytest's own temporary folder (which pytest prunes to the
    last three sessions), in this process and in every process a test starts: W&B's service sockets and media
    folders, torch.distributed's rendezvous folders, W&B Launch's config copies. A process that a test kills cannot
    clean up after itself, and a test run left some fifty such entries in /tmp each time."""
    scratch = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None  # computed again from TMPDIR
    try:
        yield scratch
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        tempfile.tempdir = None


def _go_offline(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    for var in list(os.environ):
        if var.startswith("WANDB_") or var in ("HF_TOKEN", "NETRC"):
            mp.delenv(var, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    # W&B's staging copies of every logged table (kept for `wandb sync`) and its service logs go under the test's
    # folder, not the home folder: they were never removed there, and a day of test runs left 2.3 GB in 568,000 files
    mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb-home" / "data"))
    mp.setenv("WANDB_CACHE_DIR", str(tmp / "wandb-home" / "cache"))
    mp.setenv("NETRC", str(tmp / "no-netrc"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """Every test runs offline with no W&B credentials, whatever the machine has."""
    _go_offline(monkeypatch, tmp_path)


@contextmanager
def offline(tmp: Path) -> Iterator[None]:
    """The same environment for module-scoped fixtures (which cannot use the autouse one)."""
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp, tmp)
        yield


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides: str) -> Config:
        base = [
            "dataset.name=tickets",
            f"dataset.source={tmp_path / 'data.csv'}",
            "model.name=clf",
            f"tracking.dir={tmp_path / 'track'}",
        ]
        return load_config(None, [*base, *overrides])

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def write_yaml(tmp_path: Path, cfg) -> Path:
    import yaml

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    return path


def torchrun(*args: str, cwd: Path, cpu: bool = True, script: Path | None = None, restarts: int = 0):
    """Two processes of `pipeline ARGS` (or of `script ARGS`) under torchrun; on the CPU (gloo) unless `cpu` is false,
    so that a machine with one GPU runs them too (NCCL wants a GPU per process). With `restarts`, torchrun starts
    them again when one fails (``--max-restarts``), with the stores of its attempts apart: shared, torch hands a
    restart the last attempt's addresses at times (`finetune.restart_store_hazard`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}),
           **({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if restarts else {})}
    program = [str(script)] if script is not None else ["-m", "pipeline"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           *(["--max-restarts", str(restarts)] if restarts else []), *program, *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def cli_here(monkeypatch, capsys):
    """`run_cli` in this process: ``pipeline.cli.main`` with the same arguments, for commands that load a model.

    A new process spends 3-4 s importing torch and transformers before a command starts; here they are
    loaded once. What the command sets for its own process (logging, progress-bar variables) is undone
    after each call. Behaviour that needs a process of its own (stdin, exit, import-time settings) is
    checked with `run_cli`.
    """
    import logging

    from pipeline import cli

    root = logging.getLogger()
    for library in cli._LIBRARIES:  # made before main makes them, so that they stay as the libraries make them
        logging.getLogger(library)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        environ, handlers, level = dict(os.environ), list(root.handlers), root.level
        raise_exceptions = logging.raiseExceptions
        try:
            code = cli.main([*args])
        finally:
            for var in set(os.environ) - set(environ):
                del os.environ[var]
            os.environ.update(environ)
            root.handlers[:] = handlers
            root.setLevel(level)
            logging.raiseExceptions = raise_exceptions
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["pipeline", *args], code, out.out, out.err)

    return run


def inspect_summary(run_dir: Path) -> dict:
    """What an offline run recorded, read back the way a user would."""
    wandb_bin = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_bin), "leet", "inspect", str(run_dir), "--summary", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def inspect_records(run_dir: Path) -> list[dict]:
    wandb_bin = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_bin), "leet", "inspect", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up (needs root, as on the CI machine)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(mnt: Path, leave_kib: int) -> Path:
    """A file that takes all but `leave_kib` KiB of the disk holding `mnt`."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_kib * 1024))
    return filler


def reg_runs(reg) -> list[dict]:
    """Every run a local registry's catalog records, oldest first."""
    import sqlite3

    with sqlite3.connect(reg.root / "catalog.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY started_at")]


def unused_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once (and a server may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` answering on a local port in a thread while the block runs; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
