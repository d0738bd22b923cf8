"""``pipeline predict --model-dir DIR TEXT...``: classify text with a fetched or deployed model.

Texts come from the arguments, from stdin (one per line), or from a data file (``--input``: any
format dataset-publish reads, one text per row). Predictions are printed, or written to a CSV,
TSV, JSON Lines or Parquet file (``--output``), which appears only once it is complete.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUTPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, metavar="DIR", help="a folder from deploy-fetch (or any fetched model version, or a Hugging Face "
                   "sequence classifier's folder)")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none or '-': one text per line on stdin. A sentence-pair model takes "
                        "TEXT<TAB>PAIR")
    p.add_argument("--input", metavar="PATH",
                   help="classify the rows of a file, folder or glob pattern instead (CSV, TSV, JSON Lines, JSON, "
                        "Parquet or Arrow IPC, compressed too, as dataset-publish reads them)")
    p.add_argument("--text-column", metavar="NAME",
                   help="with --input: the text column (default: the column the model's training data had, as "
                        "deploy-fetch records it in manifest.json; else text)")
    p.add_argument("--text-pair-column", metavar="NAME",
                   help="with --input: the second text of a sentence-pair model (default: the training data's, as "
                        "for --text-column)")
    p.add_argument("--id-column", metavar="NAME", help="with --input: a column to identify each row in the output "
                                                      "(default: the training data's id column, in the files that have "
                                                      "it, as for --text-column; else the file and row)")
    p.add_argument("--delimiter", metavar="CHAR",
                   help="with --input: the field separator of CSV files (default: a comma; a tab for .tsv); '\\t' is a tab")
    p.add_argument("--escape-char", metavar="CHAR",
                   help="with --input: the character that escapes a quote inside a quoted CSV field ('\\' for CSV as "
                        "Spark writes it; default: quotes are doubled)")
    p.add_argument("--no-quoting", dest="quoting", action="store_false",
                   help="with --input: CSV/TSV fields are not quoted; a quote is a character of the text (GLUE's TSV "
                        "files, Unix tools' output)")
    p.add_argument("--encoding", metavar="NAME",
                   help="with --input: the text encoding of CSV/TSV files (default utf-8), e.g. cp1252 for Excel's CSV "
                        "on Windows")
    p.add_argument("--output", metavar="PATH",
                   help=f"write the predictions to this file ({', '.join(OUTPUT_FORMATS)}) instead of printing them")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="labels to show per text (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run an architecture shipped as Python code in the model's folder (a model fine-tuned with "
                        "model.trust_remote_code); read that code first")


CHUNK = 1024  # texts classified together: length-ordered batches within it, memory bounded by it


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar for loading a small model is noise here
    from pipeline.errors import ConfigError, PipelineError
    from pipeline.predict import load
    from pipeline.results import check_writable, replaced_whole

    if args.top_k < 1:
        raise PipelineError("--top-k must be at least 1")
    if args.input and args.texts:
        raise ConfigError("give texts either as TEXT arguments or with --input, not both")
    for flag in ("text_pair_column", "id_column", "text_column", "delimiter", "escape_char", "encoding"):
        if getattr(args, flag) is not None and not args.input:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --input")
    if not args.quoting and not args.input:
        raise ConfigError("--no-quoting goes with --input")
    if args.input:
        _default_columns(args)
        args.csv_format = _csv_format(args)
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output}: name a {', '.join(OUTPUT_FORMATS)} file")
    if output is not None and not output.is_dir() and not replaced_whole(output):  # written whole, renamed over it
        raise ConfigError(f"--output {output} is not a regular file (a link or a pipe); give the path of a file, which "
                          "is replaced whole (or print to stdout, without --output)")
    if output is not None:  # a folder, or one that cannot be made or written: said before the model loads
        check_writable(output, "--output")
    rows = _file_rows(args) if args.input else _line_rows(args.texts)
    first = list(itertools.islice(rows, CHUNK))
    if not first:
        raise PipelineError("no text to classify: pass TEXT arguments, lines on stdin, or an --input file with rows")
    classifier = load(args.model_dir, trust_remote_code=args.trust_remote_code)
    if args.input and classifier.takes_pairs != bool(args.text_pair_column):
        raise ConfigError(f"{args.model_dir} classifies text pairs: name the second text's column with --text-pair-column"
                          if classifier.takes_pairs else
                          f"{args.model_dir} classifies single texts; --text-pair-column is for sentence-pair models")
    # labels that were numbers or booleans in the training data come as such (--json, .jsonl, .parquet); printed, and
    # in CSV and TSV, as the data wrote them ("true", not Python's "True")
    args.as_written = dict(zip(classifier.labels, classifier.label_names))
    chunks = itertools.chain([first], iter(lambda: list(itertools.islice(rows, CHUNK)), []))
    # Each chunk is classified and passed on when done: a pipe sees results as they come, and memory does not
    # grow with the input. An error further in stops there, naming its row or line.
    if output is None:
        done = 0
        for chunk in chunks:
            for record in _classify(classifier, chunk, args):
                _print(record, args)
            done += len(chunk)
            sys.stdout.flush()
    else:
        done = _write(output, (record for chunk in chunks for record in _classify(classifier, chunk, args)), args.top_k,
                      args.as_written)
        print(f"{done} predictions written to {output}", file=sys.stderr)
    if classifier.truncated:
        logging.getLogger(__name__).warning(
            "%d of %d texts are longer than the model's max_length (%d tokens): only their beginning was classified",
            classifier.truncated, done, classifier.max_length)
    return 0


def _classify(classifier, chunk: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    from pipeline.errors import PipelineError

    if classifier.takes_pairs and not args.input:  # stdin and arguments carry the pair after a tab
        unpaired = next((r["where"] for r in chunk if "\t" not in r["text"]), None)
        if unpaired is not None:
            raise PipelineError(f"{args.model_dir} classifies text pairs: give each as TEXT<TAB>PAIR "
                                f"({unpaired} has no tab)")
        chunk = [{**r, **dict(zip(("text", "text_pair"), r["text"].split("\t", 1)))} for r in chunk]
    pairs = [r["text_pair"] for r in chunk] if classifier.takes_pairs else None
    predictions = classifier.predict([r["text"] for r in chunk], pairs, top_k=args.top_k)
    out = []
    for r, pred in zip(chunk, predictions):
        shown = {"id": r["id"]} if "id" in r else {}
        shown |= {"text": r["text"], **({"text_pair": r["text_pair"]} if pairs is not None else {})}
        out.append({**shown, **pred.to_dict()})
    return out


def _print(record: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(record))
        return
    # one line per text, one column per field: a file's text or id, or a label as the training data wrote it, may
    # hold line breaks, tabs or a terminal's escape sequences (--json and --output keep them as they are)
    scores = "\t".join(f"{_one_line(args.as_written[t['label']])}\t{t['score']:.4f}" for t in record["top"])
    texts = [_one_line(record["text"]), *([_one_line(record["text_pair"])] if "text_pair" in record else [])]
    print("\t".join([*([_one_line(str(record["id"]))] if "id" in record else []), scores, *texts]))


def _one_line(text: str) -> str:
    from pipeline.printable import one_line

    return one_line(text, breaks_as_spaces=True)


def _write(path: Path, records: Iterator[dict[str, Any]], top_k: int, as_written: dict[Any, str]) -> int:
    """The records as a table file, written beside `path` and renamed into place once complete; in CSV and TSV, the
    labels `as_written` names them."""
    from pipeline.errors import PipelineError

    partial = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    kind = path.suffix.lower()
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            try:
                for batch in iter(lambda: list(itertools.islice(records, CHUNK)), []):
                    table = pa.Table.from_pylist([_flat(r, top_k) for r in batch])
                    writer = writer or pq.ParquetWriter(partial, table.schema, compression="zstd")
                    writer.write_table(table)
                    n += len(batch)
            finally:
                if writer is not None:
                    writer.close()
        else:
            import csv

            with open(partial, "w", newline="", encoding="utf-8") as f:
                writer = None
                for r in records:
                    row = _flat(r, top_k, as_written)
                    if kind == ".jsonl":
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    else:
                        if writer is None:
                            writer = csv.DictWriter(f, fieldnames=list(row), delimiter="\t" if kind == ".tsv" else ",",
                                                    lineterminator="\n")
                            writer.writeheader()
                        writer.writerow(row)
                    n += 1
        os.replace(partial, path)
    except OSError as e:
        raise PipelineError(f"--output {path}: cannot write it: {e.strerror or e}") from None
    finally:
        partial.unlink(missing_ok=True)
    return n


def _flat(record: dict[str, Any], top_k: int, as_written: dict[Any, str] | None = None) -> dict[str, Any]:
    """One table row: the texts, the label and its confidence, then the next labels and scores up to `top_k`;
    with `as_written`, the labels as text."""
    label = (lambda value: as_written[value]) if as_written else (lambda value: value)
    row = {k: record[k] for k in ("id", "text", "text_pair") if k in record}
    row |= {"label": label(record["label"]), "confidence": record["confidence"]}
    for i, t in enumerate(record["top"][1:top_k], 2):
        row |= {f"label_{i}": label(t["label"]), f"score_{i}": t["score"]}
    return row


def _line_rows(argv: list[str]) -> Iterator[dict[str, Any]]:
    """The texts from the arguments, or one per non-blank line of stdin (UTF-8, a leading BOM dropped), as read."""
    from pipeline.errors import PipelineError

    if argv and argv != ["-"]:
        for i, text in enumerate(argv, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes the locale could not decode arrive as surrogates
                raise PipelineError(f"TEXT argument {i} is not valid UTF-8") from None
        yield from ({"text": t, "where": f"input {i}"} for i, t in enumerate(argv, 1))
        return
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(f"stdin line {n} is not valid UTF-8 (byte {e.start + 1}: {e.reason}); "
                                "convert the input to UTF-8, e.g. with iconv") from None
        if line.strip():
            yield {"text": line.rstrip("\r\n"), "where": f"input {n}"}


def _default_columns(args: argparse.Namespace) -> None:
    """Text columns not named take the names the model's training data had (``input_columns`` in the
    manifest.json deploy-fetch writes), so a file shaped like that data needs no flags; else ``text``."""
    try:
        manifest = json.loads((Path(args.model_dir) / "manifest.json").read_text(encoding="utf-8"))
        trained = manifest.get("input_columns") or {}
    except (OSError, ValueError, AttributeError):
        trained = {}
    if not isinstance(trained, dict):
        trained = {}
    defaulted = []
    if args.text_column is None:
        args.text_column = trained.get("text") if isinstance(trained.get("text"), str) else "text"
        defaulted.append(args.text_column)
    if args.text_pair_column is None and isinstance(trained.get("text_pair"), str):
        args.text_pair_column = trained["text_pair"]
        defaulted.append(args.text_pair_column)
    # the training data's ids where a file has that column (a file shaped like it); else rows are named by file and row
    args.id_optional = args.id_column is None and isinstance(trained.get("id"), str)
    if args.id_optional:
        args.id_column = trained["id"]
    args.columns_from = (f"; by default {' and '.join(map(repr, defaulted))}, the columns of the model's training data"
                         if trained and defaulted else "")


def _csv_format(args: argparse.Namespace):
    """--delimiter, --escape-char and --encoding, checked as dataset.delimiter, dataset.escape_char and
    dataset.encoding are ('\\t' is a tab)."""
    from pipeline.config import check_delimiter, check_encoding, check_escape_char
    from pipeline.data import CsvFormat
    from pipeline.errors import ConfigError

    try:
        delimiter = check_delimiter("\t" if args.delimiter == "\\t" else args.delimiter)
    except ValueError as e:
        raise ConfigError(f"--delimiter {args.delimiter!r}: {e}") from None
    try:
        escape_char = check_escape_char(args.escape_char, delimiter, args.quoting, quoting_off="--no-quoting")
    except ValueError as e:
        raise ConfigError(f"--escape-char {args.escape_char!r}: {e}") from None
    try:
        encoding = check_encoding(args.encoding) if args.encoding is not None else "utf-8"
    except ValueError as e:
        raise ConfigError(f"--encoding: {e}") from None
    return CsvFormat(encoding=encoding, delimiter=delimiter, flags=True, escape_char=escape_char, quoting=args.quoting)


def _file_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The rows of `--input` as dataset-publish reads files: every row, in order; a missing text is ""."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data import (Columns, DataError, RowLines, _decode, blank_as_missing, is_blank, list_input_files,
                               read_files)

    cols = Columns(text=args.text_column, label=None, id=args.id_column, text_pair=args.text_pair_column,
                   settings="--text-column / --text-pair-column / --id-column to match" + args.columns_from)
    files = list_input_files(args.input, "--input")
    table = read_files(files, cols, args.input, args.csv_format,
                       optional=[cols.id] if getattr(args, "id_optional", False) else (), typed_ids=True)
    texts = {}
    for key, column in (("text", cols.text), ("text_pair", cols.text_pair)):
        if column:
            place = RowLines({str(f): f for f in files}, args.csv_format, table, column)  # "row 12, line 15"

            def named(i: int) -> str:
                file = table.column("_file")[i].as_py()
                return f"{file} {place(file, table.column('_row')[i].as_py())}"

            decoded, bad = _decode(table.column(column))
            if bad.any():
                raise DataError(f"{named(int(bad.argmax()))}: column {column!r} is not "
                                f"valid {'UTF-8' if args.csv_format.encoding == 'utf-8' else args.csv_format.encoding}; "
                                "a CSV saved in another encoding needs --encoding, e.g. cp1252")
            texts[key] = pc.fill_null(decoded, "")
            blank = is_blank(texts[key])
            if (n_blank := pc.sum(blank).as_py() or 0):
                first = pc.index(blank, True).as_py()
                logging.getLogger(__name__).warning(
                    "%d of %d rows have no text in column %r (empty, blank or missing; the first: %s): they are "
                    "classified as the empty text, so their labels say nothing about them", n_blank, table.num_rows,
                    column, named(first))
    ids = table.column(cols.id) if cols.id else None
    if ids is not None and pa.types.is_string(ids.type):
        ids = blank_as_missing(ids)  # no id, as dataset-publish reads it
    if ids is not None and ids.null_count and getattr(args, "id_optional", False):  # named by file and row: text
        ids = pc.cast(ids, "string")
    for start in range(0, table.num_rows, CHUNK):
        part = {k: v.slice(start, CHUNK).to_pylist() for k, v in texts.items()}
        files, rows = (table.column(c).slice(start, CHUNK).to_pylist() for c in ("_file", "_row"))
        keys = ids.slice(start, CHUNK).to_pylist() if ids is not None else [None] * len(rows)
        if getattr(args, "id_optional", False) or ids is None:  # a row without the default id: its file and row
            keys = [f"{f}:{r}" if k is None else k for k, f, r in zip(keys, files, rows)]
        for i, key in enumerate(keys):
            yield {"id": key, **{k: v[i] for k, v in part.items()}}
