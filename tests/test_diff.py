"""`artifacts diff`: files, metadata and rows that changed between two versions."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from pipeline.diff import _list_change, ABSENT, DiffError, _dict_diff, _short, diff_versions
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from tests.conftest import run_cli

LABELS = ["billing", "shipping", "tech"]


def tickets(n: int = 20) -> list[dict]:
    return [{"id": f"{lbl}-{i}", "text": f"{lbl} question number {i}", "label": lbl} for lbl in LABELS for i in range(n)]


def write(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return path


@pytest.fixture
def publish(make_config, tmp_path):
    def run(records: list[dict], name: str, *extra: str) -> str:
        cfg = make_config(f"dataset.source={write(tmp_path / name, records)}", *extra)
        return dataset_publish.run(cfg).produced[0]

    return run


def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "track" / "registry")


def test_two_dataset_versions_differ_by_the_rows_added_removed_relabelled_and_moved(publish, tmp_path):
    before = tickets()
    after = [dict(r) for r in before[3:]]                      # billing-0..2 removed
    after[0]["label"] = "shipping"                             # billing-3 relabelled (and its text rewritten)
    after[0]["text"] = "parcel\tlate?\nwhere is it"
    after[1]["text"] = "billing question number four"          # billing-4 edited
    after += [{"id": "new-1", "text": "a new question about my invoice", "label": "billing"},
              {"id": "new-2", "text": "a new question about my parcel", "label": "shipping"}]
    a = publish(before, "a.csv", "dataset.id_column=id")
    b = publish(after, "b.csv", "dataset.id_column=id")
    d = diff_versions(registry(tmp_path), a, b)

    assert d.rows.key == "id"
    counts = d.rows.counts
    assert (counts["added"], counts["removed"], counts["relabelled"], counts["edited"]) == (2, 3, 1, 1)
    assert sum(n for kind, n in counts.items() if kind != "removed") == len(after) and "copies" not in counts
    edited = d.rows.examples["edited"][0]
    assert edited["id"] == "billing-4" and edited["text"] == ["billing question number 4", "billing question number four"]
    assert [r["id"] for r in d.rows.examples["removed"]] == ["billing-0", "billing-1", "billing-2"]
    assert [r["id"] for r in d.rows.examples["added"]] == ["new-1", "new-2"]
    relabelled = d.rows.examples["relabelled"][0]
    assert relabelled["id"] == "billing-3" and relabelled["label"] == ["billing", "shipping"]
    assert relabelled["text"] == ["billing question number 3", "parcel\tlate?\nwhere is it"]  # both
    assert d.rows.label_counts == {"billing": (20, 17), "shipping": (20, 22), "tech": (20, 20)}
    assert {"dataset.json", "train.parquet"} <= set(d.files["changed"]) and not d.files["added"] + d.files["removed"]
    assert ("config.dataset.source", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")) in d.metadata
    assert ("num_rows.train", 48, 47) in d.metadata

    cli = run_cli("artifacts", "diff", a, b, "--show", "1", "--set", f"tracking.dir={tmp_path / 'track'}")
    assert cli.returncode == 0, cli.stderr
    assert f"{a} -> {b} (dataset)" in cli.stdout
    assert "rows (matched by id): 2 added, 3 removed, 1 relabelled" in cli.stdout
    assert "id=billing-3" in cli.stdout and "label=billing -> shipping" in cli.stdout and "id=billing-1  " not in cli.stdout
    # both texts, a line break and a tab written out so that the report keeps one line per row
    assert "text=billing question number 3 -> parcel\\tlate?\\nwhere is it  label=billing -> shipping" in cli.stdout
    assert "rows per label: billing 20 -> 17; shipping 20 -> 22" in cli.stdout
    assert not re.search(r"=(\S+) -> \1(\s|$)", cli.stdout), cli.stdout  # what did not change is one value (split=train)
    as_json = json.loads(run_cli("artifacts", "diff", a, b, "--json", "--set", f"tracking.dir={tmp_path / 'track'}").stdout)
    assert as_json["rows"]["counts"] == counts and as_json["same_content"] is False


def test_a_setting_added_since_a_version_was_made_is_no_change_at_its_default(publish, tmp_path):
    reg = registry(tmp_path)
    a = publish(tickets(), "a.csv")
    older = json.loads(json.dumps(reg.resolve(a).metadata["config"]))
    del older["dataset"]["sample_rows"]  # recorded before the setting existed
    reg.update_metadata(a, {"config": older})
    b = publish(tickets(), "b.csv", "dataset.sample_rows=5")
    c = publish(tickets()[1:], "c.csv")
    for ref, signature in ((a, "1" * 64), (c, "2" * 64)):  # what reuse matches: hashes, not news for a person
        reg.update_metadata(ref, {"input_signatures": [signature]})
    keys = {key for key, _, _ in diff_versions(reg, a, c).metadata}
    assert "config.dataset.source" in keys and "config.dataset.sample_rows" not in keys
    assert not any(k.startswith("input_signatures") for k in keys)
    assert ("config.dataset.sample_rows", 20, 5) in diff_versions(reg, a, b).metadata


def test_only_the_config_groups_that_make_a_version_are_compared(publish, tmp_path):
    """A dataset version records its run's whole config; train.*, model.* or tracking.* did not make it, and showing
    them as its changes (`config.train.epochs: 2.0 -> 12.0` between two versions of data) said they did. A model's
    comparison keeps dataset.*, model.* and train.*, and leaves out evaluate.* and the rest."""
    reg = registry(tmp_path)
    a = publish(tickets(), "a.csv")
    b = publish(tickets()[1:], "b.csv", "train.epochs=12", "model.max_length=32", "evaluate.gate.min_accuracy=0.9",
                "tracking.group=nightly")
    keys = {key for key, _, _ in diff_versions(reg, a, b).metadata}
    assert "config.dataset.source" in keys and not [k for k in keys if k.startswith("config.") and
                                                    not k.startswith("config.dataset.")]
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    recorded = {v: reg.resolve(v).metadata["config"] for v in (a, b)}
    m0 = reg.publish("clf", "model", model_dir, metadata={"config": recorded[a]}).version.ref
    (model_dir / "config.json").write_text('{"changed": true}')
    m1 = reg.publish("clf", "model", model_dir, metadata={"config": recorded[b]}).version.ref
    keys = {key for key, _, _ in diff_versions(reg, m0, m1).metadata}
    assert {"config.dataset.source", "config.train.epochs", "config.model.max_length"} <= keys
    assert not [k for k in keys if k.startswith(("config.evaluate", "config.project", "config.tracking"))]


def test_without_ids_rows_are_matched_by_text_and_copies_are_counted(publish, tmp_path):
    before = [{"text": r["text"], "label": r["label"]} for r in tickets()]
    after = [*before, dict(before[5]), {"text": "a question never seen", "label": "tech"}]  # one more copy, one new
    a, b = publish(before, "a.csv"), publish(after, "b.csv")
    d = diff_versions(registry(tmp_path), a, b)
    assert d.rows.key == "text"
    assert (d.rows.counts["added"], d.rows.counts["removed"], d.rows.counts["copies"]) == (1, 0, 1)
    assert d.rows.examples["copies"][0]["text"] == before[5]["text"]
    assert d.rows.examples["copies"][0]["copies"] == [1, 2]


def test_rows_without_an_id_are_matched_by_text_and_each_is_counted(publish, tmp_path):
    """An id column may leave rows without one (an id is checked for duplicates, not required): those rows are
    matched by their text, not grouped under one null id that matches nothing (1 added and 1 removed for them all)."""
    before = tickets()
    for r in before[::6]:
        r["id"] = ""
    after = [dict(r) for r in before]
    after[0]["label"] = "tech"                            # a row without an id relabelled
    after[6]["text"] = "a rewritten billing question"     # one without an id rewritten: removed and added, by text
    after[1]["label"] = "shipping"                        # a row with an id relabelled
    a = publish(before, "a.csv", "dataset.id_column=id")
    b = publish(after, "b.csv", "dataset.id_column=id")
    d = diff_versions(registry(tmp_path), a, b)

    assert d.rows.key == "id, else text"
    counts = d.rows.counts
    assert (counts["added"], counts["removed"], counts["relabelled"], counts["edited"], counts["copies"]) == (1, 1, 2, 0, 0)
    assert sum(n for kind, n in counts.items() if kind != "removed") == len(after)
    relabelled = d.rows.examples["relabelled"]
    assert [(r["id"], r["text"], r["label"]) for r in relabelled] == [
        ("billing-1", "billing question number 1", ["billing", "shipping"]),
        (None, "billing question number 0", ["billing", "tech"])]
    assert [(r["id"], r["text"]) for r in d.rows.examples["added"]] == [(None, "a rewritten billing question")]
    assert [(r["id"], r["text"]) for r in d.rows.examples["removed"]] == [(None, "billing question number 6")]
    cli = run_cli("artifacts", "diff", a, b, "--set", f"tracking.dir={tmp_path / 'track'}")
    assert "rows (matched by id, else text): 1 added, 1 removed, 2 relabelled, 0 edited" in cli.stdout, cli.stdout


def test_the_same_content_other_types_unknown_and_deleted_versions(publish, tmp_path):
    a = publish(tickets(), "a.csv")
    reg = registry(tmp_path)
    same = diff_versions(reg, a, "tickets:latest")
    assert same.rows is None and same.metadata == [] and same.files == {"added": [], "removed": [], "changed": []}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    reg.publish("clf", "model", model_dir)
    with pytest.raises(DiffError, match="tickets:v0 is a 'dataset' artifact and clf:v0 a 'model' artifact"):
        diff_versions(reg, a, "clf:v0")
    cli = run_cli("artifacts", "diff", a, "tickets:v9", "--set", f"tracking.dir={tmp_path / 'track'}")
    assert cli.returncode == 2 and "tickets has no version 'v9'" in cli.stderr

    b = publish(tickets(25), "b.csv")
    reg.delete(a)
    gone = diff_versions(reg, a, b)
    assert gone.rows is None and gone.files is None and gone.skipped == f"{a} was deleted; its files are gone"
    assert ("num_rows.train", 48, 63) in gone.metadata  # its record keeps the metadata


def test_metadata_is_compared_leaf_by_leaf_and_a_one_sided_subtree_is_one_entry():
    a = {"config": {"train": {"lr": 5e-5, "epochs": 3}}, "evaluation": {"gate": {"passed": True}},
         "sources": [{"path": "a.csv", "sha256": "1"}], "tags": ["x"], "seed": 1}
    b = {"config": {"train": {"lr": 1e-4, "epochs": 3}}, "sources": [{"path": "a.csv", "sha256": "2"}],
         "tags": ["x", "y"], "seed": 1.0}
    assert _dict_diff(a, b) == [
        ("config.train.lr", 5e-5, 1e-4),
        ("evaluation", {"gate": {"passed": True}}, ABSENT),
        ("seed", 1, 1.0),
        ("sources.0.sha256", "1", "2"),
        ("tags", ["x"], ["x", "y"]),
    ]


def test_a_value_shown_in_a_report_keeps_its_letters():
    """Label names are often not ASCII; JSON's \\u00f6 escapes made `Höhe` unreadable in the report."""
    assert _short(["Höhe & Co", "🚀", "tab\there"]) == '["Höhe & Co", "🚀", "tab\\there"]'
    assert _short("über\nalles") == "über\\nalles"
    # and cannot drive the terminal it is printed on: control characters and direction overrides come escaped
    assert _short("red \x1b[31m\u2028\u202eevil") == "red \\x1b[31m\\u2028\\u202eevil"
    assert _short({"label": "\x9bx\u2066"}) == '{"label": "\\x9bx\\u2066"}'



def test_a_long_list_that_changed_is_shown_as_what_was_added_removed_or_reordered():
    """`label_names` of two dataset versions cut at 80 characters hid the label added at its end."""
    six = ["account_access", "billing", "cancellation", "product_question", "shipping", "technical_issue"]
    seven = [*six[:4], "sales", *six[4:]]
    assert _list_change(six, seven) == '6 -> 7 items; added ["sales"]'
    assert _list_change(seven, six[1:]) == '7 -> 5 items; removed ["account_access", "sales"]'
    assert _list_change(six, six[::-1]) == "6 -> 6 items; the same items in another order"
    assert _list_change([*six[1:], "refunds", six[0]], six) == ('7 -> 6 items; removed ["refunds"]; the items in both in '
                                                               'another order')
    assert _list_change(["a"], ["a", "b"]) is None  # short enough to be shown whole
    assert _list_change([{"path": "a"}] * 9, [{"path": "b"}] * 9) is None  # records: compared key by key instead


def test_a_label_added_to_a_dataset_shows_in_its_diff(publish, tmp_path):
    names = ["account_access_request", "billing_and_invoices", "cancellation_of_contract", "shipping_and_delivery"]
    rows = [{"id": f"{n}-{i}", "text": f"{n} question number {i}", "label": n} for n in names for i in range(10)]
    a = publish(rows, "a.csv", "dataset.id_column=id")
    b = publish(rows + [{"id": f"sales-{i}", "text": f"a quote for {i} seats", "label": "sales"} for i in range(10)],
                "b.csv", "dataset.id_column=id")
    cli = run_cli("artifacts", "diff", a, b, "--set", f"tracking.dir={tmp_path / 'track'}")
    assert cli.returncode == 0, cli.stderr
    assert '    label_names: 4 -> 5 items; added ["sales"]; the items in both in another order' not in cli.stdout
    assert '    label_names: 4 -> 5 items; added ["sales"]' in cli.stdout.splitlines()


def test_the_report_lists_what_made_a_model_first_and_numbers_with_the_digits_that_tell_them_apart(tmp_path):
    """A model's diff had 87 keys, sorted by name: its evaluation's per-class scores (16 digits each) came before
    what it was made from, and the first 20 lines were all evaluation."""
    reg = registry(tmp_path)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    made = []
    for n, (acc, loss, ref) in enumerate(((0.9230769230769231, 0.123456789, "tickets:v0"),
                                          (0.8823529411764706, 0.123456788, "tickets:v1"))):
        (model_dir / "config.json").write_text(json.dumps({"n": n}))
        metadata = {"dataset": {"ref": ref}, "metrics": {"best": {"accuracy": acc, "loss": loss}},
                    "evaluation": {"per_class": {lbl: {"f1": acc - i / 10} for i, lbl in enumerate(LABELS)}},
                    "alias_moves": [{"alias": "production"}] * n, "zeta": n}
        made.append(reg.publish("clf", "model", model_dir, metadata=metadata).version.ref)
    from pipeline.diff import format_diff

    lines = format_diff(diff_versions(reg, *made)).splitlines()[3:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "dataset.ref", "metrics.best.accuracy", "metrics.best.loss", "zeta", "evaluation.per_class.billing.f1",
        "evaluation.per_class.shipping.f1", "evaluation.per_class.tech.f1", "alias_moves"]
    assert lines[1].strip() == "metrics.best.accuracy: 0.9231 -> 0.8824"
    assert lines[2].strip() == "metrics.best.loss: 0.123456789 -> 0.123456788"  # as many digits as differ
    assert lines[3].strip() == "zeta: 0 -> 1"


def test_one_line_leaves_no_line_break_control_character_or_direction_override():
    """`printable.one_line` on random text: one line for str.splitlines(), no control character (Cc) or
    bidirectional override left; text without them comes back unchanged."""
    import random
    import unicodedata

    from pipeline.printable import one_line

    rng = random.Random(0)
    pool = [chr(c) for c in [*range(0x250), *range(0x2000, 0x2070), 0x1F600, 0xFEFF, 0x200B]]

    def override(c: str) -> bool:
        return 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069

    for _ in range(5000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(30)))
        for spaces in (False, True):
            shown = one_line(text, breaks_as_spaces=spaces)
            assert len(shown.splitlines()) <= 1, (text, shown)
            assert not any(unicodedata.category(c) == "Cc" or override(c) for c in shown), (text, shown)
        plain = "".join(c for c in text if unicodedata.category(c) != "Cc" and c not in "\u2028\u2029" and not override(c))
        assert one_line(plain) == plain == one_line(plain, breaks_as_spaces=True)
