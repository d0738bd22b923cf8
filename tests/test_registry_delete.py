"""Deleting versions from the local registry: `artifacts delete` and `artifacts prune`.

A deleted version's files go (objects no other version shares are removed from the store), its
record stays for lineage, its number is never used again, and `latest` moves back. Versions that
hold aliases, or that live versions were made from, are refused unless the user says otherwise.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipeline.errors import RefError, RegistryError
from pipeline.registry import local as local_mod
from pipeline.registry.local import LocalRegistry
from pipeline.tracking import TrackedRun
from tests.conftest import run_cli


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "track" / "registry")


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(data)
    return root


def objects(reg: LocalRegistry) -> set[str]:
    return {p.name for p in reg.objects.rglob("*") if p.is_file()}


def run_record(reg: LocalRegistry, run_id: str, job_type: str) -> TrackedRun:
    """A run as the stages record it (W&B off): the registry's lineage edges are real."""
    run = TrackedRun(id=run_id, project="p", job_type=job_type, group=None, mode="disabled", config={}, registry=reg)
    reg.start_run(run)
    return run


def test_delete_removes_unshared_objects_keeps_the_record_and_never_reuses_the_number(reg, tmp_path):
    v0 = reg.publish("m", "model", write(tmp_path / "a", {"shared.json": "tokenizer", "w.bin": "weights 0"})).version
    v1 = reg.publish("m", "model", write(tmp_path / "b", {"shared.json": "tokenizer", "w.bin": "weights 1"})).version
    shared = next(f.digest for f in v0.files if f.path == "shared.json")
    only_v0 = next(f.digest for f in v0.files if f.path == "w.bin")

    result = reg.delete("m:v0")

    assert result.version.ref == "m:v0" and result.version.deleted_at
    assert result.bytes_freed == len("weights 0") and result.latest_now == "m:v1"
    assert only_v0 not in objects(reg) and shared in objects(reg)  # v1 still names the shared file
    with pytest.raises(RefError, match=r"m:v0 was deleted \(\d{4}-\d\d-\d\dT.* UTC\)"):
        reg.resolve("m:v0")
    record = reg.resolve("m:v0", include_deleted=True)
    assert record.deleted_at and record.files == [] and record.digest == v0.digest
    assert [v.ref for v in reg.list_versions()] == ["m:v1"]
    assert reg.resolve("m").ref == "m:v1"
    assert reg.fetch(reg.resolve("m:v1"), tmp_path / "out").path.joinpath("w.bin").read_text() == "weights 1"
    assert reg.verify().ok

    # The deleted content published again is a new version: numbers are never reused.
    again = reg.publish("m", "model", write(tmp_path / "c", {"shared.json": "tokenizer", "w.bin": "weights 0"}))
    assert again.created and again.ref == "m:v2" and again.version.digest == v0.digest
    assert only_v0 in objects(reg) and reg.resolve("m").ref == "m:v2"
    with pytest.raises(RefError, match=r"versions: v0 \(deleted\), v1, v2"):
        reg.resolve("m:v7")
    assert v1.ref == "m:v1"


def test_deleting_the_latest_moves_latest_back_and_the_last_one_leaves_none(reg, tmp_path):
    reg.publish("d", "dataset", write(tmp_path / "a", {"f": "0"}))
    reg.publish("d", "dataset", write(tmp_path / "b", {"f": "1"}))
    assert reg.delete("d:v1").latest_now == "d:v0"
    assert reg.resolve("d:latest").ref == "d:v0"
    assert reg.delete("d:latest").latest_now is None
    with pytest.raises(RefError, match=r"d has no alias 'latest'; versions: v0 \(deleted\), v1 \(deleted\)"):
        reg.resolve("d")
    assert objects(reg) == set()


def test_aliases_and_dependents_are_refused_and_nothing_changes(reg, tmp_path):
    publisher = run_record(reg, "pub00001", "dataset-publish")
    data = reg.publish("ds", "dataset", write(tmp_path / "d", {"train.parquet": "rows"}), run=publisher).version
    trainer = run_record(reg, "fit00001", "finetune")
    reg.use("ds:v0", trainer)
    model = reg.publish("m", "model", write(tmp_path / "m", {"w.bin": "w"}), run=trainer).version
    reg.finish_run(trainer, "finished")
    reg.set_alias("m:v0", "production")
    before = objects(reg)

    with pytest.raises(RegistryError, match=r"m:v0 holds the alias\(es\) production; move them first, or pass "
                                            r"--delete-aliases"):
        reg.delete("m:v0")
    with pytest.raises(RegistryError, match=r"ds:v0 is what m:v0 was made from, which could not be "
                                            r"reproduced without it; delete m:v0 first, or pass --force"):
        reg.delete("ds:v0")
    assert objects(reg) == before
    assert reg.resolve("m:production").ref == "m:v0" and reg.resolve("ds:v0").files == data.files

    # A dry run makes the same checks and says what would go, changing nothing.
    dry = reg.delete("m:v0", delete_aliases=True, dry_run=True)
    assert dry.aliases_removed == ["production"] and dry.bytes_freed == 1 and dry.latest_now is None
    assert reg.resolve("m:production").ref == "m:v0" and objects(reg) == before

    gone = reg.delete("m:v0", delete_aliases=True)
    assert gone.aliases_removed == ["production"]
    with pytest.raises(RefError, match="m has no alias 'production'"):
        reg.resolve("m:production")
    # With its only dependent deleted, the dataset may go too; lineage still knows both.
    reg.delete("ds:v0")
    assert reg.get_run("fit00001")["consumed"] == ["ds:v0"] and reg.get_run("fit00001")["produced"] == ["m:v0"]
    assert reg.resolve("m:v0", include_deleted=True).produced_by == "fit00001" == model.produced_by
    assert objects(reg) == set()


def test_the_registrys_own_fetched_copy_goes_and_other_copies_stay(reg, tmp_path):
    v = reg.publish("m", "model", write(tmp_path / "a", {"w.bin": "weights"})).version
    cache = reg.fetch(v).path  # tracking.dir/artifacts/m/v0
    deployed = reg.fetch(v, tmp_path / "deploy").path
    assert cache == reg.default_fetch_dir(v) and cache.is_dir()

    result = reg.delete("m:v0")

    assert result.copies_removed == [str(cache)] and not cache.exists()
    assert (deployed / "w.bin").read_text() == "weights"  # a deployment keeps serving
    # The deployment folder is still known as the registry's, so the next model replaces it without --force.
    nxt = reg.publish("m", "model", write(tmp_path / "b", {"w.bin": "weights 2"})).version
    assert (reg.fetch(nxt, deployed).path / "w.bin").read_text() == "weights 2"
    # A cached copy changed since its fetch (or one that came with a copied tracking folder) is still the cache.
    edited = reg.fetch(nxt).path
    (edited / "w.bin").write_text("changed by hand")
    assert reg.delete("m:v1", delete_aliases=True).copies_removed == [str(edited)] and not edited.exists()


# The versions table as schema 2 wrote it: one digest per name, deleted or not.
SCHEMA_2_VERSIONS = """CREATE TABLE versions (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, type TEXT NOT NULL,
    digest TEXT NOT NULL, size INTEGER NOT NULL, metadata TEXT NOT NULL, created_at TEXT NOT NULL, run_id TEXT,
    UNIQUE (name, version), UNIQUE (name, digest))"""


def test_a_schema_2_catalog_is_rebuilt_with_its_rows_and_can_delete(tmp_path):
    root = tmp_path / "reg"
    reg = LocalRegistry(root)
    reg.publish("thing", "dataset", write(tmp_path / "a", {"a.txt": "hello"}))
    reg.set_alias("thing:v0", "stable")
    with sqlite3.connect(root / "catalog.db") as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("CREATE TABLE saved AS SELECT id, name, version, type, digest, size, metadata, created_at, run_id "
                     "FROM versions")
        conn.execute("DROP TABLE versions")  # (a rename would rewrite the other tables' references)
        conn.execute(SCHEMA_2_VERSIONS)
        conn.execute("INSERT INTO versions SELECT * FROM saved")
        conn.execute("DROP TABLE saved")
        conn.execute("PRAGMA user_version = 2")

    again = LocalRegistry(root)

    with sqlite3.connect(root / "catalog.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == local_mod._SCHEMA_VERSION
        assert "deleted_at" in {r[1] for r in conn.execute("PRAGMA table_info(versions)")}
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    v = again.resolve("thing:stable")
    assert v.ref == "thing:v0" and [f.path for f in v.files] == ["a.txt"]
    again.delete("thing:v0", delete_aliases=True)
    assert again.publish("thing", "dataset", write(tmp_path / "b", {"a.txt": "hello"})).ref == "thing:v1"


def test_cli_delete_prune_show_and_lineage(reg, tmp_path):
    track = tmp_path / "track"
    trainer = run_record(reg, "fit00001", "finetune")
    reg.publish("ds", "dataset", write(tmp_path / "d", {"f": "rows"}))
    reg.use("ds:v0", trainer)
    for i in range(5):
        reg.publish("m", "model", write(tmp_path / f"m{i}", {"w.bin": f"weights {i}"}), run=trainer if i == 0 else None)
    reg.finish_run(trainer, "finished")
    reg.set_alias("m:v1", "production")
    cli = ("--set", f"tracking.dir={track}")

    refused = run_cli("artifacts", "delete", "ds:v0", *cli)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: ds:v0 is what m:v0 was made from, which could not be reproduced without "
                                      "it; delete m:v0 first, or pass --force")

    dry = run_cli("artifacts", "prune", "m", "--keep", "2", "--dry-run", "--json", *cli)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["kept_newest"] == ["m:v4", "m:v3"]
    assert [d["ref"] for d in planned["deleted"]] == ["m:v0", "m:v2"]
    assert planned["kept"] == [{"ref": "m:v1", "reason": "holds production"}]
    assert len(reg.list_versions(name="m")) == 5

    pruned = run_cli("artifacts", "prune", "m", "--keep", "2", *cli)
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted m:v0  (freed 9 B)" in pruned.stdout and "kept m:v1: holds production" in pruned.stdout
    assert [v.ref for v in reg.list_versions(name="m")] == ["m:v1", "m:v3", "m:v4"]

    shown = run_cli("artifacts", "show", "m:v0", *cli)
    assert shown.returncode == 0 and "deleted:" in shown.stdout and "(its files are gone)" in shown.stdout
    assert run_cli("artifacts", "delete", "ds:v0", *cli).stdout.startswith("deleted ds:v0; freed 4 B; ")
    lineage = run_cli("lineage", "m:v0", *cli)
    assert lineage.returncode == 0, lineage.stderr
    assert "m:v0  model" in lineage.stdout and "ds:v0  dataset" in lineage.stdout and lineage.stdout.count("DELETED") == 2

    bad = run_cli("artifacts", "prune", "m", "--keep", "0", *cli)
    assert bad.returncode == 2 and "keep at least 1 version" in bad.stderr


USING_RUN = """
import os, signal, sys
from pipeline.registry.local import LocalRegistry
from pipeline.tracking import TrackedRun
reg = LocalRegistry(sys.argv[1])
run = TrackedRun(id=sys.argv[2], project="p", job_type="finetune", group=None, mode="disabled", config={}, registry=reg)
reg.start_run(run)
reg.use("ds:v0", run)
print("using", flush=True)
if sys.argv[3] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)  # ended outright: its run stays 'running' in the catalog, its lock goes
sys.stdin.read()  # training, until told to stop
reg.publish("m", "model", sys.argv[4], run=run)
reg.finish_run(run, "finished")
"""


def test_a_version_a_running_run_uses_is_not_deleted_until_the_run_ends(reg, tmp_path):
    """A finetune training on ds:v0 while `artifacts prune ds --keep 1` ran lost its dataset: the model it then
    published was made from a deleted version, and evaluate refused it. A version that a run in progress (in any
    process) uses is kept, as a version that live versions were made from is; a run whose process died is not one."""
    import subprocess
    import sys

    from tests.conftest import REPO

    for i in range(2):
        reg.publish("ds", "dataset", write(tmp_path / f"d{i}", {"train.parquet": f"rows {i}"}))
    write(tmp_path / "m", {"w.bin": "weights"})
    training = subprocess.Popen([sys.executable, "-c", USING_RUN, str(reg.root), "fit00002", "alive", str(tmp_path / "m")],
                                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert training.stdout.readline().strip() == "using"
        with pytest.raises(RegistryError, match=r"^ds:v0 is in use by run fit00002 \(finetune\), running now: what it "
                                                r"makes would be made from a deleted version; delete it once that has "
                                                r"ended, or pass --force$"):
            reg.delete("ds:v0")
        pruned = run_cli("artifacts", "prune", "ds", "--keep", "1", "--set", f"tracking.dir={reg.root.parent}")
        assert pruned.returncode == 0, pruned.stderr
        assert "kept ds:v0: ds:v0 is in use by run fit00002 (finetune), running now" in pruned.stdout
        assert [v.ref for v in reg.list_versions(name="ds")] == ["ds:v0", "ds:v1"]
        assert reg.delete("ds:v0", dry_run=True, force=True).version.ref == "ds:v0"  # --force overrides it
    finally:
        training.communicate("")  # the training ends: it publishes its model and closes its run
    assert training.returncode == 0
    # now the model it made holds on to it, as any model does
    with pytest.raises(RegistryError, match=r"ds:v0 is what m:v0 was made from"):
        reg.delete("ds:v0")

    # a run whose process died without closing it (kill -9, the OOM killer) uses nothing any more
    killed = subprocess.run([sys.executable, "-c", USING_RUN, str(reg.root), "fit00003", "killed", ""], cwd=REPO,
                            capture_output=True, text=True)
    assert killed.returncode == -9 and reg.get_run("fit00003")["status"] == "crashed"
    reg.delete("m:v0")
    assert reg.delete("ds:v0").version.deleted_at


def test_prune_keeps_an_older_version_that_is_latest_again(reg, tmp_path):
    """Content published again puts `latest` on its older version: what finetune reads next is not pruned."""
    for i in range(4):
        reg.publish("ds", "dataset", write(tmp_path / f"d{i}", {"rows": f"rows {i}"}))
    reg.publish("ds", "dataset", write(tmp_path / "again", {"rows": "rows 0"}))  # the data reverted to v0's
    pruned = run_cli("artifacts", "prune", "ds", "--keep", "2", "--json", "--set", f"tracking.dir={tmp_path / 'track'}")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["kept"] == [{"ref": "ds:v0", "reason": "holds latest"}]
    assert [v.ref for v in reg.list_versions(name="ds")] == ["ds:v0", "ds:v2", "ds:v3"]
    assert reg.resolve("ds:latest").ref == "ds:v0"


def test_deleting_a_version_that_is_not_latest_says_latest_stays_where_it_is(reg, tmp_path):
    for i in range(3):
        reg.publish("ds", "dataset", write(tmp_path / f"d{i}", {"rows": f"rows {i}"}))
    reg.publish("ds", "dataset", write(tmp_path / "again", {"rows": "rows 0"}))  # `latest` back on v0
    assert reg.delete("ds:v2", dry_run=True).latest_now == "ds:v0"
    assert reg.delete("ds:v2").latest_now == "ds:v0" and reg.resolve("ds:latest").ref == "ds:v0"
    assert reg.delete("ds:v0").latest_now == "ds:v1" and reg.resolve("ds:latest").ref == "ds:v1"  # it held it


def test_a_version_deleted_after_it_was_resolved_is_reported_as_deleted_when_fetched(reg, tmp_path):
    v = reg.publish("m", "model", write(tmp_path / "a", {"w.bin": "weights"})).version  # resolved, then ...
    reg.delete("m:v0")  # ... deleted by another process before the fetch
    with pytest.raises(RefError, match="m:v0 was deleted"):
        reg.fetch(v, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_publish_that_counted_on_a_version_deleted_meanwhile_fails_and_the_next_one_stores_it(reg, tmp_path,
                                                                                              monkeypatch):
    src = write(tmp_path / "a", {"w.bin": "weights"})
    reg.publish("m", "model", src)
    other = LocalRegistry(reg.root)  # another process's handle on the same registry
    commit = LocalRegistry._commit

    def delete_first(self, *args, **kwargs):  # the delete lands between this publish's checks and its commit
        monkeypatch.setattr(LocalRegistry, "_commit", commit)
        other.delete("m:v0")
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(LocalRegistry, "_commit", delete_first)
    with pytest.raises(RegistryError, match=r"objects vanished during publish of 'm' \(1\); publish again"):
        reg.publish("m", "model", src)  # it found the content stored as m:v0 and copied nothing
    assert [v.ref for v in reg.list_versions()] == []
    again = reg.publish("m", "model", src)
    assert again.ref == "m:v1" and again.created and reg.verify().ok
