"""Every registry rule of DESIGN.md, on the local implementation."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import AliasMoved, IntegrityError, ProjectMismatch, RefError, RegistryError
from pipeline.registry import local as local_mod
from pipeline.registry.local import LocalRegistry, manifest_digest
from tests.conftest import REPO, run_cli


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def stored_bytes(reg: LocalRegistry) -> int:
    return sum(p.stat().st_size for p in reg.objects.rglob("*") if p.is_file())


def catalog(reg: LocalRegistry, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(reg.db_path)) as c:  # closed: an open connection would hold the catalog
        return c.execute(sql).fetchall()


def test_numbering_latest_and_lookup(reg, tmp_path):
    refs = []
    for i in range(3):
        src = write(tmp_path / f"src{i}", {"data.txt": f"content {i}", "sub/x.bin": bytes([i]) * 10})
        refs.append(reg.publish("ds", "dataset", src).ref)
    assert refs == ["ds:v0", "ds:v1", "ds:v2"]
    assert reg.resolve("ds").ref == "ds:v2" == reg.resolve("ds:latest").ref
    assert reg.resolve("ds:v1").ref == "ds:v1"
    assert reg.resolve("ds:v0").aliases == []
    assert [v.ref for v in reg.list_versions()] == refs
    # Versions are numbered per name.
    other = write(tmp_path / "o", {"a": "a"})
    assert reg.publish("other", "model", other).ref == "other:v0"
    assert [v.ref for v in reg.list_versions(type="model")] == ["other:v0"]


def test_digest_covers_paths_and_content(reg, tmp_path):
    a = write(tmp_path / "a", {"x.txt": "same"})
    b = write(tmp_path / "b", {"y.txt": "same"})  # same bytes, different path
    va, vb = reg.publish("ds", "dataset", a), reg.publish("ds", "dataset", b)
    assert va.created and vb.created and va.version.digest != vb.version.digest
    assert vb.bytes_stored == 0  # the content object is shared
    f = va.version.files[0]
    assert va.version.digest == manifest_digest({f.path: f.digest})


def test_dedupe_same_digest_same_version_no_new_bytes(reg, tmp_path):
    src = write(tmp_path / "s", {"a.txt": "x" * 1000, "b/c.txt": "y" * 500})
    first = reg.publish("ds", "dataset", src, metadata={"run": 1})
    before_bytes = stored_bytes(reg)
    before_files = sorted(reg.objects.rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in before_files if p.is_file()}
    # Same content from another folder, published with an extra alias.
    copy = write(tmp_path / "copy", {"a.txt": "x" * 1000, "b/c.txt": "y" * 500})
    again = reg.publish("ds", "dataset", copy, metadata={"run": 2}, aliases=["candidate"])
    assert not again.created and again.ref == first.ref == "ds:v0"
    assert again.bytes_stored == 0 and stored_bytes(reg) == before_bytes
    assert sorted(reg.objects.rglob("*")) == before_files
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # not even rewritten
    assert catalog(reg, "SELECT COUNT(*) FROM versions") == [(1,)]
    assert reg.resolve("ds:candidate").ref == "ds:v0"
    assert reg.resolve("ds:v0").metadata == {"run": 1}  # the stored version is unchanged


def test_an_older_versions_content_published_again_makes_it_latest_again(reg, tmp_path):
    """As on W&B, which merges a deduplicated artifact's aliases (`latest` among them) into the version it matched:
    `latest` is on the version published last, new or not; the result says where it was before."""
    v0 = reg.publish("ds", "dataset", write(tmp_path / "0", {"a.txt": "old"}))
    v1 = reg.publish("ds", "dataset", write(tmp_path / "1", {"a.txt": "new"}))
    assert (v0.latest_before, v1.latest_before) == (None, "ds:v0")
    again = reg.publish("ds", "dataset", write(tmp_path / "again", {"a.txt": "old"}))
    assert (again.created, again.ref, again.latest_before) == (False, "ds:v0", "ds:v1")
    assert reg.resolve("ds:latest").ref == "ds:v0" and reg.resolve("ds:v1").aliases == []
    assert catalog(reg, "SELECT COUNT(*) FROM aliases WHERE alias = 'latest'") == [(1,)]
    assert reg.publish("ds", "dataset", write(tmp_path / "2", {"a.txt": "newest"})).ref == "ds:v2"  # the next number
    assert reg.mark_latest("ds:v1").aliases == ["latest"]  # what a stage that reuses v1 rather than publish it does
    assert reg.resolve("ds:latest").ref == "ds:v1" and reg.resolve("ds:v2").aliases == []
    with pytest.raises(RefError, match="ds has no version 'v7'"):
        reg.mark_latest("ds:v7")


def test_alias_moves_off_the_old_version(reg, tmp_path):
    v0 = reg.publish("m", "model", write(tmp_path / "0", {"w": "0"}), aliases=["candidate"]).version
    v1 = reg.publish("m", "model", write(tmp_path / "1", {"w": "1"}), aliases=["candidate"]).version
    assert reg.resolve("m:v0").aliases == []
    assert sorted(reg.resolve("m:v1").aliases) == ["candidate", "latest"]
    reg.set_alias("m:v0", "production")
    assert reg.resolve("m:production").ref == v0.ref
    reg.set_alias(v1.ref, "production")
    assert reg.resolve("m:production").ref == v1.ref and "production" not in reg.resolve("m:v0").aliases
    assert catalog(reg, "SELECT COUNT(*) FROM aliases WHERE alias = 'production'") == [(1,)]
    with pytest.raises(RegistryError, match="latest"):
        reg.set_alias("m:v0", "latest")
    with pytest.raises(RefError, match="versions, not aliases"):
        reg.set_alias("m:v0", "v7")


def _promote_worker(job: tuple[str, str]) -> str:
    root, ref = job
    try:
        LocalRegistry(Path(root)).set_alias(ref, "production", expected="m:v0")
        return "moved"
    except AliasMoved as e:
        return f"refused: on {e.current}"


def test_a_conditional_alias_move_happens_only_from_the_expected_version(reg, tmp_path):
    for i in range(4):
        reg.publish("m", "model", write(tmp_path / str(i), {"w": str(i)}))
    with pytest.raises(AliasMoved, match=r"m:production is on no version now, not on m:v0; it was not moved") as e:
        reg.set_alias("m:v1", "production", expected="m:v0")
    assert e.value.current is None
    reg.set_alias("m:v0", "production", expected=None)  # "nothing is production yet" is an expectation too
    with pytest.raises(AliasMoved, match=r"m:production is on m:v0 now, not on m:v2") as e:
        reg.set_alias("m:v1", "production", expected="m:v2")
    assert e.value.current == "m:v0" and reg.resolve("m:production").ref == "m:v0"
    # three processes each promote their version from m:v0 at once: exactly one moves the alias
    with mp.get_context("spawn").Pool(3) as pool:
        outcomes = pool.map(_promote_worker, [(str(reg.root), f"m:v{i}") for i in (1, 2, 3)])
    winner = f"m:v{1 + outcomes.index('moved')}"
    assert outcomes.count("moved") == 1 and [o for o in outcomes if o != "moved"] == [f"refused: on {winner}"] * 2
    assert reg.resolve("m:production").ref == winner
    assert catalog(reg, "SELECT COUNT(*) FROM aliases WHERE alias = 'production'") == [(1,)]


def test_unknown_name_version_alias_list_what_exists(reg, tmp_path):
    with pytest.raises(RefError, match="registry is empty"):
        reg.resolve("ds")
    reg.publish("ds", "dataset", write(tmp_path / "a", {"f": "1"}), aliases=["golden"])
    reg.publish("ds", "dataset", write(tmp_path / "b", {"f": "2"}))
    with pytest.raises(RefError, match=r"no artifact named 'nope'.*known artifacts: ds"):
        reg.resolve("nope:v0")
    with pytest.raises(RefError, match=r"ds has no version 'v9'; versions: v0, v1; aliases: golden -> v0, latest -> v1"):
        reg.resolve("ds:v9")
    with pytest.raises(RefError, match=r"ds has no alias 'production'; versions: v0, v1; aliases: golden -> v0"):
        reg.resolve("ds:production")
    # a name or alias one slip off one that exists: named
    reg.publish("tickets", "dataset", write(tmp_path / "c", {"f": "3"}))
    with pytest.raises(RefError, match=r"no artifact named 'tickest' in .* \(did you mean 'tickets'\?\); known artifacts: ds, tickets$"):
        reg.resolve("tickest:v0")
    with pytest.raises(RefError, match=r"ds has no alias 'goldne' \(did you mean 'golden'\?\); versions: v0, v1; aliases"):
        reg.resolve("ds:goldne")
    with pytest.raises(RefError, match="cannot parse"):
        reg.resolve("ds:")
    with pytest.raises(RefError, match="not a 'model' artifact"):
        reg.resolve("ds", type="model")
    with pytest.raises(RefError, match="only in the W&B registry"):
        reg.resolve("team/proj/ds:v0")


def test_type_is_fixed_per_name(reg, tmp_path):
    reg.publish("ds", "dataset", write(tmp_path / "a", {"f": "1"}))
    with pytest.raises(RegistryError, match="already exists with type 'dataset'"):
        reg.publish("ds", "model", write(tmp_path / "b", {"f": "2"}))
    assert catalog(reg, "SELECT COUNT(*) FROM versions") == [(1,)]


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\b"])
def test_publish_refuses_escaping_paths(reg, tmp_path, bad):
    f = write(tmp_path, {"f": "1"}) / "f"
    with pytest.raises(RegistryError, match="path"):
        reg.publish("ds", "dataset", {bad: f})
    assert catalog(reg, "SELECT COUNT(*) FROM versions") == [(0,)] and stored_bytes(reg) == 0


def test_fetch_refuses_a_manifest_path_escaping_the_target(reg, tmp_path):
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"ok.txt": "fine"})).version
    # Tamper with the catalog as an attacker with write access would.
    with sqlite3.connect(reg.db_path) as c:
        c.execute("UPDATE files SET path = '../escaped.txt'")
    dest = tmp_path / "out" / "dest"
    with pytest.raises(RegistryError, match=r"refusing artifact path '\.\./escaped\.txt'"):
        reg.fetch(reg.resolve(v.ref), dest)
    assert not (tmp_path / "out" / "escaped.txt").exists() and not dest.exists()


def test_bad_input_changes_nothing(reg, tmp_path):
    src = write(tmp_path / "s", {"f": "1"})
    with pytest.raises(RegistryError, match="not a readable file"):
        reg.publish("ds", "dataset", {"f": src / "f", "g": src / "missing"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no files"):
        reg.publish("ds", "dataset", tmp_path / "empty")
    with pytest.raises(RefError, match="invalid artifact name"):
        reg.publish("bad name", "dataset", src)
    with pytest.raises(RegistryError, match="not plain JSON"):
        reg.publish("ds", "dataset", src, metadata={"obj": object()})
    assert catalog(reg, "SELECT COUNT(*) FROM versions") == [(0,)] and stored_bytes(reg) == 0


def test_interrupted_publish_leaves_nothing(reg, tmp_path, monkeypatch):
    src = write(tmp_path / "s", {f"f{i}.txt": f"file {i}" * 100 for i in range(5)})
    reg.publish("ds", "dataset", write(tmp_path / "base", {"keep.txt": "kept"}))
    before = stored_bytes(reg)
    real_copy, calls = local_mod._copy_object, []

    def copy_then_ctrl_c(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:  # two objects are already stored when Ctrl-C arrives
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(local_mod, "_copy_object", copy_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("ds", "dataset", src)
    monkeypatch.setattr(local_mod, "_copy_object", real_copy)
    assert len(calls) == 3
    assert [v.ref for v in reg.list_versions()] == ["ds:v0"] and reg.resolve("ds").ref == "ds:v0"
    assert stored_bytes(reg) == before  # the two stored objects were taken back
    assert not any(reg.tmp.iterdir())
    # And the same publish then succeeds as the next version.
    assert reg.publish("ds", "dataset", src).ref == "ds:v1"


_KILL_SCRIPT = """
import sys
from pathlib import Path
from pipeline.registry.local import LocalRegistry
LocalRegistry(sys.argv[1]).publish("big", "dataset", Path(sys.argv[2]))
"""


def test_killed_publish_leaves_no_version(reg, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(40):
        (src / f"part{i:02d}.bin").write_bytes(os.urandom(4 << 20))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(reg.root), str(src)], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not any(reg.objects.rglob("*/*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(reg.objects.rglob("*/*")), "the publish was killed before it stored anything"
    assert reg.list_versions() == []
    assert catalog(reg, "PRAGMA integrity_check") == [("ok",)]
    assert catalog(reg, "SELECT COUNT(*) FROM files") == [(0,)]
    # The registry still works; the orphaned objects are simply reused.
    assert reg.publish("big", "dataset", src).ref == "big:v0"


def _publish_worker(args):
    root, src, idx = args
    from pipeline.registry.local import LocalRegistry

    r = LocalRegistry(root)
    return idx, r.publish("shared", "dataset", Path(src), metadata={"worker": idx}).ref


def test_eight_concurrent_publishers_get_distinct_versions(tmp_path):
    root = tmp_path / "registry"
    jobs = []
    for i in range(8):
        src = write(tmp_path / f"w{i}", {"data.txt": f"worker {i}\n" * 1000, "common.txt": "same in all"})
        jobs.append((str(root), str(src), i))
    with mp.get_context("spawn").Pool(8) as pool:
        results = dict(pool.map(_publish_worker, jobs))
    refs = sorted(results.values(), key=lambda r: int(r.split(":v")[1]))
    assert refs == [f"shared:v{i}" for i in range(8)]
    reg = LocalRegistry(root)
    assert catalog(reg, "PRAGMA integrity_check") == [("ok",)]
    for idx, ref in results.items():
        v = reg.resolve(ref)
        assert v.metadata == {"worker": idx}
        assert {f.path for f in v.files} == {"data.txt", "common.txt"}
    assert reg.resolve("shared:latest").ref == "shared:v7"
    assert catalog(reg, "SELECT COUNT(*) FROM aliases") == [(1,)]
    assert reg.verify().ok and reg.verify().objects_checked == 9  # 8 distinct + 1 shared


def _fetch_worker(args):
    root, ref = args
    from pipeline.registry.local import LocalRegistry

    r = LocalRegistry(root)
    fetched = r.fetch(r.resolve(ref))
    return fetched.reused, sorted(p.relative_to(fetched.path).as_posix() for p in fetched.path.rglob("*") if p.is_file())


def test_eight_processes_fetching_one_version_at_once_copy_it_once_and_all_read_it_whole(tmp_path):
    """Trainings started together on one dataset version fetch it at once. One copies; the others wait for it and
    reuse its verified copy, instead of each swapping the folder under the ones already reading it."""
    files = {f"part-{i}.bin": os.urandom(1 << 20).hex() for i in range(12)}
    reg = LocalRegistry(tmp_path / "registry")
    ref = reg.publish("ds", "dataset", write(tmp_path / "src", files)).ref
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_fetch_worker, [(str(tmp_path / "registry"), ref)] * 8)
    assert sorted(reused for reused, _ in results) == [False] + [True] * 7
    assert all(listed == sorted(files) for _, listed in results)
    assert sorted(p.name for p in (tmp_path / "artifacts" / "ds").iterdir()) == ["v0"]  # no staging or old folder left


def test_fetch_verifies_and_reuses_a_verified_copy(reg, tmp_path):
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha", "d/b.txt": "beta"})).version
    first = reg.fetch(v, tmp_path / "out")
    assert not first.reused
    assert (tmp_path / "out" / "d" / "b.txt").read_text() == "beta"
    stamp = {p: p.stat().st_mtime_ns for p in first.path.rglob("*")}
    second = reg.fetch(reg.resolve("ds:v0"), tmp_path / "out")
    assert second.reused and {p: p.stat().st_mtime_ns for p in first.path.rglob("*")} == stamp
    # A changed local copy is not reused: it is fetched (and verified) again.
    (tmp_path / "out" / "a.txt").write_text("edited")
    third = reg.fetch(v, tmp_path / "out")
    assert not third.reused and (tmp_path / "out" / "a.txt").read_text() == "alpha"
    # Default destination under the tracking dir.
    assert reg.fetch(v).path == tmp_path / "artifacts" / "ds" / "v0"


def test_a_reused_copy_gets_its_extra_files_up_to_date(reg, tmp_path):
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha"})).version
    dest = tmp_path / "out"
    reg.fetch(v, dest, extras={"manifest.json": b"old"})
    stamp = (dest / "a.txt").stat().st_mtime_ns
    again = reg.fetch(v, dest, extras={"manifest.json": b"new"})
    assert again.reused and (dest / "manifest.json").read_bytes() == b"new"
    assert (dest / "a.txt").stat().st_mtime_ns == stamp and sorted(p.name for p in dest.iterdir()) == ["a.txt", "manifest.json"]
    # the registry knows the folder as it is now: still its verified copy, nothing copied
    assert reg.fetch(v, dest, extras={"manifest.json": b"new"}).reused and (dest / "a.txt").stat().st_mtime_ns == stamp


def test_fetch_will_not_clobber_foreign_files(reg, tmp_path):
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha"})).version
    dest = write(tmp_path / "mine", {"precious.txt": "keep me"})
    with pytest.raises(RegistryError, match="did not come from the registry"):
        reg.fetch(v, dest)
    assert (dest / "precious.txt").read_text() == "keep me"
    assert reg.fetch(v, dest, overwrite=True).path == dest and not (dest / "precious.txt").exists()


def test_the_registrys_own_copies_stay_known_when_the_tracking_folder_moves(tmp_path):
    """A project moved (mv: same files) reuses its fetched copies; copied elsewhere (cp -a: new files,
    a team-mate's machine) it fetches them again. Either way it does not take its own cache for a
    user's folder and refuse to fetch."""
    reg = LocalRegistry(tmp_path / "one" / "registry")
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha", "d/b.txt": "beta"})).version
    assert not reg.fetch(v).reused
    (tmp_path / "one").rename(tmp_path / "two")
    moved = LocalRegistry(tmp_path / "two" / "registry")
    again = moved.fetch(moved.resolve("ds:v0"))
    assert again.reused and again.path == tmp_path / "two" / "artifacts" / "ds" / "v0"
    shutil.copytree(tmp_path / "two", tmp_path / "three", copy_function=shutil.copy2)
    copied = LocalRegistry(tmp_path / "three" / "registry")
    fetched = copied.fetch(copied.resolve("ds:v0"))
    assert not fetched.reused and (fetched.path / "d" / "b.txt").read_text() == "beta"
    assert copied.fetch(copied.resolve("ds:v0")).reused  # and known from then on
    assert moved.fetch(moved.resolve("ds:v0")).reused  # the other copy of the folder is untouched


def test_the_registrys_own_copy_is_a_cache_fetched_again_whatever_it_holds(reg, tmp_path):
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha"})).version
    cache = write(reg.default_fetch_dir(v), {"a.txt": "edited", "stray.txt": "left here"})
    fetched = reg.fetch(v)
    assert fetched.path == cache and not fetched.reused
    assert sorted(p.name for p in cache.iterdir()) == ["a.txt"] and (cache / "a.txt").read_text() == "alpha"


def test_a_schema_3_catalog_names_its_fetched_copies_relative_to_the_tracking_folder(tmp_path):
    reg = LocalRegistry(tmp_path / "registry")
    v = reg.publish("ds", "dataset", write(tmp_path / "s", {"a.txt": "alpha"})).version
    reg.fetch(v)
    deployed = reg.fetch(v, tmp_path.parent / f"{tmp_path.name}-deploy")
    with sqlite3.connect(reg.db_path) as conn:  # the catalog as schema 3 wrote it: absolute paths
        conn.execute("UPDATE fetches SET dest = ? WHERE dest = 'artifacts/ds/v0'", (str(reg.default_fetch_dir(v)),))
        conn.execute("PRAGMA user_version = 3")
    upgraded = LocalRegistry(tmp_path / "registry")
    assert sorted(r[0] for r in catalog(upgraded, "SELECT dest FROM fetches")) == sorted(["artifacts/ds/v0", str(deployed.path)])
    assert catalog(upgraded, "PRAGMA user_version") == [(local_mod._SCHEMA_VERSION,)]
    assert upgraded.fetch(v).reused and upgraded.fetch(v, deployed.path).reused
    # the registry's own copy of a deleted version still goes with it
    assert upgraded.delete("ds:v0", force=True).copies_removed == [str(reg.default_fetch_dir(v))]


def test_tampered_object_is_detected_and_old_copy_kept(reg, tmp_path):
    v0 = reg.publish("ds", "dataset", write(tmp_path / "a", {"w.bin": "original"})).version
    v1 = reg.publish("ds", "dataset", write(tmp_path / "b", {"w.bin": "newer", "x": "x"})).version
    dest = reg.fetch(v0, tmp_path / "deploy").path
    target = reg.object_path(next(f.digest for f in v1.files if f.path == "w.bin"))
    os.chmod(target, 0o644)
    target.write_text("tampered")
    with pytest.raises(IntegrityError, match=r"ds:v1: w.bin does not match its recorded sha256"):
        reg.fetch(v1, dest)
    assert (dest / "w.bin").read_text() == "original"  # the old copy is untouched
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".deploy")]
    report = reg.verify()
    assert not report.ok and report.affected_versions == ["ds:v1"]
    assert list(report.corrupt.values()) == [["ds:v1 (w.bin)"]]
    # A missing object is reported too, with the version it breaks.
    missing = reg.object_path(v0.files[0].digest)
    missing.unlink()
    report = reg.verify()
    assert report.missing == {v0.files[0].digest: ["ds:v0 (w.bin)"]}
    assert report.affected_versions == ["ds:v0", "ds:v1"]


def test_verify_cli_exit_codes(tmp_path):
    track = tmp_path / "track"
    reg = LocalRegistry(track / "registry")
    v = reg.publish("ds", "dataset", write(tmp_path / "a", {"w.bin": "original"})).version
    ok = run_cli("artifacts", "verify", "--set", f"tracking.dir={track}")
    assert ok.returncode == 0 and "all objects match" in ok.stdout
    obj = reg.object_path(v.files[0].digest)
    os.chmod(obj, 0o644)
    obj.write_text("bad")
    bad = run_cli("artifacts", "verify", "--set", f"tracking.dir={track}")
    assert bad.returncode == 1
    assert "CORRUPT" in bad.stdout and "ds:v0 (w.bin)" in bad.stdout and "affected versions: ds:v0" in bad.stderr
    assert "publishing the same content again restores a missing or damaged file" in bad.stderr
    as_json = run_cli("artifacts", "verify", "--json", "--set", f"tracking.dir={track}")  # for a monitoring job
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["objects_checked"] == 1 and report["affected_versions"] == ["ds:v0"]
    assert report["corrupt"] == {v.files[0].digest: ["ds:v0 (w.bin)"]} and report["missing"] == {}


def test_lineage_edges_recorded(reg, tmp_path, make_config):
    from pipeline.tracking import tracked_run

    cfg = make_config()
    with tracked_run(cfg, "dataset-publish", registry=reg) as producer:
        reg.publish("ds", "dataset", write(tmp_path / "s", {"f": "1"}), run=producer)
    with tracked_run(cfg, "finetune", registry=reg) as consumer:
        reg.use("ds:latest", consumer)
    v = reg.resolve("ds:v0")
    assert v.produced_by == producer.id and v.used_by == [consumer.id]
    assert reg.get_run(producer.id)["produced"] == ["ds:v0"]
    assert reg.get_run(consumer.id)["consumed"] == ["ds:v0"]
    assert reg.get_run(consumer.id)["status"] == "finished"


def test_a_name_belongs_to_the_project_whose_run_made_its_first_version(tmp_path):
    """Two projects under one tracking.dir share one catalog. A second project's `clf` became the first project's
    clf:v5, was judged against its production (another task's labels) and took its `production` alias; in W&B
    each project has its own artifacts. Now a registry opened for a project refuses another project's names."""
    from pipeline.tracking import TrackedRun

    root = tmp_path / "registry"

    def opened(project: str, run_id: str) -> tuple[LocalRegistry, TrackedRun]:
        reg = LocalRegistry(root, project=project)
        run = TrackedRun(id=run_id, project=project, job_type="finetune", group=None, mode="offline", config={},
                         registry=reg)
        reg.start_run(run)
        return reg, run

    intents, run_a = opened("intents", "runa")
    intents.publish("clf", "model", write(tmp_path / "a", {"w.bin": "intents weights"}), run=run_a, aliases=["production"])
    sentiment, run_b = opened("sentiment", "runb")
    before = (catalog(sentiment, "SELECT name, version FROM versions"), stored_bytes(sentiment))
    with pytest.raises(ProjectMismatch) as e:
        sentiment.publish("clf", "model", write(tmp_path / "b", {"w.bin": "sentiment weights"}), run=run_b)
    assert str(e.value).startswith(f"'clf' belongs to project 'intents' in the local registry {root} (its run runa "
                                   "made clf:v0), not to project 'sentiment'")
    assert (catalog(sentiment, "SELECT name, version FROM versions"), stored_bytes(sentiment)) == before  # no byte kept
    for refused in (lambda: sentiment.resolve("clf:production"), lambda: sentiment.use("clf:v0", run_b),
                    lambda: sentiment.set_alias("clf:v0", "production"), lambda: sentiment.check_project("clf")):
        with pytest.raises(ProjectMismatch, match="'clf' belongs to project 'intents'"):
            refused()
    # its own names, and a name no run made (published by hand), are open to it; the other project's are not
    sentiment.publish("sentiment-clf", "model", write(tmp_path / "b", {}), run=run_b)
    LocalRegistry(root).publish("shared", "dataset", write(tmp_path / "c", {"f": "x"}))
    assert sentiment.use("shared", run_b).ref == intents.use("shared", run_a).ref == "shared:v0"
    with pytest.raises(ProjectMismatch, match="'sentiment-clf' belongs to project 'sentiment'"):
        intents.resolve("sentiment-clf")
    # a registry opened for no project (artifacts, lineage, reproduce reading the version) sees every name
    assert [v.ref for v in LocalRegistry(root).list_versions(type="model")] == ["clf:v0", "sentiment-clf:v0"]
    assert LocalRegistry(root).resolve("clf:production").ref == "clf:v0"
    # each version says whose it is (artifacts list and show print it): the owner, or None for a name no run made
    assert {v.ref: v.to_dict()["project"] for v in LocalRegistry(root).list_versions()} == {
        "clf:v0": "intents", "sentiment-clf:v0": "sentiment", "shared:v0": None}


def test_a_schema_1_catalog_is_upgraded_in_place(tmp_path):
    import sqlite3

    from pipeline.registry.local import LocalRegistry

    root = tmp_path / "reg"
    reg = LocalRegistry(root)
    src = tmp_path / "a.txt"
    src.write_text("hello")
    reg.publish("thing", "dataset", {"a.txt": src})
    with sqlite3.connect(root / "catalog.db") as conn:  # make it look like a catalog from before reference mode
        conn.execute("CREATE TABLE files_old AS SELECT version_id, path, sha256, size FROM files")
        conn.execute("DROP TABLE files")
        conn.execute("ALTER TABLE files_old RENAME TO files")
        conn.execute("PRAGMA user_version = 1")
    again = LocalRegistry(root)
    with sqlite3.connect(root / "catalog.db") as conn:
        assert "ref" in {r[1] for r in conn.execute("PRAGMA table_info(files)")}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == local_mod._SCHEMA_VERSION
    version = again.resolve("thing:v0")
    assert [(f.path, f.ref) for f in version.files] == [("a.txt", None)]
    assert again.fetch(version, tmp_path / "out").path.joinpath("a.txt").read_text() == "hello"


def test_an_unusable_registry_location_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RegistryError, match=rf"cannot open the local registry at {blocker}/registry .*Not a directory"):
        LocalRegistry(blocker / "registry")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "catalog.db").write_bytes(b"this is not an SQLite database, only some text " * 4)
    with pytest.raises(RegistryError, match=rf"cannot open the local registry at {damaged} .*file is not a database"):
        LocalRegistry(damaged)


def test_sqlite_errors_of_a_full_disk_are_named_as_such(reg):
    from pipeline.errors import DiskFull

    with pytest.raises(DiskFull, match=r"the disk is full \(.*catalog.db\)"):
        with reg._write():
            raise sqlite3.OperationalError("database or disk is full")  # SQLITE_FULL, as SQLite words it
    # An I/O error on a disk with room left is not called a full disk.
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        with reg._read():
            raise sqlite3.OperationalError("disk I/O error")
    assert reg.list_versions() == []  # the catalog is usable after both


CRASHING_RUN = """
import os, signal, sys
from pipeline.registry.local import LocalRegistry
from pipeline.tracking import TrackedRun
reg = LocalRegistry(sys.argv[1])
reg.start_run(TrackedRun(id="gone", project="p", job_type="finetune", group=None, mode="offline", config={}, registry=reg))
os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer ends a training: no finally, no status written
"""


def test_a_run_whose_process_died_without_closing_it_reads_crashed_not_running(tmp_path):
    """A finetune killed outright (the OOM killer, kill -9, a lost machine) stayed 'running' in lineage forever.
    W&B calls such a run crashed; so does the local registry, from the lock its process held until it died."""
    from pipeline.tracking import TrackedRun

    root = tmp_path / "registry"
    child = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(root)], cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    reg = LocalRegistry(root)
    assert catalog(reg, "SELECT status FROM runs WHERE id = 'gone'") == [("running",)]  # as it was left
    assert reg.get_run("gone")["status"] == "crashed"

    run = TrackedRun(id="alive", project="p", job_type="finetune", group=None, mode="offline", config={}, registry=reg)
    reg.start_run(run)
    assert LocalRegistry(root).get_run("alive")["status"] == "running"  # its process (this one) holds the lock
    reg.finish_run(run, "finished")
    assert LocalRegistry(root).get_run("alive")["status"] == "finished"
    assert not (root / "live" / "alive").exists()  # a closed run leaves no lock behind


def test_a_run_closed_while_it_is_read_reads_finished_not_crashed(tmp_path, monkeypatch):
    """A reader's snapshot said `running`; the run was closed (its status written, its lock let go) before the reader
    looked at the lock, which nobody held any more: `lineage` said crashed for a run that had just finished."""
    from pipeline.tracking import TrackedRun

    reg = LocalRegistry(tmp_path / "registry")
    run = TrackedRun(id="closing", project="p", job_type="finetune", group=None, mode="offline", config={}, registry=reg)
    reg.start_run(run)
    real_holder = local_mod.runlock.holder

    def closed_meanwhile(folder):  # the run's process closes it just now, between the snapshot and this look
        reg.finish_run(run, "finished")
        return real_holder(folder)

    monkeypatch.setattr(local_mod.runlock, "holder", closed_meanwhile)
    assert LocalRegistry(tmp_path / "registry").get_run("closing")["status"] == "finished"


def test_a_catalog_on_a_network_file_system_keeps_a_rollback_journal_not_wal(tmp_path, monkeypatch, caplog):
    """SQLite's WAL needs every process on one host ("WAL does not work over a network filesystem"): its index is
    shared memory. Offline W&B is what compute nodes without internet use, with tracking.dir on the cluster's
    NFS, Lustre or GPFS, where jobs on several nodes write one catalog. There the catalog keeps SQLite's rollback
    journal, which works wherever the file system's locks do; a WAL catalog moved there is switched back."""
    home = tmp_path / "shared home"  # a mount point with a space, as /proc/self/mounts escapes it
    local = LocalRegistry(home / "registry")  # made on the local disk: WAL
    assert catalog(local, "PRAGMA journal_mode") == [("wal",)]
    local.publish("tickets", "dataset", write(tmp_path / "a", {"train.parquet": "rows"}))
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n"
                      f"nas:/export/home {str(home).replace(' ', chr(92) + '040')} nfs4 rw,relatime 0 0\n")
    monkeypatch.setattr(local_mod, "MOUNTS", str(mounts))

    other = sqlite3.connect(local.db_path)  # another process reading the catalog now: it cannot be switched yet
    other.execute("SELECT count(*) FROM versions").fetchall()
    with caplog.at_level("WARNING", logger="pipeline.registry.local"):
        busy = LocalRegistry(home / "registry")
    assert busy.resolve("tickets").ref == "tickets:v0" and catalog(busy, "PRAGMA journal_mode") == [("wal",)]
    assert f"{busy.db_path} is on a nfs4 file system" in caplog.text and "another process has it open now" in caplog.text
    other.close()

    shared = LocalRegistry(home / "registry")
    assert catalog(shared, "PRAGMA journal_mode") == [("delete",)]
    assert shared.resolve("tickets").ref == "tickets:v0"  # what the WAL catalog held is all there
    shared.publish("tickets", "dataset", write(tmp_path / "b", {"train.parquet": "more rows"}))
    assert [v.ref for v in shared.list_versions("tickets")] == ["tickets:v0", "tickets:v1"]
    assert not (home / "registry" / "catalog.db-wal").exists() and not (home / "registry" / "catalog.db-shm").exists()
    assert catalog(LocalRegistry(tmp_path / "elsewhere"), "PRAGMA journal_mode") == [("wal",)]  # not on that mount


@contextlib.contextmanager
def without_write_access(folder: Path):
    """This process as a user who may read `folder` but not write in it: root becomes `nobody` (root writes
    anywhere), anyone else has the write bits taken off. As with a team's registry that a service account owns."""
    for p in (folder, *folder.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    if os.geteuid() == 0:
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
    else:
        dirs = [p for p in (folder, *folder.rglob("*")) if p.is_dir()]
        for d in dirs:
            d.chmod(0o555)
        try:
            yield
        finally:
            for d in dirs:
                d.chmod(0o755)


def test_a_registry_this_user_cannot_write_is_still_listed_shown_verified_and_traced(tmp_path, monkeypatch, capsys):
    """`artifacts list` on a registry owned by another account (or on a read-only mount) said only "unable to open
    database file": opening it set its journal mode and checked its schema in a write transaction. The commands
    that only read it (artifacts list, show, diff, verify; lineage) now read it read-only and write nothing there
    (diff compares verified copies in a temporary folder); the stages, which record runs, are still refused at once."""
    import tempfile

    from pipeline.cli import main as cli
    from pipeline.tracking import TrackedRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    from tests.conftest import SYSTEM_TMP

    # not under pytest's own folders, which only root may enter: the registry, and diff's temporary copies
    monkeypatch.setenv("TMPDIR", SYSTEM_TMP)
    monkeypatch.setattr(tempfile, "tempdir", None)
    base = Path(tempfile.mkdtemp(prefix="shared-registry-"))
    try:
        reg = LocalRegistry(base / "registry")
        run = TrackedRun(id="pub1", project="p", job_type="dataset-publish", group=None, mode="offline", config={},
                         registry=reg)
        reg.start_run(run)
        import pyarrow as pa
        import pyarrow.parquet as pq

        for v, labels in enumerate((["billing", "refund"], ["billing", "billing"])):  # v1 relabels id 2
            folder = tmp_path / f"v{v}"
            folder.mkdir()
            for split in ("train", "validation", "test"):
                pq.write_table(pa.table({"id": [f"{split}1", f"{split}2"], "text": ["charged twice", "money back"],
                                         "label": labels}), folder / f"{split}.parquet")
            reg.publish("tickets", "dataset", folder, run=run)
        reg.finish_run(run, "finished")
        assert cli(["artifacts", "--set", f"tracking.dir={tmp_path / 'warm'}", "list"]) == 0  # imports, as this user
        before = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
        capsys.readouterr()
        with without_write_access(base):
            with pytest.raises(RegistryError, match=r"cannot write the local registry at .*: this user may not write "
                                                    r"there \(attempt to write a readonly database\)\. artifacts list"):
                LocalRegistry(base / "registry")  # what a stage opens: it would record its run there
            ro = LocalRegistry(base / "registry", read_only=True)
            assert [v.ref for v in ro.list_versions()] == ["tickets:v0", "tickets:v1"] and ro.get_run("pub1")["status"] == "finished"
            assert ro.verify().ok
            with pytest.raises(RegistryError, match=r"is open read-only \(this user cannot write it\)"):
                ro.set_alias("tickets:v0", "production")
            with pytest.raises(RegistryError, match=r"only into a folder outside it, not into its own copy of tickets:v0"):
                ro.fetch(ro.resolve("tickets:v0"))
            for argv in (["artifacts", "list"], ["artifacts", "show", "tickets:v0"], ["artifacts", "verify"],
                         ["lineage", "tickets:v0"], ["artifacts", "diff", "tickets:v0", "tickets:v1"]):
                assert cli([*argv, "--set", f"tracking.dir={base}"]) == 0, argv
        out = capsys.readouterr().out
        assert "tickets:v0  dataset" in out and "produced by: pub1" in out and "all objects match" in out
        assert "rows (matched by id): 0 added, 0 removed, 3 relabelled, 0 edited, 0 moved, 3 unchanged" in out
        assert "rows per label: billing 3 -> 6; refund 3 -> 0" in out
        assert "run pub1  dataset-publish  finished" in out
        assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == before  # nothing written there
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_reading_commands_where_there_is_no_registry_create_none_and_say_so(tmp_path, monkeypatch, capsys):
    """`artifacts list` (or show, verify, lineage) run in a folder with no registry, from the wrong directory say,
    made an empty `.pipeline/registry` there, and said only that the registry was empty. Now nothing is created, and
    each says where it looked; a dataset-publish whose source is not there creates no registry either."""
    from pipeline.cli import main as cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    where = tmp_path / ".pipeline" / "registry"
    assert cli(["artifacts", "list"]) == 0
    assert capsys.readouterr().out == f"no artifact versions (there is no registry at {where})\n"
    assert cli(["artifacts", "verify"]) == 0
    for argv in (["artifacts", "show", "tickets:v0"], ["lineage", "tickets:v0"]):
        assert cli(argv) == 2, argv
        assert f"no artifact named 'tickets' in {where}; there is no registry there" in capsys.readouterr().err
    assert cli(["artifacts", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    for argv in (["artifacts", "delete", "tickets:v0"], ["artifacts", "prune", "tickets", "--keep", "1"],
                 ["artifacts", "alias", "tickets:v0", "production"], ["artifacts", "unalias", "tickets:production"]):
        assert cli(argv) == 2, argv
        said = capsys.readouterr().err  # a write refused, or the version not found: each says there is no registry
        assert f"there is no registry at {where} (nothing was published" in said or \
            f"in {where}; there is no registry there" in said, argv
    config = tmp_path / "c.yaml"
    config.write_text("project: p\ndataset: {name: tickets, source: data/tickets.csv}\nmodel: {name: m}\n")
    for stage in ("dataset-publish", "run"):
        assert cli([stage, "--config", str(config)]) == 2, stage
        assert "dataset source not found: data/tickets.csv" in capsys.readouterr().err, stage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no .pipeline, no result file


def test_stages_that_read_a_version_make_no_registry_where_there_is_none(tmp_path, monkeypatch, capsys):
    """finetune, evaluate, deploy-fetch, sweep and reproduce need a version from the registry before they record
    anything: run where there is none (from another folder than the project's), each made an empty registry there on
    its way to "known artifacts: none: the registry is empty". Now each says there is no registry, and makes none."""
    from pipeline.cli import main as cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("project: p\ndataset: {name: tickets, source: data/tickets.csv}\nmodel: {name: clf}\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("method: grid\nmetric: {name: val/loss, goal: minimize}\nparameters: {epochs: {values: [1]}}\n")
    where = tmp_path / ".pipeline" / "registry"
    for argv, missing in ((["finetune"], "tickets"), (["evaluate"], "clf"), (["deploy-fetch"], "clf"),
                          (["sweep", "--sweep", str(sweep), "--count", "1"], "tickets"), (["reproduce", "clf:v0"], "clf")):
        assert cli([*argv, "--config", str(config)]) == 2, argv
        assert f"no artifact named {missing!r} in {where}; there is no registry there" in capsys.readouterr().err, argv
        assert not (tmp_path / ".pipeline" / "registry").exists(), argv
