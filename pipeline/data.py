"""Reading raw labeled text into Arrow, validating it, and splitting it deterministically.

Everything here works on Arrow tables (pyarrow's multithreaded readers and vectorised
compute), so a million-row CSV is read, checked and split without a Python loop per row on
the happy path. Row numbers in messages are 1-based data rows (the CSV header excluded).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
SHOW = 5  # examples of each kind of problem shown in a report


class DataError(PipelineError):
    """The input data is unusable as configured; the message says where and why."""


@dataclass
class Columns:
    text: str
    label: str
    id: str | None = None
    text_pair: str | None = None

    @property
    def text_columns(self) -> list[str]:
        return [c for c in (self.text, self.text_pair) if c]

    @property
    def required(self) -> list[str]:
        return [c for c in (self.id, self.text, self.text_pair, self.label) if c]


@dataclass
class Problem:
    kind: str
    rows: list[tuple[str, int]]  # (file, 1-based row)
    detail: str = ""


@dataclass
class Validated:
    table: pa.Table  # clean rows: [id], text, [text_pair], label (string), _file, _row
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: pa.Table | None = None  # the dropped rows with their reason
    problems: list[Problem] = field(default_factory=list)


def list_input_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(sorted(SUFFIXES))} files in this folder")
        kinds = {SUFFIXES[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixed file formats ({', '.join(sorted(kinds))}); use one format per folder")
        return files
    if not path.exists():
        raise DataError(f"dataset source not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported format {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}")
    return [path]


def _read_one(path: Path, cols: Columns) -> pa.Table:
    kind = SUFFIXES[path.suffix.lower()]
    try:
        if kind in ("csv", "tsv"):
            from pyarrow import csv

            # Text as binary, so undecodable bytes are found row by row instead of failing the read.
            return csv.read_csv(
                path,
                parse_options=csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True),
                convert_options=csv.ConvertOptions(
                    column_types={c: pa.binary() for c in cols.text_columns},
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        if kind == "jsonl":
            from pyarrow import json as pajson

            return pajson.read_json(path)
        if kind == "json":
            data = json.loads(path.read_bytes())
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]} as some exports write
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
            return pa.Table.from_pylist(data)
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: undecodable bytes at byte {e.start}: {e.reason}; save the file as UTF-8") from None
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read as {kind}: {e}") from None


def read_source(source: str | Path, cols: Columns) -> tuple[pa.Table, list[Path]]:
    """One table of every input file with ``_file`` and ``_row``; columns checked per file."""
    files = list_input_files(source)
    tables = []
    for path in files:
        t = _read_one(path, cols)
        missing = [c for c in cols.required if c not in t.column_names]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(t.column_names) or 'none'}"
                " (set dataset.text_column / label_column / id_column to match)"
            )
        t = t.select(cols.required)
        for c in cols.text_columns:
            if not pa.types.is_binary(t.schema.field(c).type):
                t = t.set_column(t.schema.get_field_index(c), c, _to_binary(t.column(c), path, c))
        t = t.append_column("_file", pa.array([str(path)] * t.num_rows, pa.string()))
        t = t.append_column("_row", pa.array(np.arange(1, t.num_rows + 1, dtype=np.int64)))
        tables.append(t)
    try:
        return pa.concat_tables(tables, promote_options="permissive"), files
    except pa.ArrowInvalid as e:
        raise DataError(f"{source}: the files do not share one schema: {e}") from None


def _to_binary(col: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.cast(col, pa.binary())
    if pa.types.is_null(col.type):
        return pa.chunked_array([pa.nulls(len(col), pa.binary())])
    raise DataError(f"{path}: column {name!r} holds {col.type}, not text")


def _decode(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Binary -> string; returns the strings (undecodable rows null) and a mask of undecodable rows."""
    arr = col.combine_chunks()
    try:
        return pc.cast(arr, pa.string()), np.zeros(len(arr), dtype=bool)
    except pa.ArrowInvalid:
        values = arr.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        out = []
        for i, v in enumerate(values):
            try:
                out.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                out.append(None)
        return pa.array(out, pa.string()), bad


def validate(table: pa.Table, cols: Columns, min_per_class: int) -> Validated:
    """Find every problem; drop nothing yet. Problems list rows by (file, row)."""
    n = table.num_rows
    files = table.column("_file").to_numpy(zero_copy_only=False)
    rows = table.column("_row").to_numpy()
    reasons = np.full(n, "", dtype=object)
    problems: list[Problem] = []

    def flag(kind: str, mask: np.ndarray, detail: str = "") -> None:
        mask = mask & (reasons == "")  # one reason per row: the first found
        if mask.any():
            idx = np.flatnonzero(mask)
            reasons[idx] = kind
            problems.append(Problem(kind, [(files[i], int(rows[i])) for i in idx], detail))

    decoded = {}
    for c in cols.text_columns:
        strings, bad = _decode(table.column(c))
        decoded[c] = strings
        flag("undecodable_text", bad, f"column {c!r} is not valid UTF-8")
    for c in cols.text_columns:
        stripped = pc.utf8_trim_whitespace(decoded[c])
        empty = pc.fill_null(pc.equal(pc.utf8_length(stripped), 0), True).to_numpy(zero_copy_only=False)
        flag("empty_text", empty, f"column {c!r} is empty or null")
    label = table.column(cols.label).combine_chunks()
    if not (pa.types.is_string(label.type) or pa.types.is_large_string(label.type)):
        label = pc.cast(label, pa.string()) if not pa.types.is_null(label.type) else pa.nulls(n, pa.string())
    label = pc.utf8_trim_whitespace(label)
    flag("null_label", pc.fill_null(pc.equal(pc.utf8_length(label), 0), True).to_numpy(zero_copy_only=False),
         f"column {cols.label!r} is empty or null")

    if cols.id:
        ids = pc.cast(table.column(cols.id).combine_chunks(), pa.string()).to_numpy(zero_copy_only=False)
        seen: dict = {}
        dup = np.zeros(n, dtype=bool)
        for i, v in enumerate(ids):
            if v is None:
                continue
            if v in seen:
                dup[i] = True
            else:
                seen[v] = i
        flag("duplicate_id", dup, f"the same {cols.id!r} appears on an earlier row")

    key = decoded[cols.text]
    if cols.text_pair:
        key = pc.binary_join_element_wise(key, decoded[cols.text_pair], "\x1f")
    ok = reasons == ""
    texts = key.to_numpy(zero_copy_only=False)
    labels_np = label.to_numpy(zero_copy_only=False)
    labels_by_text: dict[str, set] = {}
    for i in np.flatnonzero(ok):
        labels_by_text.setdefault(texts[i], set()).add(labels_np[i])
    conflicting = {t for t, ls in labels_by_text.items() if len(ls) > 1}
    if conflicting:
        mask = np.array([ok[i] and texts[i] in conflicting for i in range(n)])
        flag("conflicting_label", mask, "the same text appears with different labels")

    ok = reasons == ""
    counts = Counter(labels_np[ok])
    small = sorted(lbl for lbl, c in counts.items() if c < min_per_class)
    if small:
        mask = ok & np.isin(labels_np, small)
        flag("class_too_small", mask,
             f"label(s) {', '.join(map(repr, small))} have fewer than {min_per_class} rows, too few to split")

    clean = pa.table({
        **({cols.id: pc.cast(table.column(cols.id), pa.string())} if cols.id else {}),
        cols.text: decoded[cols.text],
        **({cols.text_pair: decoded[cols.text_pair]} if cols.text_pair else {}),
        cols.label: label,
        "_file": table.column("_file"),
        "_row": table.column("_row"),
    })
    keep = pa.array(reasons == "")
    dropped = clean.filter(pc.invert(keep)).append_column(
        "reason", pa.array([r for r in reasons if r], pa.string()))
    return Validated(
        table=clean.filter(keep),
        dropped=dict(Counter(r for r in reasons if r)),
        dropped_rows=dropped,
        problems=problems,
    )


def format_problems(problems: list[Problem], source: str) -> str:
    total = sum(len(p.rows) for p in problems)
    lines = [f"dataset validation failed for {source}: {total} invalid row(s)"]
    for p in problems:
        shown = "; ".join(f"{f} row {r}" for f, r in p.rows[:SHOW])
        more = f"; ... and {len(p.rows) - SHOW} more" if len(p.rows) > SHOW else ""
        lines.append(f"  {p.kind} ({len(p.rows)} rows, {p.detail}): {shown}{more}")
    lines.append("nothing was published; fix the data or set dataset.on_invalid=drop (dropped rows are counted and recorded)")
    return "\n".join(lines)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices per split: every label split by the same fractions, a seeded shuffle.

    Each split with a fraction above 0 gets at least one row of every label; the indices of
    each split come back in input order, so the output depends only on the input and seed.
    """
    rng = np.random.default_rng(seed)
    names = [s for s in ("train", "validation", "test")]
    out: dict[str, list[np.ndarray]] = {s: [] for s in names}
    for lbl in sorted(set(labels.tolist())):  # sorted: the shuffle order never depends on dict order
        idx = np.flatnonzero(labels == lbl)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = max(1, round(n * fractions["test"])) if fractions["test"] > 0 else 0
        n_val = max(1, round(n * fractions["validation"])) if fractions["validation"] > 0 else 0
        out["test"].append(idx[:n_test])
        out["validation"].append(idx[n_test:n_test + n_val])
        out["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(v)) if v else np.array([], dtype=np.int64) for s, v in out.items()}
