"""dataset-publish: validation, drop accounting, splits, formats, dedupe, what the run records."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data import Columns, DataError, copy_key, split_order, validate
from pipeline.errors import ConfigError
from pipeline.demo_data import write_csv
from pipeline.registry.local import LocalRegistry
from pipeline.stages import dataset_publish
from tests.conftest import REPO, inspect_summary, local_http, run_cli, unused_port, write_yaml

LABELS = ["billing", "shipping", "tech"]


def rows(n_per_label: int = 10) -> list[dict]:
    out = []
    for lbl in LABELS:
        for i in range(n_per_label):
            out.append({"id": f"{lbl}-{i}", "text": f"{lbl} question number {i}", "label": lbl})
    return out


def write_rows(path: Path, records: list[dict], fmt: str | None = None) -> Path:
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(records)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture
def cfg_for(make_config):
    def make(source: Path, *extra: str):
        return make_config(f"dataset.source={source}", "dataset.id_column=id", "dataset.sample_rows=5", *extra)

    return make


def registry_of(cfg) -> LocalRegistry:
    return LocalRegistry(Path(cfg.tracking.dir) / "registry")


def artifact_files(cfg, ref: str, tmp_path: Path) -> dict[str, Path]:
    reg = registry_of(cfg)
    out = reg.fetch(reg.resolve(ref), tmp_path / "fetched" / ref.replace(":", "_")).path
    return {p.name: p for p in out.iterdir()}


def assert_same_split_files(cfg_for, plain: Path, other: Path, tmp_path: Path) -> dict[str, Path]:
    """Publish `plain` then `other` (v0, v1): their split files are byte-identical. Returns v1's files."""
    dataset_publish.run(cfg_for(plain))
    dataset_publish.run(cfg_for(other))
    want = artifact_files(cfg_for(plain), "tickets:v0", tmp_path)
    got = artifact_files(cfg_for(other), "tickets:v1", tmp_path)
    for split in ("train.parquet", "validation.parquet", "test.parquet"):
        assert got[split].read_bytes() == want[split].read_bytes()
    return got


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_every_format_publishes_the_same_dataset(tmp_path, cfg_for, fmt):
    src = write_rows(tmp_path / f"data.{fmt}", rows())
    result = dataset_publish.run(cfg_for(src))
    assert result.status == "ok" and result.produced == ["tickets:v0"]
    files = artifact_files(cfg_for(src), "tickets:v0", tmp_path)
    assert set(files) == {"train.parquet", "validation.parquet", "test.parquet", "dataset.json"}
    meta = json.loads(files["dataset.json"].read_text())
    assert meta["label_names"] == LABELS
    assert sum(meta["num_rows"].values()) == 30
    assert meta["sources"][0]["path"] == src.name and len(meta["sources"][0]["sha256"]) == 64  # where: in metadata
    assert registry_of(cfg_for(src)).resolve("tickets:v0").metadata["sources"][0]["path"] == str(src)
    train = pq.read_table(files["train.parquet"])
    assert train.column_names == ["id", "text", "label", "label_id"]
    assert set(train.column("label").to_pylist()) == set(LABELS)


@pytest.mark.parametrize("fmt,codec", [("csv", "gzip"), ("tsv", "bz2"), ("jsonl", "zstd"), ("json", "gzip"), ("csv", "lz4")])
def test_compressed_text_files_publish_the_same_dataset(tmp_path, cfg_for, fmt, codec):
    """data.csv.gz as pandas, Spark and database exports write it: read through the compression."""
    plain = write_rows(tmp_path / "plain" / f"data.{fmt}", rows())
    suffix = {"gzip": "gz", "bz2": "bz2", "zstd": "zst", "lz4": "lz4"}[codec]
    packed = tmp_path / "packed" / f"part-00000.{fmt}.{suffix}"
    packed.parent.mkdir()
    with pa.CompressedOutputStream(str(packed), codec) as out:
        out.write(plain.read_bytes())
    got = assert_same_split_files(cfg_for, plain, packed, tmp_path)
    assert json.loads(got["dataset.json"].read_text())["sources"][0]["path"] == packed.name  # the file as stored
    shouting = tmp_path / f"DATA.{fmt.upper()}.{suffix.upper()}"  # as Windows tools may name it: Arrow's own
    shouting.write_bytes(packed.read_bytes())  # detection of the codec is case-sensitive (read as compressed bytes)
    texts = {s: t.column("text").to_pylist() for s, t in dataset_publish.prepare(cfg_for(plain))[0].items()}
    assert {s: t.column("text").to_pylist() for s, t in dataset_publish.prepare(cfg_for(shouting))[0].items()} == texts
    # a folder of compressed parts is one format with plain files of the same kind
    with open(packed.parent / f"part-00001.{fmt}", "wb") as f:
        f.write(plain.read_bytes())
    assert dataset_publish.run(cfg_for(packed.parent, "dataset.on_invalid=drop")).status == "ok"


def test_arrow_ipc_files_publish_the_same_dataset(tmp_path, cfg_for):
    """pandas' `to_feather`, an Arrow IPC stream, and the `.arrow` files `datasets` keeps (with its ClassLabel names)
    give the split files the same rows give from Parquet; they were refused as an unsupported format."""
    import datasets
    import pandas as pd
    import pyarrow.feather as feather

    plain = write_rows(tmp_path / "plain" / "data.parquet", rows())
    frame = pd.DataFrame(rows())
    (tmp_path / "feather").mkdir()
    frame.to_feather(tmp_path / "feather" / "data.feather")
    assert_same_split_files(cfg_for, plain, tmp_path / "feather" / "data.feather", tmp_path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    feather.write_feather(table, tmp_path / "file.arrow")  # the IPC file format, under the other suffix
    for name in ("stream.arrow", "file.arrow"):
        tables = dataset_publish.prepare(cfg_for(tmp_path / name))[0]
        assert sorted(i for t in tables.values() for i in t.column("id").to_pylist()) == sorted(r["id"] for r in rows())
    # a datasets .arrow file: class ids, named (and ordered) by the ClassLabel its metadata keeps
    order = ["tech", "billing", "shipping"]
    features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=order)})
    datasets.Dataset.from_pandas(frame.assign(label=[order.index(x) for x in frame["label"]]), features=features,
                                 preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    shard = next((tmp_path / "saved").glob("*.arrow"))
    tables, manifest, _ = dataset_publish.prepare(cfg_for(shard))
    assert manifest["label_names"] == order and "label_type" not in manifest
    by_id = {i: lab for t in tables.values() for i, lab in zip(t.column("id").to_pylist(), t.column("label").to_pylist())}
    assert by_id == {r["id"]: r["label"] for r in rows()}
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.arrow").write_bytes((tmp_path / "stream.arrow").read_bytes())
    (tmp_path / "mixed" / "b.parquet").write_bytes(plain.read_bytes())
    with pytest.raises(DataError, match=r"mixed file formats \(arrow, parquet\)"):
        dataset_publish.prepare(cfg_for(tmp_path / "mixed"))
    (tmp_path / "broken.feather").write_bytes(b"ARROW1 not really")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'broken.feather'}: cannot read as arrow: "):
        dataset_publish.prepare(cfg_for(tmp_path / "broken.feather"))
    # IPC is read as it lies, unchecked: labels that are not UTF-8 (a damaged file) are named at the read, not met
    # as Arrow's "Invalid UTF8 sequence in input" traceback further on
    n = 30
    labels = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32).tobytes()),
                                                    pa.py_buffer(b"\xff" + b"x" * (n - 1))])
    damaged = pa.table({"id": [f"i{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)], "label": labels})
    with pa.OSFile(str(tmp_path / "damaged.arrow"), "wb") as f, pa.ipc.new_stream(f, damaged.schema) as writer:
        writer.write_table(damaged)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'damaged.arrow'}: cannot read as arrow: .*Invalid UTF8"):
        dataset_publish.prepare(cfg_for(tmp_path / "damaged.arrow", "dataset.on_invalid=drop"))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json"])
def test_empty_part_files_in_a_folder_add_no_rows(tmp_path, cfg_for, fmt):
    """Spark and export scripts write a part file for an empty partition: no bytes, no header. It was refused
    ("cannot read as csv: Empty CSV file"), so the whole folder could not be published."""
    plain = write_rows(tmp_path / "plain" / f"data.{fmt}", rows())
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / f"part-00000.{fmt}").write_bytes(plain.read_bytes())
    (parts / f"part-00001.{fmt}").write_bytes(b"")
    (parts / f"part-00002.{fmt}").write_bytes(b"\xef\xbb\xbf\n\n  \r\n")  # a byte-order mark and blank lines
    with pa.CompressedOutputStream(str(parts / f"part-00003.{fmt}.gz"), "gzip"):
        pass  # compressed nothing: not empty as stored
    if fmt == "json":
        (parts / "part-00004.json").write_text("[]")
    got = assert_same_split_files(cfg_for, plain, parts, tmp_path)
    assert len(json.loads(got["dataset.json"].read_text())["sources"]) == (5 if fmt == "json" else 4)
    with pytest.raises(DataError, match=rf"^{parts / 'part-00001'}.{fmt}: no data rows \(only a header, or empty files\)"):
        dataset_publish.prepare(cfg_for(parts / f"part-00001.{fmt}"))


def test_json_lines_named_json_are_read_as_json_lines(tmp_path, cfg_for):
    """Spark's write.json, datasets' to_json and pandas' to_json(lines=True) write one object per line in files
    named .json; they were refused ("cannot read as json: Extra data: line 2 column 1")."""
    plain = write_rows(tmp_path / "plain" / "data.jsonl", rows())
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "part-00000-4b1c-c000.json").write_bytes(plain.read_bytes())
    assert_same_split_files(cfg_for, plain, spark, tmp_path)
    for name in ("data.json.gz", "data.ndjson", "data.ndjson.gz"):  # .ndjson: as polars' write_ndjson names it
        with pa.CompressedOutputStream(str(tmp_path / name), "gzip") if name.endswith(".gz") else \
                open(tmp_path / name, "wb") as out:
            out.write(plain.read_bytes())
        assert sum(dataset_publish.prepare(cfg_for(tmp_path / name))[1]["num_rows"].values()) == 30
    lines = plain.read_text().splitlines()
    long_first = tmp_path / "long.json"  # a first line past the MiB that says JSON Lines: the whole file says it
    long_first.write_text(json.dumps({**rows()[0], "text": "a pasted log " * 200_000}) + "\n" + "\n".join(lines[1:]) + "\n")
    assert sum(dataset_publish.prepare(cfg_for(long_first))[1]["num_rows"].values()) == 30
    broken = tmp_path / "broken.json"  # a bad line is named as in a .jsonl file
    broken.write_text("\n".join(lines[:6] + ['{"id": "x", "text": "cut off'] + lines[6:]) + "\n")
    with pytest.raises(DataError, match=rf"^{broken} line 7: "):
        dataset_publish.prepare(cfg_for(broken))
    one = tmp_path / "one.json"  # one object, pretty-printed: one record
    one.write_text(json.dumps(rows()[0], indent=2))
    from pipeline.data import Columns, read_files

    table = read_files([one], Columns(text="text", label="label", id="id"), one)
    assert table.num_rows == 1 and table.column("id").to_pylist() == [rows()[0]["id"]]
    (tmp_path / "scalar.json").write_text("5")
    with pytest.raises(DataError, match="expected a JSON array of objects, or JSON Lines"):
        dataset_publish.prepare(cfg_for(tmp_path / "scalar.json"))


@pytest.mark.parametrize("orient", ["columns", "index", "split", "table", "records"])
def test_json_as_pandas_writes_it_in_each_orient_publishes_the_same_dataset(tmp_path, cfg_for, orient):
    """`df.to_json("tickets.json")` writes {column: {index: value}} (orient="columns", pandas' default), which was
    read as one row of structs ("column 'text' holds struct<0: string, ..."); the other orients likewise."""
    import pandas as pd

    plain = write_rows(tmp_path / "plain" / "data.json", rows())
    written = tmp_path / orient / "data.json"
    written.parent.mkdir()
    pd.DataFrame(rows()).to_json(written, orient=orient)
    got = assert_same_split_files(cfg_for, plain, written, tmp_path)
    assert sum(json.loads(got["dataset.json"].read_text())["num_rows"].values()) == 30


def test_split_files_do_not_depend_on_how_the_input_is_chunked(tmp_path, cfg_for):
    """Arrow reads a file in blocks (row groups, 1 MiB of CSV), and Parquet's page boundaries, so its bytes,
    follow the chunks of the table written: the split files are written from whole columns, so the same rows
    give the same bytes however they were cut (30,000 rows: past one page per column)."""
    table = pa.Table.from_pylist(_many(30_000))
    whole, cut = tmp_path / "whole" / "data.parquet", tmp_path / "cut" / "data.parquet"
    for path, group in ((whole, None), (cut, 997)):
        path.parent.mkdir()
        pq.write_table(table, path, row_group_size=group)
    assert pq.ParquetFile(cut).metadata.num_row_groups > 1 == pq.ParquetFile(whole).metadata.num_row_groups
    assert_same_split_files(cfg_for, whole, cut, tmp_path)


def test_compressed_files_report_bad_rows_and_bad_compression(tmp_path, cfg_for):
    import gzip

    lines = write_rows(tmp_path / "plain.csv", _many(3000)).read_text().splitlines()
    lines[2001] = "r-x,one field too many,billing,extra"  # data row 2,001
    ragged = tmp_path / "ragged.csv.gz"
    ragged.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=rf"^{ragged} row 2001: expected 3 fields, found 4"):
        dataset_publish.run(cfg_for(ragged))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"id": "a", "text": "t", "label": "x"}\n{"id": oops}\n'))
    with pytest.raises(DataError, match=rf"^{broken} line 2: not valid JSON"):
        dataset_publish.run(cfg_for(broken))
    not_gzip = tmp_path / "mislabelled.csv.gz"
    not_gzip.write_bytes((tmp_path / "plain.csv").read_bytes())
    with pytest.raises(DataError, match=rf"^{not_gzip}: not gzip-compressed, though its name ends in .gz \(.*\)$"):
        dataset_publish.run(cfg_for(not_gzip))
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(ragged.read_bytes()[:5000])
    with pytest.raises(DataError, match=rf"^{truncated}: cannot read as csv: .*"):
        dataset_publish.run(cfg_for(truncated))
    parquet_gz = tmp_path / "plain.parquet.gz"  # Parquet compresses inside the file
    parquet_gz.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(DataError, match=r"unsupported format '.gz'.*text formats may be compressed: .gz, .bz2[^;]*$"):
        dataset_publish.run(cfg_for(parquet_gz))
    sheet = tmp_path / "labelled.xlsx"  # a spreadsheet: how to export it
    sheet.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"unsupported format '.xlsx'.*; save a spreadsheet as CSV \(Excel: Save As, "
                                        r"'CSV UTF-8'\), or with pandas: pd.read_excel\(path\).to_parquet"):
        dataset_publish.run(cfg_for(sheet))
    for name in ("tickets.csv.zip", "tickets.zip", "export.tar.gz", "export.tgz"):  # archives: extract them
        (tmp_path / name).write_bytes(b"PK\x03\x04")
        with pytest.raises(DataError, match=r"unsupported format .*; this is an archive: extract its files and give "
                                            r"the file, or the folder they are in$"):
            dataset_publish.run(cfg_for(tmp_path / name))
    (tmp_path / "tickets.csv.xz").write_bytes(b"\xfd7zXZ")
    with pytest.raises(DataError, match=rf"unsupported format '.xz'.*; xz is not read: decompress it \(xz -dk "
                                        rf"{tmp_path / 'tickets.csv.xz'}\) or compress with gzip or zstd instead$"):
        dataset_publish.run(cfg_for(tmp_path / "tickets.csv.xz"))
    assert registry_of(cfg_for(ragged)).list_versions() == []


def test_a_ragged_row_that_is_not_utf8_is_still_named(tmp_path, cfg_for, capfd):
    # Arrow hands a malformed row to the handler that numbers it as text: a row in Latin-1 could not be,
    # and the error said "CSV parse error" with no row, after an "Exception ignored" traceback on stderr.
    lines = write_rows(tmp_path / "plain.csv", _many(300)).read_text().splitlines()
    lines[120] = "r-x,merci, très bien,billing"  # data row 120: an unquoted comma, in Latin-1
    ragged = tmp_path / "ragged.csv"
    ragged.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{ragged} row 120: expected 3 fields, found 4 .*: 'r-x,merci, très bien,"
                                        r"billing' \(shown as Latin-1: the row is not valid UTF-8\)$"):
        dataset_publish.prepare(cfg_for(ragged))
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("layout", ["dictionary", "large", "view", "large_binary"])
def test_parquet_text_in_any_arrow_layout_gives_the_same_split_files(tmp_path, cfg_for, layout):
    """pandas categoricals (dictionaries), large and view strings: the artifact holds plain strings."""
    records = rows()
    plain = write_rows(tmp_path / "plain" / "data.parquet", records)
    columns = {c: pa.array([r[c] for r in records]) for c in ("id", "text", "label")}
    if layout == "dictionary":
        columns = {c: a.dictionary_encode() for c, a in columns.items()}
    elif layout == "large_binary":
        columns["text"] = pa.array([r["text"].encode() for r in records], pa.large_binary())
    else:
        kind = pa.large_string() if layout == "large" else pa.string_view()
        columns = {c: a.cast(kind) for c, a in columns.items()}
    other = tmp_path / layout / "data.parquet"
    other.parent.mkdir()
    pq.write_table(pa.table(columns), other)
    got = assert_same_split_files(cfg_for, plain, other, tmp_path)
    assert pq.read_schema(got["train.parquet"]).types == [pa.string(), pa.string(), pa.string(), pa.int32()]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_wide_files_give_the_configured_columns_and_name_a_missing_one(tmp_path, cfg_for, fmt):
    """Only the configured columns are read; a missing one is reported with the file's header."""
    src = tmp_path / f"wide.{fmt}"
    records = [{"id": r["id"], "count": i, "text": r["text"], "label": r["label"], "when": f"2026-11-{i % 28 + 1:02d}"}
               for i, r in enumerate(rows())]
    if fmt == "csv":
        write_rows(src, records)
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "tags": ["a", "b"]} for r in records]), src)
    cfg = cfg_for(src)
    result = dataset_publish.run(cfg)
    assert result.status == "ok" and sum(result.metrics[f"rows_{s}"] for s in ("train", "validation", "test")) == 30
    train = pq.read_table(artifact_files(cfg, result.produced[0], tmp_path)["train.parquet"])
    assert train.column_names == ["id", "text", "label", "label_id"]
    with pytest.raises(DataError, match=rf"wide.{fmt}: missing column\(s\) intent; the file has: id, count, text, label, when"):
        dataset_publish.run(cfg_for(src, "dataset.label_column=intent"))


def test_sentence_pairs_are_validated_and_published_as_pairs(tmp_path, cfg_for):
    records = [{"id": f"p{i}", "text": f"question {i // 2}", "topic": LABELS[i % 3], "label": ["yes", "no"][i % 2]}
               for i in range(30)]
    # the same first text with different second texts and labels: not a conflict, the pair is the input
    assert len({r["text"] for r in records}) < len(records)
    src = write_rows(tmp_path / "pairs.csv", records)
    result = dataset_publish.run(cfg_for(src, "dataset.text_pair_column=topic"))
    files = artifact_files(cfg_for(src), result.produced[0], tmp_path)
    train = pq.read_table(files["train.parquet"])
    assert train.column_names == ["id", "text", "text_pair", "label", "label_id"]
    meta = json.loads(files["dataset.json"].read_text())
    assert meta["columns"]["text_pair"] == "topic" and meta["dropped"] == {}
    assert sum(meta["num_rows"].values()) == 30

    records[3] = {**records[1], "id": "p3-copy", "label": "yes"}   # the same pair as row 2, another label
    records[6]["topic"] = ""                                        # an empty second text
    bad = write_rows(tmp_path / "bad_pairs.csv", records)
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg_for(bad, "dataset.text_pair_column=topic"))
    msg = str(e.value)
    assert f"empty_text (1 rows, column 'topic' is empty or null): {bad} row 7" in msg
    assert (f"conflicting_label (2 rows, the same text appears with different labels): {bad} row 2 (label 'no'; row 4 "
            f"has 'yes'); {bad} row 4 (label 'yes'; row 2 has 'no')") in msg


def test_folder_input_with_one_schema(tmp_path, cfg_for):
    records = rows()
    write_rows(tmp_path / "in" / "a.csv", records[:15])
    write_rows(tmp_path / "in" / "b.csv", records[15:])
    # hidden entries are skipped: a Jupyter checkpoint copy would duplicate every row, a ._ file is not CSV
    write_rows(tmp_path / "in" / ".ipynb_checkpoints" / "a-checkpoint.csv", records[:15])
    (tmp_path / "in" / "._a.csv").write_bytes(b"\x00\x05\x16\x07 not a csv")
    result = dataset_publish.run(cfg_for(tmp_path / "in"))
    meta = json.loads(artifact_files(cfg_for(tmp_path / "in"), result.produced[0], tmp_path)["dataset.json"].read_text())
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.csv", "b.csv"]
    assert sum(meta["num_rows"].values()) == 30
    # a row that clashes with a row of another file names that file
    write_rows(tmp_path / "in" / "c.csv", [{"id": records[2]["id"], "text": "a new question", "label": records[2]["label"]},
                                           {"id": "c-1", "text": records[20]["text"], "label": records[0]["label"]}])
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg_for(tmp_path / "in"))
    a, c = tmp_path / "in" / "a.csv", tmp_path / "in" / "c.csv"
    assert f"{c} row 1 (id {records[2]['id']!r}, first on {a} row 3)" in str(e.value)
    assert (f"{tmp_path / 'in' / 'b.csv'} row 6 (label {records[20]['label']!r}; {c} row 2 has "
            f"{records[0]['label']!r})") in str(e.value)


def test_folder_files_may_differ_in_column_order_extras_and_id_type(tmp_path, cfg_for):
    records = rows()
    numeric = [{**r, "id": i} for i, r in enumerate(records[:15])]            # ids 0..14 read as integers
    write_rows(tmp_path / "in" / "a.csv", numeric)
    reordered = [{"label": r["label"], "note": "x", "text": r["text"], "id": r["id"]} for r in records[15:]]
    write_rows(tmp_path / "in" / "b.csv", reordered)                          # text ids, other order, an extra column
    result = dataset_publish.run(cfg_for(tmp_path / "in"))
    files = artifact_files(cfg_for(tmp_path / "in"), result.produced[0], tmp_path)
    ids = pa.concat_tables([pq.read_table(files[f"{s}.parquet"]) for s in ("train", "validation", "test")]).column("id")
    assert ids.type == pa.string() and sorted(ids.to_pylist()) == sorted([str(i) for i in range(15)] +
                                                                          [r["id"] for r in records[15:]])
    # a column that holds objects is refused by name, not with a traceback
    nested = tmp_path / "nested.jsonl"
    nested.write_text("".join(json.dumps({**r, "label": {"name": r["label"]}}) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"^{nested}: column 'label' holds struct<name: string>, not text or numbers"):
        dataset_publish.run(cfg_for(nested))


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_ids_and_labels_are_kept_as_written(tmp_path, cfg_for, fmt):
    """Type inference would read "007" as 7: ids would change and labels "01" and "1" would merge."""
    records = [{"id": f"00{i}", "text": f"first kind of question {i}", "label": "01"} for i in range(6)]
    records += [{"id": f"0{i}", "text": f"second kind of question {i}", "label": "1"} for i in range(6)]
    src = write_rows(tmp_path / f"codes.{fmt}", records)
    tables, manifest, _ = dataset_publish.prepare(cfg_for(src))
    assert manifest["label_names"] == ["01", "1"]
    ids = [i for t in tables.values() for i in t.column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in records)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("where", [0, 17])
def test_a_text_longer_than_arrow_s_read_block_is_read_whole(tmp_path, cfg_for, fmt, where):
    """Arrow reads CSV in 4 MiB blocks and JSON Lines in 1 MiB ones (64 KiB for a header) and fails on a longer row
    ("straddling object straddles two block boundaries", a row past two of them): a pasted log is not rare."""
    records = rows()
    long_text = "my export failed with this log: " + "ERROR line\t" * 900_000  # 10 MB: past two blocks, tabs and all
    records[where] = {**records[where], "text": long_text}
    tables, manifest, _ = dataset_publish.prepare(cfg_for(write_rows(tmp_path / f"long.{fmt}", records)))
    texts = {i: t for table in tables.values() for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist())}
    assert texts[records[where]["id"]] == long_text and len(texts) == len(records)


def test_labels_that_differ_only_in_case_or_spacing_are_kept_but_flagged(tmp_path, cfg_for, caplog):
    records = rows()
    for r in records[:5]:
        r["label"] = "Billing"
    for r in records[10:15]:
        r["label"] = "shipping_"  # trailing separator: not the same string, but the same words
    src = write_rows(tmp_path / "data.csv", records)
    with caplog.at_level("WARNING", logger="pipeline.stages.dataset_publish"):
        _, manifest, _ = dataset_publish.prepare(cfg_for(src))
    assert manifest["label_names"] == ["Billing", "billing", "shipping", "shipping_", "tech"]
    warned = [r.getMessage() for r in caplog.records]
    assert any("labels 'Billing', 'billing' differ only in case or spacing" in w for w in warned)
    assert any("labels 'shipping', 'shipping_'" in w for w in warned)
    assert not any("'tech'" in w for w in warned)
    # "café" as one character, and as "cafe" and a combining accent (macOS file names, some exports): they print
    # alike, and were two classes without a word
    for r in records[20:25]:
        r["label"] = "caf\u00e9"
    for r in records[25:30]:
        r["label"] = "cafe\u0301"
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.stages.dataset_publish"):
        dataset_publish.prepare(cfg_for(write_rows(tmp_path / "accents.csv", records)))
    assert ("labels 'cafe\\u0301', 'caf\\xe9' differ only in case or spacing or in how their characters are encoded "
            "(Unicode normal forms); they are kept as 2 classes") in caplog.text


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_only_an_empty_cell_is_missing(tmp_path, cfg_for, caplog, fmt):
    """A class named "N/A" and a text "NA" are values in every format (Arrow's CSV reader calls them null)."""
    records = rows()
    for r in records[:5]:
        r["label"] = "N/A"  # a deliberate "not applicable" class
    records[12]["text"] = "NA"
    records[13]["text"] = ""  # really empty: the one missing text
    src = write_rows(tmp_path / f"data.{fmt}", records)
    with caplog.at_level("WARNING", logger="pipeline.stages.dataset_publish"):
        tables, manifest, dropped = dataset_publish.prepare(cfg_for(src, "dataset.on_invalid=drop"))
    assert "N/A" in manifest["label_names"] and manifest["dropped"] == {"empty_text": 1}
    assert dropped.column("_row").to_pylist() == [14]
    assert "NA" in [t for table in tables.values() for t in table.column("text").to_pylist()]
    assert any("label(s) 'N/A' look like missing-value markers; they are kept as classes" in r.getMessage()
               for r in caplog.records)


def test_folder_input_names_the_file_that_holds_a_bad_row(tmp_path, cfg_for):
    records = rows()
    records[20]["text"] = "  \t\u00a0\u2003 "  # only whitespace (ASCII and Unicode): empty
    records[21]["text"] = " padded but real "
    write_rows(tmp_path / "in" / "a.csv", records[:15])
    write_rows(tmp_path / "in" / "b.csv", records[15:])
    cfg = cfg_for(tmp_path / "in")
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg)
    assert f"empty_text (1 rows, column 'text' is empty or null): {tmp_path / 'in' / 'b.csv'} row 6" in str(e.value)
    dropped = dataset_publish.prepare(cfg_for(tmp_path / "in", "dataset.on_invalid=drop"))[2]
    assert dropped.to_pylist() == [{"id": "tech-0", "text": records[20]["text"], "label": "tech",
                                    "_file": str(tmp_path / "in" / "b.csv"), "_row": 6, "reason": "empty_text"}]


def test_a_glob_pattern_selects_the_files(tmp_path, cfg_for):
    records = rows()
    write_rows(tmp_path / "exports" / "2026-01" / "part-0.csv", records[:15])
    write_rows(tmp_path / "exports" / "2026-02" / "part-0.csv", records[15:])
    write_rows(tmp_path / "exports" / "2026-02" / "summary.csv", [{"id": "x", "text": "not data", "label": "y"}])
    write_rows(tmp_path / "exports" / ".ipynb_checkpoints" / "part-0.csv", records[:15])
    pattern = str(tmp_path / "exports" / "**" / "part-*.csv")
    cfg = cfg_for(pattern)
    result = dataset_publish.run(cfg)
    version = registry_of(cfg).resolve(result.produced[0])
    assert [Path(s["path"]).relative_to(tmp_path).as_posix() for s in version.metadata["sources"]] == [
        "exports/2026-01/part-0.csv", "exports/2026-02/part-0.csv"]
    assert sum(version.metadata["num_rows"].values()) == 30
    assert dataset_publish.run(cfg).status == "unchanged"
    with pytest.raises(DataError, match=r"no .* files match this pattern"):
        dataset_publish.run(cfg_for(str(tmp_path / "exports" / "*.tsv")))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_spark_partitioned_folders_give_the_label_from_the_folder_name(tmp_path, cfg_for, fmt):
    """`df.write.partitionBy("label")`: label=VALUE folders (values URL-escaped), no label column in the files."""
    records = [{**r, "label": "tech/it" if r["label"] == "tech" else r["label"]} for r in rows()]
    plain = write_rows(tmp_path / "plain" / f"data.{fmt}", records)
    spark = tmp_path / "spark"
    for folder, label in (("label=billing", "billing"), ("label=shipping", "shipping"), ("label=tech%2Fit", "tech/it")):
        part = [{k: v for k, v in r.items() if k != "label"} for r in records if r["label"] == label]
        write_rows(spark / folder / f"part-00000-1f2e.c000.snappy.{fmt}", part)
    (spark / "_SUCCESS").write_text("")
    (spark / "label=billing" / ".part-00000-1f2e.c000.snappy.parquet.crc").write_bytes(b"crc")

    got = assert_same_split_files(cfg_for, plain, spark, tmp_path)  # byte-identical to the file with the column
    assert json.loads(got["dataset.json"].read_text())["label_names"] == ["billing", "shipping", "tech/it"]
    # A glob pattern reads the folders below its fixed part the same way: the same files, the same version.
    assert dataset_publish.run(cfg_for(str(spark / "label=*" / f"*.{fmt}"))).produced == ["tickets:v1"]

    # Spark's folder for null values is a missing label, reported like an empty cell.
    write_rows(spark / "label=__HIVE_DEFAULT_PARTITION__" / f"part-00001.{fmt}", [{"id": "n-1", "text": "no label here"}])
    with pytest.raises(DataError, match=r"null_label \(1 rows.*label=__HIVE_DEFAULT_PARTITION__/part-00001\.\w+ row 1"):
        dataset_publish.run(cfg_for(spark))
    # A column the files hold wins over a folder of the same name; a folder that names no configured column is ignored.
    mixed = tmp_path / "mixed"
    write_rows(mixed / "label=wrong" / "region=eu" / f"part-0.{fmt}", records)
    ref = dataset_publish.run(cfg_for(mixed)).produced[0]
    assert ref == "tickets:v2"
    want, again = artifact_files(cfg_for(plain), "tickets:v0", tmp_path), artifact_files(cfg_for(mixed), ref, tmp_path)
    assert all(again[f].read_bytes() == want[f].read_bytes() for f in ("train.parquet", "validation.parquet", "test.parquet"))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_folder_files_with_class_ids_beside_class_names_are_refused(tmp_path, cfg_for, fmt):
    """One file labelled 0, 1, 2 and the next billing, shipping, tech would make six classes of three."""
    records = rows()
    ids = [{**r, "label": LABELS.index(r["label"])} for r in records[1::2]]
    write_rows(tmp_path / "in" / f"a.{fmt}", records[::2])
    write_rows(tmp_path / "in" / f"b.{fmt}", ids)
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg_for(tmp_path / "in"))
    assert str(e.value) == (f"{tmp_path / 'in'}: column 'label' holds numbers in {tmp_path / 'in' / f'b.{fmt}'} ('0', '1', "
                            f"'2') but names in {tmp_path / 'in' / f'a.{fmt}'} ('billing', 'shipping', 'tech'); a class "
                            "spelt two ways would be two classes: write the labels the same way in every file (names, "
                            "or the same numbers)")
    assert registry_of(cfg_for(tmp_path / "in")).list_versions() == []
    # numbers in one file and the same numbers as text in the next are one set of classes
    write_rows(tmp_path / "in" / f"a.{fmt}", [{**r, "label": str(LABELS.index(r["label"]))} for r in records[::2]])
    tables, manifest, _ = dataset_publish.prepare(cfg_for(tmp_path / "in"))
    assert manifest["label_names"] == ["0", "1", "2"] and sum(t.num_rows for t in tables.values()) == len(records)


def test_folder_with_mixed_formats_is_refused(tmp_path, cfg_for):
    write_rows(tmp_path / "in" / "a.csv", rows())
    write_rows(tmp_path / "in" / "b.jsonl", rows())
    with pytest.raises(DataError, match="mixed file formats"):
        dataset_publish.run(cfg_for(tmp_path / "in"))


def test_splits_are_deterministic_and_stratified(tmp_path, cfg_for):
    src = write_rows(tmp_path / "d.csv", rows(40))
    a = dataset_publish.prepare(cfg_for(src))[0]
    b = dataset_publish.prepare(cfg_for(src))[0]
    assert all(a[s].equals(b[s]) for s in a)
    da, db = tmp_path / "a", tmp_path / "b"
    da.mkdir(), db.mkdir()
    fa = dataset_publish.write_artifact_dir(a, {"x": 1}, da)
    fb = dataset_publish.write_artifact_dir(b, {"x": 1}, db)
    assert all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)  # byte-identical files
    for split, expected in (("train", 32), ("validation", 4), ("test", 4)):
        labels = a[split].column("label").to_pylist()
        assert {lbl: labels.count(lbl) for lbl in LABELS} == {lbl: expected for lbl in LABELS}
    ids = [set(a[s].column("id").to_pylist()) for s in a]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # no row in two splits
    other = dataset_publish.prepare(cfg_for(src, "dataset.split.seed=7"))[0]
    assert not other["test"].equals(a["test"])


@pytest.mark.parametrize("fractions, expected", [
    ({"train": 0, "validation": 0, "test": 1}, {"train": 0, "validation": 0, "test": 40}),
    ({"train": 0, "validation": 0.5, "test": 0.5}, {"train": 0, "validation": 20, "test": 20}),
    ({"train": 0, "validation": 0.7, "test": 0.3}, {"train": 0, "validation": 28, "test": 12}),
])
def test_a_dataset_for_evaluation_only_has_no_train_rows(tmp_path, cfg_for, fractions, expected):
    """split.train = 0: a held-out (golden) set for `evaluate --dataset`, stratified over the splits it has."""
    src = write_rows(tmp_path / "d.csv", rows(40))
    cfg = cfg_for(src, *(f"dataset.split.{s}={f}" for s, f in fractions.items()))
    result = dataset_publish.run(cfg)
    meta = LocalRegistry(Path(cfg.tracking.dir) / "registry").resolve(result.produced[0]).metadata
    assert meta["num_rows"] == {s: 3 * n for s, n in expected.items()}
    tables = dataset_publish.prepare(cfg)[0]
    for split, n in expected.items():  # stratified
        labels = tables[split].column("label").to_pylist()
        assert {lbl: labels.count(lbl) for lbl in LABELS} == {lbl: n for lbl in LABELS}
    if 0 < fractions["test"] < 1:  # the same cut as with train rows: test takes the same texts first
        usual = dataset_publish.prepare(cfg_for(src, f"dataset.split.train={fractions['validation'] - 0.1:g}",
                                                "dataset.split.validation=0.1", f"dataset.split.test={fractions['test']:g}"))[0]
        assert sorted(usual["test"].column("id").to_pylist()) == sorted(tables["test"].column("id").to_pylist())


def test_train_rows_without_validation_rows_are_published_with_a_warning_that_finetune_cannot_use_them(tmp_path, cfg_for,
                                                                                                      caplog):
    """finetune refuses a version without validation rows; the publish says so at once rather than after it."""
    src = write_rows(tmp_path / "d.csv", rows(40))
    caplog.set_level("WARNING", logger="pipeline.stages.dataset_publish")
    result = dataset_publish.run(cfg_for(src, "dataset.split.train=0.8", "dataset.split.validation=0", "dataset.split.test=0.2"))
    assert result.status == "ok"
    assert (f"{src}: no validation split (dataset.split.validation is 0), so finetune and sweep cannot train on this "
            "version") in caplog.text
    caplog.clear()
    dataset_publish.run(cfg_for(src, "dataset.split.train=0", "dataset.split.validation=0", "dataset.split.test=1"))
    dataset_publish.run(cfg_for(src))
    assert "no validation split" not in caplog.text  # a held-out set, and the usual split, say nothing


def test_rows_keep_their_split_when_rows_are_added_or_removed(tmp_path, cfg_for):
    """A text's place depends on the text and the seed alone: a new dataset version moves only the few
    rows next to a cut, so its test rows were not the last version's train rows (which production
    trained on), and scores on the test split stay comparable from version to version."""
    before = rows(100)
    after = [r for i, r in enumerate(before) if i % 20 != 7]                # 5% removed
    after += [{"id": f"new-{i}", "text": f"a new question {i}", "label": LABELS[i % 3]} for i in range(15)]  # 5% added
    split_of = {}
    for name, records in (("before", before), ("after", after)):
        tables = dataset_publish.prepare(cfg_for(write_rows(tmp_path / f"{name}.csv", records)))[0]
        split_of[name] = {i: s for s, t in tables.items() for i in t.column("id").to_pylist()}
    kept = set(split_of["before"]) & set(split_of["after"])
    moved = [i for i in kept if split_of["before"][i] != split_of["after"][i]]
    assert len(kept) == 285 and len(moved) <= 12  # a plain shuffle moves about a third of them (95)
    test_before = {i for i in kept if split_of["before"][i] == "test"}
    assert len({i for i in test_before if split_of["after"][i] == "train"}) <= 3

    # the seed picks another split; the same seed the same one, whatever the rows' order
    other = dataset_publish.prepare(cfg_for(tmp_path / "before.csv", "dataset.split.seed=7"))[0]
    assert set(other["test"].column("id").to_pylist()) != {i for i in split_of["before"] if split_of["before"][i] == "test"}
    shuffled = write_rows(tmp_path / "shuffled.csv", before[::-1])
    tables = dataset_publish.prepare(cfg_for(shuffled))[0]
    assert {s: set(t.column("id").to_pylist()) for s, t in tables.items()} == \
        {s: {i for i, x in split_of["before"].items() if x == s} for s in ("train", "validation", "test")}


def test_the_split_order_is_a_seeded_hash_of_the_text(monkeypatch):
    import pipeline.data

    texts = pa.array(["reset my password", "where is my parcel", "reset my password"])
    a, b = split_order(texts, 42), split_order(texts, 7)
    monkeypatch.setattr(pipeline.data, "SPLIT_ORDER_SLICE", 2)  # hashed a slice at a time: the same ranks
    assert np.array_equal(split_order(pa.chunked_array([texts[:1], texts[1:]]), 42), a)
    assert a.dtype == np.uint64 and a[0] == a[2] and a[0] != a[1] and not np.array_equal(a, b)
    assert int(a[1]) == 0x86EBA303AF2B8D4D  # XXH3-64 is fixed by its specification: the same everywhere
    assert int(split_order(pa.array([""]), 0)[0]) == 0x2D06800538D394C2  # the specification's empty-input value
    assert int(split_order(pa.array([None, "x"]), 0)[0]) == 0x2D06800538D394C2  # a null ranks as ""


def test_validate_ranks_each_clean_row_by_its_text_as_compared():
    """validate hashes the rows' folded texts while the other core encodes them; each clean row gets the
    rank of its text (copies, equal ranks), and dropped rows none."""
    texts = ["Reset my password", "reset  my password ", "where is my parcel", "", "RESET MY PASSWORD", "a parcel"]
    table = pa.table({"text": pa.array(texts, pa.binary()), "label": ["a", "a", "b", "b", "a", "b"],
                      "_file": ["f.csv"] * 6, "_row": np.arange(1, 7)})
    checked = validate(table, Columns(text="text", label="label"), 1, split_seed=42)
    assert checked.table.column("_row").to_pylist() == [1, 2, 3, 5, 6]  # the empty text is dropped
    folded = copy_key({"text": checked.table.column("text")}, Columns(text="text", label="label"))
    assert np.array_equal(checked.order, split_order(folded, 42))  # each row: the rank of its text as compared
    assert len(set(checked.order[[0, 1, 3]].tolist())) == 1 and checked.order[0] != checked.order[2]
    assert validate(table, Columns(text="text", label="label"), 1).order is None  # no seed: no ranks


def test_ranks_are_those_of_the_folded_texts_for_texts_and_pairs_across_chunks():
    """Each clean row's rank is `split_order` of its `copy_key`: texts folded through Unicode (non-ASCII
    letters, full-width forms, non-breaking spaces) and spacing (tabs, runs of spaces), pairs, chunked columns."""
    firsts = ["Reset my password", "café CRÈME", "ｆｕｌｌ width", "tab\there", "two  spaces", " lead", "trail ",
              "nbsp\u00a0here", "line\nbreak", "PLAIN TEXT", "ÉCOLE", "x\u2003y", "ok"]
    seconds = ["Pair One", "pair\tTWO", "ΣΊΣΥΦΟΣ", "plain", "a  b", "b", "c ", "d", "E", "f", "g", "h", "i"]
    labels = ["a", "b"] * 6 + ["a"]
    for pair in (False, True):
        n = len(firsts)
        table = pa.table({"text": pa.chunked_array([pa.array(firsts[:5], pa.binary()), pa.array(firsts[5:], pa.binary())]),
                          "label": labels, "_file": ["f.csv"] * n, "_row": np.arange(1, n + 1),
                          **({"pair": pa.array(seconds, pa.binary())} if pair else {})})
        cols = Columns(text="text", label="label", text_pair="pair" if pair else None)
        checked = validate(table, cols, 1, split_seed=7)
        assert checked.table.num_rows == n
        key = copy_key({c: checked.table.column(c) for c in cols.text_columns}, cols)
        assert np.array_equal(checked.order, split_order(key, 7))
        assert len(set(checked.texts.tolist())) == n  # all different once folded


def test_odd_spacing_finds_what_the_regular_expression_finds():
    """Folding rewrites the texts with odd spacing, found from the column's bytes: the same rows as the regular
    expression it replaced, across chunks, slices, nulls, empty texts, large strings and non-ASCII text."""
    from pipeline.data import _odd_spacing

    pattern = r"[\t\n\v\f\r]|  |^ | $"
    cases = ["plain", "two  spaces", " lead", "trail ", "tab\there", "cr\r", "\x0bvt", "ff\x0c", "line\nbreak", "",
             " ", "  ", "a b c", "\x01\x08\x0e\x1f not spacing", "ünï cödé", "ends with space ", "x", None, "x  ", "é é"]
    rng = np.random.default_rng(3)
    alphabet = list("ab é\t\n\r\x0b\x0c\x01\x0e")
    cases += ["".join(rng.choice(alphabet, size=rng.integers(0, 6))) for _ in range(2000)]
    column = pa.chunked_array([pa.array(cases[:7]), pa.array(cases[7:1000]), pa.array(cases[1000:]).slice(3, 900)])
    for texts in (column, column.combine_chunks(), pa.array(cases).slice(5), column.cast(pa.large_string()),
                  pa.chunked_array([], pa.string()), pa.chunked_array([pa.array([], pa.string()), pa.array([" x"])]),
                  pa.array(cases, pa.string_view())):
        expected = pc.match_substring_regex(texts.cast(pa.string()), pattern).to_pylist()
        assert _odd_spacing(texts).tolist() == [bool(e) for e in expected]
    # a null's slot may hold bytes (a filtered or replaced array keeps them): it is still not marked
    garbage = pa.Array.from_buffers(pa.string(), 2, [pa.py_buffer(np.packbits([True, False], bitorder="little")),
                                                    pa.py_buffer(np.array([0, 2, 6], dtype=np.int32)), pa.py_buffer(b"ok  x ")])
    assert _odd_spacing(garbage).tolist() == [False, False]


def test_folding_is_the_same_whether_or_not_a_text_has_odd_spacing():
    """A text is folded to lower case with runs of ASCII whitespace as one space and none at either end (after
    NFKC). Characters NFKC keeps (U+0085, U+001C, U+2028) are text, not spacing: trimming them off only the texts
    that also had odd spacing made "\x85reset it " and "\x85reset it" two different texts."""
    from pipeline.data import Columns, copy_key

    cols = Columns(text="text", label="label")
    for sep in ("\x85", "\x1c", "\u2028", "\u1680"):
        variants = [f"{sep}Reset it", f"{sep}reset it ", f"{sep}reset\t it", f" {sep}reset it", f"{sep}reset  it\n"]
        keys = copy_key({"text": pa.chunked_array([pa.array(variants)])}, cols).to_pylist()
        assert keys == [f"{sep}reset it"] * len(variants), (repr(sep), keys)
        ends = [f"reset it{sep}", f"reset  it{sep}", f"reset it {sep}"]
        keys = copy_key({"text": pa.chunked_array([pa.array(ends)])}, cols).to_pylist()
        assert keys == [f"reset it{sep}", f"reset it{sep}", f"reset it {sep}"], (repr(sep), keys)


def test_a_label_with_too_few_texts_is_found_when_no_text_repeats():
    texts = [f"text number {i}" for i in range(8)]
    table = pa.table({"text": pa.array(texts, pa.binary()), "label": ["a", "a", "a", "b", "b", "b", "c", "c"],
                      "_file": ["f.csv"] * 8, "_row": np.arange(1, 9)})
    checked = validate(table, Columns(text="text", label="label"), 3, split_seed=1)
    assert checked.dropped == {"class_too_small": 2}
    assert "'c' have fewer than 3 distinct texts" in checked.problems[0].detail
    assert checked.table.column("label").to_pylist() == ["a"] * 3 + ["b"] * 3


def test_copies_of_a_text_stay_in_one_split(tmp_path, cfg_for, caplog):
    """A test row that is a copy of a train row measures memory, not generalisation."""
    records = []
    for r in rows(30):
        copies = 1 + int(r["id"].rsplit("-", 1)[1]) % 4  # 1 to 4 copies of each text
        records += [{**r, "id": f"{r['id']}-{c}"} for c in range(copies)]
    src = write_rows(tmp_path / "d.csv", records)
    caplog.set_level("INFO", logger="pipeline")
    result = dataset_publish.run(cfg_for(src))
    files = artifact_files(cfg_for(src), result.produced[0], tmp_path)
    texts = {s: set(pq.read_table(files[f"{s}.parquet"]).column("text").to_pylist()) for s in ("train", "validation", "test")}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["validation"] or texts["validation"] & texts["test"])
    meta = json.loads(files["dataset.json"].read_text())
    assert meta["repeated_texts"] == len(records) - 90
    for split, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):  # as close as whole texts allow
        for label in LABELS:
            assert abs(meta["label_counts"][split][label] - share * len(records) / 3) <= 4
    assert f"{len(records) - 90} rows repeat the text of an earlier row" in caplog.text

    # A label needs as many distinct texts as there are splits, however many copies it has.
    few = [*rows(10), *({"id": f"rare-{i}", "text": f"rare text {i % 2}", "label": "rare"} for i in range(6))]
    with pytest.raises(DataError, match=r"label\(s\) 'rare' have fewer than 3 distinct texts, too few to split"):
        dataset_publish.run(cfg_for(write_rows(tmp_path / "few.csv", few)))


def test_copies_that_differ_in_case_spacing_or_width_stay_in_one_split(tmp_path, cfg_for, caplog):
    variants = [lambda t: t, str.upper, lambda t: f"  {t} ", lambda t: t.replace(" ", "\t"), lambda t: t.replace(" ", "\u00a0"),
                lambda t: t.replace(" ", "   "), lambda t: "".join(chr(ord(ch) + 0xFEE0) if ch.isascii() and ch.isalnum() else ch for ch in t)]
    records = []
    for r in rows(30):
        k = int(r["id"].rsplit("-", 1)[1])
        text = f"{r['text']} café" if k % 2 else r["text"]  # non-ASCII texts fold through Unicode lower case
        records += [{**r, "id": f"{r['id']}-{v}", "text": variants[v](text)} for v in range(k % len(variants) + 1)]
    src = write_rows(tmp_path / "d.csv", records)
    caplog.set_level("INFO", logger="pipeline")
    result = dataset_publish.run(cfg_for(src))
    files = artifact_files(cfg_for(src), result.produced[0], tmp_path)
    from pipeline.data import Columns, copy_key

    def folded(split: str) -> set[str]:
        texts = pq.read_table(files[f"{split}.parquet"]).column("text")
        return set(copy_key({"text": texts}, Columns(text="text", label="label")).to_pylist())

    train, validation, test = folded("train"), folded("validation"), folded("test")
    assert not (train & test or train & validation or validation & test)
    assert len(train | validation | test) == 90  # every variant folded onto its original
    assert json.loads(files["dataset.json"].read_text())["repeated_texts"] == len(records) - 90
    assert "ignoring case and spacing" in caplog.text


def test_copies_with_another_label_are_a_conflict_only_when_written_the_same(tmp_path, cfg_for, caplog):
    r = rows()
    conflict = [*r, {"id": "x1", "text": r[0]["text"], "label": r[15]["label"]}]
    with pytest.raises(DataError, match=r"conflicting_label \(2 rows"):
        dataset_publish.run(cfg_for(write_rows(tmp_path / "conflict.csv", conflict)))

    # the same words in another case with another label: kept (it may be meant), warned about, recorded
    near = [*r, {"id": "x1", "text": r[0]["text"].upper(), "label": r[15]["label"]}]
    src = write_rows(tmp_path / "near.csv", near)
    result = dataset_publish.run(cfg_for(src))
    assert sum(result.metrics[f"rows_{s}"] for s in ("train", "validation", "test")) == 31
    a, b = r[0]["label"], r[15]["label"]
    assert (f"2 rows have a text that differs only in case or spacing from a text with another label ({src} row 1 "
            f"(label {a!r}; row 31 has {b!r}); {src} row 31 (label {b!r}; row 1 has {a!r}))") in caplog.text
    manifest = json.loads(artifact_files(cfg_for(src), result.produced[0], tmp_path)["dataset.json"].read_text())
    assert manifest["mixed_label_copies"] == 2 and manifest["repeated_texts"] == 1

    # both: the rows written the same are the conflict, the other copy is kept
    both = [*conflict, {"id": "x2", "text": r[0]["text"].lower() + "  ", "label": r[25]["label"]}]
    checked = dataset_publish.prepare(cfg_for(write_rows(tmp_path / "both.csv", both), "dataset.on_invalid=drop"))[1]
    assert checked["dropped"] == {"conflicting_label": 2} and "mixed_label_copies" not in checked

    # the copy with another label is dropped (its label is too small a class): nothing mixed is left to report
    lonely = [*r, {"id": "x1", "text": r[0]["text"].upper(), "label": "rare"}]
    caplog.clear()
    manifest = dataset_publish.prepare(cfg_for(write_rows(tmp_path / "lonely.csv", lonely), "dataset.on_invalid=drop"))[1]
    assert manifest["dropped"] == {"class_too_small": 1} and "mixed_label_copies" not in manifest
    assert "differs only in case or spacing" not in caplog.text


def test_a_label_needs_distinct_texts_not_distinct_spellings(tmp_path, cfg_for):
    spellings = ["Rare text", "rare text", "RARE TEXT", " rare  text", "another rare one"]
    few = [*rows(10), *({"id": f"rare-{i}", "text": t, "label": "rare"} for i, t in enumerate(spellings))]
    with pytest.raises(DataError, match=r"label\(s\) 'rare' have fewer than 3 distinct texts"):
        dataset_publish.run(cfg_for(write_rows(tmp_path / "few.csv", few)))


def test_users_own_splits_that_share_texts_with_train_are_warned_about(tmp_path, cfg_for, caplog):
    r = rows()
    files = {s: write_rows(tmp_path / f"{s}.csv", part) for s, part in
             (("train", r[0:8] + r[10:18] + r[20:28]), ("validation", [r[8], r[18], r[28]]),
              ("test", [r[9], {**r[0], "id": "copy-of-billing-0"}, r[29]]))}
    cfg = cfg_for(tmp_path / "train.csv", *(f"dataset.split_files.{s}={p}" for s, p in files.items()))
    manifest = dataset_publish.prepare(cfg)[1]
    assert manifest["texts_also_in_train"] == {"validation": 0, "test": 1} and manifest["repeated_texts"] == 1
    assert (f"1 test rows have a text that is also in the train split ({files['test']} row 2 (train: {files['train']} "
            "row 1))") in caplog.text


def test_users_own_split_files(tmp_path, cfg_for):
    r = rows()
    files = {s: write_rows(tmp_path / f"{s}.csv", part) for s, part in
             (("train", r[0:8] + r[10:18] + r[20:28]), ("validation", [r[8], r[18], r[28]]), ("test", [r[9], r[19], r[29]]))}
    cfg = cfg_for(tmp_path / "train.csv", *(f"dataset.split_files.{s}={p}" for s, p in files.items()))
    tables = dataset_publish.prepare(cfg)[0]
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 24, "validation": 3, "test": 3}
    assert tables["test"].column("id").to_pylist() == ["billing-9", "shipping-9", "tech-9"]
    # the lineage names the files read, not `source` (which then only names the dataset)
    from pipeline.lineage import build, render

    ref = dataset_publish.run(cfg).produced[0]
    shown = render(build(registry_of(cfg), ref), "text")
    assert f"train={files['train']}, validation={files['validation']}, test={files['test']}" in shown
    assert "source=" not in shown


def test_users_own_split_files_with_dropped_rows_keep_their_splits(tmp_path, cfg_for):
    r = rows()
    train = r[0:8] + r[10:18] + r[20:28]
    train[3] = {**train[3], "text": " "}            # dropped from train
    test = [r[9], r[19], r[29], {**r[29], "id": "tech-9b", "text": "another tech one"}]
    test[1] = {**test[1], "id": train[0]["id"]}     # an id already used in train: dropped from test
    files = {s: write_rows(tmp_path / f"{s}.csv", part) for s, part in
             (("train", train), ("validation", [r[8], r[18], r[28]]), ("test", test))}
    cfg = cfg_for(tmp_path / "train.csv", "dataset.on_invalid=drop", *(f"dataset.split_files.{s}={p}" for s, p in files.items()))
    tables, manifest, dropped = dataset_publish.prepare(cfg)
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 23, "validation": 3, "test": 3}
    assert tables["test"].column("id").to_pylist() == ["billing-9", "tech-9", "tech-9b"]
    assert r[3]["id"] not in tables["train"].column("id").to_pylist()
    assert manifest["dropped"] == {"duplicate_id": 1, "empty_text": 1}
    assert sorted(dropped.column("_file").to_pylist()) == [str(files["test"]), str(files["train"])]


def test_users_own_split_files_need_every_label_in_train(tmp_path, cfg_for):
    r = rows()  # billing 0-9, shipping 10-19, tech 20-29
    files = {s: write_rows(tmp_path / f"{s}.csv", part) for s, part in
             (("train", r[0:8] + r[20:28]), ("validation", [r[8], r[18], r[28]]), ("test", [r[9], r[19], r[29], r[10]]))}
    overrides = [f"dataset.split_files.{s}={p}" for s, p in files.items()]
    with pytest.raises(DataError) as e:
        dataset_publish.prepare(cfg_for(files["train"], *overrides))
    msg = str(e.value)
    assert "label_not_in_train (3 rows, label(s) 'shipping' have no rows in the train split" in msg
    assert f"{files['validation']} row 2; {files['test']} row 2; {files['test']} row 4" in msg
    tables, manifest, dropped = dataset_publish.prepare(cfg_for(files["train"], "dataset.on_invalid=drop", *overrides))
    assert manifest["label_names"] == ["billing", "tech"] and manifest["dropped"] == {"label_not_in_train": 3}
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 16, "validation": 2, "test": 2}
    assert sorted(dropped.column("id").to_pylist()) == ["shipping-0", "shipping-8", "shipping-9"]


def test_the_same_file_cannot_be_two_splits(cfg_for, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="split_files.validation and split_files.test name the same source"):
        cfg_for(tmp_path / "x.csv", f"dataset.split_files.train={tmp_path / 'a.csv'}",
                f"dataset.split_files.validation={tmp_path / 'b.csv'}", f"dataset.split_files.test={tmp_path / '.' / 'b.csv'}")


@pytest.mark.parametrize("fmt,blank", [("csv", ""), ("csv", "  "), ("jsonl", ""), ("jsonl", None), ("parquet", " \t")])
def test_an_empty_or_blank_id_is_no_id_in_every_format(tmp_path, cfg_for, fmt, blank):
    """An id column may leave rows without an id (CSV's empty field always could). An id written as "" (JSON, Parquet,
    a CSV's quoted `""`) or as spaces is the same: no id, so such rows are not duplicates of each other, and the
    version stores no id for them."""
    records = rows()
    for r in records[::4]:
        r["id"] = blank
    if fmt == "csv" and blank == "":  # Python's csv writes "" as an empty field: quote it, as other writers do
        src = tmp_path / "blank.csv"
        src.write_text("id,text,label\n" + "".join(
            f'{chr(34) * 2 if r["id"] == "" else r["id"]},{r["text"]},{r["label"]}\n' for r in records))
    else:
        src = write_rows(tmp_path / f"blank.{fmt}", records)
    cfg = cfg_for(src)
    ref = dataset_publish.run(cfg).produced[0]
    files = artifact_files(cfg, ref, tmp_path)
    stored = pa.concat_tables([pq.read_table(files[f"{s}.parquet"]) for s in ("train", "validation", "test")])
    assert stored.num_rows == len(records)
    assert stored.column("id").null_count == len(records[::4])
    assert sorted(i for i in stored.column("id").to_pylist() if i is not None) == sorted(
        r["id"] for i, r in enumerate(records) if i % 4)


def test_split_fractions_must_sum_to_one(cfg_for, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="sum to 1"):
        cfg_for(tmp_path / "x.csv", "dataset.split.test=0.3")


def _bad_rows() -> list[dict]:
    r = rows()
    r[1]["text"] = ""                         # empty text       -> data row 2
    r[2]["label"] = ""                        # null label       -> data row 3
    r[4]["id"] = r[3]["id"]                   # duplicate id     -> data row 5
    r[11]["text"] = r[12]["text"]             # same text, same label: fine
    r[21]["text"] = r[5]["text"]              # same text, conflicting labels -> rows 6 and 22
    r.append({"id": "rare-0", "text": "a lonely one", "label": "rare"})  # too small to split
    return r


def test_each_validation_failure_is_reported_with_file_and_row(tmp_path, cfg_for):
    src = write_rows(tmp_path / "bad.csv", _bad_rows())
    cfg = cfg_for(src)
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg)
    msg = str(e.value)
    assert f"{src} row 2" in msg.split("empty_text")[1].split("\n")[0]
    assert f"{src} row 3" in msg.split("null_label")[1].split("\n")[0]
    bad = _bad_rows()
    # each duplicate or conflicting row names the row it clashes with, and the value
    assert f"{src} row 5 (id {bad[3]['id']!r}, first on row 4)" in msg.split("duplicate_id")[1].split("\n")[0]
    conflict = msg.split("conflicting_label")[1].split("\n")[0]
    assert f"{src} row 6 (label {bad[5]['label']!r}; row 22 has {bad[21]['label']!r})" in conflict
    assert f"{src} row 22 (label {bad[21]['label']!r}; row 6 has {bad[5]['label']!r})" in conflict
    assert "'rare'" in msg.split("class_too_small")[1].split("\n")[0]
    assert "nothing was published" in msg
    assert not (Path(cfg.tracking.dir) / "wandb").exists()
    assert registry_of(cfg).list_versions() == []


def test_rows_over_several_lines_are_named_with_the_line_they_start_on(tmp_path, cfg_for, caplog):
    """A row is a record: a quoted text over several lines (a support ticket's body) or a blank line put the rows of a
    file below the lines an editor shows ("row 30" was line 59). Where a row is not on line row + 1 (CSV, TSV) or
    line row (JSON Lines), the report names its line too, as Python's csv reader finds the line the record starts
    on; a file the two readers split differently (malformed quoting, which each mends its own way) keeps the row
    alone rather than a line that may be wrong."""
    records = _bad_rows()
    records[0]["text"] = "my invoice\nis wrong\nplease fix it"   # data row 1: lines 2-4
    tall = tmp_path / "tall.csv"
    write_rows(tall, records)
    body = tall.read_text(encoding="utf-8").splitlines(keepends=True)
    assert body[4].startswith(records[1]["id"])  # data row 2 is line 5
    body.insert(7, "\r\n")                        # a blank line before data row 5 (line 8): rows 5 on start a line later
    tall.write_text("".join(body), encoding="utf-8", newline="")
    with pytest.raises(DataError) as e:
        dataset_publish.prepare(cfg_for(tall))
    msg = str(e.value)
    assert f"{tall} row 2, line 5" in msg.split("empty_text")[1].split("\n")[0]
    assert f"{tall} row 3, line 6" in msg.split("null_label")[1].split("\n")[0]
    assert (f"{tall} row 5, line 9 (id {records[3]['id']!r}, first on row 4, line 7)"
            in msg.split("duplicate_id")[1].split("\n")[0])
    assert (f"{tall} row 22, line 26 (label {records[21]['label']!r}; row 6, line 10 has {records[5]['label']!r})"
            in msg.split("conflicting_label")[1].split("\n")[0])
    lines = tall.read_text(encoding="utf-8").splitlines()
    assert lines[4].startswith(records[1]["id"]) and lines[8].startswith(records[4]["id"])  # what the editor shows
    assert lines[25].startswith(records[21]["id"]) and lines[6].startswith(records[3]["id"])

    # each row on its line after the header: the row alone, as before
    plain = write_rows(tmp_path / "plain.csv", _bad_rows())
    with pytest.raises(DataError, match=r"row 5 \(id 'billing-3', first on row 4\)"):
        dataset_publish.prepare(cfg_for(plain))

    # a row the parser refuses, below a text over several lines
    with open(tall, "a", encoding="utf-8", newline="") as f:
        f.write("r-x,one field too many,billing,extra\r\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tall))} row {len(records) + 1}, line {len(records) + 5}: "
                                        "expected 3 fields, found 4"):
        dataset_publish.prepare(cfg_for(tall))

    # a warning names the line too (a text with a backslash before a quote, on data row 3)
    warned = [dict(r) for r in rows()]
    warned[0]["text"] = "line one\nline two"
    warned[2]["text"] = 'a pasted {\\"json\\": 1} blob'
    write_rows(tmp_path / "warned.csv", warned)
    with caplog.at_level("WARNING", logger="pipeline.data"):
        dataset_publish.prepare(cfg_for(tmp_path / "warned.csv"))
    assert "warned.csv row 3, line 5: column 'text' holds a backslash before a quote" in caplog.text

    # JSON Lines: a blank line moves the rows below it off their line numbers
    jsonl = tmp_path / "tall.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(_bad_rows())))
    with pytest.raises(DataError) as e:
        dataset_publish.prepare(cfg_for(jsonl))
    msg = str(e.value)
    assert f"{jsonl} row 2\n" in msg  # above the blank line: on its line, named as before
    assert f"{jsonl} row 5, line 6 (id 'billing-3', first on row 4, line 5)" in msg.split("duplicate_id")[1].split("\n")[0]

    # Spark's backslash before a line break, outside quotes: Arrow and Python's csv split the rows apart
    spark = tmp_path / "spark.csv"
    spark.write_text('text,label\n"\nb\\""\\\n",x\r\nx ,x\n,y\n', encoding="utf-8", newline="")
    with pytest.raises(DataError, match=rf"empty_text .*: {re.escape(str(spark))} row 3\n"):
        dataset_publish.prepare(cfg_for(spark, "dataset.escape_char=\\", "dataset.id_column=null",
                                        "dataset.split.train=1", "dataset.split.validation=0", "dataset.split.test=0"))


def test_a_header_line_repeated_inside_the_data_is_named_as_such(tmp_path, cfg_for):
    """`cat a.csv b.csv > all.csv` keeps b's header as a data row: text 'text', label 'label'. It was reported as
    a class too small to split, label 'label', which does not say what the row is."""
    first = write_rows(tmp_path / "a.csv", rows())
    second = write_rows(tmp_path / "b.csv", [{**r, "id": f"b-{r['id']}", "text": f"{r['text']} again"} for r in rows()])
    joined = tmp_path / "all.csv"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with pytest.raises(DataError, match=rf"header_row \(1 rows, the row repeats the header \('text', 'label'\): files "
                                        rf"joined one after another keep each one's header line\): {joined} row 31\n"):
        dataset_publish.prepare(cfg_for(joined))
    _, manifest, dropped = dataset_publish.prepare(cfg_for(joined, "dataset.on_invalid=drop"))
    assert manifest["dropped"] == {"header_row": 1} and sum(manifest["num_rows"].values()) == 60
    assert dropped.column("_row").to_pylist() == [31]
    # a class named "label" is a class: only the row that is the header again is one
    labelled = write_rows(tmp_path / "c.csv", rows() + [{"id": f"l{i}", "text": f"label me {i}", "label": "label"}
                                                         for i in range(3)])
    assert "label" in dataset_publish.prepare(cfg_for(labelled))[1]["label_names"]


def test_undecodable_bytes_and_missing_column(tmp_path, cfg_for):
    src = tmp_path / "latin1.csv"
    body = "id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in rows())
    src.write_bytes(body.encode() + b"x-1,caf\xe9 au lait,billing\n")
    with pytest.raises(DataError, match=r"undecodable_text \(1 rows.*latin1.csv row 31"):
        dataset_publish.run(cfg_for(src))
    missing = write_rows(tmp_path / "nolabel.csv", [{"id": "1", "text": "t", "category": "x"}])
    with pytest.raises(DataError, match=r"nolabel.csv: missing column\(s\) label; the file has: id, text, category"):
        dataset_publish.run(cfg_for(missing))


def _many(n: int) -> list[dict]:
    """Rows enough to span several of Arrow's 1 MiB blocks, whose own row numbers restart per block."""
    return [{"id": f"r{i}", "text": f"question {i} " + "with some padding " * 4, "label": LABELS[i % 3]} for i in range(n)]


def test_malformed_files_are_reported_at_the_right_line_or_row(tmp_path, cfg_for):
    records = _many(30_000)
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "")                               # a blank line: skipped, but it still counts as a line
    lines[25_000] = '{"id": "r-bad", "text": oops}'    # line 25,001
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{jsonl} line 25001: not valid JSON: Expecting value at character 25$"):
        dataset_publish.run(cfg_for(jsonl))
    lines[25_000] = '{"id": "r-bad", "text": "cut short", "label": '  # a record cut short: its line's end, not "character 1"
    jsonl.write_text("\r\n".join(lines) + "\r\n")
    with pytest.raises(DataError, match=rf"^{jsonl} line 25001: not valid JSON: Expecting value at the end of the line$"):
        dataset_publish.run(cfg_for(jsonl))
    lines[25_000] = '{"id": "r-bad", "text": "a quote never closed, "label": "x"}'  # was "starting at at character 25"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{jsonl} line 25001: not valid JSON: Expecting ',' delimiter at character 49$"):
        dataset_publish.run(cfg_for(jsonl))
    lines[25_000] = '{"id": "r-bad", "text": "cut short'
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{jsonl} line 25001: not valid JSON: Unterminated string starting at "
                                        r"character 25$"):
        dataset_publish.run(cfg_for(jsonl))

    typed = [dict(r) for r in records]
    typed[20_000]["label"] = 7                         # a number among strings: line 20,001, record 20,001
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in typed))
    with pytest.raises(DataError, match=rf"^{mixed} line 20001: field 'label' holds a number, but a string on line 1"):
        dataset_publish.run(cfg_for(mixed))
    as_json = tmp_path / "mixed.json"
    as_json.write_text(json.dumps(typed))
    with pytest.raises(DataError, match=rf"^{as_json} record 20001: field 'label' holds a number"):
        dataset_publish.run(cfg_for(as_json))
    not_objects = tmp_path / "list.json"
    not_objects.write_text(json.dumps([records[0], ["a", "list"]]))
    with pytest.raises(DataError, match=rf"^{not_objects} record 2: expected a JSON object, found a list"):
        dataset_publish.run(cfg_for(not_objects))

    list_line = tmp_path / "list.jsonl"
    list_line.write_text(json.dumps(records[0]) + '\n["a", "list"]\n')
    with pytest.raises(DataError, match=rf"^{list_line} line 2: expected a JSON object, found a list"):
        dataset_publish.run(cfg_for(list_line))

    ragged = write_rows(tmp_path / "ragged.csv", records)
    text = ragged.read_text().splitlines()
    text[12_001] = "r-x,one field too many,billing,extra"  # data row 12,001 (the header is line 1)
    ragged.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=rf"^{ragged} row 12001: expected 3 fields, found 4"):
        dataset_publish.run(cfg_for(ragged))
    assert not (Path(cfg_for(ragged).tracking.dir) / "wandb").exists()
    assert registry_of(cfg_for(ragged)).list_versions() == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_unicode_text_exports_with_a_byte_order_mark_are_read(tmp_path, cfg_for, encoding):
    """Excel's "Unicode Text" export is UTF-16 with a BOM; "CSV UTF-8" starts with a UTF-8 BOM."""
    plain = write_rows(tmp_path / "plain" / "data.tsv", rows())
    exported = tmp_path / encoding / "data.tsv"
    exported.parent.mkdir()
    exported.write_text(plain.read_text(encoding="utf-8"), encoding=encoding)
    assert_same_split_files(cfg_for, plain, exported, tmp_path)


def test_a_missing_source_names_where_a_relative_path_was_looked_for(tmp_path, cfg_for, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"dataset source not found: data/tickets.csv \(relative paths start from "
                                        rf"the current directory: {tmp_path}\)"):
        dataset_publish.run(cfg_for(Path("data/tickets.csv")))
    with pytest.raises(DataError, match=rf"dataset source not found: {tmp_path}/gone.csv$"):
        dataset_publish.run(cfg_for(tmp_path / "gone.csv"))
    # a name close to one beside it: a typo, probably
    write_rows(tmp_path / "data" / "tickets.csv", rows())
    with pytest.raises(DataError, match=rf"dataset source not found: {tmp_path}/data/ticket.csv; did you mean "
                                        rf"{tmp_path}/data/tickets.csv\?$"):
        dataset_publish.run(cfg_for(tmp_path / "data" / "ticket.csv"))
    # relative, NAME/NAME may be a hub id; offline it is not one, and the folder is there
    with pytest.raises(DataError, match=r"\(is the path misspelt\? data/ is a local folder; did you mean data/tickets.csv\?\)$"):
        dataset_publish.run(cfg_for(Path("data/tickets.cvs")))
    with pytest.raises(DataError, match=rf"dataset source not found: {tmp_path}/nowhere/tickets.csv$"):  # no such folder
        dataset_publish.run(cfg_for(tmp_path / "nowhere" / "tickets.csv"))
    (tmp_path / "link.csv").symlink_to(tmp_path / "moved.csv")  # a link whose file went: not offered as its own match
    with pytest.raises(DataError, match=rf"dataset source not found: {tmp_path}/link.csv$"):
        dataset_publish.run(cfg_for(tmp_path / "link.csv"))


def test_a_named_pipe_as_the_source_is_refused_before_it_is_read(tmp_path, cfg_for):
    """The stage reads a source twice (its rows, and its sha256 on another thread at the same time): two readers of one
    pipe would each get part of the bytes, or the second would wait for a writer forever."""
    import os

    pipe = tmp_path / "tickets.csv"
    os.mkfifo(pipe)  # no writer: opening it to read would block, so this also shows it is never opened
    with pytest.raises(DataError, match=rf"^{pipe}: not a regular file \(a named pipe or a device\); the dataset "
                                        "source is read more than once, so write the data to a file first"):
        dataset_publish.run(cfg_for(pipe))
    assert registry_of(cfg_for(pipe)).list_versions() == []
    from pipeline.data import list_input_files

    with pytest.raises(DataError, match="not a regular file .* the --input is read more than once"):  # predict's
        list_input_files(pipe, "--input")


def test_a_file_with_only_a_header_says_so(tmp_path, cfg_for):
    src = tmp_path / "header.csv"
    src.write_text("id,text,label\n")
    with pytest.raises(DataError, match=rf"^{src}: no data rows"):
        dataset_publish.run(cfg_for(src))


def test_a_declared_encoding_reads_windows_excel_csv(tmp_path, cfg_for):
    records = rows()
    records[4]["text"] = "café crème – “smart quotes” and €uro"  # all in cp1252, none of it ASCII
    src = tmp_path / "excel.csv"
    src.write_bytes(write_rows(tmp_path / "utf8.csv", records).read_text(encoding="utf-8").encode("cp1252"))
    with pytest.raises(DataError, match=r"undecodable_text \(1 rows, .*needs dataset.encoding, e.g. cp1252\)"):
        dataset_publish.run(cfg_for(src))
    cfg = cfg_for(src, "dataset.encoding=CP1252")
    assert cfg.dataset.encoding == "cp1252"
    _, manifest, _ = dataset_publish.prepare(cfg)
    assert manifest["encoding"] == "cp1252" and "encoding" not in dataset_publish.prepare(cfg_for(tmp_path / "utf8.csv"))[1]
    tables = dataset_publish.prepare(cfg)[0]
    texts = [t for table in tables.values() for t in table.column("text").to_pylist()]
    assert records[4]["text"] in texts
    with pytest.raises(ConfigError, match="dataset.encoding: unknown text encoding 'klingon'"):
        cfg_for(src, "dataset.encoding=klingon")
    for r in records[20:]:
        r["label"] = "técnico"  # in a label column the whole column is refused, with the same hint
    labelled = tmp_path / "labels.csv"
    labelled.write_bytes(write_rows(tmp_path / "labels-utf8.csv", records).read_text(encoding="utf-8").encode("cp1252"))
    with pytest.raises(DataError, match=r"invalid UTF8 data; a CSV saved in another encoding needs dataset.encoding"):
        dataset_publish.run(cfg_for(labelled))
    assert "técnico" in dataset_publish.prepare(cfg_for(labelled, "dataset.encoding=cp1252"))[1]["label_names"]


def test_a_declared_encoding_on_a_utf8_file_is_warned_of(tmp_path, cfg_for, caplog):
    """Any bytes read as cp1252: a UTF-8 file with dataset.encoding set (an export tool that moved to UTF-8) would be
    published as "cafÃ©" without an error. Said, with the text as the file has it and as it would read."""
    records = rows()
    records[4]["text"] = "café crème"
    utf8 = write_rows(tmp_path / "utf8.csv", records)
    caplog.set_level("WARNING", logger="pipeline")
    tables = dataset_publish.prepare(cfg_for(utf8, "dataset.encoding=cp1252"))[0]
    assert "cafÃ© crÃ¨me" in [t for table in tables.values() for t in table.column("text").to_pylist()]
    assert (f"{utf8}: dataset.encoding is cp1252, but the file's non-ASCII text is valid UTF-8 ('café'); read as "
            "cp1252, it becomes 'cafÃ©'. Leave dataset.encoding out if the file is UTF-8") in caplog.text
    caplog.clear()
    excel = tmp_path / "excel.csv"  # the same text written in cp1252: read as it should be, nothing said
    excel.write_bytes(utf8.read_text(encoding="utf-8").encode("cp1252"))
    tables = dataset_publish.prepare(cfg_for(excel, "dataset.encoding=cp1252"))[0]
    assert "café crème" in [t for table in tables.values() for t in table.column("text").to_pylist()]
    assert "valid UTF-8" not in caplog.text


def test_a_declared_delimiter_reads_semicolon_csv(tmp_path, cfg_for):
    records = rows()
    records[3]["text"] = "a text with a , comma and a ; semicolon in quotes"
    plain = write_rows(tmp_path / "plain.csv", records)
    semi = tmp_path / "excel-de.csv"
    with open(semi, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"], delimiter=";")
        w.writeheader()
        w.writerows(records)
    with pytest.raises(DataError, match=rf"{semi}: the first line has no ',', but it has ';': set dataset.delimiter=\";\""):
        dataset_publish.prepare(cfg_for(semi))
    dataset_publish.run(cfg_for(plain))
    dataset_publish.run(cfg_for(semi, "dataset.delimiter=;"))
    want = artifact_files(cfg_for(plain), "tickets:v0", tmp_path)
    got = artifact_files(cfg_for(semi), "tickets:v1", tmp_path)
    for split in ("train.parquet", "validation.parquet", "test.parquet"):
        assert got[split].read_bytes() == want[split].read_bytes()
    assert json.loads(got["dataset.json"].read_text())["delimiter"] == ";"
    assert "delimiter" not in json.loads(want["dataset.json"].read_text())  # recorded only when set
    with pytest.raises(ConfigError, match="dataset.delimiter: the delimiter is one character other than a quote"):
        cfg_for(semi, "dataset.delimiter=;;")


@pytest.mark.parametrize("delimiter", ["\t", "|"])
def test_the_delimiter_the_message_names_can_be_set_as_it_says(tmp_path, cfg_for, delimiter):
    """A tab-separated (or pipe-separated) file named .csv: the message names the setting in double quotes, as YAML
    and --set read a tab, and the setting works, written so or plainly. A tab was refused as an empty value, and a
    bare `|` was YAML's block-scalar mark (an empty text)."""
    import json as jsonlib

    records = rows()
    plain = write_rows(tmp_path / "plain.csv", records)
    other = tmp_path / "other.csv"
    with open(other, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"], delimiter=delimiter)
        w.writeheader()
        w.writerows(records)
    hint = f"dataset.delimiter={jsonlib.dumps(delimiter)}"
    with pytest.raises(DataError, match=rf"the first line has no ',', but it has '{re.escape(delimiter.encode('unicode_escape').decode())}': set "
                                        rf"{re.escape(hint)} for a file separated by it"):
        dataset_publish.prepare(cfg_for(other))
    dataset_publish.run(cfg_for(plain))
    want = artifact_files(cfg_for(plain), "tickets:v0", tmp_path)
    for setting in (hint, f"dataset.delimiter={delimiter}"):  # as the message writes it, and as the shell passes it
        tables = dataset_publish.prepare(cfg_for(other, setting))[0]
        for split in ("train", "validation", "test"):
            assert tables[split].column("text").to_pylist() == pq.read_table(want[f"{split}.parquet"]).column("text").to_pylist()


def test_spark_s_backslash_escaped_quotes_are_read_with_escape_char_and_warned_of_without(tmp_path, cfg_for, caplog):
    """Spark's CSV writer escapes a quote inside a field with a backslash (`"he said \\"hi\\" today"`). Read with quotes
    doubled (RFC 4180), the text became `he said \\hi\\" today"` without a word; with a delimiter after the quote, the
    row split into too many fields with no hint why."""
    records = rows()
    records[4]["text"] = 'he said "hi" today'
    records[7]["text"] = 'a "quoted, comma" inside'
    plain = write_rows(tmp_path / "plain.csv", records)
    spark = tmp_path / "part-00000.csv"
    spark.write_text("id,text,label\n" + "".join(
        f'{r["id"]},"{r["text"].replace(chr(34), chr(92) + chr(34))}",{r["label"]}\n' for r in records), encoding="utf-8")
    assert '"he said \\"hi\\" today"' in spark.read_text()
    with pytest.raises(DataError, match=rf"^{re.escape(str(spark))} row 8: expected 3 fields, found 4 .*the row has a "
                                        r"backslash before a quote: a file that escapes quotes so, as Spark writes CSV, "
                                        r"needs dataset.escape_char=\"\\\\\"$"):
        dataset_publish.prepare(cfg_for(spark))
    got = assert_same_split_files(lambda source: cfg_for(source, *(["dataset.escape_char=\\"] if source == spark else [])),
                                  plain, spark, tmp_path)
    assert json.loads(got["dataset.json"].read_text())["escape_char"] == "\\"
    # without the comma, the row reads (wrongly) without an error: warned of, naming the row and the setting
    del records[7]
    spark.write_text("id,text,label\n" + "".join(
        f'{r["id"]},"{r["text"].replace(chr(34), chr(92) + chr(34))}",{r["label"]}\n' for r in records), encoding="utf-8")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        tables = dataset_publish.prepare(cfg_for(spark))[0]
    assert 'he said \\hi\\" today"' in [t for s in tables.values() for t in s.column("text").to_pylist()]
    assert (f"{spark} row 5: column 'text' holds a backslash before a quote ('he said \\\\hi\\\\\" today\"'; 1 rows do): "
            'if the file escapes quotes with a backslash, as Spark writes CSV, set dataset.escape_char="\\\\"') in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        dataset_publish.prepare(cfg_for(spark, "dataset.escape_char=\\"))
        dataset_publish.prepare(cfg_for(plain))
    assert "backslash" not in caplog.text
    for bad, said in (("\\\\", "one character other than a quote"), ('\'"\'', "one character other than a quote"),
                      (",", "the escape character ',' is also the delimiter")):
        with pytest.raises(ConfigError, match=f"dataset.escape_char: .*{said}"):
            cfg_for(spark, f"dataset.escape_char={bad}")


def test_unquoted_tsv_is_read_as_written_with_quoting_off_and_warned_of_without(tmp_path, cfg_for, caplog):
    """GLUE's TSV files (and most Unix tools' TSV) never quote a field: `"Hello," she said` read as quoted became
    `Hello, she said` without a word, and an opening quote without its close ran on into the next lines."""
    records = rows()
    records[4]["text"] = '"Hello," she said, "where is my refund"'
    records[9]["text"] = 'it is "fine"'
    glue = tmp_path / "train.tsv"
    glue.write_text("id\ttext\tlabel\n" + "".join(f"{r['id']}\t{r['text']}\t{r['label']}\n" for r in records),
                    encoding="utf-8")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        tables = dataset_publish.prepare(cfg_for(glue))[0]
    assert "Hello, she said" in "".join(t for table in tables.values() for t in table.column("text").to_pylist())
    assert (f"{glue} line 6: a field starts with a quote and goes on after the next quote ('billing-4\\t\"Hello,\" she "
            "said") in caplog.text and "set dataset.quoting=false (read as quoted, such a text loses its quotes)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        tables, manifest, _ = dataset_publish.prepare(cfg_for(glue, "dataset.quoting=false"))
    texts = {i: t for table in tables.values() for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist())}
    assert [texts[r["id"]] for r in records] == [r["text"] for r in records] and manifest["quoting"] is False
    assert "quote" not in caplog.text
    # an opening quote with no close: the row that runs on says what to set
    with open(glue, "a", encoding="utf-8") as f:
        f.write('x1\t"so it begins\tbilling\nx2\tthe next row\ttech\n')
    with pytest.raises(DataError, match=rf"^{glue} row 31: expected 3 fields, found 2 .*a field of it starts with a "
                                        r"quote: if the file does not quote its fields, as GLUE's TSV files and Unix "
                                        r"tools write them, set dataset.quoting=false$"):
        dataset_publish.prepare(cfg_for(glue))
    assert sum(dataset_publish.prepare(cfg_for(glue, "dataset.quoting=false"))[1]["num_rows"].values()) == 32
    # properly quoted TSV (pandas, Python's csv) is not warned of
    quoted = write_rows(tmp_path / "quoted.tsv", records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        dataset_publish.prepare(cfg_for(quoted))
    assert "quote" not in caplog.text
    with pytest.raises(ConfigError, match="with dataset.quoting false no field is quoted"):
        cfg_for(glue, "dataset.quoting=false", "dataset.escape_char=\\")


def test_a_quote_closed_early_is_never_found_in_rfc_4180_files():
    """`_quote_closed_early` looks for what only an unquoted file has; in 2,000 random files written by Python's csv
    (quotes doubled, fields with tabs, quotes and line breaks quoted) it finds nothing, and in the same rows written
    without quoting it finds the first field that starts with a quote (after an even number of them: an odd one
    before, as in `5" long`, throws the count off, and the check finds nothing after it) and goes on after the
    next one."""
    import io
    import random

    from pipeline.data import _quote_closed_early

    rng = random.Random(11)
    pieces = ["a", "b c", '"', '""', "\t", "\n", "\r\n", ",", " ", "x\"y", "é"]
    for _ in range(2000):
        table = [["".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) for _ in range(3)]
                 for _ in range(rng.randint(1, 6))]
        for delimiter in ("\t", ","):
            out = io.StringIO()
            csv.writer(out, delimiter=delimiter, lineterminator=rng.choice(["\n", "\r\n"])).writerows(table)
            data = np.frombuffer(out.getvalue().encode(), dtype=np.uint8)
            assert _quote_closed_early(data, ord(delimiter)) is None, out.getvalue()
        plain = "".join("\t".join(f.replace("\t", " ").replace("\n", " ").replace("\r", " ") for f in row) + "\n"
                        for row in table)
        data = np.frombuffer(plain.encode(), dtype=np.uint8)
        expected = None
        for m in re.finditer(r'(?:^|(?<=[\t\n]))"', plain):  # a field starting with a quote, quotes paired before it
            if plain[:m.start()].count('"') % 2:
                continue
            close = plain.find('"', m.start() + 1)
            if close >= 0 and close + 1 < len(plain) and plain[close + 1] not in '\t\n"':
                expected = len(plain[:m.start()].encode())
                break
        assert _quote_closed_early(data, 9) == expected, plain


@pytest.mark.parametrize("line", ["sep=;", '"sep=;"', "sep=;;;"])
def test_excel_s_separator_line_names_the_delimiter(tmp_path, cfg_for, line):
    """Excel writes and reads a first line `sep=;` saying how the fields are separated; the header is the line after.
    It was read as the header ("the file has: sep="). The same rows as the file without it; a delimiter set to
    another one is refused; a malformed row is numbered as a data row still, with its line (the row's number + 2)."""
    records = rows()
    records[3]["text"] = "a text with a , comma and a ; semicolon in quotes"
    plain = write_rows(tmp_path / "plain.csv", records)
    semi = tmp_path / "excel.csv"
    with open(semi, "w", newline="", encoding="utf-8") as f:
        f.write(line + "\r\n")
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"], delimiter=";")
        w.writeheader()
        w.writerows(records)
    assert_same_split_files(cfg_for, plain, semi, tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(semi))}: its first line, '{re.escape(line)}', says the fields "
                                        r"are separated by ';', but dataset.delimiter is '\|'$"):
        dataset_publish.prepare(cfg_for(semi, "dataset.delimiter=|"))
    with open(semi, "a", encoding="utf-8", newline="") as f:
        f.write("x99;one;field;too many\r\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(semi))} row {len(records) + 1}, line {len(records) + 3}: "
                                        "expected 3 fields, found 4"):
        dataset_publish.prepare(cfg_for(semi))


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_files_without_a_header_row_take_the_configured_column_names(tmp_path, cfg_for, fmt):
    """Spark writes CSV without a header by default; dataset.column_names names the columns instead."""
    records = rows()
    plain = write_rows(tmp_path / f"plain.{fmt}", records)
    bare = tmp_path / f"bare.{fmt}"
    bare.write_text(plain.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")  # no header row
    named = "dataset.column_names=[id, text, label]"
    dataset_publish.run(cfg_for(plain))
    dataset_publish.run(cfg_for(bare, named))
    want, got = artifact_files(cfg_for(plain), "tickets:v0", tmp_path), artifact_files(cfg_for(bare), "tickets:v1", tmp_path)
    for split in ("train.parquet", "validation.parquet", "test.parquet"):
        assert got[split].read_bytes() == want[split].read_bytes()  # the first line is a row, not a header
    assert json.loads(got["dataset.json"].read_text())["column_names"] == ["id", "text", "label"]
    assert "column_names" not in json.loads(want["dataset.json"].read_text())

    # Rows are numbered from the first line; a row with another number of fields is named.
    sep = "\t" if fmt == "tsv" else ","
    bad = tmp_path / f"bad.{fmt}"
    bad.write_text(f"a{sep}one text{sep}billing\nb{sep}two{sep}texts{sep}shipping\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad} row 2: expected 3 fields, found 4"):
        dataset_publish.prepare(cfg_for(bad, named))
    with pytest.raises(DataError, match=r"missing column\(s\) label; the file has: id, text, category"):
        dataset_publish.prepare(cfg_for(bare, "dataset.column_names=[id, text, category]"))
    with pytest.raises(ConfigError, match="dataset.column_names: column name\\(s\\) 'id' appear more than once"):
        cfg_for(bare, "dataset.column_names=[id, text, id]")


def test_json_lines_must_be_utf8(tmp_path, cfg_for):
    src = tmp_path / "wide.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-16")
    with pytest.raises(DataError, match=rf"^{src}: the file is UTF-16 .*save it as UTF-8"):
        dataset_publish.run(cfg_for(src))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_a_misspelt_or_doubled_column_is_named(tmp_path, cfg_for, fmt):
    records = [{"id": r["id"], " Text ": r["text"], "labels": r["label"]} for r in rows()]
    src = write_rows(tmp_path / f"spaced.{fmt}", records)
    with pytest.raises(DataError, match=r"missing column\(s\) text, label; the file has: id,  Text , labels "
                                        r"\('text' may be ' Text '; 'label' may be 'labels'\)"):
        dataset_publish.run(cfg_for(src))
    assert dataset_publish.prepare(cfg_for(src, 'dataset.text_column=" Text "', "dataset.label_column=labels"))[1]["columns"] \
        == {"id": "id", "text": " Text ", "label": "labels"}
    if fmt != "parquet":  # a header may repeat a name; Arrow would silently take the first
        doubled = tmp_path / f"doubled.{fmt}"
        sep = "\t" if fmt == "tsv" else ","
        doubled.write_text(sep.join(["id", "text", "label", "text"]) + "\n"
                           + "".join(sep.join([r["id"], r["text"], r["label"], "other"]) + "\n" for r in rows()))
        with pytest.raises(DataError, match=rf"^{doubled}: column\(s\) text appear more than once in the header"):
            dataset_publish.run(cfg_for(doubled))


@pytest.mark.parametrize("header", [b"a,b,c\n", b"a, b ,c\r\n", b"a,,b\n", b"a,b,\n", b" x\tq,y\r", "é,ü,日本\n".encode(),
                                    b"a,b,b\n", b"\xef\xbb\xbfid,text\n", b'id,"te,xt",label\n', b'"id\ntwo",text\n',
                                    "id,te’xt\n".encode("cp1252")])
def test_a_csv_header_is_read_as_arrow_reads_it(tmp_path, header):
    """A header without quotes is the first line split at the delimiter (Arrow is not run for it: it would parse and
    convert a whole block, which for a small file is the file); the names are Arrow's either way."""
    from pyarrow import csv as pacsv

    from pipeline.data import _first_line, _plain_header

    path = tmp_path / "h.csv"
    path.write_bytes(header)
    plain = _plain_header(_first_line(path, "utf-8"), ",")
    try:
        names = pacsv.open_csv(path).schema.names
    except UnicodeDecodeError:  # bytes that are not UTF-8: Arrow reads the header to say so
        assert plain is None
        return
    if b'"' in header:  # quotes may hold the delimiter or a line break: Arrow reads it
        assert plain is None
    else:
        assert plain == names


def test_drop_policy_counts_and_records_every_dropped_row(tmp_path, cfg_for, caplog):
    src = write_rows(tmp_path / "bad.csv", _bad_rows())
    cfg = cfg_for(src, "dataset.on_invalid=drop")
    result = dataset_publish.run(cfg)
    expected = {"empty_text": 1, "null_label": 1, "duplicate_id": 1, "conflicting_label": 2, "class_too_small": 1}
    assert result.status == "ok" and result.details["dropped"] == expected
    # said where the command is watched too: the report an error would give, with what became of the rows
    assert f"{src}: 6 invalid row(s) dropped (dataset.on_invalid=drop)\n  empty_text (1 rows" in caplog.text
    assert f"{src} row 5 (id {_bad_rows()[3]['id']!r}, first on row 4)" in caplog.text
    assert "listed in the run's data/dropped_rows table (the first 1,000)" in caplog.text
    assert result.message == ("6 invalid rows dropped (class_too_small 1, conflicting_label 2, duplicate_id 1, empty_text 1, "
                              "null_label 1)")
    version = registry_of(cfg).resolve(result.produced[0])
    assert version.metadata["dropped"] == expected
    assert sum(version.metadata["num_rows"].values()) == 31 - 6
    summary = inspect_summary(Path(result.paths["run_dir"]))
    assert summary["summary"]["data/dropped_conflicting_label"] == 2
    assert summary["summary"]["data/dropped_rows"]["_type"] == "table-file"
    assert summary["summary"]["data/dropped_rows"]["nrows"] == 6


def test_unchanged_data_is_not_published_twice(tmp_path, cfg_for):
    src = write_rows(tmp_path / "d.csv", rows())
    cfg = cfg_for(src)
    first = dataset_publish.run(cfg)
    reg = registry_of(cfg)
    stored = sorted(p for p in reg.objects.rglob("*") if p.is_file())
    again = dataset_publish.run(cfg_for(src, "train.epochs=9"))  # unrelated config changes nothing
    assert again.status == "unchanged" and again.produced == first.produced == ["tickets:v0"]
    assert again.summary_line() == "dataset-publish: unchanged (tickets:v0): the data is tickets:v0's byte for byte: no new version"
    assert sorted(p for p in reg.objects.rglob("*") if p.is_file()) == stored
    changed = write_rows(tmp_path / "d.csv", rows() + [{"id": "new", "text": "brand new", "label": "tech"}])
    assert dataset_publish.run(cfg_for(changed)).produced == ["tickets:v1"]


@pytest.mark.parametrize("layout", ["file", "folder", "glob", "split_files"])
def test_the_same_files_in_another_folder_are_the_same_version(tmp_path, cfg_for, layout):
    """A fresh checkout, a teammate's machine, an orchestrator's download folder: the same files read from another
    place are the same data. dataset.json names each source file below the source as configured (a file by its
    name, a folder's or a pattern's files by their paths below it, as W&B's add_file and add_dir name them), so its
    bytes do not depend on where the files lay; the version's metadata keeps where they were read from."""
    def place(root: Path) -> list[str]:
        if layout == "file":
            return [f"dataset.source={write_rows(root / 'tickets.csv', rows())}"]
        if layout == "split_files":
            parts = {s: write_rows(root / f"{s}.csv", [r for i, r in enumerate(rows(12)) if i % 3 == k])
                     for k, s in enumerate(("train", "validation", "test"))}
            return [f"dataset.source={root}", *(f"dataset.split_files.{s}={p}" for s, p in parts.items())]
        write_rows(root / "export" / "a.csv", rows()[:15])
        write_rows(root / "export" / "2026" / "b.csv", rows()[15:])
        return [f"dataset.source={root / 'export' / ('**/*.csv' if layout == 'glob' else '')}"]

    first = dataset_publish.run(cfg_for(tmp_path, *place(tmp_path / "checkout-a")))
    again = dataset_publish.run(cfg_for(tmp_path, *place(tmp_path / "elsewhere" / "checkout-b")))
    assert first.produced == ["tickets:v0"] and (again.status, again.produced) == ("unchanged", ["tickets:v0"])
    cfg = cfg_for(tmp_path)
    recorded = json.loads(artifact_files(cfg, "tickets:v0", tmp_path)["dataset.json"].read_text())["sources"]
    names = {"file": ["tickets.csv"], "split_files": ["train.csv", "validation.csv", "test.csv"]}.get(
        layout, ["2026/b.csv", "a.csv"])
    assert [s["path"] for s in recorded] == names and all(len(s["sha256"]) == 64 for s in recorded)
    if layout == "split_files":
        assert [s["split"] for s in recorded] == ["train", "validation", "test"]
    located = registry_of(cfg).resolve("tickets:v0").metadata["sources"]  # where the first publish read them
    assert [Path(s["path"]).relative_to(tmp_path / "checkout-a").as_posix() for s in located] == [
        n if layout in ("file", "split_files") else f"export/{n}" for n in names]
    if layout == "file":  # a file's name is part of what is recorded, as a file's name is in a W&B artifact
        renamed = write_rows(tmp_path / "renamed" / "tickets-2026-11-29.csv", rows())
        assert dataset_publish.run(cfg_for(renamed)).produced == ["tickets:v1"]


def test_a_source_named_relative_to_the_folder_is_recorded_where_it_was_read(tmp_path, cfg_for, monkeypatch):
    """`dataset.source: data/tickets.csv` (the demo's form) named the file relative to the folder the command ran in,
    and the version's metadata recorded just that: not where the file was. It records the absolute path, and the
    same command again is still known without reading the data (its input signature names the file alike)."""
    from pipeline import provenance

    monkeypatch.setattr(provenance, "code_version", lambda: {"git_commit": "a" * 40, "git_dirty": False})
    real_read, reads = dataset_publish.read_files, []
    monkeypatch.setattr(dataset_publish, "read_files", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    write_rows(tmp_path / "project" / "data" / "tickets.csv", rows())
    monkeypatch.chdir(tmp_path / "project")
    cfg = cfg_for(Path("data/tickets.csv"))
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 1
    [located] = registry_of(cfg).resolve("tickets:v0").metadata["sources"]
    assert located["path"] == str(tmp_path / "project" / "data" / "tickets.csv")
    again = dataset_publish.run(cfg, reuse=True)
    assert (again.status, again.produced, len(reads)) == ("unchanged", ["tickets:v0"], 1)  # not read again


def test_a_dry_run_checks_and_splits_the_data_and_leaves_nothing(tmp_path, cfg_for, make_config):
    """`--dry-run`: a new export checked (in CI, before a nightly publish) as the stage would check it, with the
    split counts it would give, and nothing made: no version, no W&B run, no registry folder."""
    src = write_rows(tmp_path / "d.csv", rows() + [{"id": "x1", "text": "", "label": "billing"}])
    cfg = cfg_for(src, "dataset.on_invalid=drop")
    checked = dataset_publish.run(cfg, dry_run=True)
    published = dataset_publish.run(cfg)  # the same counts as the real thing
    assert (checked.status, checked.produced, checked.run_id) == ("ok", [], None)
    assert checked.metrics == published.metrics and checked.details["dropped"] == {"empty_text": 1}
    n = published.metrics
    assert checked.message == (f"valid: {int(n['rows_train'] + n['rows_validation'] + n['rows_test'])} rows (train "
                               f"{int(n['rows_train'])}, validation {int(n['rows_validation'])}, test "
                               f"{int(n['rows_test'])}), {int(n['num_labels'])} labels; 1 invalid row would be dropped "
                               "(empty_text 1); nothing published (--dry-run)")
    fresh = make_config(f"dataset.source={src}", "dataset.id_column=id", f"tracking.dir={tmp_path / 'untouched'}")
    with pytest.raises(DataError, match=r"empty_text \(1 rows"):  # on_invalid=error: the report, as publishing gives
        dataset_publish.run(fresh, dry_run=True)
    clean = make_config(f"dataset.source={write_rows(tmp_path / 'ok.csv', rows())}", "dataset.id_column=id",
                        f"tracking.dir={tmp_path / 'untouched'}")
    assert dataset_publish.run(clean, dry_run=True).message.endswith("labels; nothing published (--dry-run)")
    assert not (tmp_path / "untouched").exists()
    cli = run_cli("dataset-publish", "--config", str(write_yaml(tmp_path, clean)), "--dry-run", "--result-json",
                  str(tmp_path / "r.json"))
    assert (cli.returncode, cli.stdout) == (0, ""), cli.stderr[-2000:]
    assert cli.stderr.splitlines()[-1].startswith("dataset-publish: ok: valid: ")
    assert json.loads((tmp_path / "r.json").read_text())["produced"] == [] and not (tmp_path / "untouched").exists()


@pytest.mark.parametrize("reuse", [False, True])
def test_data_published_again_after_other_data_makes_its_version_latest_again(tmp_path, cfg_for, caplog, monkeypatch, reuse):
    # Data reverted to what v0 holds is v0 again, and `latest` with it, as on W&B (which merges a deduplicated
    # artifact's aliases into the version it matched): finetune and sweep, which read tickets:latest unless told,
    # train on what was just published, whether the data was read again or known from its files (reuse).
    from pipeline import provenance

    monkeypatch.setattr(provenance, "code_version", lambda: {"git_commit": "a" * 40, "git_dirty": False})
    src = write_rows(tmp_path / "d.csv", rows())
    cfg = cfg_for(src)
    dataset_publish.run(cfg, reuse=reuse)
    write_rows(tmp_path / "d.csv", rows() + [{"id": "new", "text": "brand new", "label": "tech"}])
    assert dataset_publish.run(cfg, reuse=reuse).produced == ["tickets:v1"]
    write_rows(tmp_path / "d.csv", rows())
    caplog.set_level("INFO")
    again = dataset_publish.run(cfg, reuse=reuse)
    assert (again.status, again.produced) == ("unchanged", ["tickets:v0"])
    assert again.message.startswith("tickets:v0 was published from these same files" if reuse else "the data is")
    said = "tickets:latest is tickets:v0 again (it was tickets:v1)"
    assert again.message.endswith("; " + said) and said in caplog.text
    reg = registry_of(cfg)
    assert reg.resolve("tickets:latest").ref == "tickets:v0" and reg.resolve("tickets:v1").aliases == []
    caplog.clear()
    assert "latest" not in dataset_publish.run(cfg, reuse=reuse).message  # it is latest already: nothing to say
    newest = dataset_publish.run(cfg_for(write_rows(tmp_path / "d.csv", rows()[:-1])), reuse=reuse)
    assert newest.produced == ["tickets:v2"] and reg.resolve("tickets:latest").ref == "tickets:v2"
    assert "latest is" not in caplog.text


def test_a_reused_version_stands_when_the_registry_refuses_to_move_latest_onto_it(tmp_path, cfg_for, monkeypatch):
    # Online, W&B manages `latest` and might refuse it by hand: the reuse is still the result, and it says where
    # `latest` is and which version to name.
    from pipeline import provenance
    from pipeline.errors import RegistryError
    from pipeline.registry.local import LocalRegistry

    monkeypatch.setattr(provenance, "code_version", lambda: {"git_commit": "a" * 40, "git_dirty": False})
    src = write_rows(tmp_path / "d.csv", rows())
    cfg = cfg_for(src)
    dataset_publish.run(cfg, reuse=True)
    write_rows(tmp_path / "d.csv", rows() + [{"id": "new", "text": "brand new", "label": "tech"}])
    dataset_publish.run(cfg, reuse=True)
    write_rows(tmp_path / "d.csv", rows())

    def refuse(self, ref):
        raise RegistryError("'latest' is managed by the server")

    monkeypatch.setattr(LocalRegistry, "mark_latest", refuse)
    again = dataset_publish.run(cfg, reuse=True)
    assert (again.status, again.produced) == ("unchanged", ["tickets:v0"])
    assert again.message.endswith("; tickets:latest is still tickets:v1: putting it on tickets:v0 failed ('latest' is "
                                  "managed by the server); finetune and sweep read tickets:latest unless told, so name "
                                  "this version (--dataset tickets:v0)")
    assert registry_of(cfg).resolve("tickets:latest").ref == "tickets:v1"


def test_files_config_and_code_published_before_are_not_read_again(tmp_path, cfg_for, monkeypatch, cli_here):
    """The command line's default (reuse): a live version published from the same files (by sha256), dataset config,
    code and libraries is the result, status unchanged, without reading the data; anything changed reads it."""
    from pipeline import provenance

    code = {"git_commit": "a" * 40, "git_dirty": False}
    monkeypatch.setattr(provenance, "code_version", lambda: dict(code))
    real_read = dataset_publish.read_files
    reads = []
    monkeypatch.setattr(dataset_publish, "read_files", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    src = write_rows(tmp_path / "d.csv", rows())
    cfg = cfg_for(src)
    first = dataset_publish.run(cfg, reuse=True)
    reg = registry_of(cfg)
    assert first.status == "ok" and len(reg.resolve("tickets:v0").metadata["input_signatures"]) == 1 and len(reads) == 1

    again = dataset_publish.run(cfg_for(src, "train.epochs=9"), reuse=True)  # a config key the data does not use
    assert (again.status, again.produced, len(reads)) == ("unchanged", ["tickets:v0"], 1)  # not read
    assert again.metrics == first.metrics and again.details["digest"] == first.details["digest"]
    assert again.message == "tickets:v0 was published from these same files, config and code; not read again"
    assert reg.get_run(again.run_id)["produced"] == ["tickets:v0"]
    summary = inspect_summary(Path(again.paths["run_dir"]))["summary"]
    assert (summary["status"], summary["reused"], summary["published_by"]) == ("unchanged", "tickets:v0", first.run_id)
    assert summary["data/rows_train"] == first.metrics["rows_train"]
    assert dataset_publish.run(cfg).status == "unchanged" and len(reads) == 2  # the library's default reads

    # anything that makes the data: its bytes, the dataset config, the code, a library: read again
    changed = write_rows(tmp_path / "d.csv", rows() + [{"id": "new", "text": "brand new", "label": "tech"}])
    assert dataset_publish.run(cfg_for(changed), reuse=True).produced == ["tickets:v1"] and len(reads) == 3
    write_rows(tmp_path / "d.csv", rows())  # the bytes of v0 again: v0, known without reading
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 3
    assert dataset_publish.run(cfg_for(src, "dataset.split.seed=7"), reuse=True).produced == ["tickets:v2"]
    assert len(reads) == 4
    real_versions = provenance.package_versions
    monkeypatch.setattr(provenance, "package_versions", lambda: {**real_versions(), "pyarrow": "99.0"})
    assert dataset_publish.run(cfg, reuse=True).status == "unchanged" and len(reads) == 5
    monkeypatch.setattr(provenance, "package_versions", real_versions)
    code["git_dirty"] = True  # code that cannot be named is never the same code
    assert dataset_publish.run(cfg, reuse=True).status == "unchanged" and len(reads) == 6
    code.update(git_dirty=False, git_commit="b" * 40)
    # the same bytes from another commit: no new version, and v0 now names these inputs too
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 7
    assert len(reg.resolve("tickets:v0").metadata["input_signatures"]) == 3  # the pyarrow 99 one, and commit b
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 7
    # an installed package (no checkout): the digest of its files names its code; another build is other code
    code.update(git_commit=None, git_dirty=None, package_digest="c" * 64)
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 8
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 8
    code.update(package_digest="d" * 64)
    assert dataset_publish.run(cfg, reuse=True).produced == ["tickets:v0"] and len(reads) == 9

    # a folder that gains a file is other input
    folder = tmp_path / "in"
    write_rows(folder / "a.csv", rows()[:15])
    write_rows(folder / "b.csv", rows()[15:])
    assert dataset_publish.run(cfg_for(folder), reuse=True).produced == ["tickets:v3"]
    assert dataset_publish.run(cfg_for(folder), reuse=True).produced == ["tickets:v3"] and len(reads) == 10
    write_rows(folder / "c.csv", [{"id": "c0", "text": "one more question", "label": "tech"}])
    assert dataset_publish.run(cfg_for(folder), reuse=True).produced == ["tickets:v4"] and len(reads) == 11

    # a deleted version is not the result: the data is read and published anew
    reg.delete("tickets:v4")
    assert dataset_publish.run(cfg_for(folder), reuse=True).produced == ["tickets:v5"] and len(reads) == 12

    # the command reuses by default; --reread reads
    track = ["--set", f"tracking.dir={cfg.tracking.dir}", "--set", "dataset.name=tickets", "--set", "dataset.id_column=id",
             "--set", "dataset.sample_rows=5", "--set", f"dataset.source={src}", "--set", "model.name=clf"]
    out = cli_here("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), *track)  # cfg's dataset config
    assert (out.returncode, out.stdout.strip(), len(reads)) == (0, "tickets:v0", 12)
    assert "tickets:v0 was published from these same files (by sha256), dataset config and code" in out.stderr
    out = cli_here("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), *track, "--reread")
    assert (out.returncode, out.stdout.strip(), len(reads)) == (0, "tickets:v0", 13)


def test_publishing_the_same_data_again_restores_a_version_s_missing_or_damaged_files(tmp_path, cfg_for, monkeypatch,
                                                                                      caplog):
    """`artifacts verify` named a version's stored file missing (a tracking.dir copied in part) or damaged (cut
    short), but publishing the same data again said unchanged and left it so; with the data unread (reuse), or
    read but found to be the version's bytes, the registry then handed W&B a path that was not there (a traceback)."""
    from pipeline import provenance

    monkeypatch.setattr(provenance, "code_version", lambda: {"git_commit": "a" * 40, "git_dirty": False})
    real_read = dataset_publish.read_files
    reads = []
    monkeypatch.setattr(dataset_publish, "read_files", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    cfg = cfg_for(write_rows(tmp_path / "d.csv", rows()))
    dataset_publish.run(cfg, reuse=True)
    reg = registry_of(cfg)
    files = {f.path: f for f in reg.resolve("tickets:v0").files}
    train, test = reg.object_path(files["train.parquet"].digest), reg.object_path(files["test.parquet"].digest)
    train.unlink()  # missing
    test.chmod(0o644)
    test.write_bytes(test.read_bytes()[:100])  # cut short
    assert reg.damaged_files(reg.resolve("tickets:v0")) == ["test.parquet", "train.parquet"]
    assert not reg.verify().ok

    with caplog.at_level("WARNING"):
        again = dataset_publish.run(cfg, reuse=True)  # the data is read again, as the version cannot be reused
    assert (again.status, again.produced, len(reads)) == ("unchanged", ["tickets:v0"], 2)
    assert ("tickets:v0 was made from these same inputs, but its stored test.parquet, train.parquet are missing or "
            "damaged (`artifacts verify`); it is made again, which restores them when the bytes come out the same"
            ) in caplog.text
    assert ("tickets:v0: its stored test.parquet, train.parquet were missing or damaged; restored from the same files "
            "published again") in caplog.text
    assert reg.verify().ok and reg.damaged_files(reg.resolve("tickets:v0")) == []
    assert [v.ref for v in reg.list_versions()] == ["tickets:v0"]
    caplog.clear()
    assert dataset_publish.run(cfg, reuse=True).status == "unchanged" and len(reads) == 2  # whole again: reused
    train.unlink()
    assert dataset_publish.run(cfg).status == "unchanged" and len(reads) == 3  # the library's default: read, restored
    assert reg.verify().ok and "restored" in caplog.text
    # damaged at its size: only a hash tells. Reuse looks at sizes only (it reads nothing); reading (--reread) hashes
    # the version's objects as it publishes the same bytes again
    train.chmod(0o644)
    damaged = bytearray(train.read_bytes())
    damaged[40] ^= 0xFF
    train.write_bytes(bytes(damaged))
    assert dataset_publish.run(cfg, reuse=True).status == "unchanged" and len(reads) == 3 and not reg.verify().ok
    assert dataset_publish.run(cfg).status == "unchanged" and len(reads) == 4 and reg.verify().ok

def test_sample_tables_show_the_beginning_of_a_long_text_and_the_version_keeps_all_of_it(tmp_path, cfg_for):
    """Documents of 100 KB each put 6 MB of sample tables in the run (60 MB for 1 MB texts), uploaded at every sync;
    a table shows a text's first TABLE_TEXT characters and how many more there are. The split files keep them whole."""
    from pipeline.printable import TABLE_TEXT

    records = rows()
    for i, r in enumerate(records):
        r["text"] = f"{r['text']} " + "long " * (2000 + i)  # 10,000 characters and more
    result = dataset_publish.run(cfg_for(write_rows(tmp_path / "long.csv", records)))
    [table] = (Path(result.paths["run_dir"]) / "files" / "media" / "table" / "samples").glob("train_*.table.json")
    shown = json.loads(table.read_text())
    text_at = shown["columns"].index("text")
    full = {r["id"]: r["text"] for r in records}
    for row in shown["data"]:
        whole = full[row[shown["columns"].index("id")]]
        assert row[text_at] == f"{whole[:TABLE_TEXT]}… [+{len(whole) - TABLE_TEXT} characters]"
    stored = pq.read_table(artifact_files(cfg_for(tmp_path / "long.csv"), result.produced[0], tmp_path)["train.parquet"])
    assert all(t == full[i] for i, t in zip(stored.column("id").to_pylist(), stored.column("text").to_pylist()))

    # the dropped rows' table too, whatever the source calls its text column
    named = [{"id": r["id"], "body": r["text"], "label": r["label"]} for r in records]
    named.append({**named[0], "body": "other " * 3000})  # a duplicate id: dropped
    dropped = dataset_publish.run(cfg_for(write_rows(tmp_path / "named.csv", named), "dataset.text_column=body",
                                          "dataset.on_invalid=drop"))
    [table] = (Path(dropped.paths["run_dir"]) / "files" / "media" / "table" / "data").glob("dropped_rows_*.table.json")
    shown = json.loads(table.read_text())
    assert shown["data"][0][shown["columns"].index("body")] == f"{'other ' * 3000}"[:TABLE_TEXT] + "… [+16000 characters]"


def test_offline_run_holds_stats_and_sample_tables(tmp_path, cfg_for):
    src = write_rows(tmp_path / "d.csv", rows())
    result = dataset_publish.run(cfg_for(src))
    summary = inspect_summary(Path(result.paths["run_dir"]))
    s = summary["summary"]
    assert summary["state"] == "finished"
    assert (s["data/rows_train"], s["data/rows_validation"], s["data/rows_test"]) == (24, 3, 3)
    assert s["data/num_labels"] == 3 and s["artifact"] == "tickets:v0"
    for split in ("train", "validation", "test"):
        assert s[f"samples/{split}"]["_type"] == "table-file"
    assert s["samples/train"]["nrows"] == 5
    assert s["data/label_counts"]["nrows"] == 3  # a row per label, a column per split
    [counts] = (Path(result.paths["run_dir"]) / "files" / "media" / "table" / "data").glob("label_counts_*.table.json")
    table = json.loads(counts.read_text())
    assert table["columns"] == ["label", "train", "validation", "test"]
    assert table["data"] == [[lbl, 8, 1, 1] for lbl in sorted(LABELS)]
    assert s["data/text_length_hist"]["_type"] == "histogram"
    assert summary["config"]["dataset"]["source"] == str(src)
    # the seconds of each step, in the run and in the result file
    steps = ("read", "validate", "split", "open_run", "log", "write", "publish")
    assert set(result.details["timings"]) == set(steps) and all(v >= 0 for v in result.details["timings"].values())
    assert {k: s[f"timing/{k}_s"] for k in steps} == result.details["timings"]


def test_cli_and_result_file(tmp_path):
    src = write_rows(tmp_path / "d.csv", rows())
    result_path = tmp_path / "out" / "result.json"
    args = ["dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"dataset.source={src}",
            "--set", "dataset.id_column=id", "--set", f"tracking.dir={tmp_path / 'track'}", "--result-json", str(result_path)]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    res = json.loads(result_path.read_text())
    assert res["status"] == "ok" and res["produced"] == ["support-tickets:v0"] and res["run_id"]
    again = run_cli(*args)
    assert again.returncode == 0 and json.loads(result_path.read_text())["status"] == "unchanged"
    bad = run_cli(*args[:-2], "--set", "dataset.text_column=body")
    assert bad.returncode == 2 and "missing column(s) body" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_refusing_bad_data_in_a_fresh_process_creates_nothing(tmp_path):
    """The first stage of a process warms W&B up on another thread; bad data still opens no run."""
    src = write_rows(tmp_path / "bad.csv", _bad_rows())
    track = tmp_path / "track"
    out = run_cli("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"dataset.source={src}",
                  "--set", "dataset.id_column=id", "--set", f"tracking.dir={track}", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "duplicate_id (1 rows" in out.stderr and "Traceback" not in out.stderr
    assert not (track / "wandb").exists()
    assert not (track / "registry").exists() or LocalRegistry(track / "registry").list_versions() == []


def test_arrow_memory_pool_is_restored_after_the_stage(tmp_path, cfg_for):
    before = pa.default_memory_pool().backend_name
    dataset_publish.run(cfg_for(write_rows(tmp_path / "d.csv", rows())))
    with pytest.raises(DataError):
        dataset_publish.run(cfg_for(write_rows(tmp_path / "bad.csv", _bad_rows())))
    assert pa.default_memory_pool().backend_name == before


def test_a_memory_pool_the_user_chose_is_kept(tmp_path):
    """ARROW_DEFAULT_MEMORY_POOL=system: the stage allocates from the system pool, not jemalloc."""
    code = (
        "import pyarrow as pa, sys\n"
        "from pipeline.stages import dataset_publish as dp\n"
        "with dp._arrow_pool():\n"
        "    print(pa.default_memory_pool().backend_name, pa.array(['x' * 64] * 1000).nbytes > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["system", "True"]


def test_demo_data_is_deterministic_and_committed(tmp_path):
    made = write_csv(tmp_path / "demo.csv")
    assert made.read_bytes() == (REPO / "data" / "demo" / "support_tickets.csv").read_bytes()


def test_the_demo_data_command_refuses_no_rows(tmp_path, capsys):
    """`--rows 0` wrote a header alone, which dataset-publish refuses later ("no data rows"), far from the cause."""
    from pipeline import demo_data

    with pytest.raises(SystemExit) as stop:
        demo_data.main(["--rows", "0", "--out", str(tmp_path / "d.csv")])
    assert stop.value.code == 2 and "--rows must be at least 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "d.csv").exists()
    demo_data.main(["--rows", "12", "--out", str(tmp_path / "d.csv")])
    assert len((tmp_path / "d.csv").read_text(encoding="utf-8").splitlines()) == 13  # a header and 12 tickets


def _hub_like_dataset():
    import datasets

    rows = demo_rows(60)
    names = sorted({r["label"] for r in rows}, reverse=True)  # not sorted: the ClassLabel's order is kept
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    half = len(rows) // 2
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": [r["text"] for r in part], "label": [names.index(r["label"]) for r in part]},
                                          features=features)
        for split, part in (("train", rows[:half]), ("test", rows[half:]))
    }), names


def demo_rows(n: int) -> list[dict]:
    from pipeline import demo_data

    seen: dict[str, str] = {}
    return [r for r in demo_data.generate(rows=n, seed=3) if seen.setdefault(r["text"], r["label"]) == r["label"]]


def test_hub_dataset_source_is_read_with_its_class_names(cfg_for, tmp_path, monkeypatch):
    import datasets

    dd, names = _hub_like_dataset()
    calls = []

    def fake_load_dataset(path, *args, **kwargs):  # stands in for the hub download only
        calls.append(path)
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = cfg_for(tmp_path / "unused.csv", "dataset.source=someorg/tickets", "dataset.id_column=null")
    result = dataset_publish.run(cfg)
    assert calls == ["someorg/tickets"] and result.status == "ok"
    version = registry_of(cfg).resolve("tickets:v0")
    assert version.metadata["label_names"] == names  # ClassLabel ids became their names
    assert [s["path"] for s in version.metadata["sources"]] == ["hf://datasets/someorg/tickets/test",
                                                                "hf://datasets/someorg/tickets/train"]
    assert sum(version.metadata["num_rows"].values()) == dd["train"].num_rows + dd["test"].num_rows
    assert dataset_publish.run(cfg).status == "unchanged"  # the same hub data publishes once


def test_a_folder_saved_by_save_to_disk_is_read_by_datasets_with_its_class_names(cfg_for, tmp_path):
    """`ds.save_to_disk(folder)` is how many Hugging Face users keep a dataset; its dataset_info.json and state.json
    were read as data ("expected a JSON array of objects")."""
    import datasets

    from pipeline.data import list_input_files

    dd, names = _hub_like_dataset()
    saved = tmp_path / "saved"
    dd.save_to_disk(str(saved))
    cfg = cfg_for(saved, "dataset.id_column=null")
    assert dataset_publish.run(cfg).status == "ok"
    version = registry_of(cfg).resolve("tickets:v0")
    assert version.metadata["label_names"] == names  # the ClassLabel's order, its ids as their names
    assert "label_type" not in version.metadata  # names, not numbers
    assert sum(version.metadata["num_rows"].values()) == dd["train"].num_rows + dd["test"].num_rows
    files = sorted(str(f.relative_to(saved)) for f in saved.rglob("*") if f.is_file())
    assert sorted(str(Path(s["path"]).relative_to(saved)) for s in version.metadata["sources"]) == files
    # its rows, splits in name order, with their labels named: the same split files as that data in a CSV file
    rows = dd["test"].to_list() + dd["train"].to_list()
    as_csv = write_rows(tmp_path / "same.csv", [{"text": r["text"], "label": names[r["label"]]} for r in rows])
    other = cfg_for(as_csv, "dataset.id_column=null", "dataset.name=same", f"dataset.labels={json.dumps(names)}")
    dataset_publish.run(other)

    def split_files(v):
        return {f.path: f.digest for f in v.files if f.path.endswith(".parquet")}

    assert split_files(registry_of(cfg).resolve("same:v0")) == split_files(version) and len(split_files(version)) == 3
    assert dataset_publish.run(cfg).status == "unchanged"
    # one Dataset is one split; a bad row is named by the folder and its split
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a text", ""] * 10, "label": [0, 1] * 10},
                               features=dd["train"].features).save_to_disk(str(single))
    with pytest.raises(DataError, match=rf"empty_text .*{single} \(train split\) row 2"):
        dataset_publish.run(cfg_for(single, "dataset.id_column=null", "dataset.name=single"))
    plain = tmp_path / "plain"  # labels that are numbers without class names: numbers, as in a JSON file
    datasets.Dataset.from_dict({"text": [f"text {i}" for i in range(20)], "label": [0, 1] * 10}).save_to_disk(str(plain))
    _, manifest, _ = dataset_publish.prepare(cfg_for(plain, "dataset.id_column=null", "dataset.name=plain"))
    assert manifest["label_names"] == ["0", "1"] and manifest["label_type"] == "integer"
    # predict --input and split files read data files: such a folder is named, not read as JSON
    with pytest.raises(DataError, match=rf"^{saved}: a folder saved by datasets' save_to_disk, which only dataset.source "
                                        r"reads; export it for the --input with .to_parquet"):
        list_input_files(saved, "--input")


def test_parquet_written_by_datasets_keeps_its_class_label_names(cfg_for, tmp_path):
    """`Dataset.to_parquet` (and the hub's own Parquet conversion) stores class ids, with the ClassLabel names in
    the file's schema metadata; the labels were published as "0", "1", ... and the model's classes named so."""
    dd, names = _hub_like_dataset()
    shards = tmp_path / "shards"
    shards.mkdir()
    for split, ds in dd.items():
        ds.to_parquet(str(shards / f"{split}.parquet"))
    assert pq.read_table(shards / "train.parquet").schema.field("label").type == pa.int64()
    cfg = cfg_for(shards, "dataset.id_column=null")
    assert dataset_publish.run(cfg).status == "ok"
    version = registry_of(cfg).resolve("tickets:v0")
    assert version.metadata["label_names"] == names and "label_type" not in version.metadata  # names, in id order
    # the same rows as the names in a CSV, in that order: the same split files
    rows = dd["test"].to_list() + dd["train"].to_list()
    as_csv = write_rows(tmp_path / "same.csv", [{"text": r["text"], "label": names[r["label"]]} for r in rows])
    dataset_publish.run(cfg_for(as_csv, "dataset.id_column=null", "dataset.name=same", f"dataset.labels={json.dumps(names)}"))
    same = registry_of(cfg).resolve("same:v0")
    assert {f.path: f.digest for f in same.files if f.path.endswith(".parquet")} == \
        {f.path: f.digest for f in version.files if f.path.endswith(".parquet")}
    # as split files too; shards whose names differ, or ids beside names, are refused
    own = tmp_path / "own"
    own.mkdir()
    half = dd["test"].num_rows // 2
    dd["train"].to_parquet(str(own / "train.parquet"))
    dd["test"].select(range(half)).to_parquet(str(own / "validation.parquet"))
    dd["test"].select(range(half, dd["test"].num_rows)).to_parquet(str(own / "test.parquet"))
    splits = [f"dataset.split_files.{s}={own / s}.parquet" for s in ("train", "validation", "test")]
    assert dataset_publish.prepare(cfg_for(shards, "dataset.id_column=null", "dataset.on_invalid=drop",
                                           *splits))[1]["label_names"] == names
    other = dd["test"].cast_column("label", __import__("datasets").ClassLabel(names=sorted(names)))
    other.select(range(half, dd["test"].num_rows)).to_parquet(str(own / "test.parquet"))
    with pytest.raises(DataError, match=r"^split_files: the splits name their classes differently \(train: .*; test: "):
        dataset_publish.prepare(cfg_for(shards, "dataset.id_column=null", "dataset.on_invalid=drop", *splits))
    other.to_parquet(str(shards / "test.parquet"))
    with pytest.raises(DataError, match=rf"{shards}: the files name their classes differently: {shards / 'test.parquet'} "
                                        r"has \[.*\] and .*train.parquet has"):
        dataset_publish.prepare(cfg)
    pq.write_table(pq.read_table(shards / "test.parquet").replace_schema_metadata(None), shards / "test.parquet")
    with pytest.raises(DataError, match=r"column 'label' holds numbers in .*test.parquet .* but names in .*train.parquet"):
        dataset_publish.prepare(cfg)


def test_a_hub_class_id_beyond_its_class_label_names_is_refused(cfg_for, tmp_path, monkeypatch):
    import datasets

    dd, names = _hub_like_dataset()
    table = dd["train"].data.table
    ids = table.column("label").to_pylist()
    ids[3] = len(names)  # datasets refuses it when encoding; a dataset built from an Arrow table is not checked
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(ids, pa.int64()))
    broken = datasets.Dataset(table, info=datasets.DatasetInfo(features=dd["train"].features))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: datasets.DatasetDict({"train": broken}))
    cfg = cfg_for(tmp_path / "unused.csv", "dataset.source=someorg/tickets", "dataset.id_column=null")
    with pytest.raises(DataError, match=rf"^hf://datasets/someorg/tickets/train: row 4 has class id {len(names)} in "
                                        rf"column 'label', but its ClassLabel names only {len(names)} classes"):
        dataset_publish.run(cfg)
    assert not registry_of(cfg).list_versions()


def test_integer_labels_take_numeric_order(tmp_path, cfg_for):
    """Labels 0..N-1 keep their ids, and 2 comes before 10; "01" is not an integer as written."""
    records = [{"id": f"{lbl}-{i}", "text": f"question {i} of kind {lbl}", "label": lbl}
               for lbl in (10, 2, 0, 1, 11, 9, 3, 4, 5, 6, 8, 7) for i in range(5)]
    src = write_rows(tmp_path / "ints.csv", records)
    tables, manifest, _ = dataset_publish.prepare(cfg_for(src))
    assert manifest["label_names"] == [str(i) for i in range(12)]
    for t in tables.values():  # class id i is label i
        assert [int(label) for label in t.column("label").to_pylist()] == t.column("label_id").to_pylist()
    negative = [{"id": f"n{i}", "text": f"negative {i}", "label": -3} for i in range(5)]
    src = write_rows(tmp_path / "ints.jsonl", records[:15] + negative)  # numbers in JSON
    assert dataset_publish.prepare(cfg_for(src))[1]["label_names"] == ["-3", "0", "2", "10"]
    mixed = write_rows(tmp_path / "mixed.csv", records[:15] + [{"id": f"x{i}", "text": f"zero {i}", "label": "01"}
                                                               for i in range(5)])
    assert dataset_publish.prepare(cfg_for(mixed))[1]["label_names"] == ["0", "01", "10", "2"]


def test_the_label_type_of_the_source_is_recorded_when_it_is_not_text(tmp_path, cfg_for):
    """Labels are published as text; numbers or booleans in every file of the source are recorded as
    `label_type` (predict gives them back so). Text labels, "0" in JSON or any CSV, leave the manifest as it was."""
    ints = [{"id": f"{lbl}-{i}", "text": f"question {i} of kind {lbl}", "label": lbl} for lbl in (0, 1, 2) for i in range(5)]

    def recorded(source: Path, *extra: str):
        tables, manifest, _ = dataset_publish.prepare(cfg_for(source, *extra))
        assert tables["train"].schema.field("label").type == pa.string()
        return manifest.get("label_type")

    assert recorded(write_rows(tmp_path / "a.jsonl", ints)) == "integer"
    assert recorded(write_rows(tmp_path / "a.csv", ints)) is None
    assert recorded(write_rows(tmp_path / "s.jsonl", [{**r, "label": str(r["label"])} for r in ints])) is None
    assert recorded(write_rows(tmp_path / "f.json", [{**r, "label": r["label"] + 0.5} for r in ints])) == "number"
    flags = [{**r, "label": r["label"] == 1} for r in ints if r["label"] < 2]
    assert recorded(write_rows(tmp_path / "b.parquet", flags)) == "boolean"
    small = pa.Table.from_pylist(ints).set_column(2, "label", pa.array([r["label"] for r in ints], pa.int8()).dictionary_encode())
    pq.write_table(small, tmp_path / "d.parquet")  # a pandas categorical of small ints
    assert recorded(tmp_path / "d.parquet") == "integer"
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_rows(folder / "a.jsonl", ints[:8])
    write_rows(folder / "b.jsonl", [{**r, "label": r["label"] + 0.0} for r in ints[8:]])
    assert recorded(folder) == "number"  # whole numbers beside floats: floats
    write_rows(folder / "c.jsonl", [{"id": "c1", "text": "one more of kind 0", "label": "0"}])
    assert recorded(folder) is None  # one file of text: text
    parts = {s: write_rows(tmp_path / f"{s}.jsonl", [{**r, "id": f"{s}-{r['id']}", "text": f"{s}: {r['text']}"} for r in ints])
             for s in ("train", "validation", "test")}
    assert recorded(tmp_path / "a.jsonl", *(f"dataset.split_files.{s}={p}" for s, p in parts.items())) == "integer"


def test_dataset_labels_set_the_order_and_refuse_other_labels(tmp_path, cfg_for):
    src = write_rows(tmp_path / "d.csv", rows(6) + [{"id": "typo", "text": "a typo in the label", "label": "biling"},
                                                    {"id": "typo2", "text": "another one", "label": "Tech "}])
    listed = "dataset.labels=[tech, billing, shipping]"
    with pytest.raises(DataError) as e:
        dataset_publish.run(cfg_for(src, listed))
    assert ("unknown_label (2 rows, label(s) 'Tech' (maybe 'tech'), 'biling' (maybe 'billing') are not in "
            "dataset.labels)") in str(e.value)
    assert f"{src} row 19" in str(e.value) and not registry_of(cfg_for(src)).list_versions()

    result = dataset_publish.run(cfg_for(src, listed, "dataset.on_invalid=drop"))
    version = registry_of(cfg_for(src)).resolve(result.produced[0])
    assert version.metadata["label_names"] == ["tech", "billing", "shipping"]
    assert version.metadata["dropped"] == {"unknown_label": 2}
    files = artifact_files(cfg_for(src), result.produced[0], tmp_path)
    table = pq.read_table(files["train.parquet"])
    assert {(r["label"], r["label_id"]) for r in table.to_pylist()} == {("tech", 0), ("billing", 1), ("shipping", 2)}

    # a listed label no row has is an error (a class the model never sees), whatever the policy
    with pytest.raises(DataError, match=r"no valid row has the label\(s\) 'refund' listed in dataset.labels"):
        dataset_publish.run(cfg_for(src, "dataset.labels=[tech, billing, shipping, refund]", "dataset.on_invalid=drop"))
    # ... and says where its rows went when they were dropped
    few = write_rows(tmp_path / "few.csv", rows(6) + [{"id": f"r{i}", "text": f"refund {i}", "label": "refund"}
                                                      for i in range(2)])
    with pytest.raises(DataError, match=r"no valid row has the label\(s\) 'refund' listed in dataset.labels \(their "
                                        r"rows were dropped: 2 class_too_small\)"):
        dataset_publish.run(cfg_for(few, "dataset.labels=[tech, billing, shipping, refund]", "dataset.on_invalid=drop"))
    with pytest.raises(ConfigError, match=r"dataset.labels: label name\(s\) 'tech' appear more than once"):
        cfg_for(src, "dataset.labels=[tech, billing, ' tech']")
    with pytest.raises(ConfigError, match="quote label names"):
        cfg_for(src, "dataset.labels=[yes, no]")
    assert cfg_for(src, "dataset.labels=[2, 10, 1.5]").dataset.labels == ["2", "10", "1.5"]


def test_a_hub_dataset_that_cannot_be_loaded_says_so(tmp_path):
    track = tmp_path / "track"
    out = run_cli("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"),
                  "--set", "dataset.source=nobody/no-such-dataset", "--set", f"tracking.dir={track}",
                  env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert ("dataset.source 'nobody/no-such-dataset' is not a file or folder, and the Hugging Face hub cannot be "
            "reached (offline) to load a hub dataset of that name, nor does the datasets cache hold one") in out.stderr
    assert not (track / "registry").exists() or not LocalRegistry(track / "registry").list_versions()


def _hub_cache_with(cache: Path, repo_id: str, dd) -> None:
    """What ``datasets.load_dataset(repo_id)`` leaves in its cache, made without the hub: datasets' own builder
    prepares the data, and its folder takes the hub dataset's name (`org___name/default/0.0.0/<hash>`, one
    `<name>-<split>.arrow` per split), as the cache module that reads it offline expects."""
    import datasets

    files = {}
    for split, ds in dd.items():
        files[split] = str(cache.parent / f"{split}.parquet")
        ds.to_parquet(files[split])
    builder = datasets.load_dataset_builder("parquet", data_files=files, features=dd["train"].features,
                                            cache_dir=str(cache / "build"))
    builder.download_and_prepare()
    org, name = repo_id.split("/")
    target = cache / f"{org}___{name}" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        (target / f.name.replace("parquet-", f"{name}-")).write_bytes(f.read_bytes())


def test_a_cached_hub_dataset_publishes_at_once_when_the_hub_cannot_be_reached(tmp_path):
    """Left to itself, the hub client retries a refused connection five times with backoff (about 25 s) before
    datasets reads its cache; the stage asks the hub once and then reads the cache alone."""
    dd, names = _hub_like_dataset()
    cache = tmp_path / "hf" / "datasets"
    _hub_cache_with(cache, "someorg/tickets", dd)
    track = tmp_path / "track"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{unused_port()}", "HF_DATASETS_CACHE": str(cache),
           "WANDB_MODE": "offline"}
    args = ("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"tracking.dir={track}",
            "--set", "dataset.id_column=null", "--set", "dataset.name=hubtickets")
    out = run_cli(*args, "--set", "dataset.source=someorg/tickets", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cannot be reached (ConnectError): reading the datasets cache only" in out.stderr
    assert "Retrying" not in out.stderr  # the hub client's backoff never started
    version = LocalRegistry(track / "registry").resolve("hubtickets:v0")
    assert version.metadata["label_names"] == names  # the cached ClassLabel order
    assert sum(version.metadata["num_rows"].values()) == sum(ds.num_rows for ds in dd.values())

    # not in the cache either: said at once, and a local folder in the name may be a misspelt path
    (tmp_path / "exports").mkdir()
    out = run_cli(*args, "--set", "dataset.source=exports/tickets", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "Retrying" not in out.stderr, out.stderr[-3000:]
    assert ("dataset.source 'exports/tickets' is not a file or folder, and the Hugging Face hub cannot be reached "
            "(offline) to load a hub dataset of that name, nor does the datasets cache hold one (is the path "
            "misspelt? exports/ is a local folder)") in out.stderr
    assert [v.ref for v in LocalRegistry(track / "registry").list_versions()] == ["hubtickets:v0"]


def test_a_hub_that_answers_but_has_no_such_dataset_says_so(tmp_path):
    import http.server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    with local_http(NotFound) as hub:
        out = run_cli("dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"),
                      "--set", "dataset.source=nobody/no-such-dataset", "--set", f"tracking.dir={tmp_path / 'track'}",
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_DATASETS_CACHE": str(tmp_path / "hf"),
                           "WANDB_MODE": "offline"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert ("dataset.source 'nobody/no-such-dataset' is not a file or folder, and no Hugging Face hub dataset of that "
            "name could be loaded (") in out.stderr
    assert "hub ids need the network or the datasets cache" in out.stderr and "cannot be reached" not in out.stderr


def test_duplicate_and_conflict_helpers_agree_with_sorting():
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.data import _codes, _distinct_per_group, _first_occurrence

    rng = np.random.default_rng(0)
    values = pa.array([f"v{x}" for x in rng.integers(0, 500, 5000)])
    codes = _codes(values)
    _, first = np.unique(codes, return_index=True)
    expected = np.zeros(len(codes), dtype=bool)
    expected[first] = True
    assert np.array_equal(_first_occurrence(codes), expected)
    assert pc.count_distinct(values).as_py() == int(_first_occurrence(codes).sum())

    groups, labels = rng.integers(0, 300, 5000), rng.integers(0, 4, 5000)
    pairs = np.unique(groups * 4 + labels)
    reference = np.bincount(pairs // 4, minlength=300)
    assert np.array_equal(_distinct_per_group(groups, labels, 300, 4), reference)
    # the fallback for tables too large to count densely gives the same answer
    big = 16_000_300  # above the 64M-cell dense limit with 4 labels
    sparse_groups = groups * (big // 300)
    assert np.array_equal(_distinct_per_group(sparse_groups, labels, big, 4)[sparse_groups], reference[groups])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two codings put the same rows together (the numbers themselves may differ)."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_text_codes_from_the_split_ranks_group_exactly_the_equal_texts():
    """validate numbers the texts by their split-rank hashes; rows sharing a hash are checked to be equal,
    and where two different texts share one (forced here) the texts are numbered by Arrow instead."""
    import pyarrow.compute as pc

    from pipeline.data import _codes, _codes_by_hash

    rng = np.random.default_rng(1)
    values = pa.array([None if x == 0 else f"t{x}" for x in rng.integers(0, 300, 3000)])
    hashes = split_order(values, 42)
    codes = _codes_by_hash(hashes, values)
    assert codes.min() == 0 and codes.max() + 1 == len(set(codes.tolist()))  # dense
    assert np.array_equal(codes, np.unique(hashes, return_inverse=True)[1])  # the hashes' ranks, however rows are sorted
    # a null counts as "" (as it ranks): it is grouped with itself like any text
    assert _same_partition(codes, _codes(pc.fill_null(values, "")))
    unique = pa.array([f"u{i}" for i in range(50)])
    assert np.array_equal(np.sort(_codes_by_hash(split_order(unique, 0), unique)), np.arange(50))
    collided = np.zeros(len(values), dtype=np.uint64)  # every text the same hash: the check finds it
    assert _same_partition(_codes_by_hash(collided, values), _codes(values))


def test_texts_are_ranked_by_hash_and_a_tie_by_first_appearance():
    """stratified_split ranks a label's texts by their hashes; two texts with one hash (about 2**-64 a pair, forced
    here) rank by where each first appears, whatever order a fast unstable sort would leave them in."""
    from pipeline.data import _ranked

    keys = split_order(pa.array([f"text {i}" for i in range(5000)]), 3)
    first = np.random.default_rng(2).permutation(5000)
    assert np.array_equal(_ranked(keys, first), np.lexsort((first, keys)))
    tied = np.array([5, 3, 5, 3, 5, 3, 5, 3] * 40, dtype=np.uint64)
    first = np.random.default_rng(4).permutation(len(tied))
    assert np.array_equal(_ranked(tied, first), np.lexsort((first, tied)))
    assert _ranked(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)).tolist() == []


@pytest.mark.parametrize("own_splits", [False, True])
@pytest.mark.parametrize("policy", ["error", "drop"])
def test_a_text_column_with_no_text_at_all_is_reported(tmp_path, cfg_for, own_splits, policy):
    """Every text empty (a column of empty cells) once failed with an IndexError inside validation."""
    empty = [{"id": f"e{i}", "text": "", "label": LABELS[i % 3]} for i in range(6)]
    src = write_rows(tmp_path / "empty.csv", empty)
    extra = [f"dataset.on_invalid={policy}"]
    if own_splits:
        extra += [f"dataset.split_files.{s}={write_rows(tmp_path / f'{s}.csv', empty)}" for s in ("train", "validation", "test")]
    cfg = cfg_for(src, *extra)
    match = r"no valid rows left \(\d+ dropped\)" if policy == "drop" else r"empty_text \(\d+ rows, column 'text' is empty"
    with pytest.raises(DataError, match=match):
        dataset_publish.run(cfg)
    assert registry_of(cfg).list_versions() == []


def test_a_project_may_not_publish_train_or_judge_under_another_projects_names(tmp_path, cfg_for):
    """Two configs with different `project:` under one tracking.dir: the second project's stages are refused the
    first's names before any work (its data not read, no model trained), and work under names of their own."""
    from pipeline.errors import ProjectMismatch
    from pipeline.stages import evaluate, finetune

    src = write_rows(tmp_path / "data.csv", rows())
    first = dataset_publish.run(cfg_for(src, "project=intents"))
    broken = tmp_path / "broken.csv"
    broken.write_text('id,text,label\n1,"unclosed,billing\n')  # read, this would be a DataError
    with pytest.raises(ProjectMismatch) as e:
        dataset_publish.run(cfg_for(broken, "project=sentiment"))
    assert str(e.value).startswith(f"'tickets' belongs to project 'intents' in the local registry "
                                   f"{registry_of(cfg_for(src)).root} (its run {first.run_id} made tickets:v0), "
                                   "not to project 'sentiment'")
    reg = registry_of(cfg_for(src))
    assert [v.ref for v in reg.list_versions()] == ["tickets:v0"]
    assert catalog_runs(reg) == [("intents", "dataset-publish")]  # no run was opened for the refused one

    own = dataset_publish.run(cfg_for(src, "project=sentiment", "dataset.name=sentiment-data"))
    assert own.produced == ["sentiment-data:v0"]
    reg.publish("clf", "model", write_rows(tmp_path / "m" / "w.csv", rows(1)).parent)  # model.name, made by no run: open
    with pytest.raises(ProjectMismatch, match="'sentiment-data' belongs to project 'sentiment'"):
        finetune.plan(cfg_for(src, "project=intents", "dataset.name=sentiment-data"))
    clf = tmp_path / "clf"
    clf.mkdir()
    (clf / "w.bin").write_text("intents weights")
    from pipeline.tracking import TrackedRun

    intents_run = TrackedRun(id="intentsft", project="intents", job_type="finetune", group=None, mode="offline",
                             config={}, registry=reg)
    reg.start_run(intents_run)
    reg.publish("intent-clf", "model", clf, run=intents_run, aliases=["candidate"])
    sentiment = cfg_for(src, "project=sentiment", "dataset.name=sentiment-data", "model.name=intent-clf")
    with pytest.raises(ProjectMismatch, match="'intent-clf' belongs to project 'intents'"):
        finetune.plan(sentiment)  # the model name it would publish, before the base model is even loaded
    with pytest.raises(ProjectMismatch, match="'intent-clf' belongs to project 'intents'"):
        evaluate.run(sentiment)  # would have judged (and promoted) the other project's candidate
    assert reg.resolve("intent-clf:candidate").aliases == ["candidate", "latest"]
    from pipeline.runner import run_all

    with pytest.raises(ProjectMismatch, match="'intent-clf' belongs to project 'intents'"):  # `run`: before its first stage
        run_all(cfg_for(src, "project=sentiment", "dataset.name=fresh-data", "model.name=intent-clf"))
    assert "fresh-data" not in {v.name for v in reg.list_versions()}  # not published, then left beside no model


@pytest.mark.parametrize("split, message", [
    (("0", "0", "1"), "which would have no train and no validation rows (dataset.split: train 0, validation 0, test 1): "
                      "finetune trains on it; finetune chooses the checkpoint on it; to publish a held-out set, run "
                      "`dataset-publish`, then score a model on it with `evaluate --dataset NAME:vN`"),
    (("0.8", "0", "0.2"), "which would have no validation rows (dataset.split: train 0.8, validation 0, test 0.2): "
                          "finetune chooses the checkpoint on it"),
    (("0.9", "0.1", "0"), "which would have no test rows (dataset.split: train 0.9, validation 0.1, test 0): evaluate "
                          "scores it (evaluate.split: test)"),
])
def test_run_refuses_a_split_the_later_stages_cannot_use_before_it_publishes(tmp_path, cfg_for, split, message):
    """`run` hands the version it publishes to finetune (train and validation rows) and evaluate (`evaluate.split`):
    refused before the data is read, not after a version that the run cannot use was published."""
    from pipeline.runner import PipelineResult, run_all

    src = write_rows(tmp_path / "d.csv", rows(40))
    cfg = cfg_for(src, *(f"dataset.split.{s}={f}" for s, f in zip(("train", "validation", "test"), split)))
    outcome = PipelineResult(group="g")
    with pytest.raises(ConfigError, match=re.escape(f"`run` trains and evaluates on the dataset it publishes, {message}")):
        run_all(cfg, result=outcome)
    assert [(s.stage, s.status) for s in outcome.stages] == [("dataset-publish", "failed")]
    reg = LocalRegistry(Path(cfg.tracking.dir) / "registry")
    assert reg.list_versions() == [] and catalog_runs(reg) == []  # nothing published, no run opened


def catalog_runs(reg: LocalRegistry) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(reg.db_path) as conn:
        return conn.execute("SELECT project, job_type FROM runs ORDER BY started_at").fetchall()


def test_binary_ids_or_labels_that_are_not_utf8_name_their_row(tmp_path, cfg_for):
    """Parquet written with bytes (not strings) for an id or label: the first row that is not UTF-8 is named, as for
    text columns; Arrow's own message named neither the row nor the bytes."""
    ok = [f"T{i}".encode() for i in range(30)]
    for column in ("id", "label"):
        table = {"id": pa.array(ok, pa.binary()), "text": [f"text number {i}" for i in range(30)],
                 "label": pa.array([b"a", b"b", b"c"] * 10, pa.binary())}
        bad = list(table[column].to_pylist())
        bad[6] = b"caf\xe9"
        table[column] = pa.array(bad, pa.binary())
        src = tmp_path / f"{column}.parquet"
        pq.write_table(pa.table(table), src)
        with pytest.raises(DataError, match=rf"^{re.escape(str(src))} row 7: column '{column}' is not valid UTF-8 text "
                                            r"\(byte 4 of b'caf\\xe9': unexpected end of data\)$"):
            dataset_publish.run(cfg_for(src))
        assert not (tmp_path / "track").exists() or registry_of(cfg_for(src)).list_versions() == []
    table["label"] = pa.array([b"a", b"b", b"c"] * 10, pa.binary())
    table["id"] = pa.array(ok, pa.binary())
    pq.write_table(pa.table(table), tmp_path / "fine.parquet")  # bytes that are UTF-8 are read as text
    assert dataset_publish.run(cfg_for(tmp_path / "fine.parquet")).produced


def test_a_null_line_in_json_lines_is_refused_not_a_crash(tmp_path, cfg_for):
    """pyarrow 26's JSON reader ends the process (a segmentation fault) where a block starts with a `null` line, and
    reads one elsewhere as a row of nulls; the line is named before Arrow reads the file. Run in a child process:
    a crash would take the test runner with it."""
    good = '{"id": "a%d", "text": "text %d", "label": "%s"}\n'
    rows = "".join(good % (i, i, "xyz"[i % 3]) for i in range(30))
    for content, line, found in (("null\n" + rows, 1, "a null"), (rows + "\n  null \r\n" + rows, 32, "a null"),
                                 ("\ufeffnull\n" + rows, 1, "a null"),
                                 ("nulltrue text\n" + rows, 1, "'nulltrue text', which is not JSON")):
        src = tmp_path / "d.jsonl"
        src.write_text(content, encoding="utf-8", newline="")
        cfg = write_yaml(tmp_path, cfg_for(src))
        out = run_cli("dataset-publish", "--config", str(cfg), "--dry-run")
        assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
        assert f"error: {src} line {line}: expected a JSON object, found {found}" in out.stderr
    # the lines are found across the chunks the file is read in, and only a line that is null
    from pipeline.data import _null_line

    cases = {'{"a": null}\n{"b": "null"}\n nul\n': None, '{"a":1}\r\n\r\nnull\r\n': 3, "\n\n\n null\n": 4,
             '{"a": 1}\n nully\n': 2, "null 1\n": 1,  # a line that starts with null crashes the reader too
             "null" + "x" * 200: 1, '{"a": 1}\n' + "x" * 200 + "\nnull": 3,  # a long line, read in several chunks
             "x" * 200 + "null\nnull": 2, '{"a":1}': None, "": None, " " * 30 + "null\n": 1, " \nn\nnull": 3,
             json.dumps([{"a": None}] * 3, indent=2): None}  # pretty-printed JSON: lines not starting with {
    for content, line in cases.items():
        (tmp_path / "n.jsonl").write_text(content, encoding="utf-8", newline="")
        assert {_null_line(tmp_path / "n.jsonl", chunk=size) for size in (1, 2, 3, 7, 70, 1 << 20)} == {line}, content


def test_json_numbers_too_large_for_an_exact_id_are_refused(tmp_path, cfg_for):
    """JSON has one kind of number: Arrow reads ids beyond 64 bits as floating point, where two ids that differ in
    their last digits are one (a duplicate, dropped with `drop`); Python's json keeps them, but Arrow cannot take
    them from a JSON array. Either is named, with the id as the file writes it."""
    rows = [{"id": 12345678901234567890123 + i, "text": f"text {i}", "label": "xyz"[i % 3]} for i in range(30)]
    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^{re.escape(str(lines))} line 1: id 12345678901234567890123 is too large to "
                                        r"be read exactly: .* write the id values as strings \(\"12345678901234567890123\"\)"):
        dataset_publish.run(cfg_for(lines))
    array = tmp_path / "big.json"
    array.write_text(json.dumps(rows[3:]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(array))} record 1: field 'id' holds 12345678901234567890126, a "
                                        r"whole number beyond 64 bits; write it as a string"):
        dataset_publish.run(cfg_for(array))
    # 2**63 is beyond Arrow's signed 64 bits too, and so is a number inside a list of a column not read
    array.write_text(json.dumps([{"id": "a", "text": "a", "label": "x", "other": [1, 2**63]}]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(array))} record 1: field 'other' holds {2**63}, a whole "
                                        r"number beyond 64 bits"):
        dataset_publish.run(cfg_for(array))
    # beyond 2**53 beside a number with a fraction (a JSON array): Arrow's own words named no record
    array.write_text(json.dumps([{"id": 1.5, "text": "a", "label": "x"}, {"id": 2**53 + 1, "text": "b", "label": "y"}]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(array))} record 2: field 'id' holds {2**53 + 1}, a whole "
                                        r"number too large to be read exactly beside the numbers with a fraction"):
        dataset_publish.run(cfg_for(array))
    # written as strings, they are ids like any other
    lines.write_text("".join(json.dumps({**r, "id": str(r["id"])}) + "\n" for r in rows))
    assert dataset_publish.run(cfg_for(lines)).produced
