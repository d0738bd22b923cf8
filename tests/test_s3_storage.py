"""s3:// sources and reference mode against a local S3 server (moto), through pyarrow's real S3 client.

The same code path reaches AWS or any S3-compatible store: pyarrow reads the endpoint and the
credentials from the standard AWS_* environment variables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, IntegrityError
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from tests.conftest import run_cli
from tests.tiny import write_tickets

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint, monkeypatch):
    """(client, bucket): a fresh bucket; pyarrow and boto3 both pointed at the local server."""
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def objects(client, bucket: str, prefix: str = "") -> dict[str, dict]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in listed}


def config(tmp_path: Path, *extra: str):
    return load_config(None, ["dataset.name=tickets", "dataset.id_column=ticket_id", "model.name=clf",
                              f"tracking.dir={tmp_path / 'track'}", *extra])


def test_publish_from_s3_with_split_files_referenced_on_s3(s3, tmp_path):
    client, bucket = s3
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    client.upload_file(str(csv), bucket, "raw/tickets.csv")
    cfg = config(tmp_path, f"dataset.source=s3://{bucket}/raw/tickets.csv", f"dataset.reference=s3://{bucket}/refs")

    result = dataset_publish.run(cfg)
    assert result.status == "ok" and result.produced == ["tickets:v0"]
    reg = LocalRegistry(Path(cfg.tracking.dir) / "registry")
    version = reg.resolve("tickets:v0")
    assert version.metadata["sources"] == [{"path": f"s3://{bucket}/raw/tickets.csv",
                                            "sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
                                            "size": csv.stat().st_size}]
    refs = {f.path: f for f in version.files if f.ref}
    assert sorted(refs) == ["test.parquet", "train.parquet", "validation.parquet"]
    stored = objects(client, bucket, "refs/")
    for f in refs.values():  # content-addressed keys in the bucket, holding exactly the recorded bytes
        key = f"refs/sha256/{f.digest[:2]}/{f.digest}.parquet"
        assert f.ref == f"s3://{bucket}/{key}" and stored[key]["Size"] == f.size
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f.digest

    # the same data again: no new version and no new upload
    again = dataset_publish.run(cfg)
    assert again.status == "unchanged" and again.produced == ["tickets:v0"]
    assert objects(client, bucket, "refs/") == stored

    fetched = reg.fetch(version, tmp_path / "copy")
    assert json.loads((fetched.path / "dataset.json").read_text())["num_rows"] == version.metadata["num_rows"]
    assert hashlib.sha256((fetched.path / "train.parquet").read_bytes()).hexdigest() == refs["train.parquet"].digest

    # an object changed behind the registry's back is caught on fetch and by `artifacts verify`
    train = refs["train.parquet"]
    client.put_object(Bucket=bucket, Key=train.ref.split(f"s3://{bucket}/", 1)[1], Body=b"PAR1 tampered PAR1")
    with pytest.raises(IntegrityError, match=f"referenced file {train.ref} does not match its recorded sha256"):
        reg.fetch(version, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()
    out = run_cli("artifacts", "verify", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert out.returncode == 1 and train.ref in out.stdout + out.stderr


def test_an_s3_folder_source_reads_every_data_file(s3, tmp_path):
    client, bucket = s3
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    lines = csv.read_text().splitlines(keepends=True)
    (tmp_path / "a.csv").write_text("".join(lines[:121]))
    (tmp_path / "b.csv").write_text(lines[0] + "".join(lines[121:]))
    client.upload_file(str(tmp_path / "a.csv"), bucket, "exports/2026/a.csv")
    client.upload_file(str(tmp_path / "b.csv"), bucket, "exports/2026/b.csv")
    cfg = config(tmp_path, f"dataset.source=s3://{bucket}/exports/2026/")
    result = dataset_publish.run(cfg)
    version = LocalRegistry(Path(cfg.tracking.dir) / "registry").resolve(result.produced[0])
    assert [s["path"] for s in version.metadata["sources"]] == [f"s3://{bucket}/exports/2026/a.csv",
                                                                f"s3://{bucket}/exports/2026/b.csv"]
    assert sum(version.metadata["num_rows"].values()) == len(lines) - 1


def test_a_missing_s3_source_is_named(s3, tmp_path):
    _, bucket = s3
    cfg = config(tmp_path, f"dataset.source=s3://{bucket}/nothing/here.csv")
    with pytest.raises(ConfigError, match=f"dataset.source s3://{bucket}/nothing/here.csv does not exist"):
        dataset_publish.run(cfg)
    assert not (Path(cfg.tracking.dir) / "wandb").exists()


def test_split_files_on_s3_are_read_and_the_source_label_is_not(s3, tmp_path):
    client, bucket = s3
    lines = write_tickets(tmp_path / "tickets.csv", rows=240).read_text().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    parts = {"train/part-0.csv": body[:90], "train/part-1.csv": body[90:180], "validation.csv": body[180:210],
             "test.csv": body[210:]}
    for key, rows in parts.items():
        client.put_object(Bucket=bucket, Key=f"splits/{key}", Body=(header + "".join(rows)).encode())
    split_files = [f"dataset.split_files.train=s3://{bucket}/splits/train/",
                   f"dataset.split_files.validation=s3://{bucket}/splits/validation.csv",
                   f"dataset.split_files.test=s3://{bucket}/splits/test.csv"]
    # with split files, dataset.source only names the dataset: nothing is fetched from it
    cfg = config(tmp_path, f"dataset.source=s3://{bucket}/never/fetched.csv", *split_files)
    result = dataset_publish.run(cfg)
    version = LocalRegistry(Path(cfg.tracking.dir) / "registry").resolve(result.produced[0])
    assert version.metadata["num_rows"] == {"train": 180, "validation": 30, "test": len(body) - 210}
    assert [s["path"] for s in version.metadata["sources"]] == [f"s3://{bucket}/splits/{k}" for k in parts]
    missing = config(tmp_path, "dataset.source=tickets", *split_files[:2],
                     f"dataset.split_files.test=s3://{bucket}/splits/gone.csv")
    with pytest.raises(ConfigError, match=f"dataset.split_files.test s3://{bucket}/splits/gone.csv does not exist"):
        dataset_publish.run(missing)
