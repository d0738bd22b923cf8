"""s3:// sources and reference mode against a local S3 server (moto), through pyarrow's real S3 client.

The same code path reaches AWS or any S3-compatible store: pyarrow reads the endpoint and the
credentials from the standard AWS_* environment variables.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from tests import object_stores as scenario
from tests.object_stores import config
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


class S3Bucket:
    """A bucket on the S3 server, read and written with boto3 (an `object_stores.Store`)."""

    scheme = "s3"

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def sizes(self, prefix: str = "") -> dict[str, int]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix).get("Contents", [])
        return {o["Key"]: o["Size"] for o in listed}


@pytest.fixture
def s3(endpoint, monkeypatch) -> S3Bucket:
    """A fresh bucket; pyarrow and boto3 both pointed at the local server."""
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
    return S3Bucket(client, bucket)


def test_publish_from_s3_with_split_files_referenced_on_s3(s3, tmp_path):
    scenario.publish_with_split_files_referenced_in_the_store(s3, tmp_path)


def test_an_s3_folder_source_reads_every_data_file(s3, tmp_path):
    scenario.a_folder_source_reads_every_data_file(s3, tmp_path)


def test_a_missing_s3_source_is_named(s3, tmp_path):
    scenario.a_missing_source_is_named(s3, tmp_path)


def test_problems_in_an_s3_file_are_named_by_its_uri_not_the_downloaded_copy(s3, tmp_path, caplog):
    scenario.problems_are_named_by_the_uri_not_the_downloaded_copy(s3, tmp_path, caplog)


def test_split_files_on_s3_are_read_and_the_source_label_is_not(s3, tmp_path):
    bucket = s3.name
    lines = write_tickets(tmp_path / "tickets.csv", rows=240).read_text().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    parts = {"train/part-0.csv": body[:90], "train/part-1.csv": body[90:180], "validation.csv": body[180:210],
             "test.csv": body[210:]}
    for key, rows in parts.items():
        s3.put(f"splits/{key}", (header + "".join(rows)).encode())
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
