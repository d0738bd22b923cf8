"""gs:// sources and reference mode against a local Cloud Storage emulator, through pyarrow's real GCS client.

The pipeline opens ``gs://`` URIs as it would for Google Cloud (``pyarrow.fs.FileSystem.from_uri``,
application default credentials). Here the standard variables point that client elsewhere:
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (honoured by the google-cloud-cpp client inside Arrow) at the
emulator, and ``GOOGLE_APPLICATION_CREDENTIALS`` at an ``authorized_user`` credentials file whose
token endpoint is a local stand-in, so no request leaves the machine. The test side reads and
writes the bucket over the emulator's JSON API with plain HTTP, not through pyarrow.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import socket
import threading
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.errors import ConfigError, IntegrityError
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from tests.conftest import inspect_records, run_cli
from tests.tiny import write_tickets

emulator = pytest.importorskip("gcp_storage_emulator.server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TokenEndpoint(http.server.BaseHTTPRequestHandler):
    """OAuth2's token endpoint, as far as a refresh-token exchange needs it."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"access_token": "local-test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(emulator endpoint, credentials file)."""
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    tokens = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    credentials = tmp_path_factory.mktemp("gcloud") / "application_default_credentials.json"
    credentials.write_text(json.dumps({"type": "authorized_user", "client_id": "test", "client_secret": "test",
                                       "refresh_token": "test",
                                       "token_uri": f"http://127.0.0.1:{tokens.server_address[1]}/token"}))
    yield f"http://127.0.0.1:{port}", credentials
    tokens.shutdown()
    server.stop()


class Bucket:
    """A bucket on the emulator, read and written over its JSON API."""

    def __init__(self, endpoint: str, name: str):
        self.endpoint, self.name = endpoint, name

    def _call(self, method: str, url: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.endpoint}{url}", data=data, method=method,
                                         headers={"Content-Type": "application/json" if method == "POST" and
                                                  url.startswith("/storage") else "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def create(self) -> Bucket:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": self.name}).encode())
        return self

    def put(self, key: str, body: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{self.name}/o?uploadType=media&name={quote(key, safe='')}", body)

    def get(self, key: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{self.name}/o/{quote(key, safe='')}?alt=media")

    def sizes(self, prefix: str = "") -> dict[str, int]:
        listed = json.loads(self._call("GET", f"/storage/v1/b/{self.name}/o?prefix={quote(prefix, safe='')}"))
        return {o["name"]: int(o["size"]) for o in listed.get("items", [])}


@pytest.fixture
def gcs(servers, monkeypatch) -> Bucket:
    endpoint, credentials = servers
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", endpoint)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    return Bucket(endpoint, f"b-{uuid.uuid4().hex[:10]}").create()


def config(tmp_path: Path, *extra: str):
    return load_config(None, ["dataset.name=tickets", "dataset.id_column=ticket_id", "model.name=clf",
                              f"tracking.dir={tmp_path / 'track'}", *extra])


def test_publish_from_gcs_with_split_files_referenced_on_gcs(gcs, tmp_path):
    csv = write_tickets(tmp_path / "tickets.csv", rows=240)
    gcs.put("raw/tickets.csv", csv.read_bytes())
    cfg = config(tmp_path, f"dataset.source=gs://{gcs.name}/raw/tickets.csv", f"dataset.reference=gs://{gcs.name}/refs")

    result = dataset_publish.run(cfg)
    assert result.status == "ok" and result.produced == ["tickets:v0"]
    reg = LocalRegistry(Path(cfg.tracking.dir) / "registry")
    version = reg.resolve("tickets:v0")
    assert version.metadata["sources"] == [{"path": f"gs://{gcs.name}/raw/tickets.csv",
                                            "sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
                                            "size": csv.stat().st_size}]
    refs = {f.path: f for f in version.files if f.ref}
    assert sorted(refs) == ["test.parquet", "train.parquet", "validation.parquet"]
    stored = gcs.sizes("refs/")
    for f in refs.values():  # content-addressed objects in the bucket, holding exactly the recorded bytes
        key = f"refs/sha256/{f.digest[:2]}/{f.digest}.parquet"
        assert f.ref == f"gs://{gcs.name}/{key}" and stored[key] == f.size
        assert hashlib.sha256(gcs.get(key)).hexdigest() == f.digest

    # the offline W&B run logged the version with the same references (W&B's cloud SDKs are not needed for it)
    art = next(r["artifact"] for r in inspect_records(Path(result.paths["run_dir"]))
               if r["type"] == "artifact" and r["artifact"]["name"] == "tickets")
    entries = {e["path"]: e for e in art["manifest"]["contents"]}
    assert {p: entries[p]["ref"] for p in refs} == {p: f.ref for p, f in refs.items()}
    assert "dataset.json" in entries and not entries["dataset.json"].get("ref")

    # the same data again: no new version and no new upload
    again = dataset_publish.run(cfg)
    assert again.status == "unchanged" and again.produced == ["tickets:v0"]
    assert gcs.sizes("refs/") == stored

    fetched = reg.fetch(version, tmp_path / "copy")
    assert json.loads((fetched.path / "dataset.json").read_text())["num_rows"] == version.metadata["num_rows"]
    assert hashlib.sha256((fetched.path / "train.parquet").read_bytes()).hexdigest() == refs["train.parquet"].digest

    # an object changed behind the registry's back is caught on fetch and by `artifacts verify`
    train = refs["train.parquet"]
    gcs.put(train.ref.split(f"gs://{gcs.name}/", 1)[1], b"PAR1 tampered PAR1")
    with pytest.raises(IntegrityError, match=f"referenced file {train.ref} does not match its recorded sha256"):
        reg.fetch(version, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()
    out = run_cli("artifacts", "verify", "--set", f"tracking.dir={cfg.tracking.dir}")
    assert out.returncode == 1 and train.ref in out.stdout + out.stderr


def test_a_gcs_folder_source_reads_every_data_file(gcs, tmp_path):
    lines = write_tickets(tmp_path / "tickets.csv", rows=240).read_text().splitlines(keepends=True)
    gcs.put("exports/2026/a.csv", "".join(lines[:121]).encode())
    gcs.put("exports/2026/b.csv", (lines[0] + "".join(lines[121:])).encode())
    cfg = config(tmp_path, f"dataset.source=gs://{gcs.name}/exports/2026/")
    result = dataset_publish.run(cfg)
    version = LocalRegistry(Path(cfg.tracking.dir) / "registry").resolve(result.produced[0])
    assert [s["path"] for s in version.metadata["sources"]] == [f"gs://{gcs.name}/exports/2026/a.csv",
                                                                f"gs://{gcs.name}/exports/2026/b.csv"]
    assert sum(version.metadata["num_rows"].values()) == len(lines) - 1


def test_a_missing_gcs_source_is_named(gcs, tmp_path):
    cfg = config(tmp_path, f"dataset.source=gs://{gcs.name}/nothing/here.csv")
    with pytest.raises(ConfigError, match=f"dataset.source gs://{gcs.name}/nothing/here.csv does not exist"):
        dataset_publish.run(cfg)
    assert not (Path(cfg.tracking.dir) / "wandb").exists()


def test_problems_in_a_gcs_file_are_named_by_its_uri_not_the_downloaded_copy(gcs, tmp_path, caplog):
    lines = write_tickets(tmp_path / "tickets.csv", rows=240).read_text().splitlines(keepends=True)
    unlabelled = lines[:5] + [lines[5].rsplit(",", 1)[0] + ",\n"] + lines[6:]  # data row 5: no label
    gcs.put("raw/unlabelled.csv", "".join(unlabelled).encode())
    uri = f"gs://{gcs.name}/raw/unlabelled.csv"
    with pytest.raises(DataError) as e:
        dataset_publish.run(config(tmp_path, f"dataset.source={uri}"))
    assert f"null_label (1 rows, column 'label' is empty or null): {uri} row 5" in str(e.value)
    assert "dataset-source-" not in str(e.value)

    with caplog.at_level(logging.WARNING):  # the rows a warning names, and the dropped rows table
        result = dataset_publish.run(config(tmp_path, f"dataset.source={uri}", "dataset.on_invalid=drop"))
    assert result.status == "ok" and "dataset-source-" not in caplog.text
    assert f"({uri} row " in caplog.text  # the demo tickets' copies with another label (a warning)

    ragged = lines[:10] + ["T-x,one field too many,billing,extra\n"] + lines[10:]  # data row 10
    gcs.put("raw/ragged.csv", "".join(ragged).encode())
    with pytest.raises(DataError, match=rf"^gs://{gcs.name}/raw/ragged.csv row 10: expected 3 fields, found 4"):
        dataset_publish.run(config(tmp_path, f"dataset.source=gs://{gcs.name}/raw/ragged.csv"))
