"""Reading raw labeled text into Arrow, validating it, and splitting it deterministically.

Everything here works on Arrow tables (pyarrow's multithreaded readers and vectorised
compute), so a million-row CSV is read, checked and split without a Python loop per row on
the happy path. Row numbers in messages are 1-based data rows (the CSV header excluded), with the line a row starts
on where that is not where the row's number puts it (`RowLines`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv as pycsv  # Arrow's reader is `csv` where it is imported
import glob
import io
import itertools
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import arrow
from pipeline.errors import PipelineError, likely_match, near_label, near_name

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
            ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow"}
# .ndjson: JSON Lines as polars' write_ndjson and many log exports name it; .arrow, .feather: Arrow's IPC formats
# (pandas' to_feather, the .arrow files datasets keeps), compressed inside as Parquet is
BINARY_KINDS = ("parquet", "arrow")
# Text formats may be compressed (data.csv.gz, part-0000.json.zst, as Spark and pandas write them): they are read
# through a stream that decompresses them by the suffix, in any case (`_arrow_input`). Parquet compresses inside.
SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")  # not read: the message says how to export them
ARCHIVES = (".zip", ".tar", ".tgz", ".7z", ".rar")  # likewise (Kaggle's downloads are .zip, pandas writes .csv.zip)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
log = logging.getLogger(__name__)

SHOW = 5  # examples of each kind of problem shown in a report
DROPPED_ROWS_LOGGED = 1000  # rows of the run's table of dropped rows (on_invalid: drop); all are counted


class DataError(PipelineError):
    """The input data is unusable as configured; the message says where and why."""


@dataclass
class Columns:
    text: str
    label: str | None  # None: texts to classify (`pipeline predict --input`), not a dataset
    id: str | None = None
    text_pair: str | None = None
    settings: str = "dataset.text_column / label_column / id_column to match"  # what a missing column's message says

    @property
    def text_columns(self) -> list[str]:
        return [c for c in (self.text, self.text_pair) if c]

    @property
    def required(self) -> list[str]:
        return [c for c in (self.id, self.text, self.text_pair, self.label) if c]


@dataclass(frozen=True)
class CsvFormat:
    """How CSV/TSV files are written (JSON is UTF-8 by definition; Parquet stores UTF-8 and its names)."""

    encoding: str = "utf-8"
    delimiter: str | None = None  # None: a comma for .csv, a tab for .tsv
    column_names: tuple[str, ...] | None = None  # the columns of files without a header row; None: row 1 is it
    flags: bool = False  # set by command-line flags (`predict --delimiter`), not `dataset.*`: what messages name
    escape_char: str | None = None  # the character before a quote inside a quoted field (Spark's \); None: doubled
    quoting: bool = True  # False: fields are never quoted, a quote is text (GLUE's TSV)

    @property
    def header_lines(self) -> int:
        """Lines before the first data row, as a row's number counts them: the header (none with `column_names`)."""
        return 0 if self.column_names else 1

    def setting(self, name: str, value: str | None = None) -> str:
        """How the user sets `name` (``delimiter``, ``encoding``), with `value` when given: ``dataset.delimiter=";"``
        (in double quotes, as YAML and --set read them: '\\t' in single quotes is a backslash and a t), or for
        flags ``--delimiter ';'``."""
        if name == "quoting":  # a switch: only ever named to turn it off
            return "--no-quoting" if self.flags else "dataset.quoting=false"
        if self.flags:
            return f"--{name.replace('_', '-')}" + ("" if value is None else " " + ("'\\t'" if value == "\t" else shlex.quote(value)))
        return f"dataset.{name}" + ("" if value is None else f"={json.dumps(value)}")

    def parse_options(self, delimiter: str, **kwargs):
        from pyarrow import csv

        return csv.ParseOptions(delimiter=delimiter, newlines_in_values=self.quoting, escape_char=self.escape_char or False,
                                quote_char='"' if self.quoting else False, **kwargs)

    def read_options(self, encoding: str, **kwargs):
        from pyarrow import csv

        return csv.ReadOptions(encoding=encoding, column_names=list(self.column_names or ()), **kwargs)


@dataclass
class Problem:
    kind: str
    rows: list[tuple[str, int]]  # the first few (file, 1-based row)
    detail: str = ""
    count: int = 0  # rows with this problem in all
    notes: list[str] = field(default_factory=list)  # for each of `rows`, what the row is in conflict with (or none)
    lines: list[int | None] = field(default_factory=list)  # for each of `rows`, its line where not row + 1 (`RowLines`)


@dataclass
class Validated:
    table: pa.Table  # clean rows: [id], text, [text_pair], label (string), _file, _row[, _split]
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: pa.Table | None = None  # the dropped rows with their reason
    problems: list[Problem] = field(default_factory=list)
    # per clean row: a code of its text (and pair) as `copy_key` compares them; copies, equal codes
    texts: np.ndarray | None = None
    order: np.ndarray | None = None  # per clean row: its text's `split_order` rank, when a split seed was given
    # clean rows whose text is a copy (ignoring case and spacing) of a text with another label
    mixed_label_copies: int = 0
    # the first few, as "FILE row N (label 'a'; row M has 'b')"
    mixed_label_examples: list[str] = field(default_factory=list)


def list_input_files(source: str | Path, what: str = "dataset source") -> list[Path]:
    """The data files of a source: a file, a folder (searched recursively) or a glob pattern; `what` names
    the source in a message."""
    path = Path(source)
    if path.is_dir() and saved_dataset(path):
        raise DataError(f"{path}: a folder saved by datasets' save_to_disk, which only dataset.source reads; export it "
                        f"for the {what} with .to_parquet(...) (a DatasetDict: each split)")
    if path.is_dir():
        # Hidden entries are not data: .ipynb_checkpoints/ copies, macOS ._ files, editors' swap files.
        files = [p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        return _one_format(files, path, "in this folder")
    if not path.exists() and any(c in str(source) for c in "*?["):  # data/*.csv, exports/**/part-*.parquet
        files = [Path(p) for p in glob.glob(str(source), recursive=True)]  # glob skips hidden names itself
        return _one_format(files, path, "match this pattern")
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative paths start from the current directory: {Path.cwd()})"
        raise DataError(f"{what} not found: {path}{relative}{near_name(path)}")
    if format_suffix(path) not in SUFFIXES:
        raise DataError(f"{path}: unsupported format {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))} (text "
                        f"formats may be compressed: {', '.join(COMPRESSIONS)}){_format_hint(path)}")
    if not path.is_file():  # a folder's files and a pattern's matches are regular files already
        # dataset-publish reads a source twice at once (its rows, its sha256 on another thread): two readers of a
        # pipe would each get part of its bytes, or wait for a writer forever; Arrow's readers also seek
        raise DataError(f"{path}: not a regular file (a named pipe or a device); the {what} is read more than once, "
                        "so write the data to a file first")
    return [path]


def format_suffix(path: Path) -> str:
    """The suffix that names the data format: ``.csv`` for data.csv and for data.csv.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS and SUFFIXES.get(suffixes[-2], "parquet") not in BINARY_KINDS:
        return suffixes[-2]
    return path.suffix.lower()


def _format_hint(path: Path) -> str:
    """How to turn a file of a format that is not read into one that is: a spreadsheet, an archive, xz."""
    suffixes = [x.lower() for x in path.suffixes]
    if path.suffix.lower() in SPREADSHEETS:
        return ("; save a spreadsheet as CSV (Excel: Save As, 'CSV UTF-8'), or with pandas: "
                "pd.read_excel(path).to_parquet('data.parquet')")
    if path.suffix.lower() in ARCHIVES or suffixes[-2:-1] == [".tar"]:
        return "; this is an archive: extract its files and give the file, or the folder they are in"
    if path.suffix.lower() in (".xz", ".lzma"):
        return f"; xz is not read: decompress it (xz -dk {shlex.quote(str(path))}) or compress with gzip or zstd instead"
    return ""


def _arrow_input(path: Path) -> Any:
    """What Arrow's CSV and JSON readers are given for `path`: the path itself, or, compressed, a stream that
    decompresses it by our reading of its suffix (Arrow's own detection is case-sensitive: DATA.CSV.GZ was read as
    its compressed bytes)."""
    codec = _compression(path)
    return str(path) if codec is None else pa.input_stream(str(path), compression=codec)


def _compression(path: Path) -> str | None:
    """The codec of a compressed text file (data.csv.gz: gzip); None for any other file."""
    return COMPRESSIONS.get(path.suffix.lower()) if format_suffix(path) != path.suffix.lower() else None


def _open(path: Path) -> io.BufferedReader:
    """The file's bytes, decompressed when its name ends in a compression suffix."""
    return io.BufferedReader(pa.input_stream(str(path), compression=_compression(path)))


def _one_format(candidates: list[Path], source: Path, where: str) -> list[Path]:
    files = sorted(p for p in candidates if p.is_file() and format_suffix(p) in SUFFIXES)
    if not files:
        raise DataError(f"{source}: no {', '.join(sorted(SUFFIXES))} files {where}")
    kinds = {SUFFIXES[format_suffix(p)] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{source}: mixed file formats ({', '.join(sorted(kinds))}); use one format per source")
    return files


LIKELY_DELIMITERS = (";", "\t", "|", ",")


def _read_one(path: Path, cols: Columns, fmt: CsvFormat = CsvFormat(), from_folders: Collection[str] = ()) -> pa.Table:
    """One file's configured columns; those in `from_folders` may be absent (a ``key=value`` folder gives them)."""
    kind = SUFFIXES[format_suffix(path)]
    try:
        if codec := _compression(path):  # say so when it is not compressed, rather than zlib's words
            try:
                with _open(path) as f:
                    f.read(1)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: not {codec}-compressed, though its name ends in {path.suffix} ({e})") from None
        if kind not in BINARY_KINDS and _blank(path):  # an empty part file (Spark writes one for an empty partition)
            log.info("%s: an empty file (no rows)", path)
            return pa.table({c: pa.nulls(0) for c in cols.required})
        if kind in ("csv", "tsv"):
            from pyarrow import csv

            encoding, delimiter, skip, first = _csv_layout(path, fmt, kind)
            parse = fmt.parse_options(delimiter)
            if encoding == fmt.encoding and (utf8 := _utf8_text(path, encoding)):
                log.warning("%s: %s is %s, but the file's non-ASCII text is valid UTF-8 (%r); read as %s, it becomes "
                            "%r. Leave %s out if the file is UTF-8", path, fmt.setting("encoding"), encoding, utf8,
                            encoding, utf8.encode("utf-8").decode(encoding, errors="replace"), fmt.setting("encoding"))
            text_as_binary = {c: pa.binary() for c in cols.text_columns}
            # Ids and labels as written: type inference would read "007" as 7 and "01" as 1.
            as_written = {**{c: pa.string() for c in (cols.id, cols.label) if c}, **text_as_binary}
            # Only the configured columns are converted (other columns cost nothing and can hold anything);
            # text as binary, so undecodable bytes are found row by row. Only an empty cell is missing, as
            # in JSON and Parquet: Arrow's default markers would turn a class named "N/A" or a text "NA"
            # into nulls, reported as empty when the file holds a value.
            convert = csv.ConvertOptions(include_columns=cols.required, column_types=as_written, null_values=[""],
                                         strings_can_be_null=True, quoted_strings_can_be_null=False)
            # A first line without the delimiter is one column, so the configured columns cannot all be there.
            if (seen := _other_delimiter(first, delimiter)) is not None:
                raise DataError(f"{path}: the first line has no {delimiter!r}, but it has {seen!r}: "
                                f"{'pass' if fmt.flags else 'set'} {fmt.setting('delimiter', seen)} for a file separated by it")
            try:
                # The header first: a missing, misspelt or doubled column is named. Arrow reads it (one 64 KiB
                # block, parsed and converted: as much as the whole of a small file) only when quotes make it
                # more than the first line split at the delimiter.
                header = list(fmt.column_names) if fmt.column_names else _plain_header(first, delimiter)
                if header is None:
                    header = _growing_blocks(lambda block: csv.open_csv(
                        _arrow_input(path), parse_options=parse, read_options=fmt.read_options(encoding, block_size=block, skip_rows=skip),
                        convert_options=csv.ConvertOptions(column_types=text_as_binary)).schema.names, first=1 << 16)
                elsewhere = [c for c in from_folders if c not in header]
                _check_columns(header + elsewhere, str(path), cols)
                if elsewhere:
                    convert.include_columns = [c for c in cols.required if c not in elsewhere]
                table = _growing_blocks(lambda block: csv.read_csv(
                    _arrow_input(path), read_options=fmt.read_options(encoding, block_size=block, skip_rows=skip), parse_options=parse,
                    convert_options=convert), first=CSV_BLOCK)
                if fmt.quoting and not fmt.escape_char:
                    _warn_of_backslash_quotes(table, path, cols, fmt)
                if fmt.quoting and not fmt.escape_char and delimiter == "\t":  # TSV is often unquoted (GLUE's, Unix tools')
                    _warn_of_unquoted_tsv(path, fmt)
                return table
            except pa.ArrowInvalid as e:
                if "invalid UTF8" in str(e):  # in an id or label column (text columns are checked row by row)
                    raise DataError(f"{path}: {e}; a CSV saved in another encoding needs {fmt.setting('encoding')}, "
                                    "e.g. cp1252") from None
                if "CSV parse error" not in str(e):
                    raise
                raise _locate_csv_error(path, kind, fmt.read_options(encoding, use_threads=False, skip_rows=skip), parse, convert,
                                        e, fmt) from None
        if kind == "jsonl":
            return _read_jsonl(path, cols)
        if kind == "json":
            if _json_lines_within(path):  # said by its first lines, before a big file is read whole into memory
                return _read_jsonl(path, cols)
            with _open(path) as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data" and text.lstrip()[:1] == b"{":
                    # one object per line: JSON Lines named .json, as Spark's write.json, datasets' to_json and
                    # pandas' to_json(lines=True) name it
                    return _read_jsonl(path, cols)
                raise
            data = _json_records(data, cols)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of objects, or JSON Lines (one object per line)")
            if not data:
                return pa.table({c: pa.nulls(0) for c in cols.required})
            stray = next((i for i, r in enumerate(data, 1) if not isinstance(r, dict)), None)
            if stray is not None:  # from_pylist would make a row of nulls of it
                raise DataError(f"{path} record {stray}: expected a JSON object, found a {_json_kind(data[stray - 1])}")
            try:
                table = pa.Table.from_pylist(data)
            except pa.ArrowException as e:  # a field whose type changes from record to record
                said = _locate_json_error(enumerate(data, 1), str(path), "record")
                if said is None and "exactly representable" in str(e):  # a whole number beside fractions, beyond 2**53
                    said = next((f"{path} record {i}: field {k!r} holds {v}, a whole number too large to be read exactly "
                                 "beside the numbers with a fraction in that field (read as 64-bit floating point, "
                                 f"exact to 2**53 only); write it as a string (\"{v}\") in the file"
                                 for i, r in enumerate(data, 1) for k, v in r.items() if type(v) is int and abs(v) > 2**53),
                                None)
                raise DataError(said or f"{path}: cannot read as json: {e}") from None
            except OverflowError:  # a whole number beyond 64 bits (Python's json keeps it exactly; Arrow cannot)
                number, key, value = next(((i, k, big) for i, r in enumerate(data, 1) for k, v in r.items()
                                           if (big := _beyond_64_bits(v)) is not None), (None, None, None))
                raise DataError(f"{path} record {number}: field {key!r} holds {value}, a whole number beyond 64 bits; "
                                f"write it as a string (\"{value}\") in the file" if number is not None else
                                f"{path}: cannot read as json: a whole number beyond 64 bits") from None
            return _exact_numbers(table, path, cols, lambda: enumerate(data, 1), "record")
        if kind == "arrow":
            whole = _read_arrow_ipc(path)  # memory-mapped: the columns not configured are never read
            schema, read = whole.schema, whole.select
        else:
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            read = lambda columns: pq.read_table(path, columns=columns)  # noqa: E731
        elsewhere = [c for c in from_folders if c not in schema.names]
        _check_columns(schema.names + elsewhere, str(path), cols)
        table = read([c for c in cols.required if c not in elsewhere])  # only the configured columns
        if cols.label and cols.label in schema.names and (names := _class_label_names(schema, cols.label)) is not None:
            # class ids with their names in the file (datasets' to_parquet, its .arrow files): the names, as from the hub
            table = _class_ids_named(table, cols.label, names, str(path))
            table = _with_class_names(table, names)
        return table
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: undecodable bytes at byte {e.start}: {e.reason}; save the file as UTF-8") from None
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read as {kind}: {e}") from None


def _read_arrow_ipc(path: Path) -> pa.Table:
    """An Arrow IPC file: the file format (Feather v2, pandas' ``to_feather``), Feather v1, or the stream format
    (the ``.arrow`` files of ``datasets``' cache and ``save_to_disk``)."""
    import pyarrow.feather as feather

    try:
        table = feather.read_table(str(path), memory_map=True)
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    # IPC is read as it lies, unchecked: a damaged file gives offsets past its buffers, and text that is not UTF-8,
    # which later steps would read out of bounds or fail on with Arrow's words. Checked here, once, in full.
    table.validate(full=True)
    return table


def _json_lines_within(path: Path) -> bool:
    """Whether a .json file is JSON Lines, as its first line says: a whole JSON object, and more after it (Spark's
    part files are hundreds of MB: read whole and parsed as one document, they would be held in memory twice)."""
    try:
        with _open(path) as f:
            head = f.read(1 << 20)
    except (OSError, pa.ArrowException):
        return False
    first, newline, rest = head.removeprefix(b"\xef\xbb\xbf").lstrip().partition(b"\n")
    if not newline or not first.startswith(b"{") or not rest.strip():
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _json_records(data: Any, cols: Columns) -> Any:
    """The records of a JSON document, as exports and pandas' ``to_json`` write them: an array of objects
    (``orient="records"``), ``{"data": [...]}`` (any one key), ``orient="table"`` (``{"schema": ..., "data": [...]}``),
    ``orient="split"`` (``{"columns": [...], "data": [[...]]}``), ``orient="columns"``, pandas' default
    (``{column: {index: value}}``), or ``orient="index"`` (``{index: {column: value}}``); one object is one record."""
    if not isinstance(data, dict):
        return data
    values = list(data.values())
    if len(data) == 1 and isinstance(values[0], list):
        return values[0]
    if isinstance(data.get("data"), list) and isinstance(data.get("schema"), dict):  # orient="table"
        return data["data"]
    if isinstance(data.get("columns"), list) and isinstance(data.get("data"), list) and \
            all(isinstance(row, list) for row in data["data"]):  # orient="split"
        return [dict(zip(data["columns"], row)) for row in data["data"]]
    if values and all(isinstance(v, dict) for v in values):
        if any(c in data for c in cols.required):  # orient="columns": the keys are the columns
            index = list(dict.fromkeys(k for v in values for k in v))
            return [{column: v.get(k) for column, v in data.items()} for k in index]
        return values  # orient="index": the values are the rows
    return [data]  # one record: a JSON Lines file of one line, or one object pretty-printed


def _read_jsonl(path: Path, cols: Columns) -> pa.Table:
    """A JSON Lines file (named .jsonl, or .json with one object per line)."""
    from pyarrow import json as pajson

    if wide := _wide_encoding(path):
        raise DataError(f"{path}: the file is {wide.upper()} (it starts with that byte-order mark); "
                        "JSON Lines must be UTF-8: save it as UTF-8")
    if (line := _null_line(path)) is not None:  # Arrow's reader crashes the process on one (pyarrow 26)
        with _open(path) as f:
            text = next(itertools.islice(f, line - 1, None), b"")[:80].decode("utf-8", errors="replace")
        text = text.removeprefix("\ufeff").strip()
        raise DataError(f"{path} line {line}: expected a JSON object, found "
                        + ("a null" if text == "null" else f"{text!r}, which is not JSON"))
    try:
        table = _growing_blocks(lambda block: pajson.read_json(_arrow_input(path), read_options=pajson.ReadOptions(block_size=block)))
    except pa.ArrowInvalid as e:
        # Arrow numbers rows within its 1 MiB block, not within the file: find the line here.
        raise DataError(_locate_json_error(_jsonl_records(path), str(path), "line")
                        or f"{path}: cannot read as jsonl: {_strip_block_row(e)}") from None
    return _exact_numbers(table, path, cols, lambda: _jsonl_records(path), "line")


def _blank(path: Path) -> bool:
    """Whether a text file holds nothing, or only spacing (and a UTF-8 byte-order mark): no header and no rows, as
    Spark and export scripts write a part file for an empty partition. Reads up to the first other byte."""
    try:
        with _open(path) as f:
            start = b"\xef\xbb\xbf"
            while chunk := f.read(1 << 16):
                if (chunk.removeprefix(start) if start else chunk).strip():
                    return False
                start = b""
    except (OSError, pa.ArrowException):
        return False  # not readable: the reader says why
    return True


BLOCK = 1 << 20  # Arrow's own default block for CSV and JSON Lines
# CSV is read in 4 MiB blocks: as fast (0.12 s for a million rows either way), in a quarter of the chunks, so each
# later step that walks a column's chunks (odd spacing, the backslash check, the split's take) makes a quarter of
# the Python calls; each of those waits for the GIL while W&B is imported on another thread (95 chunks: +0.15 s).
CSV_BLOCK = 4 << 20
MAX_BLOCK = 1 << 30


def _growing_blocks(read, first: int = BLOCK):
    """``read(block_size)``, again with blocks 16 times larger while a row is longer than a block (Arrow
    fails on it: "straddling object straddles two block boundaries"), up to 1 GiB. A ticket with a pasted
    log can be megabytes long; the common file is read in `first`-sized blocks, as before."""
    block = first
    while True:
        try:
            return read(block)
        except pa.ArrowInvalid as e:
            if "straddling object" not in str(e) or block >= MAX_BLOCK:
                raise
            block = min(block * 16, MAX_BLOCK)


def _first_line(path: Path, encoding: str, skip: int = 0) -> str | None:
    """The file's first line (after `skip` lines) as Arrow's CSV reader sees it (at most 64 KiB, its line break kept;
    a UTF-8 byte-order mark dropped; undecodable bytes as U+FFFD); None when the file cannot be read (the reader
    reports it)."""
    try:
        with io.TextIOWrapper(_open(path), encoding=encoding, errors="replace", newline="") as f:
            for _ in range(skip):
                f.readline(1 << 16)
            first = f.readline(1 << 16)
    except (OSError, LookupError, pa.ArrowException):
        return None
    return first.removeprefix("\ufeff")


_EXCEL_SEPARATOR = re.compile(r'"?sep=(.)"?(?:\1)*\r?\n?')


def _excel_separator(first: str | None) -> str | None:
    """The separator a first line ``sep=;`` names (Excel writes and reads it, to say how the fields are separated;
    re-saved, it may be padded with more of them: ``sep=;;;``), or None."""
    found = _EXCEL_SEPARATOR.fullmatch(first or "")
    return found.group(1) if found and found.group(1) not in "\r\n\"" else None


def _other_delimiter(first: str | None, delimiter: str) -> str | None:
    """Another likely separator, when the `first` line has it and not `delimiter` (Excel writes ';' in many locales)."""
    if first is None or delimiter in first:
        return None
    return next((d for d in LIKELY_DELIMITERS if d != delimiter and d in first), None)


def _plain_header(first: str | None, delimiter: str) -> list[str] | None:
    """The column names of a header line without quotes: the line split at the delimiter, as Arrow splits it.
    None when Arrow must read it (quotes, which may hold the delimiter or a line break; a line that goes on past
    64 KiB; undecodable bytes, which Arrow reports; an unreadable file)."""
    if first is None or '"' in first or "\ufffd" in first or not first.endswith(("\n", "\r")):
        return None
    return first.rstrip("\r\n").split(delimiter)


def _utf8_text(path: Path, encoding: str, sample: int = 1 << 20) -> str | None:
    """For a CSV read in another encoding than UTF-8 (``dataset.encoding``): the first non-ASCII word of its first MiB
    when that MiB is valid UTF-8 with some non-ASCII text, which the other encoding would read as other characters
    ("café" as "cafÃ©" in cp1252) without an error. None when it is not, or the encoding is UTF-8 anyway. Text
    written in cp1252 or Latin-1 is almost never valid UTF-8 (é is a lone byte E9, which UTF-8 cannot end on)."""
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        return None
    try:
        with _open(path) as f:
            head = f.read(sample)
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except (OSError, pa.ArrowException, UnicodeDecodeError):
        return None
    if text.isascii():
        return None
    return next(word for word in re.split(r"[\s,;\t\"]+", text) if not word.isascii())[:40]


def _csv_layout(path: Path, fmt: CsvFormat, kind: str) -> tuple[str, str, int, str | None]:
    """How a CSV/TSV file is read: its encoding, its delimiter, the lines before its header (Excel's ``sep=;`` line,
    which names the separator) and the header's line (`_first_line`)."""
    encoding = _wide_encoding(path) or fmt.encoding  # Excel's "Unicode Text" export is UTF-16
    delimiter = fmt.delimiter or ("\t" if kind == "tsv" else ",")
    first = _first_line(path, encoding)
    if (said := _excel_separator(first)) is None:
        return encoding, delimiter, 0, first
    if fmt.delimiter and fmt.delimiter != said:
        raise DataError(f"{path}: its first line, {first.strip()!r}, says the fields are separated by "
                        f"{said!r}, but {fmt.setting('delimiter')} is {fmt.delimiter!r}")
    return encoding, said, 1, _first_line(path, encoding, skip=1)


def _wide_encoding(path: Path) -> str | None:
    """``utf-16`` or ``utf-32`` when the file starts with that byte-order mark, else None."""
    try:
        with _open(path) as f:
            head = f.read(4)
    except (OSError, pa.ArrowException):
        return None  # the reader reports it
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00 starts with FF FE
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


BACKSLASH_QUOTE = '\\"'


def _warn_of_backslash_quotes(table: pa.Table, path: Path, cols: Columns, fmt: CsvFormat) -> None:
    """A warning where a text holds a backslash before a quote: most likely a file that escapes quotes with a
    backslash (Spark's CSV: ``"he said \\"hi\\" today"``), which read with quotes doubled (RFC 4180) gives
    ``he said \\hi\\" today"`` without an error. A warning, not a refusal: a text may hold one (pasted JSON)."""
    for c in cols.text_columns:
        if c not in table.column_names or not table.num_rows or not _has_backslash_quote(table.column(c)):
            continue
        found = pc.match_substring(table.column(c), BACKSLASH_QUOTE)  # by row: a fifth of a second per million
        if not pc.any(found).as_py():  # the bytes were the end of one text and the start of the next
            continue
        first = pc.index(found, arrow.scalar(True)).as_py()  # a Python True would import pandas (0.5 s)
        text = table.column(c)[first].as_py().decode(fmt.encoding, errors="replace")
        at = text.find(BACKSLASH_QUOTE)
        line = moved_line(csv_row_lines(path, fmt, table.column(c), c), first + 1, fmt.header_lines)
        log.warning("%s %s: column %r holds a backslash before a quote (%r; %d rows do): if the file escapes quotes "
                    "with a backslash, as Spark writes CSV, set %s (read without it, a quote after a backslash ends the "
                    "quoted text, and the rest runs on with its quotes as they are)", path,
                    row_place(first + 1, line), c,
                    text[max(0, at - 30):at + 30], pc.sum(found).as_py(), fmt.setting("escape_char", "\\"))


def _quote_closed_early(data: np.ndarray, delimiter: int) -> int | None:
    """The offset of the first field in `data` (a CSV's bytes) that starts with a quote whose next quote is followed
    by more of the field rather than by the delimiter or the line's end: ``"Hello," she said`` in a file that does not
    quote its fields, which read as quoted becomes ``Hello, she said``. None when there is none.

    In an RFC 4180 file every quote is in a quoted field, where they come in pairs (opening and closing, and a quote
    inside doubled), so a field opens exactly at a quote with an even number of quotes before it that follows a
    delimiter or a line break; and the quote after it either closes the field (a delimiter or the line's end
    follows) or starts a pair (a quote follows). So such a file never gives an offset; a quote inside a quoted
    field, after a delimiter or a line break there, has an odd number before it."""
    quotes = np.flatnonzero(data == 34)
    if len(quotes) < 2:
        return None
    before = np.where(quotes > 0, data[np.maximum(quotes - 1, 0)], 10)
    opening = ((before == delimiter) | (before == 10) | (before == 13)) & (np.arange(len(quotes)) % 2 == 0)
    opening[-1] = False  # the last quote closes nothing after it
    starts = np.flatnonzero(opening)
    after = quotes[starts + 1] + 1  # the byte after each opening quote's next quote
    inside = after < len(data)
    follows = np.full(len(starts), 10, dtype=np.uint8)
    follows[inside] = data[after[inside]]
    early = (follows != delimiter) & (follows != 10) & (follows != 13) & (follows != 34)
    return int(quotes[starts[np.argmax(early)]]) if early.any() else None


UNQUOTED_SCAN = 16 << 20


def _warn_of_unquoted_tsv(path: Path, fmt: CsvFormat) -> None:
    """A warning when a tab-separated file looks unquoted: a field that starts with a quote and has more text after
    its next quote (GLUE's TSV, Unix tools' output: ``"Hello," she said``), which read as quoted loses its quotes
    without an error. Looks at the first 16 MiB (0.03 s; a whole 100 MB file of quoted texts would take 0.2 s): a
    file written so has such fields all through."""
    try:
        with _open(path) as f:
            data = np.frombuffer(f.read(UNQUOTED_SCAN), dtype=np.uint8)
    except (OSError, pa.ArrowException):
        return
    at = _quote_closed_early(data, 9)
    if at is None:
        return
    line_start = int(data[:at].tobytes().rfind(b"\n")) + 1
    line_end = data[at:at + 200].tobytes().find(b"\n")
    shown = data[line_start:at + (line_end if line_end >= 0 else 200)].tobytes().decode(fmt.encoding, errors="replace")
    log.warning("%s line %d: a field starts with a quote and goes on after the next quote (%r): if the file does not "
                "quote its fields, as GLUE's TSV files and Unix tools write them, set %s (read as quoted, such a text "
                "loses its quotes)", path, int(np.count_nonzero(data[:at] == 10)) + 1, shown[:120],
                fmt.setting("quoting"))


def _has_backslash_quote(texts: pa.ChunkedArray) -> bool:
    """Whether the bytes of the column hold a backslash followed by a quote: read with NumPy at 0.02 s per million
    texts (a regular expression over the same bytes takes twice that, a kernel by row four times)."""
    for chunk in texts.chunks:
        data = chunk.buffers()[2] if len(chunk.buffers()) > 2 else None
        if data is None or data.size < 2:
            continue
        data = np.frombuffer(data, dtype=np.uint8)
        backslashes = np.flatnonzero(data[:-1] == 92)
        if (data[backslashes + 1] == 34).any():
            return True
    return False


def _locate_csv_error(path: Path, kind: str, read, parse, convert, error: Exception,
                      fmt: CsvFormat | None = None) -> DataError:
    """The first malformed row of a CSV, found by a single-threaded re-read (the fast read cannot number rows)."""
    from pyarrow import csv

    found = []

    def keep_first(row) -> str:
        found.append(row)
        return "error"

    def quiet(unraisable) -> None:
        # Arrow decodes the row's text before it calls the handler; a row that is not valid UTF-8 fails there,
        # and Arrow can only print that ("Exception ignored ..."). It is read again as Latin-1 below.
        if not (unraisable.object is keep_first and isinstance(unraisable.exc_value, UnicodeDecodeError)):
            hook(unraisable)

    hook = sys.unraisablehook
    utf8 = read.encoding.lower().replace("-", "") == "utf8"
    for encoding in (read.encoding, "latin-1") if utf8 else (read.encoding,):
        read.encoding = encoding  # Latin-1 decodes any bytes, and a line's bytes and number stay the same
        sys.unraisablehook = quiet
        try:
            csv.read_csv(_arrow_input(path), read_options=read, convert_options=convert,
                         parse_options=csv.ParseOptions(delimiter=parse.delimiter, newlines_in_values=parse.newlines_in_values,
                                                        escape_char=parse.escape_char, invalid_row_handler=keep_first))
        except pa.ArrowException:
            pass
        finally:
            sys.unraisablehook = hook
        if found:
            break
    if found and found[0].number is not None:
        row = found[0]
        header_rows = (0 if read.column_names else 1) + read.skip_rows  # rows are numbered as data rows
        shown = " (shown as Latin-1: the row is not valid UTF-8)" if utf8 and encoding == "latin-1" else ""
        escaped = (f"; the row has a backslash before a quote: a file that escapes quotes so, as Spark writes CSV, "
                   f"needs {fmt.setting('escape_char', chr(92))}" if fmt and not parse.escape_char and BACKSLASH_QUOTE in row.text
                   else "")
        if not escaped and fmt and fmt.quoting and re.search(f'(^|{re.escape(parse.delimiter)})"', row.text):
            escaped = (f"; a field of it starts with a quote: if the file does not quote its fields, as GLUE's TSV files "
                       f"and Unix tools write them, set {fmt.setting('quoting')}")
        number = row.number - header_rows
        line = _line_of_error(path, fmt, number, row.text) if fmt else None
        return DataError(f"{path} {row_place(number, line)}: expected {row.expected_columns} fields, found "
                         f"{row.actual_columns} (an unquoted delimiter or quote?): {row.text[:200]!r}{shown}{escaped}")
    return DataError(f"{path}: cannot read as {kind}: {error}")


@contextlib.contextmanager
def _csv_records(path: Path, fmt: CsvFormat, column: str | None = None) -> Iterator[Iterator[tuple[int, str]]]:
    """The data rows of a CSV/TSV file as Python's csv reader reads them in the dialect Arrow is given, one at a time:
    (the 1-based line it starts on, as editors number lines, its field of `column`, or "" without one). A quoted text
    may hold line breaks, and a blank line is no row, to Arrow either; the header (after Excel's ``sep=;`` line) is
    passed over. A second reading, for the rows a report names, not the common path."""
    kind = SUFFIXES[format_suffix(path)]
    encoding, delimiter, skip, _ = _csv_layout(path, fmt, kind)
    limit = pycsv.field_size_limit()
    pycsv.field_size_limit(sys.maxsize)  # a row may be megabytes long (a pasted log), past csv's 128 KiB
    try:
        with io.TextIOWrapper(_open(path), encoding="utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding,
                              errors="replace", newline="") as text:
            reader = pycsv.reader(text, delimiter=delimiter, quotechar='"', escapechar=fmt.escape_char, doublequote=True,
                                  quoting=pycsv.QUOTE_MINIMAL if fmt.quoting else pycsv.QUOTE_NONE, strict=False)

            def rows() -> Iterator[tuple[int, str]]:
                names, before, line = list(fmt.column_names or ()), skip + fmt.header_lines, 0
                at = names.index(column) if column in names else -1
                for record in reader:
                    start, line = line + 1, reader.line_num
                    if not record:
                        continue
                    if before:  # Excel's sep= line, the header
                        before -= 1
                        if not before and not names:
                            names = record
                            at = names.index(column) if column in names else -1
                        continue
                    yield start, record[at] if 0 <= at < len(record) else ""

            yield rows()
    finally:
        pycsv.field_size_limit(limit)


def csv_row_lines(path: Path, fmt: CsvFormat, texts: pa.ChunkedArray | pa.Array, column: str) -> np.ndarray | None:
    """Per data row of a CSV/TSV file, the line it starts on, where some row is not on ``row + 1`` (``row`` without a
    header row): a quoted text over several lines, blank lines between rows, Excel's ``sep=`` line. `texts` are the
    file's `column` as Arrow read it (as binary). None when each row is its own line after the header, or when
    Python's reading splits the rows otherwise than Arrow's did (another number of rows, or another text in one:
    malformed quoting, which the two mend differently): a report then says the row alone, rather than a line that may
    be wrong. Row by row, in memory of 8 bytes a row."""
    rows, header = len(texts), fmt.header_lines
    try:
        if _wide_encoding(path) is None and _line_breaks(path) == rows + header:  # a line per row, no blank line
            return None
        lines = np.zeros(rows, dtype=np.int64)
        with _csv_records(path, fmt, column) as records:
            n = 0
            for chunk in pc.cast(texts, pa.binary()).chunks:
                for start in range(0, len(chunk), 1 << 16):
                    for value in chunk.slice(start, 1 << 16).to_pylist():
                        line, field = next(records, (None, None))
                        # Arrow's text is UTF-8 (transcoded from the file's encoding); a null is an empty field
                        if line is None or field != (b"" if value is None else value).decode("utf-8", "replace"):
                            return None
                        lines[n] = line
                        n += 1
            if next(records, None) is not None:
                return None
    except (OSError, ValueError, DataError, pa.ArrowException, pycsv.Error) as e:  # the report stands without it
        log.debug("%s: rows not matched to lines: %s", path, e)
        return None
    return None if np.array_equal(lines, np.arange(1 + header, rows + 1 + header)) else lines


def _line_of_error(path: Path, fmt: CsvFormat, row: int, text: str) -> int | None:
    """The line data row `row` of a CSV/TSV file that Arrow could not parse starts on, where that is not ``row + 1``;
    None when that line is not where Arrow's `text` of the row starts (the readers disagree) or the file is unread."""
    try:
        with _csv_records(path, fmt) as records:
            line = next(itertools.islice(records, row - 1, None), (None,))[0]
        if line is None or line == row + fmt.header_lines:
            return None
        encoding = _csv_layout(path, fmt, SUFFIXES[format_suffix(path)])[0]
        with io.TextIOWrapper(_open(path), encoding=encoding, errors="replace", newline="") as f:
            found = next(itertools.islice(f, line - 1, None), "")
    except (OSError, ValueError, DataError, pa.ArrowException, pycsv.Error) as e:
        log.debug("%s: row %d not matched to a line: %s", path, row, e)
        return None
    first = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    return line if found.rstrip("\r\n").removeprefix("\ufeff") == first else None


def _line_breaks(path: Path) -> int:
    """How many lines a text file has: its line breaks, and a last line without one."""
    breaks, last = 0, b"\n"
    with _open(path) as f:
        while chunk := f.read(1 << 24):
            breaks, last = breaks + chunk.count(b"\n"), chunk[-1:]
    return breaks + (last != b"\n")


def jsonl_row_lines(path: Path, rows: int) -> np.ndarray | None:
    """Per row of a JSON Lines file of `rows` rows, its line, where that is not the row's number (blank lines
    between rows); None when each row is its line, or the file's non-blank lines are not `rows`."""
    try:
        if _line_breaks(path) == rows:
            return None
        with _open(path) as f:
            lines = np.asarray([number for number, line in enumerate(f, 1) if line.strip()], dtype=np.int64)
    except (OSError, pa.ArrowException) as e:
        log.debug("%s: rows not matched to lines: %s", path, e)
        return None
    return None if len(lines) != rows or np.array_equal(lines, np.arange(1, rows + 1)) else lines


def moved_line(lines: Sequence[int] | np.ndarray | None, row: int, header: int) -> int | None:
    """Row `row`'s line in `lines` (each row's, from `csv_row_lines` or `jsonl_row_lines`), where it is not the line
    the row's number puts it on (``row + header``); None where it is, or where the lines are not known."""
    if lines is None or not 0 < row <= len(lines) or int(lines[row - 1]) == row + header:
        return None
    return int(lines[row - 1])


class RowLines:
    """For reports: ``row N``, and ``row N, line M`` where a CSV/TSV file's row N is not on line N + 1 (`csv_row_lines`;
    N without a header row), or a JSON Lines file's not on line N (`jsonl_row_lines`). `files` maps the names reports
    give files (``_file``) to the files read; `table` holds their rows as read (with ``_file``, and `column` as
    binary). A file is read again only when a report first names one of its rows."""

    def __init__(self, files: dict[str, Path], fmt: CsvFormat, table: pa.Table, column: str):
        self._files, self._fmt, self._table, self._column = files, fmt, table, column
        self._lines: dict[str, tuple[np.ndarray | None, int]] = {}  # per file: each row's line; lines before row 1

    def line(self, file: str, row: int) -> int | None:
        if file not in self._lines:
            path = self._files.get(file)
            kind = SUFFIXES.get(format_suffix(path)) if path is not None else None
            mine = lambda: pc.equal(pc.cast(self._table.column("_file"), pa.string()), arrow.scalar(file))  # noqa: E731
            if kind in ("csv", "tsv"):
                self._lines[file] = (csv_row_lines(path, self._fmt, self._table.column(self._column).filter(mine()),
                                                   self._column), self._fmt.header_lines)
            elif kind == "jsonl" or kind == "json" and _json_lines_within(path):
                self._lines[file] = (jsonl_row_lines(path, pc.sum(mine()).as_py() or 0), 0)
            else:
                self._lines[file] = (None, 0)
        lines, header = self._lines[file]
        return moved_line(lines, row, header)

    def __call__(self, file: str, row: int) -> str:
        return row_place(row, self.line(file, row))


def row_place(row: int, line: int | None) -> str:
    """``row 30``, or ``row 30, line 59``."""
    return f"row {row}" if line is None else f"row {row}, line {line}"


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; a DataError naming the line that does not parse."""
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8").rstrip("\r\n")
                yield number, json.loads(text)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {number}: undecodable bytes: {e.reason}; save the file as UTF-8") from None
            except json.JSONDecodeError as e:  # where in the line: its end, for a record cut short
                at = "at the end of the line" if e.pos >= len(text) else f"at character {e.pos + 1}"
                # e.msg may end in "at" itself ("Unterminated string starting at")
                raise DataError(f"{path} line {number}: not valid JSON: {e.msg.removesuffix(' at')} {at}") from None


def _beyond_64_bits(value: Any) -> int | None:
    """The first whole number in a JSON value (at any depth) that Arrow's signed 64 bits cannot hold, or None."""
    if type(value) is int:
        return value if not -2**63 <= value < 2**63 else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((big for v in items if (big := _beyond_64_bits(v)) is not None), None)


def _exact_numbers(table: pa.Table, path: Path, cols: Columns, records: Callable[[], Iterable[tuple[int, Any]]],
                   unit: str) -> pa.Table:
    """`table`, read from JSON, unless its id or label column lost digits.

    JSON has one kind of number: a column of whole numbers is read as 64-bit floats when one of them is beyond 64
    bits or has a fraction, and a float holds whole numbers exactly only up to 2**53, so the ids
    12345678901234567890123 and 12345678901234567890124 would be read as one (a duplicate id, dropped with `drop`).
    The first such value is named, as the file writes it (`records`: (line or record number, parsed value))."""
    for c in (cols.id, cols.label):
        if not c or c not in table.column_names or not pa.types.is_floating(table.schema.field(c).type):
            continue
        inexact = arrow.to_numpy(pc.greater_equal(pc.abs(table.column(c)), arrow.scalar(float(2**53))), fill=False)
        if inexact.any():
            number, record = next(itertools.islice(records(), int(inexact.argmax()), None))
            value = record.get(c) if isinstance(record, dict) else None
            raise DataError(f"{path} {unit} {number}: {c} {value} is too large to be read exactly: the column is read as "
                            f"64-bit floating point, exact to 2**53 only, where it is {float(value or 0):.17g}, the "
                            f"same as numbers that differ from it in the last digits; write the {c} values as "
                            f"strings (\"{value}\") in the file")
    return table


def _null_line(path: Path, chunk: int = 1 << 20) -> int | None:
    """The number of the first line of a JSON Lines file that is ``null`` or starts with it, or None.

    pyarrow 26's JSON reader ends the process with a segmentation fault where a block it parses starts with a
    ``null`` line, or a line that starts with ``null`` (``nullx``, ``null 1``), as any line may start a block; it reads
    one elsewhere as a row of nulls. A line that starts with
    ``{`` (nearly all of them) is not looked at; the line starts are found with NumPy a MiB at a time (small
    arrays: large fresh ones cost more in page faults than the comparison): about 0.06 s for 100 MB."""
    carry, first_line = b"", 1  # the unfinished last line of the bytes before; the number of the line `part` starts with
    with _open(path) as f:
        while True:
            block = f.read(chunk)
            data = carry + block
            end = data.rfind(b"\n") + 1 if block else len(data)  # whole lines, and the last one at the end
            part, carry = data[:end], data[end:]
            if len(carry) > 64:  # its start says whether it starts with `null` (a long line is not copied on)
                carry = carry[:64]
            if part:
                view = np.frombuffer(part, dtype=np.uint8)
                breaks = np.flatnonzero(view == 10)
                starts = np.concatenate(([0], breaks + 1))[:len(breaks) + (not part.endswith(b"\n"))]
                for i in _maybe_null(view, starts).tolist():
                    start = int(starts[i])
                    stop = part.find(b"\n", start)
                    line = part[start:stop if stop >= 0 else len(part)]
                    if line.removeprefix(b"\xef\xbb\xbf" if first_line + i == 1 else b"").strip().startswith(b"null"):
                        return first_line + i  # `null`, or `null` and more: either crashes the reader
                first_line += len(breaks)
            if not block:
                return None


def _maybe_null(view: np.ndarray, starts: np.ndarray, window: int = 16) -> np.ndarray:
    """The indices of the lines (starting at `starts` in `view`) that may be ``null``: those whose first byte other
    than spacing or a byte-order mark, among their first `window`, is ``n`` (or that have none there). Vectorised, so
    that a file of many lines that do not start with ``{`` (pretty-printed JSON named .jsonl) costs no loop per line."""
    lines = np.flatnonzero(view[starts] != ord("{"))  # nearly all lines of JSON Lines start with it
    if not len(lines):
        return lines
    seen = view[np.minimum(starts[lines][:, None] + np.arange(window), len(view) - 1)]
    spacing = np.isin(seen, (0x20, 0x09, 0x0B, 0x0C, 0x0D, 0xEF, 0xBB, 0xBF))  # spaces, tab, VT, FF, CR; a BOM's bytes
    first = np.argmax(~spacing, axis=1)
    return lines[spacing.all(axis=1) | (seen[np.arange(len(lines)), first] == ord("n"))]


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


def _locate_json_error(records: Iterable[tuple[int, Any]], where: str, unit: str) -> str | None:
    """Where JSON records stop fitting one table: an entry that is not an object, or a field whose type changes."""
    first: dict[str, tuple[str, int]] = {}
    for number, record in records:
        if not isinstance(record, dict):
            return f"{where} {unit} {number}: expected a JSON object, found a {_json_kind(record)}"
        for key, value in record.items():
            kind = _json_kind(value)
            if kind == "null":
                continue
            seen_kind, seen_at = first.setdefault(key, (kind, number))
            if seen_kind != kind:
                return (f"{where} {unit} {number}: field {key!r} holds a {kind}, but a {seen_kind} on {unit} {seen_at}; "
                        "one column needs one type (quote the values to make them all strings)")
    return None


def _strip_block_row(error: Exception) -> str:
    """Arrow's JSON message without its ``in row N``, which counts from the start of a block, not the file."""
    return re.sub(r"\s+in row \d+\s*$", "", str(error))


def read_files(files: list[Path], cols: Columns, source: str | Path, fmt: CsvFormat = CsvFormat(),
               name: Callable[[Path], str] = str, optional: Collection[str] = (), typed_ids: bool = False) -> pa.Table:
    """One table of the input files (from ``list_input_files(source)``) with ``_file`` and ``_row``;
    `fmt` says how CSV/TSV files are written; `name` gives the ``_file`` that reports show for a file
    (the URI of a downloaded one). Configured columns in `optional` may be missing from a file: its rows
    hold nulls there. With `typed_ids`, an id column of numbers in every file (JSON, Parquet) stays numbers, as
    a caller that hands the ids back (``predict --output``) needs them to join its own table; else ids are text."""
    root = _static_root(source)
    tables = []
    label_typed = []  # per file: its labels were numbers or booleans (JSON, Parquet), not text
    label_types = []  # per file: its label column's type, as read
    class_names = None  # (the first file with them, the ClassLabel names of its label column)
    for path in files:
        # a column missing from the file comes from its key=value folder, else (when optional) is null
        folders = {**dict.fromkeys(optional), **{k: v for k, v in hive_partitions(path, root).items() if k in cols.required}}
        t = _read_one(path, cols, fmt, folders)
        for key, value in folders.items():  # Spark/Hive partitionBy: the column is in the folder name, not the file
            if key not in t.column_names:
                t = t.append_column(key, constant(value, t.num_rows) if value is not None else pa.nulls(t.num_rows, pa.string()))
        label_typed.append(bool(cols.label) and cols.label in t.column_names and _typed(t.schema.field(cols.label).type))
        label_types.append(t.schema.field(cols.label).type if cols.label and cols.label in t.column_names else pa.null())
        if (names := read_class_names(t)) is not None:
            if class_names is not None and names != class_names[1]:
                raise DataError(f"{source}: the files name their classes differently: {class_names[0]} has "
                                f"{class_names[1]} and {name(path)} has {names} (ClassLabel names kept by datasets)")
            class_names = class_names or (name(path), names)
        tables.append(_normalise(t, name(path), cols, typed_ids))
    if any(label_typed) and not all(label_typed):
        _check_label_spelling(tables, label_typed, cols.label, source)
    if typed_ids and cols.id and len({t.schema.field(cols.id).type for t in tables if t.num_rows}) > 1:
        # numbers in one file and text (or none, or other numbers: 7 beside 7.5 would become 7.0) in another: all
        # of them as text, as they are compared
        tables = [t.set_column(t.schema.get_field_index(cols.id), cols.id, _to_string(t.column(cols.id), source, cols.id))
                  for t in tables]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise DataError(f"{source}: the files do not share one schema: {e}") from None
    table = with_label_type(table, label_type(label_types))
    return table if class_names is None else _with_class_names(table, class_names[1])


# What the label column held in the source, when not text: its labels are compared, published and trained on as text
# ("0", "1", "true"), and `predict` gives them back as the source had them (0, 1, true), so they join the caller's
# table. Kept in the read table's schema metadata.
LABEL_TYPES = ("integer", "number", "boolean")
KIND_TYPES = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), None: pa.string()}  # one of each
_LABEL_TYPE_KEY = b"pipeline.label_type"


def label_type(types: Iterable[pa.DataType]) -> str | None:
    """``integer``, ``number`` (floating point, or whole numbers beside it) or ``boolean`` when every file's label
    column (`types`, as read) holds that kind; None when any holds text or another kind, or none holds any."""
    kinds = set()
    for t in types:
        t = t.value_type if pa.types.is_dictionary(t) else t
        if pa.types.is_null(t):  # a file whose labels are all null: it says nothing about the others
            continue
        kinds.add("integer" if pa.types.is_integer(t) else "number" if pa.types.is_floating(t)
                  else "boolean" if pa.types.is_boolean(t) else None)
    if kinds == {"integer", "number"}:
        return "number"
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def with_label_type(table: pa.Table, kind: str | None) -> pa.Table:
    """`table`, recording in its schema metadata that its (text) labels were of the `kind` in the source."""
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != _LABEL_TYPE_KEY}
    if kind is not None:
        metadata[_LABEL_TYPE_KEY] = kind.encode()
    return table.replace_schema_metadata(metadata or None)


def read_label_type(table: pa.Table) -> str | None:
    """What `with_label_type` recorded in `table`: the label column's kind in the source, or None (text)."""
    kind = (table.schema.metadata or {}).get(_LABEL_TYPE_KEY, b"").decode()
    return kind if kind in LABEL_TYPES else None


def typed_labels(names: list[str], kind: str | None) -> list[Any] | None:
    """Label names (text, as published and trained on) as the source wrote them: ints, floats or booleans for
    `kind`; None when `kind` is None or a name does not read as one (a folder edited by hand, say)."""
    if kind not in LABEL_TYPES:
        return None
    out: list[Any] = []
    for n in names:
        if kind == "boolean":
            if n not in ("true", "false"):
                return None
            out.append(n == "true")
            continue
        try:
            out.append(int(n) if kind == "integer" else float(n))
        except (TypeError, ValueError):
            return None
    return out


def _number_ids(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _typed(t: pa.DataType) -> bool:
    """A label column of numbers or booleans (not text, and not all null)."""
    values = t.value_type if pa.types.is_dictionary(t) else t
    return not pa.types.is_null(values) and not any(is_text(values) for is_text in _TEXT_TYPES)


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _check_label_spelling(tables: list[pa.Table], typed: list[bool], label: str, source: str | Path) -> None:
    """Files whose labels are numbers beside files whose labels are names: the numbers are most likely class ids
    and the names the same classes spelt out, which would make twice the classes. Numbers written as text
    ("0", "1" in a CSV) agree with numbers, and pass."""
    numbers = next((t for t, is_typed in zip(tables, typed) if is_typed and t.num_rows), None)
    if numbers is None:  # files of numbers, but no rows in them
        return
    named = None
    for table, is_typed in zip(tables, typed):
        if not is_typed:
            values = [v for v in pc.unique(table.column(label)).to_pylist() if v is not None]
            words = [v for v in values if not _NUMBER.fullmatch(v)]
            if words:
                named = (table.column("_file")[0].as_py(), words)
                break
    if named is None:
        return
    shown = [v for v in pc.unique(numbers.column(label)).to_pylist() if v is not None]
    raise DataError(f"{source}: column {label!r} holds numbers in {numbers.column('_file')[0].as_py()} "
                    f"({', '.join(map(repr, sorted(shown)[:SHOW]))}) but names in {named[0]} "
                    f"({', '.join(map(repr, sorted(named[1])[:SHOW]))}); a class spelt two ways would be two classes: "
                    "write the labels the same way in every file (names, or the same numbers)")


HIVE_FOLDER = re.compile(r"^([^=]+)=(.*)$")
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Spark and Hive name the folder of null values


def hive_partitions(path: Path, root: Path | None) -> dict[str, str | None]:
    """The ``key=value`` folders between `root` and the file, as ``partitionBy`` in Spark or Hive writes them.

    Values are URL-escaped in folder names (``a%2Fb``); the null folder gives None.
    """
    if root is None:
        return {}
    try:
        between = Path(path).parent.relative_to(root).parts
    except ValueError:
        return {}
    out: dict[str, str | None] = {}
    for part in between:
        if m := HIVE_FOLDER.match(part):
            value = unquote(m[2])
            out[unquote(m[1])] = None if value == HIVE_NULL else value
    return out


def name_below_source(path: Path, source: str | Path) -> str:
    """A data file's name below its source as configured, with ``/`` between folders: a file source's own name, a
    folder's or a glob pattern's file by its path below the folder (or the pattern's fixed part). Where the source
    lies is not in it: the same files read from another folder have the same names, as W&B names a file by
    ``add_file`` (its name) and ``add_dir`` (its path inside the folder)."""
    root = _static_root(source)
    try:
        return path.relative_to(root).as_posix() if root is not None else path.name
    except ValueError:  # not below it (cannot happen for a file the source listed): the name alone
        return path.name


def _static_root(source: str | Path) -> Path | None:
    """The folder a source's files are found under: the folder itself, or a glob pattern's fixed part."""
    path = Path(source)
    if path.is_dir():
        return path
    if not path.exists() and any(c in str(source) for c in "*?["):
        fixed = []
        for part in path.parts:
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        return Path(*fixed) if fixed else Path(".")
    return None


def _check_columns(names: list[str], where: str, cols: Columns) -> None:
    """Every configured column present once; a missing one names the file's columns and the likely match."""
    missing = [c for c in cols.required if c not in names]
    if missing:
        near = {c: likely_match(c, names) for c in missing}
        hint = "; ".join(f"{c!r} may be {n!r}" for c, n in near.items() if n is not None)
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; the file has: {', '.join(names) or 'none'}"
            + (f" ({hint})" if hint else "") + f" (set {cols.settings})"
        )
    doubled = [c for c in cols.required if names.count(c) > 1]
    if doubled:
        raise DataError(f"{where}: column(s) {', '.join(doubled)} appear more than once in the header; rename "
                        "all but one, so the configured column is not a guess")


def _normalise(t: pa.Table, name: str, cols: Columns, typed_ids: bool = False) -> pa.Table:
    """Check and keep the configured columns, text as binary, plus ``_file`` and ``_row`` (1-based); ids and labels
    as text (with `typed_ids`, ids of numbers stay numbers)."""
    _check_columns(t.column_names, name, cols)
    t = t.select(cols.required)
    for c in cols.text_columns:
        if not pa.types.is_binary(t.schema.field(c).type):
            t = t.set_column(t.schema.get_field_index(c), c, _to_binary(t.column(c), name, c))
    for c in (cols.id, cols.label):  # compared as strings: numeric ids in one file and text ids in the next agree
        if c is not None and c == cols.id and typed_ids and (_number_ids(t.schema.field(c).type) or
                                                             (pa.types.is_null(t.schema.field(c).type) and not t.num_rows)):
            continue  # numbers, or an empty file's column of no type
        if c and not pa.types.is_string(t.schema.field(c).type):
            t = t.set_column(t.schema.get_field_index(c), c, _to_string(t.column(c), name, c))
    t = t.append_column("_file", constant(name, t.num_rows))
    return t.append_column("_row", arrow.from_numpy(np.arange(1, t.num_rows + 1, dtype=np.int64)))


def constant(value: str, n: int) -> pa.DictionaryArray:
    """``value`` on every one of ``n`` rows, stored once (a dictionary), not as a string per row."""
    return pa.DictionaryArray.from_arrays(arrow.from_numpy(np.zeros(n, np.int32)), arrow.strings([value]))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).exists() and format_suffix(Path(source)) not in SUFFIXES


def saved_dataset(path: Path) -> bool:
    """Whether a folder is a Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset``),
    as ``datasets.load_from_disk`` tells them: its JSON files are datasets' own records, not data."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and
                                                      (path / "dataset_info.json").is_file())


def saved_dataset_files(path: Path) -> list[Path]:
    """Every file of a ``save_to_disk`` folder (Arrow shards and datasets' records): what its digests cover."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def load_saved_dataset(path: Path, cols: Columns) -> tuple[pa.Table, list[str] | None]:
    """A ``save_to_disk`` folder read as a hub dataset is: all its splits (one ``Dataset`` is one split), class ids
    as their ``ClassLabel`` names; and those names in id order (None when the label column has none)."""
    import datasets

    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the message is what matters
        raise DataError(f"{path}: a folder saved by datasets' save_to_disk that cannot be read: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    table, _, class_names = hub_table(dd, str(path), cols, named=lambda split: f"{path} ({split} split)")
    return table, class_names


def _class_ids_named(table: pa.Table, column: str, names: list[str], where: str) -> pa.Table:
    """The class ids of a ``ClassLabel`` column replaced by their names; -1 (or null) is no label, as the test
    splits of some hub datasets have it."""
    ids = pc.fill_null(table.column(column), -1).to_numpy(zero_copy_only=False)
    beyond = np.flatnonzero(ids >= len(names))
    if len(beyond):
        raise DataError(f"{where}: row {int(beyond[0]) + 1} has class id {int(ids[beyond[0]])} in column "
                        f"{column!r}, but its ClassLabel names only {len(names)} classes")
    named = np.array(names, dtype=object)[np.maximum(ids, 0)] if len(names) else np.full(len(ids), None, dtype=object)
    named[ids < 0] = None
    return table.set_column(table.schema.get_field_index(column), column, arrow.strings(named))


def _class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of `column` that Hugging Face ``datasets`` keeps in a Parquet or Arrow IPC file it
    writes (``to_parquet``, the hub's Parquet conversion, its ``.arrow`` files): its features, in the schema's
    ``huggingface`` metadata."""
    try:
        feature = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel" or not isinstance(feature.get("names"), list):
        return None
    if not pa.types.is_integer(schema.field(column).type):
        return None
    return [str(n) for n in feature["names"]]


_CLASS_NAMES_KEY = b"pipeline.class_names"


def _with_class_names(table: pa.Table, names: list[str]) -> pa.Table:
    """`table`, recording in its schema metadata the ``ClassLabel`` names its label column's ids had."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), _CLASS_NAMES_KEY: json.dumps(names).encode()})


def read_class_names(table: pa.Table) -> list[str] | None:
    """The ``ClassLabel`` names that `read_files` found in the files (Parquet written by ``datasets``), in id
    order; None when they had none."""
    raw = (table.schema.metadata or {}).get(_CLASS_NAMES_KEY)
    return json.loads(raw) if raw else None


def hub_table(dataset_dict, source: str, cols: Columns, named: Callable[[str], str] | None = None
              ) -> tuple[pa.Table, list[dict], list[str] | None]:
    """All splits of a Hugging Face ``DatasetDict`` as one table (class ids become their names), their
    sources, and the label column's ``ClassLabel`` names in id order (None when it has none). `named`: how a
    report names a split's rows (a hub dataset's: ``hf://datasets/ID/SPLIT``)."""
    tables, sources, class_names, label_types = [], [], None, []
    for split in sorted(dataset_dict):
        ds = dataset_dict[split]
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        name = named(split) if named else f"hf://datasets/{source}/{split}"
        feature = ds.features.get(cols.label)
        if feature is not None and hasattr(feature, "names") and cols.label in table.column_names:
            class_names = class_names or [str(n) for n in feature.names]
            table = _class_ids_named(table, cols.label, [str(n) for n in feature.names], name)
        label_types.append(table.schema.field(cols.label).type if cols.label in table.column_names else pa.null())
        tables.append(_normalise(table, name, cols))
        sources.append({"path": name, "fingerprint": ds._fingerprint, "rows": ds.num_rows})
    table = pa.concat_tables(tables, promote_options="permissive")
    return with_label_type(table, label_type(label_types)), sources, class_names


def load_hub_dataset(source: str, cols: Columns) -> tuple[pa.Table, list[dict], list[str] | None]:
    """A hub dataset id (online, or cached by ``datasets``); a DataError that says so when it cannot be had.

    When the hub cannot be reached, the dataset is read from the ``datasets`` cache alone, as with
    ``HF_HUB_OFFLINE=1``: left to itself, the hub client retries the connection five times with
    backoff, about 25 s, before datasets looks in its cache (or says it is not there).
    """
    import datasets

    reachable = _hub_reachable()
    try:
        with contextlib.nullcontext() if reachable else _hub_offline():
            dd = datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the message is what matters
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if reachable:
            why = (f"no Hugging Face hub dataset of that name could be loaded ({first}); hub ids need the network or "
                   "the datasets cache")
        else:
            why = ("the Hugging Face hub cannot be reached (offline) to load a hub dataset of that name, nor does the "
                   "datasets cache hold one")
            if not isinstance(e, (ConnectionError, FileNotFoundError)):  # not "not cached": say what it was
                why += f" that can be read ({first})"
        top = Path(source).parts[0]
        if "/" in source and Path(top).is_dir():
            why += f" (is the path misspelt? {top}/ is a local folder{near_name(Path(source))})"
        raise DataError(
            f"dataset.source {source!r} is not a file or folder, and {why}"
        ) from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    return hub_table(dd, source, cols)


def _hub_reachable() -> bool:
    """One request to the hub's endpoint (``HF_ENDPOINT``, through the hub client's own proxies), not retried."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False  # datasets reads its cache alone
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - any failure to get an answer means "not reachable"
        log.info("the Hugging Face hub (%s) cannot be reached (%s): reading the datasets cache only",
                 constants.ENDPOINT, type(e).__name__)
        return False
    return True


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for datasets and the hub client while the block runs (both read it at each call)."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
               pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)


def _to_binary(col: pa.ChunkedArray, path: Path | str, name: str) -> pa.ChunkedArray:
    """Any Arrow text type as binary: large and view layouts, and dictionaries of text (pandas categoricals)."""
    values = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if any(is_type(values) for is_type in _TEXT_TYPES):
        return pc.cast(col, pa.binary())
    if pa.types.is_null(col.type):
        return pa.chunked_array([pa.nulls(len(col), pa.binary())])
    raise DataError(f"{path}: column {name!r} holds {col.type}, not text")


def _to_string(col: pa.ChunkedArray, path: Path | str, name: str) -> pa.ChunkedArray:
    """An id or label column as plain strings: numbers, booleans, dictionaries, large and view strings."""
    if pa.types.is_null(col.type):
        return pa.chunked_array([pa.nulls(len(col), pa.string())])
    values = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if not (any(is_type(values) for is_type in _TEXT_TYPES) or pa.types.is_integer(values)
            or pa.types.is_floating(values) or pa.types.is_boolean(values) or pa.types.is_decimal(values)):
        raise DataError(f"{path}: column {name!r} holds {col.type}, not text or numbers")
    try:
        return pc.cast(col, pa.string())
    except pa.ArrowInvalid as e:  # binary that is not UTF-8: the first such row is named
        for i, value in enumerate(col.to_pylist(), 1):
            try:
                if isinstance(value, bytes):
                    value.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise DataError(f"{path} row {i}: column {name!r} is not valid UTF-8 text (byte {bad.start + 1} of "
                                f"{value[:40]!r}{'...' if len(value) > 40 else ''}: {bad.reason})") from None
        raise DataError(f"{path}: column {name!r} cannot be read as text: {e}") from None


def _decode(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary -> string; returns the strings (undecodable rows null) and a mask of undecodable rows."""
    try:  # chunk by chunk, no copy: the cast only checks the bytes
        return pc.cast(col, pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        values = col.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        out = []
        for i, v in enumerate(values):
            try:
                out.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                out.append(None)
        return arrow.strings(out), bad


def _codes(arr: pa.Array) -> np.ndarray:
    """Dense integer codes of the values (nulls get -1): equal values, equal codes."""
    return _encode(arr)[0]


def _encode(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(`_codes` of the values, the distinct values in code order)."""
    enc = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    return arrow.to_numpy(enc.indices, fill=-1).astype(np.int64), enc.dictionary


def _codes_by_hash(hashes: np.ndarray, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Dense codes of `values` (equal values, equal codes) from their 64-bit `hashes` (`split_order`).

    Sorting the hashes takes a fraction of the time of Arrow's hash table over the strings. Distinct
    hashes are distinct values, so all that is left to check is that the rows sharing a hash hold
    the same value; where two different values share one (about 2**-64 per pair) the values are
    encoded by Arrow instead. A null counts as the empty string, as in `split_order`.

    The codes are the hashes' ranks, so they do not depend on how rows with one hash are ordered:
    NumPy's quicksort (vectorised, 0.03 s for a million) serves, where a stable sort takes 0.11 s.
    """
    n = len(hashes)
    by_hash = np.argsort(hashes)  # rows with one hash in any order: each is compared with the one sorted first
    ranked = hashes[by_hash]
    starts = np.empty(n, dtype=bool)
    starts[:1] = True
    np.not_equal(ranked[1:], ranked[:-1], out=starts[1:])
    codes = np.empty(n, dtype=np.int64)
    codes[by_hash] = np.cumsum(starts) - 1
    if starts.all():  # every hash once: every value once
        return codes
    shared = np.flatnonzero(~starts)  # positions (in hash order) of the rows whose hash an earlier row has
    first = by_hash[np.flatnonzero(starts)[codes[by_hash[shared]]]]  # the row sorted first with each one's hash
    texts = pc.fill_null(values, arrow.scalar("")) if values.null_count else values
    same = pc.equal(texts.take(arrow.from_numpy(by_hash[shared])), texts.take(arrow.from_numpy(first)))
    if not pc.all(same).as_py():
        return _codes(values)
    return codes


def _first_occurrence(codes: np.ndarray) -> np.ndarray:
    """True where a code appears for the first time.

    ``dictionary_encode`` numbers values in order of first appearance, so a row holds a new value
    exactly when its code is above every code before it: one pass, no sort and no hash table.
    """
    if not len(codes):
        return np.zeros(0, dtype=bool)
    seen_max = np.maximum.accumulate(codes)
    prev = np.empty_like(seen_max)
    prev[0] = -1
    prev[1:] = seen_max[:-1]
    return codes > prev


def _distinct_per_group(groups: np.ndarray, values: np.ndarray, n_groups: int, n_values: int) -> np.ndarray:
    """How many distinct values each group has (all arguments dense codes >= 0)."""
    if n_groups * n_values <= 64_000_000:  # a (group, value) count table of at most 512 MB
        seen = np.bincount(groups * n_values + values, minlength=n_groups * n_values).reshape(n_groups, n_values)
        return np.count_nonzero(seen, axis=1)
    pairs = np.unique(groups * n_values + values)
    return np.bincount(pairs // n_values, minlength=n_groups)


def validate(table: pa.Table, cols: Columns, min_per_class: int, split_seed: int | None = None,
             labels: list[str] | None = None, line: Callable[[str, int], int | None] | None = None) -> Validated:
    """Find every problem, one reason per row (the first found). Vectorised: no loop per row.

    With `labels` (``dataset.labels``), a row whose label is not one of them is an ``unknown_label``. `line` gives
    the line a row shown in a report starts on, where that is not row + 1 (`RowLines.line`).

    With `split_seed`, each clean row's `split_order` rank comes back too (`Validated.order`): it is
    computed from the texts as compared while the other core encodes them.
    """
    n = table.num_rows
    files = table.column("_file")
    rows = arrow.to_numpy(table.column("_row"))
    reason = np.zeros(n, dtype=np.int8)  # 0: valid; k: problems[k - 1]
    kinds: list[str] = []
    problems: list[Problem] = []
    line = line or (lambda file, row: None)

    def flag(kind: str, mask: np.ndarray, detail: str = "",
             notes: Callable[[np.ndarray], list[str]] | None = None) -> None:
        """`notes`: given the rows shown, what each one is in conflict with (another row, say)."""
        mask = mask & (reason == 0)
        if mask.any():
            idx = np.flatnonzero(mask)
            kinds.append(kind)
            reason[idx] = len(kinds)
            where = files.take(arrow.from_numpy(idx[:SHOW])).to_pylist()
            shown = [(f, int(rows[i])) for f, i in zip(where, idx[:SHOW])]
            problems.append(Problem(kind, shown, detail, len(idx), notes(idx[:SHOW]) if notes else [],
                                    [line(f, r) for f, r in shown]))

    def row_name(i: int, beside: int | None = None) -> str:
        """Row `i` as seen from row `beside`: its number (and line), and its file when that is another one."""
        file, row = files[int(i)].as_py(), int(rows[i])
        place = row_place(row, line(file, row))
        return place if beside is not None and file == files[int(beside)].as_py() else f"{file} {place}"

    ids = blank_as_missing(pc.cast(table.column(cols.id), pa.string())) if cols.id else None
    decoded = {}
    for c in cols.text_columns:
        strings, bad = _decode(table.column(c))
        decoded[c] = strings
        flag("undecodable_text", bad, f"column {c!r} is not valid UTF-8; a CSV saved in another encoding needs dataset.encoding, e.g. cp1252")
    # The second core folds the texts into the key copies are found by (then numbers them, without a split
    # seed), then numbers the ids, while this thread checks the rows and hashes the keys into split ranks.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate-texts") as pool:
        key_job = pool.submit(copy_key, decoded, cols)
        copies_job = pool.submit(lambda: _codes(key_job.result())) if split_seed is None else None
        ids_job = pool.submit(_codes, ids) if ids is not None else None
        for c in cols.text_columns:
            flag("empty_text", arrow.to_numpy(is_blank(decoded[c]), fill=True), f"column {c!r} is empty or null")
        label = table.column(cols.label).combine_chunks()
        if pa.types.is_null(label.type):
            label = pa.nulls(n, pa.string())
        elif not pa.types.is_string(label.type):  # numbers, large or view strings, dictionaries: plain strings
            label = pc.cast(label, pa.string())
        label = pc.utf8_trim_whitespace(label)
        label_codes, label_values = _encode(label)
        # A CSV's header line again inside the data (files joined with `cat` keep each one's header): its label is
        # the label column's name and its text the text column's. Looked for among the rows of that label only.
        if (named := pc.index(label_values, arrow.scalar(cols.label)).as_py()) >= 0:  # not Array.index: it imports pandas
            rows_named = np.flatnonzero(label_codes == named)
            heading = decoded[cols.text].take(arrow.from_numpy(rows_named))
            again = np.zeros(n, dtype=bool)
            again[rows_named] = arrow.to_numpy(pc.equal(heading, arrow.scalar(cols.text)), fill=False)
            flag("header_row", again, f"the row repeats the header ({cols.text!r}, {cols.label!r}): files joined "
                 "one after another keep each one's header line")
        flag("null_label", arrow.to_numpy(pc.equal(pc.utf8_length(label), arrow.scalar(0)), fill=True),
             f"column {cols.label!r} is empty or null")
        if labels is not None:
            unknown = arrow.to_numpy(pc.invert(pc.is_in(label, value_set=arrow.strings(labels))), fill=False)
            unknown &= reason == 0
            if unknown.any():
                found = sorted(label.take(arrow.from_numpy(np.flatnonzero(unknown))).unique().to_pylist())
                flag("unknown_label", unknown, f"label(s) {', '.join(near_label(f, labels) for f in found[:SHOW])}"
                     f"{' and more' if len(found) > SHOW else ''} are not in dataset.labels")

        order = None
        if split_seed is None:
            text_codes = copies_job.result()
        else:  # the ranks (a loop in Python) are hashed here while the second core numbers the ids (Arrow)
            key = key_job.result()
            order = split_order(key, split_seed)
            text_codes = _codes_by_hash(order, key)
        if ids_job is not None:
            codes = ids_job.result()
            first = _first_occurrence(codes)
            # codes number the ids in order of first appearance: id k is first on row firsts[k]
            firsts = np.flatnonzero(first)
            flag("duplicate_id", (codes >= 0) & ~first, f"the same {cols.id!r} appears on an earlier row",
                 notes=lambda shown: [f"{cols.id} {v!r}, first on {row_name(firsts[codes[i]], i)}"
                                      for i, v in zip(shown, ids.take(arrow.from_numpy(shown)).to_pylist())])

    def other_label(i: int, among: np.ndarray, keys: np.ndarray, key: int) -> str:
        """Row `i`'s label, and the first row of `among` (whose texts are `keys`) with the text `key` and another label."""
        j = int(among[(keys == key) & (label_codes[among] != label_codes[i])][0])
        return f"label {label[i].as_py()!r}; {row_name(j, i)} has {label[j].as_py()!r}"

    n_labels = int(label_codes.max()) + 1 if n else 1
    n_texts = int(text_codes.max()) + 1 if n else 0

    def copies_with_other_labels(ok: np.ndarray) -> np.ndarray:
        """The valid rows whose text (as compared) other valid rows have with another label."""
        labels_per_text = _distinct_per_group(text_codes[ok], label_codes[ok], n_texts, n_labels)
        mixed = np.zeros(n, dtype=bool)
        mixed[ok] = labels_per_text[text_codes[ok]] > 1  # only valid rows: a null text has no code (-1)
        return mixed

    mixed = np.zeros(n, dtype=bool)
    if n_texts < n:  # some text repeats (or is null): look for copies with different labels
        mixed = copies_with_other_labels(reason == 0)
        if mixed.any():  # a conflict is the very same text with two labels; only these few rows are compared as written
            idx = np.flatnonzero(mixed)
            exact = _codes(copy_key({c: v.take(arrow.from_numpy(idx)) for c, v in decoded.items()}, cols, as_written=True))
            per_exact = _distinct_per_group(exact, label_codes[idx], int(exact.max()) + 1, n_labels)
            conflict = np.zeros(n, dtype=bool)
            conflict[idx] = per_exact[exact] > 1
            text_of = dict(zip(idx.tolist(), exact.tolist()))
            flag("conflicting_label", conflict, "the same text appears with different labels",
                 notes=lambda shown: [other_label(i, idx, exact, text_of[i]) for i in shown.tolist()])

    ok = reason == 0
    # Copies of a text with one label stay in one split (`stratified_split`), so a label needs as many
    # distinct texts as there are splits.
    if n_texts == n:  # no text repeats: a label's distinct texts are its rows (no table of labels x texts)
        per_label = np.bincount(label_codes[ok], minlength=n_labels)
    else:
        per_label = _distinct_per_group(label_codes[ok], text_codes[ok], n_labels, max(n_texts, 1))
    small_codes = np.flatnonzero((per_label > 0) & (per_label < min_per_class))
    if len(small_codes):
        small = sorted(label_values.take(arrow.from_numpy(small_codes)).to_pylist())
        flag("class_too_small", ok & np.isin(label_codes, small_codes),
             f"label(s) {', '.join(map(repr, small))} have fewer than {min_per_class} distinct texts, too few to split")

    if "_split" in table.column_names:  # the user's own splits: every label must have train rows to learn from
        ok = reason == 0
        is_train = arrow.to_numpy(pc.equal(pc.cast(table.column("_split"), pa.string()), arrow.scalar("train")))
        in_train = np.bincount(label_codes[ok & is_train], minlength=n_labels) > 0
        untrainable = ok & ~is_train & ~in_train[label_codes]
        if untrainable.any():
            missing = sorted(label_values.take(arrow.from_numpy(np.unique(label_codes[untrainable]))).to_pylist())
            flag("label_not_in_train", untrainable,
                 f"label(s) {', '.join(map(repr, missing))} have no rows in the train split, so a model cannot learn them")

    if mixed.any():  # left once the conflicts and the other problems are out: copies that differ in case or spacing
        mixed = copies_with_other_labels(reason == 0)
    clean = pa.table({
        **({cols.id: ids} if cols.id else {}),
        cols.text: decoded[cols.text],
        **({cols.text_pair: decoded[cols.text_pair]} if cols.text_pair else {}),
        cols.label: label,
        "_file": files,
        "_row": table.column("_row"),
        **({"_split": table.column("_split")} if "_split" in table.column_names else {}),  # the user's own splits
    })
    keep = reason == 0
    mixed_idx = np.flatnonzero(mixed & keep)
    dropped_idx = np.flatnonzero(~keep)
    dropped = clean.take(arrow.from_numpy(dropped_idx)).append_column(
        "reason", arrow.strings(kinds).take(arrow.from_numpy(reason[dropped_idx].astype(np.int64) - 1)))
    return Validated(
        table=clean if not len(dropped_idx) else clean.filter(arrow.from_numpy(keep)),
        dropped={p.kind: p.count for p in problems},
        dropped_rows=dropped,
        problems=problems,
        texts=text_codes[keep],
        order=order[keep] if order is not None else None,
        mixed_label_copies=len(mixed_idx),
        mixed_label_examples=[f"{row_name(i)} ({other_label(i, mixed_idx, text_codes[mixed_idx], text_codes[i])})"
                              for i in mixed_idx[:SHOW].tolist()],
    )


def is_blank(texts: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """True where a text is empty or only whitespace (null where it is null). utf8_is_space stops at the first
    other character: no trimmed copy of every text is made."""
    return pc.or_kleene(pc.equal(pc.binary_length(texts), arrow.scalar(0)), pc.utf8_is_space(texts))


def blank_as_missing(ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Ids (text) that are empty or only whitespace as null: no id, as a CSV's empty field is. A quoted `""`, JSON's
    ``""`` and spaces alike, so that rows without an id are not duplicates of one another in some formats only."""
    blank = is_blank(ids)
    if not pc.any(blank).as_py():
        return ids
    return pc.if_else(blank, arrow.strings([None])[0], ids)


def copy_key(decoded: dict[str, pa.ChunkedArray], cols: Columns, as_written: bool = False) -> pa.ChunkedArray | pa.Array:
    """What makes two rows copies: their text (and pair), compared ignoring case and spacing unless `as_written`.

    Texts are compared after NFKC (full-width letters, non-breaking spaces), lower case, and runs of
    whitespace as one space with none at either end: "Reset my password", "reset  my password " and
    "RESET MY PASSWORD" are one text, so they are kept in one split. Only the few rows that need it
    are rewritten; the common case (ASCII, single spaces) costs three scans of the column.
    """
    key = [decoded[c] if as_written else _fold(decoded[c]) for c in cols.text_columns]
    return key[0] if len(key) == 1 else pc.binary_join_element_wise(*key, arrow.scalar("\x1f"))


def _fold(texts: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    wide = arrow.to_numpy(pc.invert(pc.string_is_ascii(texts)), fill=False)  # ASCII is its own NFKC form
    if wide.any():
        texts = _rewrite(texts, wide, lambda t: pc.utf8_lower(pc.utf8_normalize(t, "NFKC")))
    texts = pc.ascii_lower(texts)  # leaves the non-ASCII rows, lowered above, as they are
    odd = _odd_spacing(texts)
    if odd.any():
        # runs of ASCII spacing are one space, and that space is trimmed at either end; other characters (U+0085,
        # U+001C) are left as the texts without odd spacing have them
        texts = _rewrite(texts, odd, lambda t: pc.utf8_trim(pc.replace_substring_regex(t, r"[\t\n\v\f\r ]+", " "), " "))
    return texts


def _odd_spacing(texts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a text has spacing that folding rewrites: a tab, newline, vertical tab, form feed or carriage
    return, two spaces in a row, or a space at either end. ASCII whitespace only: NFKC has already made the
    other spaces (U+00A0, U+2003, ...) plain ones. Where the text is UTF-8, these bytes are those characters.

    What ``match_substring_regex(texts, r"[\t\n\v\f\r]|  |^ | $")`` finds, read from the column's bytes
    with NumPy in less than half the time (0.07 s against 0.16 s for a million texts); a null is False.
    """
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    marks = []
    for chunk in chunks:
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):  # string views
            chunk = chunk.cast(pa.string())
        _, offsets_buffer, data_buffer = chunk.buffers()
        width = 8 if pa.types.is_large_string(chunk.type) else 4
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if width == 8 else np.int32, count=len(chunk) + 1,
                                offset=chunk.offset * width).astype(np.int64)
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        seen = data[offsets[0]:offsets[-1]]
        space = seen == 32
        odd_byte = (seen - np.uint8(9)) <= 4  # \t \n \v \f \r (bytes 9-13); the others wrap round above 4
        odd_byte[1:] |= space[1:] & space[:-1]  # the second of two spaces (across two texts: both ends checked below)
        mark = np.zeros(len(chunk), dtype=bool)
        mark[np.searchsorted(offsets, np.flatnonzero(odd_byte) + offsets[0], side="right") - 1] = True
        filled = np.flatnonzero(offsets[1:] > offsets[:-1])
        mark[filled] |= (data[offsets[filled]] == 32) | (data[offsets[filled + 1] - 1] == 32)
        if chunk.null_count:
            mark &= arrow.to_numpy(chunk.is_valid())
        marks.append(mark)
    return np.concatenate(marks) if marks else np.zeros(0, dtype=bool)


def _rewrite(texts: pa.ChunkedArray | pa.Array, rows: np.ndarray, how) -> pa.Array:
    """`how` applied to the `rows` marked only: Unicode and regex kernels cost several scans of the column."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    mask = arrow.from_numpy(rows)
    return pc.replace_with_mask(texts, mask, how(texts.filter(mask)))


def format_problems(problems: list[Problem], source: str, dropped: bool = False) -> str:
    """The report of invalid rows: what stops the stage, or, with `dropped` (``on_invalid: drop``), what it left out."""
    total = sum(p.count for p in problems)
    lines = [f"{source}: {total} invalid row(s) dropped (dataset.on_invalid=drop)" if dropped else
             f"dataset validation failed for {source}: {total} invalid row(s)"]
    for p in problems:
        notes = [f" ({note})" for note in p.notes] or [""] * len(p.rows)
        at = p.lines or [None] * len(p.rows)
        shown = "; ".join(f"{f} {row_place(r, line)}{note}" for (f, r), line, note in zip(p.rows[:SHOW], at, notes))
        more = f"; ... and {p.count - SHOW} more" if p.count > SHOW else ""
        lines.append(f"  {p.kind} ({p.count} rows, {p.detail}): {shown}{more}")
    lines.append(f"they are counted in the version's metadata (dropped) and listed in the run's data/dropped_rows table "
                 f"(the first {DROPPED_ROWS_LOGGED:,})" if dropped else
                 "nothing was published; fix the data or set dataset.on_invalid=drop (dropped rows are counted and recorded)")
    return "\n".join(lines)


SPLIT_ORDER_SLICE = 1 << 16


def split_order(texts: pa.Array, seed: int) -> np.ndarray:
    """Where each text ranks when its label's rows are split: XXH3-64 of the text's UTF-8 bytes, seeded
    with the split seed (XXH3's output is fixed by its specification, on every machine). It depends
    on the text and the seed alone, not on the other rows, so a text keeps its place (and its split)
    from one dataset version to the next."""
    import xxhash

    hash64 = xxhash.xxh3_64_intdigest
    as_bytes = pc.cast(texts, pa.binary())  # bytes straight from the buffer: no str to encode again
    out = np.empty(len(texts), dtype=np.uint64)
    # A slice's Python objects at a time: the memory of one is reused for the next (a third faster at 1M
    # rows than making every object at once, which is mostly the kernel handing out fresh pages).
    for start in range(0, len(texts), SPLIT_ORDER_SLICE):
        part = as_bytes.slice(start, SPLIT_ORDER_SLICE).to_pylist()
        out[start:start + len(part)] = np.fromiter((hash64(t or b"", seed) for t in part), dtype=np.uint64, count=len(part))
    return out  # a null ranks as ""


def stratified_split(labels: np.ndarray, fractions: dict[str, float], order: np.ndarray,
                     groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Row indices per split: every label split by the same fractions, rows ranked by `order`.

    Each label's texts are ranked by `order` (`split_order`: a hash of the text seeded with the seed);
    the first go to test, the next to validation, the rest to train, as many as come closest to the
    fractions (with ``train`` 0, the rest go to validation, or to test when it is the only split). Rows
    with the same `groups` code (copies of one text, which share their `order`) go
    to one split together, so no test row is a copy of a train row. A text's rank does not depend
    on the other rows: adding or removing rows moves only the few texts next to a cut from one
    split to the next, and a test row of one dataset version stays a test row in the next. Each
    split with a fraction above 0 gets at least one text of every label; the indices of each split
    come back in input order.
    """
    names = ("train", "validation", "test")
    rest = next(s for s in names if fractions[s] > 0)  # the split that takes the rows the cuts leave
    split_of = np.full(len(labels), names.index(rest), dtype=np.int8)  # an index into `names`
    by_label = np.argsort(labels, kind="stable")  # each label's rows together, in input order
    for idx in np.split(by_label, np.flatnonzero(np.diff(labels[by_label])) + 1):
        if not len(idx):  # no rows at all
            continue
        n = len(idx)
        n_test = max(1, round(n * fractions["test"])) if fractions["test"] > 0 and rest != "test" else 0
        n_val = max(1, round(n * fractions["validation"])) if fractions["validation"] > 0 and rest == "train" else 0
        if groups is None:  # every row its own group: the same cuts, without finding groups
            first, inverse, sizes = np.arange(n), np.arange(n), np.ones(n, dtype=np.int64)
        else:
            _, first, inverse, sizes = np.unique(groups[idx], return_index=True, return_inverse=True, return_counts=True)
        ranked = _ranked(order[idx][first], first)
        k_test = _groups_for(sizes[ranked], n_test, leave=1 + (n_val > 0))
        k_val = _groups_for(sizes[ranked[k_test:]], n_val, leave=1)
        position = np.empty(len(ranked), dtype=np.int64)
        position[ranked] = np.arange(len(ranked))
        row_position = position[inverse.reshape(-1)]
        split_of[idx[row_position < k_test]] = 2
        split_of[idx[(row_position >= k_test) & (row_position < k_test + k_val)]] = 1
    return {s: np.flatnonzero(split_of == i) for i, s in enumerate(names)}


def _ranked(keys: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The order of `keys` (hashes), a tie (two texts with one hash, about 2**-64 a pair) broken by `first`.

    NumPy's quicksort (vectorised) sorts 64-bit keys in a third of the time of a stable sort or a
    lexsort; it is used unless two keys are equal, when its order of the two would be arbitrary."""
    ranked = np.argsort(keys)
    in_order = keys[ranked]
    if len(in_order) > 1 and (in_order[1:] == in_order[:-1]).any():
        return np.lexsort((first, keys))
    return ranked


def _groups_for(sizes: np.ndarray, rows: int, leave: int) -> int:
    """How many of these groups (in order) come closest to `rows` rows: at least one when rows are wanted,
    and at most all but `leave`, so the splits after this one get a group each."""
    if rows <= 0 or not len(sizes):
        return 0
    k = int(np.argmin(np.abs(np.cumsum(sizes) - rows))) + 1
    return max(1, min(k, len(sizes) - leave))
