"""The W&B registry, as far as it can be exercised without a server.

Online calls (`use_artifact`, `Api().artifact`, alias saves) need W&B itself; what the
artifact carries is built by the same function the offline path logs, checked here and in
test_tracking.py from the offline run's records.
"""

import pytest

from pipeline.errors import RefError, RegistryError
from pipeline.registry.wandb_registry import WandbRegistry, make_wandb_artifact


def test_references_are_qualified_with_entity_and_project():
    reg = WandbRegistry(project="proj", entity="team")
    assert reg.qualify("model") == "team/proj/model:latest"
    assert reg.qualify("model:v3") == "team/proj/model:v3"
    assert reg.qualify("other/model:production") == "team/other/model:production"
    assert reg.qualify("acme/other/model:v1") == "acme/other/model:v1"
    with pytest.raises(RefError):
        reg.qualify("model:")


def test_publish_needs_a_run_and_valid_names(tmp_path):
    reg = WandbRegistry(project="proj", entity="team")
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    with pytest.raises(RegistryError, match="needs a tracked run"):
        reg.publish("model", "model", {"w.bin": f})
    with pytest.raises(RefError, match="invalid artifact name"):
        reg.publish("bad name", "model", {"w.bin": f})


def test_artifact_built_for_wandb_masks_secrets_and_checks_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_TOKEN", "tok-1234567890")
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    art = make_wandb_artifact("model", "model", {"weights/w.bin": f},
                              {"note": "tok-1234567890", "api_key": "k"}, immutable=False)
    assert art.metadata == {"note": "***", "api_key": "***"}
    assert list(art.manifest.entries) == ["weights/w.bin"]
    with pytest.raises(RegistryError, match="escapes"):
        make_wandb_artifact("model", "model", {"../w.bin": f}, {}, immutable=True)
