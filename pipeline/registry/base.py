"""The registry interface the stages talk to, whatever the tracking mode."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import RegistryError

if TYPE_CHECKING:
    from pipeline.refstore import Reference
    from pipeline.tracking import TrackedRun


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path inside the artifact
    digest: str  # sha256 hex locally; W&B's base64 MD5 online
    size: int
    ref: str | None = None  # reference mode: the file:// s3:// gs:// URI holding the bytes (no copy stored)


@dataclass
class ArtifactVersion:
    name: str
    version: int
    type: str
    digest: str
    size: int
    metadata: dict[str, Any]
    aliases: list[str]
    created_at: str
    produced_by: str | None = None  # run id
    used_by: list[str] = field(default_factory=list)  # run ids
    files: list[FileEntry] = field(default_factory=list)
    qualified_name: str | None = None  # entity/project/name:vN online
    deleted_at: str | None = None  # set on a deleted version's record (lineage keeps it; its files are gone)
    # the W&B project the name belongs to: online, the artifact's; locally, the project of the run that made the name's
    # first version (None when no run made one: published by hand)
    project: str | None = None
    # online, ``entity/project`` of a version outside the configured project (another project's, or a registry's
    # link): its exact reference carries them, so that it names this version wherever it is resolved again
    home: str | None = None

    @property
    def ref(self) -> str:
        """The exact reference, ``name:vN`` (``entity/project/name:vN`` for a version outside the configured
        project, online): what result files and lineage record, and what the stages resolve again."""
        return self.tagged(f"v{self.version}")

    def tagged(self, tag: str) -> str:
        """The reference to `tag` (an alias, ``latest``) of this version's name, where this version is."""
        return f"{self.home + '/' if self.home else ''}{self.name}:{tag}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": f"v{self.version}",
            "type": self.type,
            "digest": self.digest,
            "size": self.size,
            "aliases": sorted(self.aliases),
            "created_at": self.created_at,
            "project": self.project,
            "produced_by": self.produced_by,
            "used_by": list(self.used_by),
            "metadata": self.metadata,
            "files": [{"path": f.path, "digest": f.digest, "size": f.size, **({"ref": f.ref} if f.ref else {})}
                      for f in self.files],
            **({"deleted_at": self.deleted_at} if self.deleted_at else {}),
        }


@dataclass
class PublishResult:
    version: ArtifactVersion
    created: bool  # False: an existing version had the same digest; nothing new was stored
    bytes_stored: int  # bytes newly written to the object store
    latest_before: str | None = None  # where ``NAME:latest`` was (an exact ``name:vN``) before; None: on no version

    @property
    def ref(self) -> str:
        return self.version.ref

    def latest_again(self) -> str | None:
        """For content an older version holds, published again: that version is ``NAME:latest`` again (as on W&B),
        in words; None when the version is new, or `latest` was on it already."""
        return None if self.created else latest_again(self.version, self.latest_before)


def latest_again(version: ArtifactVersion, before: str | None) -> str | None:
    """``NAME:latest is NAME:vN again (it was NAME:vM)``: what is said when `latest` comes back to an older
    `version` from where it was `before`; None when it was on it already."""
    if before == version.ref:
        return None
    return f"{version.tagged('latest')} is {version.ref} again" + (f" (it was {before})" if before else "")


@dataclass
class FetchResult:
    version: ArtifactVersion
    path: Path
    reused: bool  # True: a verified copy was already there; nothing copied


@dataclass
class DeleteResult:
    version: ArtifactVersion  # the deleted version's record (``deleted_at`` set)
    aliases_removed: list[str]  # aliases it held, `latest` excepted (if it held it, it moves to the newest live version)
    latest_now: str | None  # where `latest` of the name points afterwards (None: no live version left)
    bytes_freed: int  # object-store bytes removed (content no other version shares)
    copies_removed: list[str] = field(default_factory=list)  # local copies removed: the registry's fetched copy, tokenised caches

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": self.version.ref, "aliases_removed": self.aliases_removed, "latest": self.latest_now,
                "bytes_freed": self.bytes_freed, "copies_removed": self.copies_removed}


@dataclass
class VerifyReport:
    objects_checked: int
    bytes_checked: int
    corrupt: dict[str, list[str]]  # object sha256 -> affected "name:vN (path)" entries
    missing: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing

    @property
    def affected_versions(self) -> list[str]:
        refs = {entry.split(" ")[0] for d in (self.corrupt, self.missing) for v in d.values() for entry in v}
        return sorted(refs)


class Registry(Protocol):
    """What a stage may do with artifacts. Two implementations: local and W&B."""

    kind: str
    missing: bool  # no registry where one was looked for, and none was made (a local one opened to read); W&B: never

    def resolve(self, ref: str, type: str | None = None, *, include_deleted: bool = False) -> ArtifactVersion: ...

    def check_project(self, name: str, project: str | None = None) -> None:
        """Raise `ProjectMismatch` when `name` is another project's (a local registry that projects share)."""
        ...

    def use(self, ref: str, run: TrackedRun | None, type: str | None = None) -> ArtifactVersion: ...

    def fetch(self, version: ArtifactVersion, dest: Path | None = None, *, overwrite: bool = False) -> FetchResult: ...

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
    ) -> PublishResult: ...

    def set_alias(self, ref: str, alias: str, *, expected: str | None | object = ...) -> ArtifactVersion:
        """Point `alias` at `ref`'s version. With `expected` (an exact ``name:vN``, or None for "on no
        version"), move it only if it is there now, else raise `AliasMoved` naming where it is."""
        ...

    def remove_alias(self, ref: str) -> ArtifactVersion:
        """Take the alias ``NAME:ALIAS`` (not ``latest``) off the version that holds it; that version, without it."""
        ...

    def mark_latest(self, ref: str) -> ArtifactVersion:
        """Put ``latest`` on `ref`'s version, as publishing its content again does (W&B merges the aliases of a
        logged artifact that dedupes to an existing version, ``latest`` among them, into that version): for a stage
        whose result is a version it knows it would publish again, without publishing (reuse)."""
        ...

    def update_metadata(self, ref: str, patch: Mapping[str, Any]) -> ArtifactVersion: ...

    def list_versions(self, name: str | None = None, type: str | None = None) -> list[ArtifactVersion]: ...

    def newest_where(self, name: str, type: str, where: Callable[[dict[str, Any]], bool]) -> ArtifactVersion | None:
        """The newest live version of `name` whose metadata `where` accepts; None when there is none."""
        ...

    def delete(self, ref: str, *, delete_aliases: bool = False, force: bool = False, dry_run: bool = False) -> DeleteResult:
        """Delete a version's files; its record stays for lineage and its number is never reused.

        Refused when it holds aliases other than `latest` (unless `delete_aliases`), and when live
        versions were made from it, which could then not be rebuilt (unless `force`). `dry_run`
        makes the same checks and reports what would happen, changing nothing."""
        ...

    def get_run(self, run_id: str) -> dict[str, Any]: ...

    def start_run(self, run: TrackedRun) -> None: ...

    def finish_run(self, run: TrackedRun, status: str) -> None: ...


def append_record(registry: Registry, ref: str, key: str, record: dict[str, Any], keep: int = 50) -> ArtifactVersion:
    """Add `record` to the list `key` of a version's metadata (its newest `keep`), as the metadata is when written,
    not as first read: the history of what was done to a version (`reproductions`, `alias_moves`)."""
    done = list(registry.resolve(ref).metadata.get(key) or [])
    return registry.update_metadata(ref, {key: [*done, record][-keep:]})


def put_latest(registry: Registry, ref: str) -> str | None:
    """`Registry.mark_latest` for a stage that reuses a version: None when ``latest`` is on it now, else why the
    registry refused (online, W&B manages ``latest``). A refusal leaves the reused version the stage's result."""
    try:
        registry.mark_latest(ref)
    except Exception as e:  # noqa: BLE001 - only the pointer did not move
        return str(e)
    return None


def settable_alias(alias: str) -> str:
    """`alias` when it may be set by hand (`set_alias`): a valid alias, and not ``latest``, which the registry moves."""
    from pipeline.refs import validate_alias

    validate_alias(alias)
    if alias == "latest":
        raise RegistryError("'latest' moves by itself to the version published last; it cannot be set or taken off by hand")
    return alias


def check_deletable(ref: str, aliases: list[str], dependents: list[str], *, delete_aliases: bool, force: bool,
                    in_use: list[str] = ()) -> list[str]:
    """The refusals of `Registry.delete`, the same in both registries; returns the aliases (not `latest`) that go.
    `in_use`: the runs running now that use the version (``run ID (JOB_TYPE)``): a finetune training on a dataset
    version would publish a model made from a deleted one, which could be neither evaluated nor reproduced."""
    held = [a for a in aliases if a != "latest"]
    if held and not delete_aliases:
        raise RegistryError(f"{ref} holds the alias(es) {', '.join(held)}; move them first, or pass "
                            "--delete-aliases to delete the version and its aliases")
    if dependents and not force:
        names = ", ".join(dependents)
        raise RegistryError(f"{ref} is what {names} {'was' if len(dependents) == 1 else 'were'} made from, which could "
                            f"not be reproduced without it; delete {names} first, or pass --force")
    if in_use and not force:
        raise RegistryError(f"{ref} is in use by {', '.join(in_use)}, running now: what {'it makes' if len(in_use) == 1 else 'they make'} "
                            "would be made from a deleted version; delete it once that has ended, or pass --force")
    return held


def swap_into_place(staging: Path, dest: Path) -> None:
    """Replace `dest` by the complete folder `staging` with renames: never a half-written `dest`."""
    import os
    import shutil
    import uuid

    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, dest)


def refresh_extras(dest: Path, extras: Mapping[str, bytes]) -> bool:
    """Bring the extra files (a manifest) of a reused fetch up to date, each replaced whole by a rename;
    True when any changed. The version's own files are not touched."""
    import os
    import uuid

    changed = False
    for path, data in extras.items():
        target = dest / check_artifact_path(path)
        try:
            if target.read_bytes() == data:
                continue
        except OSError:
            pass
        partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            partial.write_bytes(data)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        changed = True
    return changed


def check_artifact_path(path: str) -> str:
    """A manifest path must be relative, normalised, and stay inside the artifact."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        raise RegistryError(f"invalid path in artifact manifest: {path!r}")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise RegistryError(f"refusing artifact path {path!r}: it escapes the target directory or is not normalised")
    return str(p)


def collect_files(files: Path | Mapping[str, Path], references: Mapping[str, Reference] | None = None) -> dict[str, Path]:
    """Normalise a directory or a {artifact path: local file} mapping, checking every entry."""
    out: dict[str, Path] = {}
    references = references or {}
    for name in references:
        check_artifact_path(name)
    if isinstance(files, (str, Path)):
        root = Path(files)
        if not root.is_dir():
            raise RegistryError(f"cannot publish {root}: not a directory")
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[check_artifact_path(p.relative_to(root).as_posix())] = p
    else:
        for name, p in files.items():
            p = Path(p)
            if not p.is_file():
                raise RegistryError(f"cannot publish {name!r}: {p} is not a readable file")
            out[check_artifact_path(name)] = p
    if not out and not references:
        raise RegistryError("cannot publish an artifact with no files")
    clash = sorted(set(out) & set(references))
    if clash:
        raise RegistryError(f"paths both stored and referenced: {clash}")
    return out
