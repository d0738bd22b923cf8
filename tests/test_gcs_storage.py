"""gs:// sources and reference mode against a local Cloud Storage emulator, through pyarrow's real GCS client.

The pipeline opens ``gs://`` URIs as it would for Google Cloud (``pyarrow.fs.FileSystem.from_uri``,
application default credentials). Here the standard variables point that client elsewhere:
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (honoured by the google-cloud-cpp client inside Arrow) at the
emulator, and ``GOOGLE_APPLICATION_CREDENTIALS`` at an ``authorized_user`` credentials file whose
token endpoint is a local stand-in, so no request leaves the machine. The test side reads and
writes the bucket over the emulator's JSON API with plain HTTP, not through pyarrow.
"""

from __future__ import annotations

import http.server
import json
import urllib.request
import uuid
from urllib.parse import quote

import pytest

from tests import object_stores as scenario
from tests.conftest import local_http, unused_port

emulator = pytest.importorskip("gcp_storage_emulator.server")


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
    port = unused_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    credentials = tmp_path_factory.mktemp("gcloud") / "application_default_credentials.json"
    try:
        with local_http(_TokenEndpoint) as tokens:
            credentials.write_text(json.dumps({"type": "authorized_user", "client_id": "test", "client_secret": "test",
                                               "refresh_token": "test", "token_uri": f"{tokens}/token"}))
            yield f"http://127.0.0.1:{port}", credentials
    finally:
        server.stop()


class Bucket:
    """A bucket on the emulator, read and written over its JSON API (an `object_stores.Store`)."""

    scheme = "gs"

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


def test_publish_from_gcs_with_split_files_referenced_on_gcs(gcs, tmp_path):
    scenario.publish_with_split_files_referenced_in_the_store(gcs, tmp_path)


def test_a_gcs_folder_source_reads_every_data_file(gcs, tmp_path):
    scenario.a_folder_source_reads_every_data_file(gcs, tmp_path)


def test_a_missing_gcs_source_is_named(gcs, tmp_path):
    scenario.a_missing_source_is_named(gcs, tmp_path)


def test_problems_in_a_gcs_file_are_named_by_its_uri_not_the_downloaded_copy(gcs, tmp_path, caplog):
    scenario.problems_are_named_by_the_uri_not_the_downloaded_copy(gcs, tmp_path, caplog)
