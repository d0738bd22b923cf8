"""Reference mode: split files kept in external storage (file:// here), recorded by URI and checksum."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, IntegrityError
from pipeline.registry.local import LocalRegistry, hash_file
from pipeline.stages import dataset_publish, finetune
from tests.conftest import inspect_records, run_cli
from tests.tiny import write_tickets, write_tiny_model


def registry(cfg) -> LocalRegistry:
    return LocalRegistry(Path(cfg.tracking.dir) / "registry")


def stored_objects(cfg) -> list[Path]:
    return [p for p in (Path(cfg.tracking.dir) / "registry" / "objects").rglob("*") if p.is_file()]


def test_reference_mode_records_uris_and_checksums_instead_of_copies(make_config, tmp_path):
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    store = tmp_path / "bucket"
    cfg = make_config(f"dataset.source=file://{csv}", f"dataset.reference=file://{store}", "dataset.id_column=ticket_id")
    result = dataset_publish.run(cfg)
    assert result.status == "ok" and result.produced == ["tickets:v0"]
    version = registry(cfg).resolve("tickets:v0")
    refs = {f.path: f for f in version.files if f.ref}
    assert sorted(refs) == ["test.parquet", "train.parquet", "validation.parquet"]
    for f in refs.values():
        assert f.ref.startswith(f"file://{store}/sha256/{f.digest[:2]}/{f.digest}")
        local = Path(f.ref[len("file://"):])
        assert hash_file(local) == (f.digest, f.size)
    # only dataset.json was copied into the registry
    assert [p.name for p in stored_objects(cfg)] == [next(f.digest for f in version.files if f.path == "dataset.json")]
    manifest_sources = json.loads(Path(registry(cfg).fetch(version, tmp_path / "ds").path / "dataset.json").read_text())["sources"]
    assert manifest_sources[0]["path"] == "tickets.csv"  # by its name: the version's bytes hold no location
    assert version.metadata["sources"][0]["path"] == f"file://{csv}"  # the source as the user named it
    assert version.metadata["reference"] == f"file://{store}"
    shown = run_cli("artifacts", "show", "tickets:v0", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert "train.parquet" in shown.stdout and refs["train.parquet"].ref in shown.stdout

    # the offline W&B run carries the references too (W&B's add_reference)
    art = next(r["artifact"] for r in inspect_records(Path(result.paths["run_dir"])) if r["type"] == "artifact"
               and any(e["path"] == "dataset.json" for e in r["artifact"]["manifest"]["contents"]))
    ref_entries = [e for e in art["manifest"]["contents"] if e.get("ref")]
    assert sorted(e["path"] for e in ref_entries) == sorted(refs)
    assert all(e["ref"].startswith("file://") for e in ref_entries)

    # publishing again: same digest, no new version, nothing rewritten in the store
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = dataset_publish.run(cfg)
    assert again.status == "unchanged" and again.produced == ["tickets:v0"]
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == mtimes

    # later stages read it like any dataset version: fetch reads and verifies the referenced bytes
    fetched = registry(cfg).fetch(version, tmp_path / "copy")
    assert hash_file(fetched.path / "train.parquet")[0] == refs["train.parquet"].digest


def test_a_changed_referenced_file_fails_fetch_and_verify(make_config, tmp_path):
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    store = tmp_path / "bucket"
    cfg = make_config(f"dataset.source={csv}", f"dataset.reference=file://{store}")
    dataset_publish.run(cfg)
    version = registry(cfg).resolve("tickets:v0")
    train = next(f for f in version.files if f.path == "train.parquet")
    path = Path(train.ref[len("file://"):])
    with open(path, "r+b") as fh:
        fh.seek(40)
        fh.write(b"tampered")
    with pytest.raises(IntegrityError, match=f"referenced file {train.ref} does not match its recorded sha256"):
        registry(cfg).fetch(version, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # nothing half-written
    out = run_cli("artifacts", "verify", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert out.returncode == 1 and train.ref in out.stdout + out.stderr and "tickets:v0 (train.parquet)" in out.stdout + out.stderr
    # publishing the same data again: the command line's default checks a referenced file by its size (reading
    # a big corpus back to hash it at every publish is what reference mode avoids), so it stays as it is ...
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"]
    assert registry(cfg).verify().corrupt
    # ... and reading again (--reread, the library's default) hashes it and puts the recorded bytes back
    assert dataset_publish.run(cfg).produced == ["tickets:v0"]
    assert registry(cfg).verify().ok
    assert hash_file(registry(cfg).fetch(version, tmp_path / "copy").path / "train.parquet")[0] == train.digest
    os.remove(path)
    report = registry(cfg).verify()
    assert list(report.missing) == [train.ref]


def test_finetune_trains_on_a_referenced_dataset(make_config, tmp_path):
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    model = write_tiny_model(tmp_path / "bert")
    cfg = make_config(f"dataset.source={csv}", f"dataset.reference=file://{tmp_path / 'bucket'}", f"model.base={model}",
                      "model.max_length=64", "train.epochs=1", "train.misclassified_rows=0")
    dataset_publish.run(cfg)
    result = finetune.run(cfg)
    assert result.status == "ok" and result.consumed == ["tickets:v0"]


def test_reference_must_be_a_storage_uri(make_config):
    with pytest.raises(ConfigError, match="dataset.reference"):
        make_config("dataset.reference=http://example.com/data")
