"""The W&B registry (online mode): artifacts, aliases and lineage live in W&B itself.

The calls are few and plain: `run.use_artifact`, `run.log_artifact`, `Api().artifact`,
`artifact.aliases` + `save()`, `artifact.download` + `verify`, `artifact.delete`, and
`run.link_artifact` when a W&B Registry is configured. W&B dedupes by digest server-side, keeps
`latest`, and moves an alias off the old version when it is added to a new one, the same rules as
the local registry.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AliasMoved, IntegrityError, RefError, RegistryError
from pipeline.redact import redact
from pipeline.refs import parse_ref, validate_alias, validate_name
from pipeline.registry.base import (
    ArtifactVersion,
    DeleteResult,
    FetchResult,
    FileEntry,
    PublishResult,
    check_artifact_path,
    check_deletable,
    collect_files,
    refresh_extras,
    settable_alias,
    swap_into_place,
)

if TYPE_CHECKING:
    from pipeline.tracking import TrackedRun


def make_wandb_artifact(name: str, type: str, files: Mapping[str, Path], metadata: Mapping[str, Any],
                        *, immutable: bool, references: Mapping[str, str] | None = None, online: bool = False):
    """A `wandb.Artifact` holding `files` under their artifact paths, and `references` ({path: URI}).

    ``immutable=True`` makes W&B reference the files where they lie instead of copying them into
    its staging folder: right for the local registry's read-only objects (wandb#7066).
    References go in with ``add_reference``; offline, only ``file://`` ones are checksummed by W&B
    (the others would need the cloud; the local registry holds their sha256).
    """
    import wandb

    art = wandb.Artifact(name, type=type, metadata=redact(dict(metadata)))
    for path, local in sorted(files.items()):
        art.add_file(os.path.abspath(local), name=check_artifact_path(path),
                     policy="immutable" if immutable else "mutable")
    for path, uri in sorted((references or {}).items()):
        if online or uri.startswith("file://"):
            art.add_reference(uri, name=check_artifact_path(path), checksum=True)
        else:
            _add_unchecked_reference(art, uri, check_artifact_path(path))
    return art


def _add_unchecked_reference(art, uri: str, name: str) -> None:
    """The entry ``add_reference(uri, checksum=False)`` makes for an s3:// or gs:// URI (the URI as its digest),
    made here: W&B's handlers import their cloud SDK (boto3, google-cloud-storage) before they look at
    `checksum`, and the pipeline needs neither (it reads those URIs through pyarrow), so an offline run
    without them could not log a reference-mode dataset."""
    from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

    art.manifest.add_entry(ArtifactManifestEntry(path=name, ref=uri, digest=uri))


class WandbRegistry:
    kind = "wandb"
    missing = False  # W&B holds the project's artifacts, whatever it holds

    def __init__(self, project: str, entity: str | None = None, link_registry: str | None = None,
                 fetch_root: Path | None = None):
        self.project = project
        self.fetch_root = Path(fetch_root) if fetch_root else Path("artifacts")  # default fetch folders go here
        self._entity = entity
        self.link_registry = link_registry
        self._api = None

    @property
    def api(self):
        if self._api is None:  # the public API talks to the server: only when first needed
            import wandb

            self._api = wandb.Api()
        return self._api

    @property
    def entity(self) -> str:
        return self._entity or self.api.default_entity

    def qualify(self, ref: str) -> str:
        """``entity/project/name:tag``: the configured entity and project fill what `ref` omits."""
        r = parse_ref(ref)
        entity = r.entity or self.entity
        return f"{entity}/{r.project or self.project}/{r.name}:{r.tag}"

    def to_version(self, art: Any) -> ArtifactVersion:
        """A W&B artifact as the registry's version. One outside the configured entity and project (another
        project's, or a link in W&B's registry) keeps them in its `ref`: resolved again with the config's
        project, a bare ``name:vN`` would name another version, or none."""
        producer, users = None, []
        try:
            run = art.logged_by()
            producer = self._run_id(run) if run else None
            users = [self._run_id(r) for r in art.used_by()]
        except Exception:  # lineage is best effort for listings; `lineage` asks again
            pass
        return ArtifactVersion(
            name=art.name.split(":")[0],
            version=int(str(art.version).lstrip("v")),
            type=art.type,
            digest=art.digest,
            size=int(art.size or 0),
            metadata=dict(art.metadata or {}),
            aliases=[a for a in art.aliases],
            created_at=str(art.created_at),
            produced_by=producer,
            used_by=users,
            files=[FileEntry(e.path, e.digest, int(e.size or 0)) for e in art.manifest.entries.values()],
            qualified_name=art.qualified_name,
            project=art.project,
            home=self._home(art),
        )

    def _home(self, thing: Any) -> str | None:
        """``entity/project`` of a W&B artifact or run outside the configured project; None inside it."""
        return None if (thing.project == self.project and thing.entity == self.entity) else f"{thing.entity}/{thing.project}"

    def _placed(self, thing: Any, name: str) -> str:
        """`name` (of a W&B artifact or run), led by ``entity/project/`` where `thing` is outside the configured project."""
        home = self._home(thing)
        return f"{home}/{name}" if home else name

    def _exact_ref(self, art: Any) -> str:
        """An artifact's exact reference (`ArtifactVersion.ref`) without reading its lineage and manifest."""
        return self._placed(art, art.name)

    def _run_id(self, run: Any) -> str:
        """A run's id; ``entity/project/id`` for a run of another project, which `get_run` finds there."""
        return self._placed(run, run.id)

    def _artifact(self, ref: str, type: str | None = None):
        import wandb

        q = self.qualify(ref)
        try:
            return self.api.artifact(q, type=type)
        except (wandb.errors.CommError, ValueError) as e:
            raise RefError(f"cannot resolve {q} in W&B: {e}") from None

    def check_project(self, name: str, project: str | None = None) -> None:
        """Nothing to check: W&B keeps each project's artifacts apart itself."""

    def resolve(self, ref: str, type: str | None = None, *, include_deleted: bool = False) -> ArtifactVersion:
        """`include_deleted` has no effect: W&B's API does not return deleted versions."""
        return self.to_version(self._artifact(ref, type))

    def use(self, ref: str, run: TrackedRun | None, type: str | None = None) -> ArtifactVersion:
        if run is None or run.wandb_run is None:
            return self.resolve(ref, type)
        import wandb

        q = self.qualify(ref)
        try:
            art = run.wandb_run.use_artifact(q, type=type)
        except (wandb.errors.CommError, ValueError) as e:
            raise RefError(f"cannot use {q} from W&B: {e}") from None
        version = self.to_version(art)
        run.note_consumed(version.ref)
        return version

    def fetch(self, version: ArtifactVersion, dest: Path | None = None, *, overwrite: bool = False,
              extras: Mapping[str, bytes] | None = None) -> FetchResult:
        from wandb.sdk.lib.hashutil import md5_file_b64

        art = self._artifact(version.qualified_name or version.ref)
        cache = Path(os.path.abspath(self.fetch_root / version.name / f"v{version.version}"))
        dest = Path(os.path.abspath(dest)) if dest else cache
        for f in version.files:
            check_artifact_path(f.path)
        if dest.is_dir() and all((dest / f.path).is_file() and md5_file_b64(dest / f.path) == f.digest for f in version.files):
            refresh_extras(dest, extras or {})  # the version's files stay as verified; only what describes them moved on
            return FetchResult(version=version, path=dest, reused=True)
        if dest.is_dir() and any(dest.iterdir()) and not overwrite and dest != cache:  # the cache is fetched again
            raise RegistryError(f"{dest} already holds other files; pass overwrite (--force) to replace them")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            art.download(root=str(staging))
            try:
                art.verify(root=str(staging))
            except ValueError as e:
                raise IntegrityError(f"{version.ref}: downloaded files fail verification: {e}") from None
            for path, data in (extras or {}).items():
                (staging / check_artifact_path(path)).write_bytes(data)
            swap_into_place(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return FetchResult(version=version, path=dest, reused=False)

    def publish(self, name: str, type: str, files: Path | Mapping[str, Path], *,
                metadata: Mapping[str, Any] | None = None, aliases: tuple[str, ...] | list[str] = (),
                run: TrackedRun | None = None, references: Mapping[str, Any] | None = None) -> PublishResult:
        validate_name(name)
        aliases = [validate_alias(a) for a in aliases if a != "latest"]
        if run is None or run.wandb_run is None:
            raise RegistryError("publishing to W&B needs a tracked run (artifacts are logged by runs)")
        entries = collect_files(files, references)
        meta = dict(metadata or {})
        if references:  # W&B checksums references by ETag/MD5; keep the sha256 the local registry verifies with
            meta["reference_sha256"] = {p: r.sha256 for p, r in references.items()}
        art = make_wandb_artifact(name, type, entries, meta, immutable=False,
                                  references={p: r.uri for p, r in (references or {}).items()}, online=True)
        try:
            before = self._artifact(f"{name}:latest", type).version
        except RefError:
            before = None
        logged = run.wandb_run.log_artifact(art, aliases=["latest", *aliases])
        logged.wait()
        final = self._artifact(f"{name}:{logged.version}", type)
        if self.link_registry and type == "model":
            run.wandb_run.link_artifact(final, f"wandb-registry-{self.link_registry}/{name}", aliases=aliases or None)
        version = self.to_version(final)
        # A version above the one `latest` was on is new, unless another run made it: `latest` sits on an older
        # version when that one's content was logged again, and W&B matches content to any live version.
        created = before is None or int(str(before).lstrip("v")) < version.version
        if created and version.produced_by is not None:
            created = version.produced_by.rsplit("/", 1)[-1] == run.wandb_run.id
        run.note_produced(version.ref)
        return PublishResult(version=version, created=created, bytes_stored=version.size if created else 0,
                             latest_before=f"{version.name}:{before}" if before is not None else None)

    def set_alias(self, ref: str, alias: str, *, expected: str | None | object = ...) -> ArtifactVersion:
        settable_alias(alias)
        art = self._artifact(ref)
        if expected is not ...:
            # W&B has no conditional alias write: this check narrows the race to the moment before save().
            name = art.name.split(":")[0]
            try:
                current = self.resolve(f"{name}:{alias}").ref
            except RefError:
                current = None
            if current != expected:
                raise AliasMoved(name, alias, current, expected)
        if alias not in art.aliases:
            art.aliases.append(alias)
            art.save()
        return self.to_version(art)

    def remove_alias(self, ref: str) -> ArtifactVersion:
        alias = settable_alias(parse_ref(ref).tag)
        art = self._artifact(ref)  # the version that holds it
        art.aliases.remove(alias)
        art.save()
        return self.to_version(art)

    def mark_latest(self, ref: str) -> ArtifactVersion:
        art = self._artifact(ref)
        if "latest" not in art.aliases:  # W&B takes an alias off the collection's other version when it is saved here
            art.aliases.append("latest")
            art.save()
        return self.to_version(art)

    def update_metadata(self, ref: str, patch: Mapping[str, Any]) -> ArtifactVersion:
        art = self._artifact(ref)
        art.metadata.update(redact(dict(patch)))
        art.save()
        return self.to_version(art)

    def list_versions(self, name: str | None = None, type: str | None = None) -> list[ArtifactVersion]:
        out = []
        for t in self.api.artifact_types(project=f"{self.entity}/{self.project}"):
            if type and t.name != type:
                continue
            for coll in t.collections():
                if name and coll.name != name:
                    continue
                out.extend(self.to_version(a) for a in coll.artifacts())
        return sorted(out, key=lambda v: (v.name, v.version))

    def newest_where(self, name: str, type: str, where: Callable[[dict[str, Any]], bool]) -> ArtifactVersion | None:
        """Checked on each version's metadata as the listing brings it; only the match is read in full (its
        lineage and manifest are more queries per version)."""
        found = None
        for t in self.api.artifact_types(project=f"{self.entity}/{self.project}"):
            if t.name != type:
                continue
            for coll in t.collections():
                if coll.name == name:
                    found = max((a for a in coll.artifacts() if where(dict(a.metadata or {}))),
                                key=lambda a: int(str(a.version).lstrip("v")), default=None)
        return self.to_version(found) if found is not None else None

    def delete(self, ref: str, *, delete_aliases: bool = False, force: bool = False, dry_run: bool = False) -> DeleteResult:
        """W&B soft-deletes the version and collects its files later; the same refusals as the local registry."""
        art = self._artifact(ref)
        version = self.to_version(art)
        users = list(art.used_by())
        dependents = sorted({self._exact_ref(a) for run in users for a in run.logged_artifacts() if a.id != art.id})
        in_use = [f"run {run.id} ({run.job_type})" for run in users if run.state == "running"]
        held = check_deletable(version.ref, version.aliases, dependents, delete_aliases=delete_aliases, force=force,
                               in_use=in_use)
        if dry_run:
            return DeleteResult(version=version, aliases_removed=held, latest_now=None, bytes_freed=0)
        art.delete(delete_aliases=True)  # W&B counts `latest` as an alias too; the others were checked above
        version.deleted_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            latest = self.resolve(version.tagged("latest")).ref
        except RefError:
            latest = None
        # W&B's garbage collection frees the storage later, and only for files no other version shares.
        return DeleteResult(version=version, aliases_removed=held, latest_now=latest, bytes_freed=0)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """A run as lineage needs it, from W&B (``used_artifacts``, ``logged_artifacts``)."""
        import wandb

        path = run_id if "/" in run_id else f"{self.entity}/{self.project}/{run_id}"  # another project's: `_run_id`
        try:
            r = self.api.run(path)
        except (wandb.errors.CommError, ValueError) as e:
            raise RefError(f"no run {path!r} in W&B: {e}") from None
        return {
            "id": run_id, "project": r.project, "job_type": r.job_type, "run_group": r.group, "status": r.state,
            "config": dict(r.config), "summary": {k: v for k, v in dict(r.summary).items() if not k.startswith("_")},
            "started_at": str(r.created_at), "ended_at": None, "mode": "online", "wandb_dir": None,
            "produced": [self._exact_ref(a) for a in r.logged_artifacts()],
            "consumed": [self._exact_ref(a) for a in r.used_artifacts()],
        }

    def start_run(self, run: TrackedRun) -> None:
        """W&B records the run itself."""

    def finish_run(self, run: TrackedRun, status: str) -> None:
        """W&B records the run's end and exit code itself."""
