"""The embedded local registry: a SQLite catalog plus a content-addressed object store.

Layout under ``<tracking.dir>/registry``::

    catalog.db              versions, files, aliases, runs, usage (lineage), verified fetches
    objects/sha256/ab/<hex> one read-only file per distinct content
    tmp/                    partial writes, renamed into ``objects/`` only when complete

A version row is inserted, with its files and aliases, in one ``BEGIN IMMEDIATE`` transaction
after every object it names is stored, so a crash or Ctrl-C mid-publish leaves no version, and
concurrent writers are serialised by SQLite (distinct version numbers, consistent catalog).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import refstore, runlock
from pipeline.errors import (AliasMoved, DiskFull, IntegrityError, PipelineError, ProjectMismatch, RefError, RegistryError,
                             did_you_mean, no_space_left)
from pipeline.redact import redact
from pipeline.refs import parse_ref, validate_alias, validate_name
from pipeline.registry.base import (
    ArtifactVersion,
    DeleteResult,
    FetchResult,
    FileEntry,
    PublishResult,
    VerifyReport,
    check_artifact_path,
    check_deletable,
    collect_files,
    refresh_extras,
    settable_alias,
    swap_into_place,
)

if TYPE_CHECKING:
    from pipeline.refstore import Reference
    from pipeline.tracking import TrackedRun

log = logging.getLogger(__name__)

# The commands that open a registry this user cannot write, read-only (`read_only`), as messages name them
READERS = "artifacts list, show, diff and verify, and lineage"
MOUNTS = "/proc/self/mounts"  # Linux: each mount's device, mount point and file system type
# File systems that processes on several machines share (a cluster's home or scratch). SQLite's WAL keeps its
# index in shared memory, which needs every process on one host: "WAL does not work over a network filesystem".
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph", "glusterfs",
    "fuse.glusterfs", "ocfs2", "gfs2", "panfs", "wekafs", "fuse.juicefs", "orangefs", "pvfs2", "afs", "9p",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "davfs",
})


def _cannot_write(error: Exception) -> bool:
    """Whether `error` says that this user may not write there (permissions, a read-only mount)."""
    if isinstance(error, OSError):
        return error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    return isinstance(error, sqlite3.OperationalError) and any(
        said in str(error) for said in ("readonly", "read-only", "unable to open database file"))


def network_file_system(path: Path) -> str | None:
    """The type of the network file system that `path` is on (``nfs4``, ``lustre``, ...); None on a local one, or
    where there is no mount table to read (not Linux)."""
    try:
        lines = Path(MOUNTS).read_text(errors="replace").splitlines()
    except OSError:
        return None
    target, longest, kind = os.path.realpath(path), -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # "\040" is a space
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > longest:  # the innermost mount holding the path
            longest, kind = len(point), fields[2]
    return kind if kind in NETWORK_FILE_SYSTEMS else None


# 2: files.ref (reference-mode entries); 3: versions.deleted_at; 4: fetches.dest relative to the tracking folder
# for copies inside it (see `_fetch_key`)
_SCHEMA_VERSION = 4
NOTHING_HERE = "nothing was published with this tracking.dir; a relative one starts from the current directory"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL,
    run_id TEXT,
    deleted_at TEXT,
    UNIQUE (name, version)
);
-- one live version per content: a deleted version's digest may be published again (as a new number)
CREATE UNIQUE INDEX IF NOT EXISTS versions_live_digest ON versions (name, digest) WHERE deleted_at IS NULL;
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    ref TEXT,
    PRIMARY KEY (version_id, path)
);
CREATE INDEX IF NOT EXISTS files_by_object ON files (sha256);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    project TEXT,
    job_type TEXT NOT NULL,
    run_group TEXT,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}',
    started_at TEXT NOT NULL,
    ended_at TEXT,
    wandb_dir TEXT,
    mode TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    run_id TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    used_at TEXT NOT NULL,
    PRIMARY KEY (run_id, version_id)
);
CREATE TABLE IF NOT EXISTS fetches (
    dest TEXT PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    digest TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    verified_at TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def manifest_digest(hashes: Mapping[str, str]) -> str:
    """A version's digest: covers every path and its content hash, order-independent."""
    h = hashlib.sha256()
    for path in sorted(hashes):
        h.update(f"{path}\t{hashes[path]}\n".encode())
    return h.hexdigest()


def hash_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, f.tell()


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _copy_object(src: Path, dst: Path) -> None:
    """Kernel-side copy of a source file that was just hashed, made durable before it is named."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """A tqdm bar on a terminal for big transfers; silent otherwise."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if total >= 256 << 20 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _copy_verified(src: Path, dst: Path, expected_sha256: str, progress: _Progress | None = None) -> bool:
    """Copy (in the kernel), then hash the copy itself: True when what landed in `dst` is right."""
    shutil.copyfile(src, dst)
    digest, size = hash_file(dst)
    if progress:
        progress.update(size)
    return digest == expected_sha256


class LocalRegistry:
    kind = "local"

    def __init__(self, root: str | Path, project: str | None = None, *, read_only: bool = False, consuming: bool = False):
        """`project`: the W&B project whose stages use this registry. One registry serves every project that shares
        a tracking.dir, but W&B keeps each project's artifacts apart; so a name belongs to the project whose run
        made its first version, and a registry opened for another project refuses it (`check_project`).
        Without `project` (``artifacts``, ``lineage``, reading a version to reproduce it) every name is open.

        `read_only`: for commands that only read. A registry this user cannot write (another account's, a
        read-only mount) is then read as it stands, and nothing is written there; any write is refused.

        Where there is no catalog yet, a registry opened `read_only` or `consuming` (by a stage that must find a
        version before it records anything) is `missing`: read as empty, and nothing is created."""
        self.root = Path(os.path.abspath(root))
        self.project = project
        self.objects = self.root / "objects" / "sha256"
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "catalog.db"
        self.live = self.root / "live"  # <run id>/training.lock: held by the process of each open run (`start_run`)
        self._holding: dict[str, contextlib.ExitStack] = {}
        self._read_only_uri: str | None = None  # set: the catalog is opened read-only, by this URI
        self.missing = (read_only or consuming) and not self.db_path.exists()  # read as empty, nothing created
        if self.missing:
            self._open_empty()
            return
        try:
            for d in (self.objects, self.tmp, self.live):  # live/ stays: a run's folder in it comes and goes
                d.mkdir(parents=True, exist_ok=True)
            self._init_schema()
        except (OSError, sqlite3.Error) as e:  # a file where a folder should be, no space, a damaged catalog
            if no_space_left(e, self.root):
                raise DiskFull(str(self.db_path)) from e
            if self.db_path.is_file() and _cannot_write(e):
                if read_only:
                    self._open_read_only()
                    return
                raise RegistryError(f"cannot write the local registry at {self.root} (under tracking.dir): this user "
                                    f"may not write there ({e}). {READERS}, read it as it stands; this command writes "
                                    "to it (a stage records its run there)") from None
            raise RegistryError(f"cannot open the local registry at {self.root} (under tracking.dir): {e}") from None

    def _open_read_only(self) -> None:
        """Read the catalog without writing anything beside it. SQLite's ``mode=ro`` still needs WAL's index file,
        which a cleanly closed catalog no longer has and a reader may not create; then the catalog is read as
        ``immutable``: as it stands (a read-only mount cannot change under it; another account's registry could, and
        a listing taken while it writes may miss what it writes)."""
        quoted = urllib.parse.quote(str(self.db_path))
        for uri in (f"file:{quoted}?mode=ro", f"file:{quoted}?mode=ro&immutable=1"):
            self._read_only_uri = uri
            try:
                with self._read() as conn:
                    current = conn.execute("PRAGMA user_version").fetchone()[0]
                    conn.execute("SELECT count(*) FROM versions").fetchone()
                break
            except (sqlite3.Error, PipelineError):
                continue
        else:
            raise RegistryError(f"cannot read the local registry at {self.root} (under tracking.dir), which this user "
                                "cannot write either")
        if current > _SCHEMA_VERSION:
            raise self._newer_schema(current)
        if current < _SCHEMA_VERSION:
            raise RegistryError(f"{self.db_path} was written by an older version of the pipeline (schema {current}), "
                                "and this user cannot write it to upgrade it: a stage run by its owner does")

    def _open_empty(self) -> None:
        """No catalog at `db_path` (a reading command run where nothing was published, from another folder say):
        an empty catalog in memory, so that the command reads nothing, and leaves no registry folder behind."""
        self._read_only_uri = f"file:pipeline-empty-registry-{uuid.uuid4().hex}?mode=memory&cache=shared"
        self._empty_catalog = self._connect()  # an in-memory database lasts while a connection to it is open
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self._empty_catalog.execute(stmt)

    @property
    def read_only(self) -> bool:
        """Whether the catalog was opened read-only (`read_only` allowed it, and this user cannot write the registry)."""
        return self._read_only_uri is not None

    def _newer_schema(self, current: int) -> RegistryError:
        return RegistryError(f"{self.db_path} was written by a newer version of the pipeline (schema {current}); upgrade")

    # -- catalog plumbing ------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._read_only_uri:
            conn = sqlite3.connect(self._read_only_uri, uri=True, timeout=120, isolation_level=None)
        else:
            conn = sqlite3.connect(self.db_path, timeout=120, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 120000")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction: all of it or none of it."""
        if self.missing:
            raise RegistryError(f"there is no registry at {self.root} ({NOTHING_HERE}): this command does not make one")
        if self._read_only_uri:
            raise RegistryError(f"the local registry at {self.root} is open read-only (this user cannot write it): "
                                f"only {READERS}, read it so")
        with self._full_disk_named():
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several queries."""
        with self._full_disk_named():
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                yield conn
                conn.execute("COMMIT")
            finally:
                conn.close()

    @contextmanager
    def _full_disk_named(self) -> Iterator[None]:
        """SQLite's errors on a full disk as `DiskFull`. Even a read fails there ("disk I/O error"):
        WAL mode creates its shared-memory file on the first connection."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if no_space_left(e, self.root):
                raise DiskFull(str(self.db_path)) from e
            raise

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            # WAL on a local disk (readers never wait for a writer); SQLite's rollback journal on a network file
            # system, where WAL does not work, as jobs on several machines share one catalog
            shared = network_file_system(self.root)
            journal = "delete" if shared else "wal"
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != journal:
                try:
                    now = conn.execute(f"PRAGMA journal_mode = {journal.upper()}").fetchone()[0]
                except sqlite3.OperationalError:  # "database is locked": another connection has it open
                    now = None
                if now != journal:  # the next command to open it alone switches it
                    log.warning("%s is on a %s file system, where SQLite's WAL does not work across machines, but "
                                "another process has it open now: it keeps WAL until a command opens it alone",
                                self.db_path, shared)
            # Off for this connection only, so an older catalog's versions table can be rebuilt
            # (SQLite's documented procedure); the references are checked before the commit.
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("BEGIN IMMEDIATE")
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > _SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise self._newer_schema(current)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(versions)")}
            rebuilt = bool(columns) and "deleted_at" not in columns  # a schema 1 or 2 catalog
            if rebuilt:
                self._rebuild_versions_table(conn)
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            if "ref" not in {r[1] for r in conn.execute("PRAGMA table_info(files)")}:  # a schema 1 catalog
                conn.execute("ALTER TABLE files ADD COLUMN ref TEXT")
            if 0 < current < 4:  # fetched copies under the tracking folder: named relative to it from now on
                home = str(self.root.parent) + os.sep
                conn.execute("UPDATE OR IGNORE fetches SET dest = substr(dest, ?) WHERE substr(dest, 1, ?) = ?",
                             (len(home) + 1, len(home), home))
            broken = conn.execute("PRAGMA foreign_key_check").fetchall() if rebuilt else []
            if broken:
                conn.execute("ROLLBACK")
                raise RegistryError(f"{self.db_path}: {len(broken)} catalog rows point at versions that do not exist")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()

    @staticmethod
    def _rebuild_versions_table(conn: sqlite3.Connection) -> None:
        """Schema 3: versions gain ``deleted_at``, and a digest is unique among live versions only.

        SQLite cannot drop a table constraint, so the table is copied into the new layout inside
        the caller's transaction (ids kept, so files, aliases, usage and fetches still match).
        """
        table = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS versions"):_SCHEMA.index(";")]
        conn.execute(table.replace("IF NOT EXISTS versions", "versions_rebuilt"))
        kept = "id, name, version, type, digest, size, metadata, created_at, run_id"
        conn.execute(f"INSERT INTO versions_rebuilt ({kept}) SELECT {kept} FROM versions")
        conn.execute("DROP TABLE versions")
        conn.execute("ALTER TABLE versions_rebuilt RENAME TO versions")

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def _object_intact(self, sha256: str, size: int, read: bool = False) -> bool:
        """The object is there, at its size (a stat), and with `read`, of its content (a hash of it)."""
        path = self.object_path(sha256)
        try:
            return path.stat().st_size == size and (not read or hash_file(path)[0] == sha256)
        except FileNotFoundError:
            return False

    def damaged_files(self, version: ArtifactVersion) -> list[str]:
        """The paths of `version`'s stored files whose object is missing or not at its size: a stat each, not a hash
        (`artifacts verify` reads the bytes). References, which live at their URI, are not looked at."""
        if not version.files:
            with self._read() as conn:
                version = self._load(conn, self._resolve_row(conn, version.ref, None))
        return [f.path for f in version.files if not f.ref and not self._object_intact(f.digest, f.size)]

    # -- reading -----------------------------------------------------------------------------
    def _load(self, conn: sqlite3.Connection, row: sqlite3.Row, with_files: bool = True) -> ArtifactVersion:
        vid = row["id"]
        aliases = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias", (vid,))]
        used_by = [r[0] for r in conn.execute("SELECT run_id FROM usage WHERE version_id = ? ORDER BY used_at", (vid,))]
        files = []
        if with_files:
            files = [
                FileEntry(r["path"], r["sha256"], r["size"], r["ref"])
                for r in conn.execute("SELECT path, sha256, size, ref FROM files WHERE version_id = ? ORDER BY path", (vid,))
            ]
        return ArtifactVersion(
            name=row["name"],
            version=row["version"],
            type=row["type"],
            digest=row["digest"],
            size=row["size"],
            metadata=json.loads(row["metadata"]),
            aliases=aliases,
            created_at=row["created_at"],
            produced_by=row["run_id"],
            used_by=used_by,
            files=files,
            deleted_at=row["deleted_at"],
            project=(self._owner(conn, row["name"]) or {"project": None})["project"],
        )

    def _resolve_row(self, conn: sqlite3.Connection, ref: str, type: str | None,
                     include_deleted: bool = False) -> sqlite3.Row:
        r = parse_ref(ref)
        if r.entity or r.project:
            raise RefError(
                f"{ref!r} names an entity/project: such references resolve only in the W&B registry "
                f"(online mode); locally use {r.name}:{r.tag}"
            )
        versions = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (r.name,)).fetchall()
        if not versions:
            names = [x[0] for x in conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            if self.missing:
                raise RefError(f"no artifact named {r.name!r} in {self.root}; there is no registry there ({NOTHING_HERE})")
            known = ", ".join(names) if names else "none: the registry is empty"
            raise RefError(f"no artifact named {r.name!r} in {self.root}{did_you_mean(r.name, names)}; known artifacts: {known}")
        self._check_owner(conn, r.name, self.project)
        if r.version is not None:
            row = next((v for v in versions if v["version"] == r.version), None)
            if row is not None and row["deleted_at"] and not include_deleted:
                raise RefError(f"{r.name}:v{r.version} was deleted ({row['deleted_at'][:19]} UTC); its files are gone, "
                               "its record stays for lineage")
        else:
            hit = conn.execute("SELECT version_id FROM aliases WHERE name = ? AND alias = ?", (r.name, r.tag)).fetchone()
            row = next((v for v in versions if hit and v["id"] == hit[0]), None)
        if row is None:
            alias_rows = conn.execute(
                "SELECT a.alias, v.version FROM aliases a JOIN versions v ON v.id = a.version_id "
                "WHERE a.name = ? ORDER BY a.alias",
                (r.name,),
            ).fetchall()
            vs = ", ".join(f"v{v['version']}" + (" (deleted)" if v["deleted_at"] else "") for v in versions)
            al = ", ".join(f"{a[0]} -> v{a[1]}" for a in alias_rows) or "none"
            what, near = ("version", "") if r.version is not None else ("alias", did_you_mean(r.tag, [a[0] for a in alias_rows]))
            raise RefError(f"{r.name} has no {what} {r.tag!r}{near}; versions: {vs}; aliases: {al}")
        if type is not None and row["type"] != type:
            raise RefError(f"{r.name}:v{row['version']} is a {row['type']!r} artifact, not a {type!r} artifact")
        return row

    def check_project(self, name: str, project: str | None = None) -> None:
        """Raise `ProjectMismatch` when `name` belongs to another project than `project` (default: this registry's).
        Stages ask this before any work for the names they will publish."""
        with self._read() as conn:
            self._check_owner(conn, name, project or self.project)

    @staticmethod
    def _owner(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
        """The first version of `name` that a run of a known project made: (version, id, project) of that run."""
        return conn.execute("SELECT v.version, r.id, r.project FROM versions v JOIN runs r ON r.id = v.run_id "
                            "WHERE v.name = ? AND r.project IS NOT NULL ORDER BY v.version LIMIT 1", (name,)).fetchone()

    def _check_owner(self, conn: sqlite3.Connection, name: str, project: str | None) -> None:
        first = self._owner(conn, name) if project else None
        if first is not None and first["project"] != project:
            raise ProjectMismatch(
                f"{name!r} belongs to project {first['project']!r} in the local registry {self.root} (its run "
                f"{first['id']} made {name}:v{first['version']}), not to project {project!r}: W&B keeps each project's "
                "artifacts apart, and so does the local registry that the projects under one tracking.dir share. Name "
                "this project's artifacts otherwise (dataset.name, model.name), give it a tracking.dir of its own, or "
                f"set its project to {first['project']!r}")

    def resolve(self, ref: str, type: str | None = None, *, include_deleted: bool = False) -> ArtifactVersion:
        """The version `ref` names. A deleted version is a RefError saying so, unless `include_deleted`
        (lineage): then its record comes back with ``deleted_at`` set and no files."""
        with self._read() as conn:
            return self._load(conn, self._resolve_row(conn, ref, type, include_deleted))

    def list_versions(self, name: str | None = None, type: str | None = None) -> list[ArtifactVersion]:
        sql, args = "SELECT * FROM versions WHERE deleted_at IS NULL", []
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        if type:
            sql, args = sql + " AND type = ?", [*args, type]
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY name, version", args).fetchall()
            return [self._load(conn, row, with_files=False) for row in rows]

    def newest_where(self, name: str, type: str, where: Callable[[dict[str, Any]], bool]) -> ArtifactVersion | None:
        return next((v for v in reversed(self.list_versions(name, type)) if where(v.metadata)), None)

    def use(self, ref: str, run: TrackedRun | None, type: str | None = None) -> ArtifactVersion:
        """Resolve `ref` and record that `run` consumed it (a lineage edge)."""
        with self._write() as conn:
            row = self._resolve_row(conn, ref, type)
            if run is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO usage (run_id, version_id, used_at) VALUES (?, ?, ?)",
                    (run.id, row["id"], _now()),
                )
            version = self._load(conn, row)
        if run is not None:
            run.note_consumed(version.ref)
        return version

    # -- publishing --------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        type: str,
        files: Path | Mapping[str, Path],
        *,
        metadata: Mapping[str, Any] | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        run: TrackedRun | None = None,
        references: Mapping[str, Reference] | None = None,
    ) -> PublishResult:
        """Store `files` (a folder or {path: file}) as the next version of `name`.

        `references` ({path: Reference}) are recorded by URI and checksum instead of copied
        (reference mode): the digest covers them like stored files, and fetch reads and
        verifies them from their URI.
        """
        validate_name(name)
        validate_name(type)
        aliases = [validate_alias(a) for a in aliases if a != "latest"]
        owner = run.project if run is not None else self.project
        self.check_project(name, owner)  # before a byte is hashed or stored; again in the commit's transaction
        references = dict(references or {})
        entries = collect_files(files, references)
        meta = redact(dict(metadata or {}))
        try:
            meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RegistryError(f"artifact metadata for {name!r} is not plain JSON: {e}") from None

        total = sum(p.stat().st_size for p in entries.values())
        progress = _Progress(total, f"hashing {name}")
        hashed: dict[str, tuple[str, int]] = {}
        stats = {path: _stat_key(src) for path, src in entries.items()}
        try:
            for path, src in entries.items():
                hashed[path] = hash_file(src)
                progress.update(hashed[path][1])
        finally:
            progress.close()
        digest = manifest_digest({**{p: h for p, (h, _) in hashed.items()}, **{p: r.sha256 for p, r in references.items()}})

        created_objects: list[str] = []
        try:
            with self._read() as conn:
                known = conn.execute("SELECT 1 FROM versions WHERE name = ? AND digest = ? AND deleted_at IS NULL",
                                     (name, digest)).fetchone()
            # Only the objects the store lacks are copied: none for the digest of an existing version, unless some of
            # its stored files went missing or were damaged (`artifacts verify`), which these same bytes restore. Its
            # objects are hashed to see (as many bytes as were just hashed to find the digest); any other object
            # already there, shared with other versions, only has its size checked.
            created_objects = self._store_objects(entries, hashed, stats, name, hash_existing=bool(known))
            result = self._commit(name, type, digest, hashed, meta_json, aliases, run, created_objects, references, owner)
        except BaseException:
            self._discard_unreferenced(created_objects)
            raise
        if known and created_objects:
            created = set(created_objects)
            restored = sorted(p for p, (h, _) in hashed.items() if h in created)
            log.warning("%s: its stored %s %s missing or damaged; restored from the same files published again",
                        result.version.ref, ", ".join(restored), "was" if len(restored) == 1 else "were")
        if run is not None:
            run.note_produced(result.version.ref)
            run.log_artifact_files(
                result.version,
                {f.path: self.object_path(f.digest) for f in result.version.files if not f.ref},
                references={f.path: f.ref for f in result.version.files if f.ref},
            )
        return result

    def _store_objects(self, entries: Mapping[str, Path], hashed: Mapping[str, tuple[str, int]],
                       stats: Mapping[str, tuple[int, int, int]], name: str, hash_existing: bool = False) -> list[str]:
        """Copy the objects the store lacks (missing, or not at their size; with `hash_existing`, not of their
        content either); returns the ones this call created.

        A source whose size, mtime or inode moved since it was hashed is refused, so a file
        rewritten mid-publish can never be stored under the hash of its old content.
        """
        missing = {}
        for path, src in entries.items():
            sha, size = hashed[path]
            if sha not in missing and not self._object_intact(sha, size, hash_existing):
                missing[sha] = (path, src)
        created: list[str] = []
        progress = _Progress(sum(hashed[p][1] for p, _ in missing.values()), f"storing {name}")
        try:
            for sha, (path, src) in missing.items():
                final = self.object_path(sha)
                final.parent.mkdir(exist_ok=True)
                tmp = self.tmp / f"{sha}.{uuid.uuid4().hex}"
                try:
                    _copy_object(src, tmp)
                    progress.update(hashed[path][1])
                    if _stat_key(src) != stats[path] or tmp.stat().st_size != hashed[path][1]:
                        raise RegistryError(f"{src} changed while it was being published ({path}); publish again")
                    os.chmod(tmp, 0o444)
                    os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)
                created.append(sha)
        except BaseException:
            self._discard_unreferenced(created)
            raise
        finally:
            progress.close()
        return created

    def _commit(self, name, type, digest, hashed, meta_json, aliases, run, created_objects, references,
                owner: str | None = None) -> PublishResult:
        new = set(created_objects)
        stored = sum({h: size for h, size in hashed.values() if h in new}.values())  # each new object once
        with self._write() as conn:
            self._check_owner(conn, name, owner)  # another project's first version may have landed meanwhile
            types = {r[0] for r in conn.execute("SELECT DISTINCT type FROM versions WHERE name = ?", (name,))}
            if types and type not in types:
                raise RegistryError(f"{name!r} already exists with type {types.pop()!r}; cannot add a {type!r} version")
            row = conn.execute("SELECT * FROM versions WHERE name = ? AND digest = ? AND deleted_at IS NULL",
                               (name, digest)).fetchone()
            latest_before = self._latest(conn, name)
            created = row is None
            if created:
                # A concurrent clean-up may have removed an object we found present earlier:
                # under the write lock, make sure every object this version names is there.
                lost = sorted({h for h, _ in hashed.values() if not self.object_path(h).exists()})
                if lost:
                    raise RegistryError(f"objects vanished during publish of {name!r} ({len(lost)}); publish again")
                number = conn.execute(
                    "SELECT COALESCE(MAX(version) + 1, 0) FROM versions WHERE name = ?", (name,)
                ).fetchone()[0]
                size = sum(s for _, s in hashed.values()) + sum(r.size for r in references.values())
                cur = conn.execute(
                    "INSERT INTO versions (name, version, type, digest, size, metadata, created_at, run_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, number, type, digest, size, meta_json, _now(), run.id if run else None),
                )
                vid = cur.lastrowid
                conn.executemany(
                    "INSERT INTO files (version_id, path, sha256, size, ref) VALUES (?, ?, ?, ?, ?)",
                    [(vid, p, h, s, None) for p, (h, s) in sorted(hashed.items())]
                    + [(vid, p, r.sha256, r.size, r.uri) for p, r in sorted(references.items())],
                )
            else:
                vid = row["id"]
            # An existing version's content published again is `latest` again, as W&B merges a deduplicated
            # artifact's aliases (`latest` among them) into the version it matched.
            for alias in ("latest", *aliases):
                self._move_alias(conn, name, alias, vid)
            version = self._load(conn, conn.execute("SELECT * FROM versions WHERE id = ?", (vid,)).fetchone())
        return PublishResult(version=version, created=created, bytes_stored=stored if created else 0,
                             latest_before=latest_before)

    @staticmethod
    def _latest(conn: sqlite3.Connection, name: str) -> str | None:
        """The exact reference ``name:latest`` is on; None when no version holds it."""
        row = conn.execute("SELECT v.version FROM aliases a JOIN versions v ON v.id = a.version_id "
                           "WHERE a.name = ? AND a.alias = 'latest'", (name,)).fetchone()
        return f"{name}:v{row[0]}" if row else None

    @staticmethod
    def _move_alias(conn: sqlite3.Connection, name: str, alias: str, version_id: int) -> None:
        conn.execute(
            "INSERT INTO aliases (name, alias, version_id, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name, alias) DO UPDATE SET version_id = excluded.version_id, updated_at = excluded.updated_at",
            (name, alias, version_id, _now()),
        )

    def _discard_unreferenced(self, shas: list[str]) -> int:
        """Remove these objects unless a committed version uses them; returns the bytes removed.

        Under the write lock: a publish that found an object present and commits later sees it
        gone in its own check (`_commit`) and fails, rather than naming a missing object.
        """
        if not shas:
            return 0
        freed = 0
        with self._write() as conn:
            for sha in dict.fromkeys(shas):
                if not conn.execute("SELECT 1 FROM files WHERE sha256 = ? AND ref IS NULL LIMIT 1", (sha,)).fetchone():
                    obj = self.object_path(sha)
                    try:
                        size = obj.stat().st_size
                        obj.unlink()
                    except FileNotFoundError:
                        continue
                    freed += size
        return freed

    def delete(self, ref: str, *, delete_aliases: bool = False, force: bool = False, dry_run: bool = False) -> DeleteResult:
        """Delete a version (see `Registry.delete`); stored objects no other version names are removed.

        The catalog change is one transaction (the version's files and aliases go, `deleted_at` is
        set, `latest` moves back); the objects are removed after it, so a crash in between leaves
        unreferenced objects, never a live version without its bytes.
        """
        with self._write() as conn:
            row = self._resolve_row(conn, ref, None)
            version = self._load(conn, row)
            dependents = [f"{r[0]}:v{r[1]}" for r in conn.execute(
                "SELECT DISTINCT p.name, p.version FROM usage u JOIN versions p ON p.run_id = u.run_id "
                "WHERE u.version_id = ? AND p.id != ? AND p.deleted_at IS NULL ORDER BY p.name, p.version",
                (row["id"], row["id"]))]
            running = [(r[0], r[1]) for r in conn.execute(
                "SELECT r.id, r.job_type FROM usage u JOIN runs r ON r.id = u.run_id WHERE u.version_id = ? "
                "AND r.status = 'running' ORDER BY u.used_at", (row["id"],))]
            in_use = [f"run {run_id} ({job_type})" for run_id, job_type in running if self._alive(run_id)]
            held = check_deletable(version.ref, version.aliases, dependents, delete_aliases=delete_aliases, force=force,
                                   in_use=in_use)
            newest = conn.execute("SELECT id, version FROM versions WHERE name = ? AND deleted_at IS NULL AND id != ? "
                                  "ORDER BY version DESC LIMIT 1", (row["name"], row["id"])).fetchone()
            if "latest" in version.aliases:  # it moves to the newest version left
                latest_now = f"{row['name']}:v{newest['version']}" if newest is not None else None
            else:  # it stays where it is: on an older version whose content was published again, say
                latest_now = self._latest(conn, row["name"])
            objects = [f.digest for f in version.files if not f.ref]
            if dry_run:  # the same checks, and what would be freed: content no other version names
                alone = conn.execute(
                    "SELECT sha256, MAX(size) FROM files WHERE version_id = ? AND ref IS NULL AND sha256 NOT IN "
                    "(SELECT sha256 FROM files WHERE version_id != ? AND ref IS NULL) GROUP BY sha256",
                    (row["id"], row["id"])).fetchall()
                return DeleteResult(version=version, aliases_removed=held, latest_now=latest_now,
                                    bytes_freed=sum(r[1] for r in alone))
            conn.execute("DELETE FROM files WHERE version_id = ?", (row["id"],))
            conn.execute("DELETE FROM aliases WHERE version_id = ?", (row["id"],))
            conn.execute("UPDATE versions SET deleted_at = ? WHERE id = ?", (_now(), row["id"]))
            if newest is not None and "latest" in version.aliases:
                self._move_alias(conn, row["name"], "latest", newest["id"])
            copies = {r[0] for r in conn.execute("SELECT dest FROM fetches WHERE version_id = ?", (row["id"],))}
            record = self._load(conn, conn.execute("SELECT * FROM versions WHERE id = ?", (row["id"],)).fetchone())
        freed = self._discard_unreferenced(objects)
        # The registry's own fetched copy (tracking.dir/artifacts/NAME/vN) is a cache of the deleted
        # bytes: it goes too (as fetched, or changed since). Folders fetched elsewhere (a deployment) stay.
        removed = []
        default = self.default_fetch_dir(version)
        if default.is_dir():
            shutil.rmtree(default, ignore_errors=True)
            removed.append(str(default))
        if self._fetch_key(default) in copies:
            with self._write() as conn:
                conn.execute("DELETE FROM fetches WHERE dest = ? AND version_id = ?", (self._fetch_key(default), row["id"]))
        return DeleteResult(version=record, aliases_removed=held, latest_now=latest_now, bytes_freed=freed,
                            copies_removed=removed)

    def set_alias(self, ref: str, alias: str, *, expected: str | None | object = ...) -> ArtifactVersion:
        """Point `alias` at the version `ref` resolves to, taking it off any other version.

        With `expected`, a compare-and-set: the check and the move are one write transaction, so
        of two writers that both expect the same current version, exactly one moves the alias.
        """
        settable_alias(alias)
        with self._write() as conn:
            row = self._resolve_row(conn, ref, None)
            if expected is not ...:
                now = conn.execute("SELECT v.version FROM aliases a JOIN versions v ON v.id = a.version_id "
                                   "WHERE a.name = ? AND a.alias = ?", (row["name"], alias)).fetchone()
                current = f"{row['name']}:v{now[0]}" if now else None
                if current != expected:
                    raise AliasMoved(row["name"], alias, current, expected)
            self._move_alias(conn, row["name"], alias, row["id"])
            return self._load(conn, row)

    def remove_alias(self, ref: str) -> ArtifactVersion:
        alias = settable_alias(parse_ref(ref).tag)
        with self._write() as conn:
            row = self._resolve_row(conn, ref, None)  # the version that holds it (a RefError naming those there are)
            conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (row["name"], alias))
            return self._load(conn, row)

    def mark_latest(self, ref: str) -> ArtifactVersion:
        with self._write() as conn:
            row = self._resolve_row(conn, ref, None)
            self._move_alias(conn, row["name"], "latest", row["id"])
            return self._load(conn, row)

    def update_metadata(self, ref: str, patch: Mapping[str, Any]) -> ArtifactVersion:
        """Merge `patch` into a version's metadata (top-level keys). Content and digest stay as they are."""
        with self._write() as conn:
            row = self._resolve_row(conn, ref, None)
            meta = {**json.loads(row["metadata"]), **redact(dict(patch))}
            try:
                meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RegistryError(f"metadata for {ref!r} is not plain JSON: {e}") from None
            conn.execute("UPDATE versions SET metadata = ? WHERE id = ?", (meta_json, row["id"]))
            return self._load(conn, conn.execute("SELECT * FROM versions WHERE id = ?", (row["id"],)).fetchone())

    # -- fetching ----------------------------------------------------------------------------
    def default_fetch_dir(self, version: ArtifactVersion) -> Path:
        return self.root.parent / "artifacts" / version.name / f"v{version.version}"

    @staticmethod
    def _snapshot(dest: Path) -> dict[str, list[int]]:
        snap = {}
        for p in sorted(dest.rglob("*")):
            if p.is_file() or p.is_symlink():
                st = p.lstat()
                snap[p.relative_to(dest).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return snap

    def _fetch_key(self, dest: Path) -> str:
        """How the catalog names a fetched copy: relative to the tracking folder when it is inside it (the
        registry's own copies under ``artifacts/``), so they stay known, and reusable, when the whole
        folder is moved or copied to another place; by its absolute path elsewhere (a deployment)."""
        try:
            return dest.relative_to(self.root.parent).as_posix()
        except ValueError:
            return str(dest)

    def _as_fetched(self, dest: Path) -> str | None:
        """The digest the registry last fetched into `dest`, if the folder is still exactly as it wrote it."""
        if not dest.is_dir():
            return None
        with self._read() as conn:
            row = conn.execute("SELECT digest, snapshot FROM fetches WHERE dest = ?", (self._fetch_key(dest),)).fetchone()
        return row["digest"] if row and json.loads(row["snapshot"]) == self._snapshot(dest) else None

    def _reusable(self, dest: Path, version: ArtifactVersion) -> bool:
        return self._as_fetched(dest) == version.digest

    def fetch(
        self,
        version: ArtifactVersion,
        dest: Path | None = None,
        *,
        overwrite: bool = False,
        extras: Mapping[str, bytes] | None = None,
    ) -> FetchResult:
        """Copy a version into `dest`, verifying every byte; reuse a verified copy.

        The copy is built in a sibling temporary folder and renamed into place, so `dest` is
        never half-written; on a hash mismatch the old contents of `dest` stay as they were.
        `extras` are small files (a manifest) written into the same atomic swap.
        """
        if self.read_only and dest is None:  # its own copies live in the registry's folder, which this user cannot write
            raise RegistryError(f"the local registry at {self.root} is open read-only (this user cannot write it): a "
                                f"version is fetched from it only into a folder outside it, not into its own copy of {version.ref}")
        dest = Path(os.path.abspath(dest or self.default_fetch_dir(version)))
        if self.read_only:  # copied and verified all the same; neither the lock nor the fetch is recorded there
            return self._fetch(version, dest, overwrite, extras)
        # One fetch into a folder at a time: a second one (two trainings starting on the same dataset version)
        # waits, then finds the copy verified and reuses it, instead of swapping the folder under the first.
        with self._fetching(dest):
            return self._fetch(version, dest, overwrite, extras)

    @contextmanager
    def _fetching(self, dest: Path) -> Iterator[None]:
        """Hold the lock of fetches into `dest` (a file under the registry's root, named by the folder, so that the
        user's folders get no lock files); where ``fcntl`` is missing (Windows), no lock."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        locks = self.root / "locks"
        locks.mkdir(exist_ok=True)
        key = hashlib.sha256(self._fetch_key(dest).encode()).hexdigest()[:32]
        fd = os.open(locks / f"fetch-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            runlock.flock(fd, fcntl.LOCK_EX)  # released when the process ends, however it ends (none: no locks here)
            yield
        finally:
            os.close(fd)

    def _fetch(self, version: ArtifactVersion, dest: Path, overwrite: bool, extras: Mapping[str, bytes] | None) -> FetchResult:
        if not version.files:
            with self._read() as conn:
                version = self._load(conn, self._resolve_row(conn, version.ref, None))
        extras = dict(extras or {})
        for f in [*version.files, *(FileEntry(p, "", 0) for p in extras)]:
            check_artifact_path(f.path)
            if os.path.commonpath([dest, os.path.abspath(dest / f.path)]) != str(dest):
                raise RegistryError(f"refusing artifact path {f.path!r}: it escapes {dest}")
        clash = set(extras) & {f.path for f in version.files}
        if clash:
            raise RegistryError(f"extra files would overwrite artifact files: {sorted(clash)}")
        if self._reusable(dest, version):
            if refresh_extras(dest, extras):  # the version's files stay as verified; only what describes them moved on
                with self._write() as conn:
                    conn.execute("UPDATE fetches SET snapshot = ? WHERE dest = ?",
                                 (json.dumps(self._snapshot(dest)), self._fetch_key(dest)))
            return FetchResult(version=version, path=dest, reused=True)
        if dest.exists() and not dest.is_dir():
            raise RegistryError(f"cannot fetch into {dest}: it is a file")
        # The registry's own copy (tracking.dir/artifacts/NAME/vN) is a cache, fetched again when it is not as
        # fetched; any other folder is replaced only when the registry fetched into it before, or with `overwrite`.
        if dest.is_dir() and any(dest.iterdir()) and not overwrite and dest != self.default_fetch_dir(version):
            with self._read() as conn:
                ours = conn.execute("SELECT 1 FROM fetches WHERE dest = ?", (self._fetch_key(dest),)).fetchone()
            if not ours:
                raise RegistryError(f"{dest} already holds files that did not come from the registry; pass overwrite (--force) to replace them")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        progress = _Progress(version.size, f"fetching {version.ref}")
        try:
            staging.mkdir()
            for f in version.files:
                obj = self.object_path(f.digest)
                target = staging / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.ref:  # reference mode: the bytes live at the URI; read and verify them there
                    refstore.read_verified(refstore.Reference(f.ref, f.digest, f.size), target)
                    progress.update(f.size)
                    continue
                if not obj.is_file():
                    self.resolve(version.ref)  # a RefError saying so when the version was deleted meanwhile
                    raise IntegrityError(f"{version.ref}: stored object for {f.path} is missing ({obj}); run `artifacts verify`")
                if not _copy_verified(obj, target, f.digest, progress):
                    raise IntegrityError(
                        f"{version.ref}: {f.path} does not match its recorded sha256 {f.digest[:12]}...: "
                        f"the stored object {obj} was modified; run `artifacts verify`"
                    )
            for path, data in extras.items():
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).write_bytes(data)
            swap_into_place(staging, dest)
        finally:
            progress.close()
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        if self.read_only:
            return FetchResult(version=version, path=dest, reused=False)
        with self._write() as conn:
            vid = self._resolve_row(conn, version.ref, None)["id"]
            conn.execute(
                "INSERT INTO fetches (dest, version_id, digest, snapshot, verified_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (dest) DO UPDATE SET version_id = excluded.version_id, digest = excluded.digest,"
                " snapshot = excluded.snapshot, verified_at = excluded.verified_at",
                (self._fetch_key(dest), vid, version.digest, json.dumps(self._snapshot(dest)), _now()),
            )
        return FetchResult(version=version, path=dest, reused=False)

    # -- integrity ---------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Re-hash every stored object; name the versions each bad object affects."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT f.sha256, f.size, f.path, f.ref, v.name, v.version FROM files f JOIN versions v ON v.id = f.version_id"
            ).fetchall()
        users: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        refs: dict[tuple[str, str, int], list[str]] = {}
        for r in rows:
            if r["ref"]:
                refs.setdefault((r["ref"], r["sha256"], r["size"]), []).append(f"{r['name']}:v{r['version']} ({r['path']})")
                continue
            users.setdefault(r["sha256"], []).append(f"{r['name']}:v{r['version']} ({r['path']})")
            sizes[r["sha256"]] = r["size"]
        corrupt, missing, checked = {}, {}, 0
        progress = _Progress(sum(sizes.values()) + sum(k[2] for k in refs), "verifying objects")
        try:
            for sha, affected in sorted(users.items()):
                obj = self.object_path(sha)
                if not obj.is_file():
                    missing[sha] = sorted(affected)
                    continue
                actual, size = hash_file(obj)
                checked += size
                progress.update(size)
                if actual != sha:
                    corrupt[sha] = sorted(affected)
            for (uri, sha, size), affected in sorted(refs.items()):  # referenced files: keyed by their URI
                state = refstore.check(refstore.Reference(uri, sha, size))
                checked += size
                progress.update(size)
                if state != "ok":
                    (missing if state == "missing" else corrupt)[uri] = sorted(affected)
        finally:
            progress.close()
        return VerifyReport(objects_checked=len(users) + len(refs), bytes_checked=checked, corrupt=corrupt, missing=missing)

    # -- runs --------------------------------------------------------------------------------
    def start_run(self, run: TrackedRun) -> None:
        """Record `run` as running. Its process holds a lock (`runlock`) from now until `finish_run`; the kernel
        releases it however the process ends, so a run still 'running' whose lock is free was ended outright (the
        OOM killer, kill -9, a lost machine) and reads ``crashed``, as W&B calls such a run (`get_run`)."""
        holding = contextlib.ExitStack()
        try:
            holding.enter_context(runlock.hold(self.live / run.id, f"run {run.id}", doing="running"))
        except runlock.RunBusy:  # the run is open in another process as well (finetune refuses that before): its
            pass  # lock already says "alive"; refusing here would have the caller mark that process's run failed
        try:
            self._record_start(run)
        except BaseException:
            holding.close()
            raise
        self._holding[run.id] = holding

    def _record_start(self, run: TrackedRun) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (id, project, job_type, run_group, status, config, started_at, wandb_dir, mode)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = 'running', ended_at = NULL, wandb_dir = excluded.wandb_dir",
                (run.id, run.project, run.job_type, run.group, json.dumps(redact(run.config)), _now(),
                 str(run.wandb_dir) if run.wandb_dir else None, run.mode),
            )

    def finish_run(self, run: TrackedRun, status: str) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "UPDATE runs SET status = ?, summary = ?, ended_at = ? WHERE id = ?",
                    (status, json.dumps(redact(run.summary), default=str), _now(), run.id),
                )
        finally:  # the status is written (or cannot be): the lock that said "alive" goes, with its folder
            if (holding := self._holding.pop(run.id, None)) is not None:
                holding.close()

    def get_run(self, run_id: str) -> dict[str, Any]:
        out = self._run_record(run_id)
        # A run read as running whose lock nobody holds: its process is gone without closing it (`start_run`), or it
        # closed the run after this read's snapshot. A run writes its status before it lets go of the lock, so a
        # fresh read tells the two apart.
        if out["status"] == "running" and not self._alive(run_id):
            out = self._run_record(run_id)
            if out["status"] == "running":
                out["status"] = "crashed"
        return out

    def _alive(self, run_id: str) -> bool:
        """Whether a run the catalog says is running has a process that still holds its lock (`start_run`). Where
        locks do not work, no lock file is left to go by, and the catalog is taken at its word."""
        live = self.live / run_id
        return not (live / runlock.LOCK_FILE).exists() or runlock.holder(live) is not None

    def _run_record(self, run_id: str) -> dict[str, Any]:
        """A run as the catalog has it: its row, and the versions it produced and consumed."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RefError(f"no run {run_id!r} recorded in {self.root}")
            out = dict(row)
            out["config"] = json.loads(out["config"])
            out["summary"] = json.loads(out["summary"])
            out["produced"] = [
                f"{r[0]}:v{r[1]}" for r in conn.execute("SELECT name, version FROM versions WHERE run_id = ? ORDER BY id", (run_id,))
            ]
            # A run that published content an earlier version already held made no new version,
            # but it did produce that version: its summary says so.
            for ref in out["summary"].get("artifacts/produced") or []:
                if ref not in out["produced"]:
                    out["produced"].append(ref)
            out["consumed"] = [
                f"{r[0]}:v{r[1]}"
                for r in conn.execute(
                    "SELECT v.name, v.version FROM usage u JOIN versions v ON v.id = u.version_id WHERE u.run_id = ? ORDER BY u.used_at",
                    (run_id,),
                )
            ]
            return out
