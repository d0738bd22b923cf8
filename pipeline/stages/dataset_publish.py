"""dataset-publish: raw labeled text -> a validated, split, versioned dataset artifact.

Everything is read, validated and split before anything is written: a data problem stops
the stage with a report naming file, row and problem, and no run, artifact or registry entry
is created. The artifact holds one Parquet file per split and ``dataset.json`` (schema, label
names in a fixed order, counts, source digests, split config). Its content is a pure
function of the input bytes and the dataset config, so publishing unchanged data again
gives status ``unchanged`` and the existing ``NAME:vN``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import arrow
from pipeline.config import Config
from pipeline.data import (DROPPED_ROWS_LOGGED, KIND_TYPES, SHOW, Columns, CsvFormat, DataError, RowLines, constant,
                           format_problems, label_type, list_input_files, load_hub_dataset, load_saved_dataset,
                           looks_like_hub_id, name_below_source, read_class_names, read_files, read_label_type,
                           saved_dataset, saved_dataset_files, stratified_split, typed_labels, validate, with_label_type)
from pipeline.errors import ConfigError, RefError
from pipeline.printable import table_text
from pipeline.refstore import Reference, is_uri, materialize, put
from pipeline.registry.base import latest_again, put_latest
from pipeline.registry.local import hash_file
from pipeline.results import StageResult
from pipeline.tracking import tracked_run, warm_up

STAGE = "dataset-publish"
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 1
# Besides the code, what computes a version's files from the data: other versions of these read the data again.
DATA_PACKAGES = ("wandb-finetune-pipeline", "pyarrow", "numpy")
# How each label's texts are ranked before the cuts (`split_order`), recorded in dataset.json
SPLIT_ORDER = "xxh3-64 of the text as copies are compared (case and spacing folded), seeded with the split seed"
log = logging.getLogger(__name__)


def _columns(config: Config) -> Columns:
    d = config.dataset
    return Columns(text=d.text_column, label=d.label_column, id=d.id_column, text_pair=d.text_pair_column)


class Prepared(NamedTuple):
    """The data read, validated and split."""

    tables: dict[str, pa.Table]  # per split
    manifest: dict[str, Any]  # dataset.json's content; its `sources` name each file below the source (`_recorded`)
    dropped: pa.Table | None  # the rows `on_invalid: drop` left out, with why
    located: list[dict[str, Any]]  # each source file where it was read (path or URI), sha256 and size


def prepare(config: Config, timings: dict[str, float] | None = None) -> tuple[dict[str, pa.Table], dict[str, Any], pa.Table | None]:
    """Read, validate and split: (tables per split, dataset.json content, dropped rows). `timings`, when given,
    gets the seconds each step took (``read``, ``validate``, ``split``)."""
    return _read(config, timings)[:3]


def _read(config: Config, timings: dict[str, float] | None = None) -> Prepared:
    """`prepare`, and where each source file was read (`Prepared.located`)."""
    d = config.dataset
    # What is read: the user's split files (then `source` is only a label), else the source.
    wanted = _named_sources(config)
    where = {s: f"dataset.split_files.{s}" for s in SPLITS} if d.split_files else {"all": "dataset.source"}
    with tempfile.TemporaryDirectory(prefix="dataset-source-") as tmp:
        local, renames = {}, []
        for part, source in wanted.items():
            if is_uri(source):  # file:// as it is; s3:// and gs:// downloaded
                local[part] = str(materialize(source, Path(tmp) / part, where[part]))
                renames.append((local[part], source.rstrip("/")))
            else:
                local[part] = source
        try:
            return _prepare(config, local, renames, {} if timings is None else timings)
        except (DataError, ConfigError) as e:  # a problem in a downloaded file: named by its URI, not the copy
            told = str(e)
            for copy, uri in renames:
                told = told.replace(copy, uri)
            if told == str(e):
                raise
            raise type(e)(told) from None


def _prepare(config: Config, sources: dict[str, str], renames: list[tuple[str, str]], timings: dict[str, float]):
    d = config.dataset
    cols = _columns(config)
    listed = _list_sources(config, sources)
    files = [f for fs in listed.values() for f in fs]
    # The source digests are read on a second core while Arrow parses the same (cached) bytes.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-digest") as pool:
        digests = [pool.submit(hash_file, f) for f in files]
        try:
            tables, manifest, dropped = _prepare_tables(config, sources.get("all", d.source), cols, listed,
                                                        lambda f: _source_name(f, renames), timings)
        except BaseException:
            for job in digests:
                job.cancel()
            raise
        if not files:  # a hub source: _prepare_tables recorded its splits' fingerprints
            return Prepared(tables, manifest, dropped, manifest["sources"])
        located = _source_records(files, [job.result() for job in digests], lambda f: _located_name(f, renames))
    manifest["sources"] = _recorded(listed, sources, located, parts=bool(d.split_files))
    return Prepared(tables, manifest, dropped, located)


def _named_sources(config: Config) -> dict[str, str]:
    """What is read, per part: the user's split files (then `source` only names the dataset), else the source."""
    d = config.dataset
    return {s: getattr(d.split_files, s) for s in SPLITS} if d.split_files else {"all": d.source}


def _source_records(files: list[Path], digests: Iterable[tuple[str, int]], name: Callable[[Path], str] = str) -> list[dict]:
    """``dataset.json``'s ``sources``: each file as reports name it, its sha256 and size."""
    return [{"path": name(f), "sha256": sha, "size": size} for f, (sha, size) in zip(files, digests)]


def _recorded(listed: dict[str, list[Path]], sources: dict[str, str], located: list[dict], parts: bool) -> list[dict]:
    """dataset.json's ``sources``: the files of `located` (in `listed`'s order) by their names below the source
    (`name_below_source`), not where they lay, so the same files read from another folder give the same bytes; with
    ``dataset.split_files``, each names the split it is read for."""
    named = [(part, name_below_source(f, sources[part])) for part, fs in listed.items() for f in fs]
    return [{**r, "path": name, **({"split": part} if parts else {})} for (part, name), r in zip(named, located)]


def _list_sources(config: Config, sources: dict[str, str]) -> dict[str, list[Path]]:
    """The data files to read, per part (``all``, or each split of ``dataset.split_files``); none for a hub id."""
    if config.dataset.split_files:
        return {s: list_input_files(sources[s]) for s in SPLITS}
    if looks_like_hub_id(sources["all"]):  # a Hugging Face hub dataset id: all its splits, re-split like a file
        return {}
    if saved_dataset(Path(sources["all"])):  # datasets' save_to_disk: read by datasets, its files digested
        return {"all": saved_dataset_files(Path(sources["all"]))}
    return {"all": list_input_files(sources["all"])}


def _prepare_tables(config: Config, source: str, cols: Columns, listed: dict[str, list[Path]],
                    shown: Callable[[Path], str] = str, timings: dict[str, float] | None = None):
    d = config.dataset
    timings = {} if timings is None else timings
    started = time.perf_counter()
    where = "split_files" if d.split_files else d.source  # what a report names as the data's origin
    fmt = CsvFormat(d.encoding, d.delimiter, tuple(d.column_names) if d.column_names else None, escape_char=d.escape_char,
                    quoting=d.quoting)
    hub_sources: list[dict] = []
    class_names = None  # a hub dataset's ClassLabel names
    if d.split_files:
        parts = {s: read_files(listed[s], cols, getattr(d.split_files, s), fmt, shown) for s in SPLITS}
        table = pa.concat_tables([t.append_column("_split", constant(s, t.num_rows)) for s, t in parts.items()],
                                 promote_options="permissive")
        table = with_label_type(table, label_type(KIND_TYPES[read_label_type(t)] for t in parts.values() if t.num_rows))
        named = {s: names for s, t in parts.items() if (names := read_class_names(t)) is not None}
        if len({tuple(n) for n in named.values()}) > 1:
            raise DataError(f"split_files: the splits name their classes differently ("
                            f"{'; '.join(f'{s}: {n}' for s, n in named.items())}; ClassLabel names kept by datasets)")
        class_names = next(iter(named.values()), None)
        min_per_class = 1
    else:
        if not listed:
            table, hub_sources, class_names = load_hub_dataset(source, cols)
        elif saved_dataset(Path(source)):
            table, class_names = load_saved_dataset(Path(source), cols)
        else:
            table = read_files(listed["all"], cols, source, fmt, shown)
            class_names = read_class_names(table)  # Parquet written by datasets keeps its ClassLabel names
        fractions = d.split.model_dump()
        min_per_class = sum(1 for s in SPLITS if fractions[s] > 0)
    if table.num_rows == 0:
        raise DataError(f"{where}: no data rows (only a header, or empty files)")
    source_label_type = read_label_type(table)
    timings["read"] = time.perf_counter() - started
    # Reports name a CSV row's line too where it is not row + 1 (a quoted text over several lines, blank lines)
    lines = RowLines({shown(f): f for fs in listed.values() for f in fs}, fmt, table, cols.text)
    checked = validate(table, cols, min_per_class, split_seed=None if d.split_files else d.split.seed, labels=d.labels,
                       line=lines.line)
    if checked.problems and d.on_invalid == "error":
        raise DataError(format_problems(checked.problems, where))
    if checked.problems:  # on_invalid: drop
        log.warning("%s", format_problems(checked.problems, where, dropped=True))
    clean = checked.table
    if clean.num_rows == 0:
        raise DataError(f"{where}: no valid rows left ({sum(checked.dropped.values())} dropped)")
    label_names = label_order(pc.unique(clean.column(cols.label)).to_pylist(), d.labels, class_names, where,
                              checked.dropped_rows if checked.dropped else None, cols.label)
    labels = arrow.to_numpy(pc.index_in(clean.column(cols.label), value_set=arrow.strings(label_names))).astype(np.int32)
    if len(label_names) < 2:
        raise DataError(f"{where}: a classifier needs at least 2 labels, found {label_names}")
    _warn_about_suspicious_labels(label_names, where)
    timings["validate"] = time.perf_counter() - started - timings["read"]

    repeats = int(len(checked.texts) - np.count_nonzero(np.bincount(checked.texts)))  # rows whose text an earlier row has
    if checked.mixed_label_copies:
        log.warning("%s: %d rows have a text that differs only in case or spacing from a text with another label "
                    "(%s); they are kept, and each label's copies stay in one split", where, checked.mixed_label_copies,
                    "; ".join(checked.mixed_label_examples))
    if d.split_files:
        assigned = pc.cast(clean.column("_split"), pa.string())
        index = {s: np.flatnonzero(arrow.to_numpy(pc.equal(assigned, arrow.scalar(s)))) for s in SPLITS}
        in_train = np.isin(checked.texts, checked.texts[index["train"]])
        leaked = {s: int(in_train[index[s]].sum()) for s in ("validation", "test")}
        if any(leaked.values()):
            log.warning("%s: %s rows have a text that is also in the train split (%s); they measure memory, not "
                        "generalisation (let dataset.split make the splits to keep the copies of a text together)",
                        where, " and ".join(f"{n} {s}" for s, n in leaked.items() if n),
                        "; ".join(_train_copies(clean, checked.texts, index, lines)))
    else:
        # Copies of one text go to one split together: a test row is never a copy of a train row.
        index = stratified_split(labels, d.split.model_dump(), checked.order, groups=checked.texts if repeats else None)
        if repeats:
            log.info("%s: %d rows repeat the text of an earlier row (ignoring case and spacing); each text's copies "
                     "are in one split", where, repeats)

    canonical = {"text": cols.text, "label": cols.label}
    if cols.id:
        canonical = {"id": cols.id, **canonical}
    if cols.text_pair:
        canonical = {**canonical, "text_pair": cols.text_pair}
    ordered = ["id", "text", "text_pair", "label"]
    out_cols = [c for c in ordered if c in canonical]
    base = pa.table({c: clean.column(canonical[c]) for c in out_cols})
    # In as few chunks as the text fits (one, under 2 GiB a column): Arrow takes rows from one chunk in a third of
    # the time it takes them from many (0.05 s against 0.13-0.23 s for a million CSV rows in 95 chunks, the copy
    # included). The same rows come out either way.
    base = base.append_column("label_id", arrow.from_numpy(labels.astype(np.int32))).combine_chunks()
    tables = {s: base.take(arrow.from_numpy(index[s].astype(np.int64))) for s in SPLITS}

    counts = {s: dict(zip(label_names, np.bincount(labels[index[s]], minlength=len(label_names)).tolist())) for s in SPLITS}
    if len(index["train"]) and not len(index["validation"]):  # with train 0 it is a held-out set, as meant
        log.warning("%s: no validation split (dataset.split.validation is 0), so finetune and sweep cannot train on this "
                    "version: they choose the checkpoint on the validation split; set dataset.split.validation above 0 "
                    "to train on it", where)
    timings["split"] = time.perf_counter() - started - timings["read"] - timings["validate"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": d.name,
        "columns": {c: canonical[c] for c in out_cols},  # artifact column -> column in the source
        "schema": {f.name: str(f.type) for f in tables["train"].schema},
        "label_names": label_names,
        "num_rows": {s: tables[s].num_rows for s in SPLITS},
        "label_counts": {s: {n: counts[s].get(n, 0) for n in label_names} for s in SPLITS},
        "sources": hub_sources,  # a file source's digests replace these in _prepare
        # each split's file (folder, pattern) by its last name, as `sources` name files: not where it lay
        "split": ({"files": {s: Path(p).name for s, p in d.split_files.model_dump().items()}} if d.split_files else
                  {"stratified": d.split.model_dump(), "order": SPLIT_ORDER}),
        "on_invalid": d.on_invalid,
        "dropped": dict(sorted(checked.dropped.items())),
    }
    if source_label_type and typed_labels(label_names, source_label_type) is not None:
        # labels that were numbers or booleans in the source (JSON, Parquet), which predict gives back as such;
        # recorded only then, so text labels keep the manifest they always had
        manifest["label_type"] = source_label_type
    if d.encoding != "utf-8":  # recorded only when set, so UTF-8 data keeps the manifest it always had
        manifest["encoding"] = d.encoding
    if d.delimiter is not None:  # likewise
        manifest["delimiter"] = d.delimiter
    if d.escape_char is not None:  # likewise
        manifest["escape_char"] = d.escape_char
    if not d.quoting:  # likewise
        manifest["quoting"] = False
    if d.column_names:  # likewise
        manifest["column_names"] = d.column_names
    if repeats:  # likewise
        manifest["repeated_texts"] = repeats
        if checked.mixed_label_copies:
            manifest["mixed_label_copies"] = checked.mixed_label_copies
        if d.split_files and any(leaked.values()):
            manifest["texts_also_in_train"] = leaked
    dropped = checked.dropped_rows if checked.dropped else None
    return tables, manifest, dropped


def _train_copies(clean: pa.Table, texts: np.ndarray, index: dict[str, np.ndarray], place: RowLines,
                  show: int = SHOW) -> list[str]:
    """The first few validation and test rows whose text (as copies are compared) a train row has, each with the
    first such train row: ``FILE row N (train: FILE row M)`` (`place` names a row)."""
    files, rows = clean.column("_file"), clean.column("_row")
    train = index["train"]
    codes, first = np.unique(texts[train], return_index=True)  # each train text, and its first train row
    out = []
    for split in ("validation", "test"):
        held = index[split]
        for i in held[np.flatnonzero(np.isin(texts[held], codes))[:show - len(out)]].tolist():
            j = int(train[first[np.searchsorted(codes, texts[i])]])
            out.append(f"{files[i].as_py()} {place(files[i].as_py(), rows[i].as_py())} "
                       f"(train: {files[j].as_py()} {place(files[j].as_py(), rows[j].as_py())})")
    return out


_INTEGER = re.compile(r"0|-?[1-9][0-9]*")


def label_order(found: list[str], listed: list[str] | None, class_names: list[str] | None, where: str,
                dropped: pa.Table | None = None, label_column: str = "label") -> list[str]:
    """The label names in class-id order: as `listed` (``dataset.labels``; each needs rows), else in the order
    of a hub dataset's ClassLabel, else in numeric order when every one is an integer as written (so labels
    0..N-1 keep their ids, and 2 comes before 10), else sorted. `dropped` (the rows dropped, with their
    reason) says where a listed label's rows went."""
    if listed is not None:
        have = set(found)
        missing = [n for n in listed if n not in have]
        if missing:
            why = ""
            if dropped is not None and dropped.num_rows:
                lost = dropped.filter(pc.is_in(dropped.column(label_column), value_set=arrow.strings(missing)))
                reasons = {}
                for reason in lost.column("reason").to_pylist():
                    reasons[reason] = reasons.get(reason, 0) + 1
                why = f" (their rows were dropped: {', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})" if reasons else ""
            raise DataError(f"{where}: no valid row has the label(s) {', '.join(map(repr, missing))} listed in "
                            f"dataset.labels{why}; a model cannot learn a class it never sees (list only the labels "
                            "the data has)")
        return list(listed)
    if class_names is not None:
        rank = {n: i for i, n in enumerate(class_names)}
        return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))
    if all(_INTEGER.fullmatch(n) for n in found):
        return sorted(found, key=int)
    return sorted(found)


MISSING_MARKERS = {"na", "n/a", "#n/a", "nan", "null", "none", "nil", "-", "?"}


def _warn_about_suspicious_labels(label_names: list[str], source: str) -> None:
    """Labels that differ only in case or spacing are kept apart, but are usually one class spelt two ways;
    a label spelt like a missing-value marker is kept as a class (only an empty cell is missing)."""
    markers = [n for n in label_names if n.strip().casefold() in MISSING_MARKERS]
    if markers:
        log.warning("%s: label(s) %s look like missing-value markers; they are kept as classes (only an empty "
                    "label is missing)", source, ", ".join(map(repr, markers)))
    import unicodedata

    groups: dict[str, list[str]] = {}
    for name in label_names:
        folded = unicodedata.normalize("NFKC", name).casefold()  # "café" composed or as "cafe" and an accent
        groups.setdefault(" ".join(folded.replace("_", " ").replace("-", " ").split()), []).append(name)
    for names in groups.values():
        if len(names) > 1:
            # labels that print alike (one é as one character, one as two) are shown with their code points
            alike = len({unicodedata.normalize("NFC", n) for n in names}) < len(names)
            log.warning("%s: labels %s differ only in case or spacing%s; they are kept as %d classes",
                        source, ", ".join(map(ascii if alike else repr, names)),
                        " or in how their characters are encoded (Unicode normal forms)" if alike else "", len(names))


def _source_name(path: Path, renames: list[tuple[str, str]]) -> str:
    """A source file as the user named it: the URI for a downloaded remote source."""
    for local, uri in renames:
        if str(path) == local or str(path).startswith(local.rstrip("/") + "/"):
            return uri + str(path)[len(local):]
    return str(path)


def _located_name(path: Path, renames: list[tuple[str, str]]) -> str:
    """Where a source file was read, as the version's metadata records it: its URI, or its absolute path (a path as
    the user named it, ``data.csv``, would not say in which folder; links are kept as named)."""
    named = _source_name(path, renames)
    return named if is_uri(named) else os.path.abspath(named)


def write_artifact_dir(tables: dict[str, pa.Table], manifest: dict[str, Any], out: Path) -> dict[str, Path]:
    """The artifact's files. Same tables and manifest -> byte-identical files."""
    files = {f"{split}.parquet": out / f"{split}.parquet" for split in tables}

    def write(split: str) -> None:
        pq.write_table(tables[split], out / f"{split}.parquet", compression="zstd", row_group_size=1 << 20)

    with ThreadPoolExecutor(max_workers=len(tables) or 1, thread_name_prefix="write-split") as pool:
        list(pool.map(write, tables))  # each file on its own thread: Parquet encoding releases the GIL
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files["dataset.json"] = out / "dataset.json"
    return files


def _log_stats(run, tables: dict[str, pa.Table], manifest: dict[str, Any], dropped: pa.Table | None,
               sample_rows: int, seed: int) -> None:
    import wandb

    # A row per label, a column per split: W&B keeps 10,000 rows of a table, so a row per (split, label)
    # would lose labels past 3,333 of them.
    per_split = manifest["label_counts"]
    counts = wandb.Table(columns=["label", *per_split],
                         data=[[n, *(per_split[s][n] for s in per_split)] for n in manifest["label_names"]])
    train_counts = wandb.Table(columns=["label", "count"], data=[[n, c] for n, c in manifest["label_counts"]["train"].items()])
    lengths = np.concatenate([arrow.to_numpy(pc.utf8_length(t.column("text"))) for t in tables.values()])
    rng = np.random.default_rng(seed)
    # Binned here: a chart of 30 bars instead of a table of every length (a million rows would crawl).
    hist, edges = np.histogram(lengths, bins=min(30, max(1, int(lengths.max(initial=0)) + 1)))
    length_table = wandb.Table(columns=["text_length", "rows"],
                               data=[[f"{int(edges[i])}-{int(edges[i + 1])}", int(c)] for i, c in enumerate(hist)])
    data: dict[str, Any] = {
        "data/label_counts": counts,
        "data/label_distribution": wandb.plot.bar(train_counts, "label", "count", title="Train label distribution"),
        "data/text_length": wandb.plot.bar(length_table, "text_length", "rows", title="Text length (characters)"),
        "data/text_length_hist": wandb.Histogram(np_histogram=(hist, edges)),
    }
    for split, t in tables.items():
        if sample_rows and t.num_rows:
            take = np.sort(rng.choice(t.num_rows, min(sample_rows, t.num_rows), replace=False))
            sample = t.take(arrow.from_numpy(take)).to_pylist()
            columns = [c for c in t.column_names]
            data[f"samples/{split}"] = wandb.Table(columns=columns, data=[[_cell(r, c) for c in columns] for r in sample])
    if dropped is not None and dropped.num_rows:
        keep = [c for c in dropped.column_names]
        rows = dropped.slice(0, DROPPED_ROWS_LOGGED).to_pylist()
        texts = {manifest["columns"][c] for c in ("text", "text_pair") if c in manifest["columns"]}  # as the source names them
        data["data/dropped_rows"] = wandb.Table(columns=keep, data=[[_cell(r, c, texts) for c in keep] for r in rows])
    run.log(data)
    run.set_summary(**_data_summary(manifest))


def _cell(row: dict[str, Any], column: str, texts: Collection[str] = ("text", "text_pair")) -> Any:
    """A row's value in a W&B table: a text (a column of `texts`) as `table_text` shows it, the others as they are."""
    return table_text(row[column]) if column in texts else row[column]


def _data_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run summary's counts, from ``dataset.json`` (or a version's metadata, which holds the same keys)."""
    return {**{f"data/rows_{s}": n for s, n in manifest["num_rows"].items()},
            "data/num_labels": len(manifest["label_names"]),
            **{f"data/dropped_{k}": v for k, v in manifest["dropped"].items()}}


def _upload_references(files: dict[str, Path], root: str, verify: bool) -> dict[str, Reference]:
    """Reference mode: the split files go to `root` (content-addressed); dataset.json stays a stored file. A file
    already there is taken as the same bytes by its size, and with `verify` (reading again: --reread) only once
    read back and hashed, so that a damaged one is written again."""
    refs = {}
    for name, path in files.items():
        if name.endswith(".parquet"):
            sha, _ = hash_file(path)
            refs[name] = put(path, root, sha, suffix=".parquet", verify=verify)
            log.info("%s -> %s", name, refs[name].uri)
    return refs


@contextmanager
def _arrow_pool() -> Iterator[None]:
    """Arrow allocations on jemalloc while the stage runs, where the pyarrow wheel has it.

    Validation makes and drops several buffers the size of the text column. Measured on a
    million-row CSV on 2 cores: validation took 1.35-2.5 s under the default mimalloc pool and
    0.9 s under jemalloc, while pyarrow's plain CSV-to-Parquet conversion is as fast under
    either. Buffers remember their pool, so restoring the previous default afterwards is safe.
    A pool chosen with ``ARROW_DEFAULT_MEMORY_POOL`` is left as it is.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        yield
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # e.g. Windows wheels
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def run(config: Config, *, group: str | None = None, reuse: bool = False, dry_run: bool = False) -> StageResult:
    """Publish the configured data as the next version of ``dataset.name`` (status ``unchanged`` with the version
    that holds it, when one does). `reuse` (the command line's default): when a live version was published from
    the same files (by sha256), dataset config, code and libraries (`input_signature`), that version is the result
    and the data is not read again. `dry_run`: read, check and split the data as publishing would, and make nothing
    (no version, no W&B run, no registry folder); the result gives the counts, and invalid data raises as ever."""
    with _arrow_pool():
        return _dry_run(config) if dry_run else _run(config, group, reuse)


def _dry_run(config: Config) -> StageResult:
    _, manifest, _ = prepare(config)
    counts = manifest["num_rows"]
    said = [f"valid: {sum(counts.values())} rows (" + ", ".join(f"{s} {n}" for s, n in counts.items())
            + f"), {len(manifest['label_names'])} labels"]
    if manifest["dropped"]:
        said.append(_dropped(manifest["dropped"], "would be dropped"))
    said.append("nothing published (--dry-run)")
    return StageResult(stage=STAGE, status="ok", run_id=None, message="; ".join(said), metrics=_metrics(manifest),
                       details={"dry_run": True, "dropped": manifest["dropped"], "label_names": manifest["label_names"],
                                "label_counts": manifest["label_counts"]})


def _dropped(dropped: dict[str, int], verb: str) -> str:
    """``6 invalid rows dropped (duplicate_id 1, ...)``: what the result says of the rows `drop` leaves out."""
    total = sum(dropped.values())
    return (f"{total} invalid row{'s' if total != 1 else ''} {verb} ("
            + ", ".join(f"{k} {n}" for k, n in dropped.items()) + ")")


def _metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The result's metrics: rows per split, labels, rows dropped."""
    return {**{f"rows_{s}": float(n) for s, n in manifest["num_rows"].items()},
            "num_labels": float(len(manifest["label_names"])), "dropped": float(sum(manifest["dropped"].values()))}


def _local_files_only(config: Config) -> bool:
    """The data is local files, copied into the version: what the input signature can name from their bytes alone
    (not a hub dataset, a remote URI or reference mode, whose stored objects are checked by publishing)."""
    d = config.dataset
    named = _named_sources(config)
    return not d.reference and not any(map(is_uri, named.values())) and (bool(d.split_files) or not looks_like_hub_id(d.source))


def input_signature(config: Config, sources: list[dict[str, Any]], code: dict[str, Any],
                    packages: dict[str, str]) -> str | None:
    """sha256 of what a dataset version is made from: the source files (each one's path as recorded, sha256 and
    size), the dataset config, the artifact format, the pipeline's commit (or an installed package's digest) and the
    versions of `DATA_PACKAGES`.
    None when the pipeline's package has uncommitted changes (code that cannot be named) or the data is not
    local files."""
    from pipeline.provenance import code_identity, signature

    if code.get("git_dirty") or not _local_files_only(config):
        return None
    return signature({"dataset": config.to_dict()["dataset"], "sources": sources, "format_version": FORMAT_VERSION,
                      "code": code_identity(code), "packages": {p: packages.get(p) for p in DATA_PACKAGES}})


def _signed_versions(config: Config, registry) -> bool:
    """Some version of this dataset records input signatures: only then are the files hashed to look for theirs
    (a first publish, or versions from before signatures, have nothing to compare with)."""
    return registry.newest_where(config.dataset.name, "dataset", lambda meta: bool(meta.get("input_signatures"))) is not None


def published_before(config: Config, registry, provenance: Callable[[], tuple[dict[str, Any], dict[str, str]]]):
    """The newest live version of this dataset published from exactly these inputs (`input_signature`), found
    without reading the data: only the source files are hashed. `provenance`: (code version, package versions)."""
    from pipeline.provenance import made_from

    code, packages = provenance()
    if code.get("git_dirty"):
        return None
    files = [f for fs in _list_sources(config, _named_sources(config)).values() for f in fs]
    sources = _source_records(files, map(hash_file, files), lambda f: _located_name(f, []))
    return made_from(registry, config.dataset.name, "dataset", input_signature(config, sources, code, packages))


def _code_and_packages() -> tuple[dict[str, Any], dict[str, str]]:
    from pipeline.provenance import code_and_packages  # imports importlib.metadata (50 ms): off the start-up path

    return code_and_packages()


def _run(config: Config, group: str | None, reuse: bool) -> StageResult:
    from pipeline.tracking import open_registry

    local = _local_files_only(config)  # else no input signature: see `input_signature`
    if local:  # a source that is not there (the command run from another folder) is named before a registry is made
        _list_sources(config, _named_sources(config))
    registry = open_registry(config.tracking, project=config.project, entity=config.entity)
    registry.check_project(config.dataset.name)  # another project's name: refused before the data is read
    look_up = local and reuse and _signed_versions(config, registry)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="provenance") as side:
        provenance = side.submit(_code_and_packages) if local else None  # git and package metadata: off the data's path
        earlier = published_before(config, registry, provenance.result) if look_up else None
        # W&B's import (a second of Python) goes on while the data is read and checked. Not before the lookup: it
        # would hold the GIL that the git and package lookups need, and they would take 0.5 s instead of 0.05 s.
        warm_up(config)
        if earlier is not None:
            return _reuse(config, group, registry, earlier)
        timings: dict[str, float] = {}  # seconds per step: the run's summary (timing/*) and the result's details
        tables, manifest, dropped, located = _read(config, timings)
        code, packages = provenance.result() if local else ({}, {})
    signature = input_signature(config, located, code, packages)
    d = config.dataset
    with tempfile.TemporaryDirectory(prefix="dataset-publish-") as tmp, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-artifact") as pool:
        # The data is valid: the files are written while the run opens and logs its charts.
        writing = pool.submit(_timed, timings, "write", write_artifact_dir, tables, manifest, Path(tmp))
        opening = time.perf_counter()
        with tracked_run(config, STAGE, group=group, registry=registry) as trun:
            timings["open_run"] = time.perf_counter() - opening  # W&B's import (begun on another thread) and init
            _timed(timings, "log", _log_stats, trun, tables, manifest, dropped, d.sample_rows, d.split.seed)
            files = writing.result()
            metadata = {
                "format_version": FORMAT_VERSION,
                "label_names": manifest["label_names"],
                **({"label_type": manifest["label_type"]} if "label_type" in manifest else {}),
                "num_rows": manifest["num_rows"],
                "dropped": manifest["dropped"],
                "sources": located,  # where this publish read them; dataset.json names them below the source
                "config": trun.config,
                **({"input_signatures": [signature]} if signature else {}),  # see `input_signature`
            }
            references = _upload_references(files, d.reference, verify=not reuse) if d.reference else {}
            if references:
                files = {k: v for k, v in files.items() if k not in references}
                metadata["reference"] = d.reference
            published = _timed(timings, "publish", trun.registry.publish, d.name, "dataset", files, metadata=metadata,
                               run=trun, references=references)
            status = "ok" if published.created else "unchanged"
            if signature:  # the provenance module is loaded by now (on the side thread)
                from pipeline.provenance import add_signature

                add_signature(trun.registry, published.version, signature)  # the same bytes from other inputs too
            trun.set_summary(**{"artifact": published.ref, "status": status},
                             **{f"timing/{k}_s": round(v, 3) for k, v in timings.items()})
            if not published.created:
                log.info("data unchanged: %s already holds it; no new version", published.ref)
    said = [_dropped(manifest["dropped"], "dropped")] if manifest["dropped"] else []
    if status == "unchanged":
        said.append(f"the data is {published.ref}'s byte for byte: no new version")
        said.extend(_latest_again(published.version, published.latest_before))
    result = _result(status, trun, published.version, manifest, message="; ".join(said) or None)
    result.details["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return result


def _timed(timings: dict[str, float], key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, its seconds recorded as ``timings[key]``."""
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[key] = time.perf_counter() - started


def _reuse(config: Config, group: str | None, registry, earlier) -> StageResult:
    """The stage's run for a version published before from the same files, config and code: the data is not read
    again, and the result is that version, status ``unchanged``, as publishing the same content again gives."""
    meta = earlier.metadata
    with tracked_run(config, STAGE, group=group, registry=registry, tags=["reused"]) as trun:
        before = earlier.ref if "latest" in earlier.aliases else _latest_ref(registry, earlier)
        latest = _mark_latest(registry, earlier, before)  # as publishing its content again does
        trun.note_produced(earlier.ref)
        trun.set_summary(**_data_summary(meta), artifact=earlier.ref, status="unchanged", reused=earlier.ref,
                         published_by=earlier.produced_by)
        log.info("data unchanged: %s was published from these same files (by sha256), dataset config and code; they are "
                 "not read again and no new version is made", earlier.ref)
    said = [f"{earlier.ref} was published from these same files, config and code; not read again", *latest]
    return _result("unchanged", trun, earlier, meta, message="; ".join(said))


def _latest_ref(registry, version) -> str | None:
    """The exact version ``NAME:latest`` is on now; None when none is."""
    try:
        return registry.resolve(version.tagged("latest"), "dataset").ref
    except RefError:  # `latest` went with a version deleted meanwhile
        return None


def _mark_latest(registry, version, before: str | None) -> list[str]:
    """Put ``latest`` on a version reused rather than published again, and say so (`_latest_again`). Should the
    registry refuse (online, W&B manages ``latest``), the version stands as the result and the message says where
    ``latest`` still is, and which version to name."""
    if before == version.ref:
        return []
    refused = put_latest(registry, version.ref)
    if refused:
        said = (f"{version.tagged('latest')} is still {before}: putting it on {version.ref} failed ({refused}); finetune and "
                f"sweep read {version.tagged('latest')} unless told, so name this version (--dataset {version.ref})")
        log.warning("%s", said)
        return [said]
    return _latest_again(version, before)


def _latest_again(version, before: str | None) -> list[str]:
    """For data that an older version holds, published again: that version is ``NAME:latest`` again (as on W&B),
    which finetune and sweep read unless told. Said in the result and logged; empty when it was `latest` before."""
    said = latest_again(version, before)
    if said is None:
        return []
    log.info("%s", said)
    return [said]


def _result(status: str, trun, version, manifest: dict[str, Any], message: str | None = None) -> StageResult:
    return StageResult(
        stage=STAGE,
        status=status,
        run_id=trun.id,
        produced=[version.ref],
        message=message,
        metrics=_metrics(manifest),
        paths={"run_dir": str(trun.wandb_dir) if trun.wandb_dir else ""},
        details={"dropped": manifest["dropped"], "digest": version.digest},
    )
