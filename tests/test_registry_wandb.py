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


def _run(entity: str, project: str, run_id: str, logged=(), used=()):
    """What W&B's API hands back for a run: the attributes the registry reads (no server here)."""
    from types import SimpleNamespace

    return SimpleNamespace(id=run_id, entity=entity, project=project, job_type="finetune", group="g", state="finished",
                           config={}, summary={}, created_at="2026-11-28", logged_artifacts=lambda: list(logged),
                           used_artifacts=lambda: list(used))


def _artifact(entity: str, project: str, name: str = "tickets", version: str = "v3", producer=None, users=()):
    """What W&B's API hands back for an artifact: the attributes `to_version` reads."""
    from types import SimpleNamespace

    return SimpleNamespace(
        name=f"{name}:{version}", version=version, type="dataset", digest="d" * 32, size=10, metadata={"a": 1},
        aliases=["latest"], created_at="2026-11-28T00:00:00", entity=entity, project=project,
        qualified_name=f"{entity}/{project}/{name}:{version}", manifest=SimpleNamespace(entries={}),
        logged_by=lambda: producer or _run(entity, project, "run1"), used_by=lambda: list(users))


@pytest.mark.parametrize("entity, project, ref", [
    ("team", "proj", "tickets:v3"),                            # the configured project: the plain exact ref
    ("team", "other", "team/other/tickets:v3"),                # another project's version
    ("acme", "proj", "acme/proj/tickets:v3"),                  # another entity's project of the same name
    ("team", "wandb-registry-model", "team/wandb-registry-model/tickets:v3"),  # a link in W&B's registry
])
def test_a_version_outside_the_configured_project_keeps_its_project_in_its_ref(entity, project, ref):
    """The stages record a version's exact ref and resolve it again (finetune's dataset, evaluate's training data,
    reproduce). A bare `tickets:v3` from another project was resolved again in the config's project: another
    version, or none."""
    reg = WandbRegistry(project="proj", entity="team")
    version = reg.to_version(_artifact(entity, project))
    assert version.ref == ref and version.to_dict()["ref"] == ref
    assert reg.qualify(version.ref) == version.qualified_name == f"{entity}/{project}/tickets:v3"
    # its aliases are looked up where it is (evaluate's production, delete's latest)
    assert reg.qualify(version.tagged("production")) == f"{entity}/{project}/tickets:production"


@pytest.mark.parametrize("logged_as, made_by, created", [
    ("v1", "run-v1", False),  # v1's content again, while `latest` is on v0: W&B matched v1, which another run made
    ("v2", "now", True),      # new content: the next version, made by this run
    ("v0", "run-v0", False),  # what `latest` is on
])
def test_online_publish_says_new_only_for_a_version_this_run_made(tmp_path, logged_as, made_by, created):
    """`latest` is not always the newest version (content published again puts it back on an older one), so a
    version number above it does not make a version new."""
    from types import SimpleNamespace

    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    versions = {"latest": _artifact("team", "proj", "clf", "v0", producer=_run("team", "proj", "run-v0")),
                logged_as: _artifact("team", "proj", "clf", logged_as, producer=_run("team", "proj", made_by))}

    class Api:
        def artifact(self, path, type=None):
            return versions[path.rsplit(":", 1)[-1]]

    logged = []
    wandb_run = SimpleNamespace(id="now", log_artifact=lambda art, aliases: logged.append(aliases) or
                                SimpleNamespace(version=logged_as, wait=lambda: None))
    run = SimpleNamespace(wandb_run=wandb_run, id="now", note_produced=lambda ref: None)
    reg = WandbRegistry(project="proj", entity="team")
    reg._api = Api()
    result = reg.publish("clf", "model", {"w.bin": f}, run=run)
    assert (result.created, result.ref, result.latest_before) == (created, f"clf:{logged_as}", "clf:v0")
    assert logged == [["latest"]] and (result.bytes_stored > 0) == created


def test_an_alias_taken_off_online_is_saved_on_the_version_that_held_it():
    """`artifacts unalias` online: W&B's artifact loses the alias and is saved; latest and vN are refused unread."""
    art = _artifact("team", "proj", "clf", "v2")
    art.aliases.append("staging")
    saved = []
    art.save = lambda: saved.append(list(art.aliases))
    asked = []

    class Api:  # W&B's public API, as far as the registry's lookup asks it
        def artifact(self, path, type=None):
            asked.append(path)
            return art

    reg = WandbRegistry(project="proj", entity="team")
    reg._api = Api()
    assert reg.remove_alias("clf:staging").aliases == ["latest"]
    assert asked == ["team/proj/clf:staging"] and saved == [["latest"]]
    for ref, said in (("clf:latest", "'latest' moves by itself"), ("clf:v2", "names of the form vN are versions")):
        with pytest.raises((RegistryError, RefError), match=said):
            reg.remove_alias(ref)
    assert asked == ["team/proj/clf:staging"]


def test_latest_put_on_a_reused_version_online_is_saved_on_it():
    """A stage that reuses an older version (its content published again) puts `latest` on it, as W&B does when the
    same content is logged again: the alias is added and the artifact saved (W&B takes it off the other version);
    a version that holds it already is not saved again."""
    art = _artifact("team", "proj", "tickets", "v0")
    art.aliases.remove("latest")
    saved = []
    art.save = lambda: saved.append(list(art.aliases))

    class Api:
        def artifact(self, path, type=None):
            return art

    reg = WandbRegistry(project="proj", entity="team")
    reg._api = Api()
    assert reg.mark_latest("tickets:v0").aliases == ["latest"] and saved == [["latest"]]
    reg.mark_latest("tickets:v0")
    assert saved == [["latest"]]


def test_lineage_online_names_another_projects_runs_and_versions_where_they_are():
    """lineage walks W&B's runs and artifacts: a version's producing run in another project is looked up there (it
    was looked up in the config's project, and shown as not recorded), and what a run consumed from another
    project keeps its project in its ref."""
    data = _artifact("team", "shared-data", "tickets", "v2", producer=_run("team", "shared-data", "pub1"))
    model = _artifact("team", "proj", "clf", "v0", producer=_run("team", "proj", "ft1"))
    runs = {"team/shared-data/pub1": _run("team", "shared-data", "pub1", logged=[data]),
            "team/proj/ft1": _run("team", "proj", "ft1", logged=[model], used=[data])}

    class Api:  # W&B's public API, as far as get_run asks it
        def run(self, path):
            return runs[path]

    reg = WandbRegistry(project="proj", entity="team")
    reg._api = Api()
    assert reg.to_version(data).produced_by == "team/shared-data/pub1"
    assert reg.to_version(model).produced_by == "ft1"
    trained = reg.get_run("ft1")
    assert trained["consumed"] == ["team/shared-data/tickets:v2"] and trained["produced"] == ["clf:v0"]
    published = reg.get_run(reg.to_version(data).produced_by)
    assert published["id"] == "team/shared-data/pub1" and published["project"] == "shared-data"
    assert published["produced"] == ["team/shared-data/tickets:v2"]


def test_online_delete_refuses_a_version_a_running_run_uses():
    """As the local registry: a dataset version a finetune is training on now is not deleted under it (its state is
    W&B's `running`); a finished or crashed user does not hold it, and --force deletes it anyway."""
    from pipeline.errors import RegistryError

    training = _run("team", "proj", "fit9")
    training.state = "running"
    crashed = _run("team", "proj", "old1")
    crashed.state = "crashed"
    art = _artifact("team", "proj", "tickets", "v3", users=[crashed, training])
    deleted = []
    art.id = "a3"
    art.delete = lambda delete_aliases: deleted.append(delete_aliases)

    class Api:
        def artifact(self, path, type=None):
            if path.endswith(":latest"):
                return _artifact("team", "proj", "tickets", "v4")
            return art

    reg = WandbRegistry(project="proj", entity="team")
    reg._api = Api()
    with pytest.raises(RegistryError, match=r"^tickets:v3 is in use by run fit9 \(finetune\), running now"):
        reg.delete("tickets:v3")
    assert deleted == []
    training.state = "finished"
    assert reg.delete("tickets:v3").latest_now == "tickets:v4" and deleted == [True]
    training.state = "running"
    assert reg.delete("tickets:v3", force=True).version.ref == "tickets:v3" and len(deleted) == 2
