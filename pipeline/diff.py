"""What changed between two artifact versions: files, metadata and, for datasets, rows.

``pipeline artifacts diff A B`` answers the first question about a model that got better or worse
than the one before: what changed in its data and config? Files are compared by content hash,
metadata key by key (nested keys dotted: ``config.train.learning_rate``), and two dataset versions
row by row from their verified split files: rows are matched by id when both versions have one,
else by their text (and pair), and each match is unchanged, relabelled, moved to another split, or
only on one side.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.printable import one_line
from pipeline.registry.base import ArtifactVersion

SPLITS = ("train", "validation", "test")


class DiffError(PipelineError):
    """Two versions that cannot be compared (exit code 2)."""


@dataclass
class RowDiff:
    key: str  # "id", or "text" when a version has no id column
    counts: dict[str, int]  # added, removed, relabelled, moved, unchanged; edited (by id) or copies (by text)
    examples: dict[str, list[dict[str, Any]]]  # the first few of each kind but unchanged
    label_counts: dict[str, tuple[int, int]]  # label -> (rows in a, rows in b), all splits


@dataclass
class Diff:
    a: ArtifactVersion
    b: ArtifactVersion
    files: dict[str, list[str]] | None  # added, removed, changed paths (None: `skipped` says why)
    metadata: list[tuple[str, Any, Any]]  # (dotted key, value in a, value in b); ABSENT where a side lacks it
    rows: RowDiff | None = None  # two datasets with different content
    skipped: str | None = None  # why files and rows were not compared

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.ref,
            "b": self.b.ref,
            "type": self.a.type,
            "same_content": self.a.digest == self.b.digest,
            "files": self.files,
            # a key one side lacks has no "a" (or "b") entry
            "metadata": [{"key": k, **({"a": va} if va is not ABSENT else {}), **({"b": vb} if vb is not ABSENT else {})}
                         for k, va, vb in self.metadata],
            **({"rows": {"key": self.rows.key, "counts": self.rows.counts, "examples": self.rows.examples,
                         "label_counts": {k: list(v) for k, v in self.rows.label_counts.items()}}} if self.rows else {}),
            **({"skipped": self.skipped} if self.skipped else {}),
        }


def diff_versions(registry, ref_a: str, ref_b: str, examples: int = 5) -> Diff:
    a, b = registry.resolve(ref_a, include_deleted=True), registry.resolve(ref_b, include_deleted=True)
    if a.type != b.type:
        raise DiffError(f"{a.ref} is a {a.type!r} artifact and {b.ref} a {b.type!r} artifact; compare versions of one type")
    out = Diff(a=a, b=b, files=None, metadata=_dict_diff(_configs_completed(a.metadata, a.type), _configs_completed(b.metadata, b.type)))
    gone = [v.ref for v in (a, b) if v.deleted_at]
    if gone:  # the record keeps metadata and lineage; files and rows went with the delete
        out.skipped = f"{' and '.join(gone)} {'was deleted; its' if len(gone) == 1 else 'were deleted; their'} files are gone"
        return out
    files_a = {f.path: f.digest for f in a.files}
    files_b = {f.path: f.digest for f in b.files}
    out.files = {
        "added": sorted(set(files_b) - set(files_a)),
        "removed": sorted(set(files_a) - set(files_b)),
        "changed": sorted(p for p in set(files_a) & set(files_b) if files_a[p] != files_b[p]),
    }
    if a.type == "dataset" and a.digest != b.digest:
        if getattr(registry, "read_only", False):  # a registry this user cannot write: verified copies in a temporary folder
            with tempfile.TemporaryDirectory(prefix="artifacts-diff-") as tmp:
                out.rows = _row_diff(registry.fetch(a, Path(tmp) / "a").path, registry.fetch(b, Path(tmp) / "b").path,
                                     examples)
        else:  # the registry's own copies, which the stages that read these versions reuse
            out.rows = _row_diff(registry.fetch(a).path, registry.fetch(b).path, examples)
    return out


def _configs_completed(metadata: dict[str, Any], kind: str) -> dict[str, Any]:
    """The metadata of a version of type `kind` as compared: the recorded config with the keys added since at their
    defaults (a version made before a setting existed ran as its default does, so that is no change), only the
    groups that make such a version, and without the input signatures that reuse matches (hashes of
    what `config`, `dataset`, `code` and `packages` already show)."""
    from pipeline.config import MODEL_GROUPS, with_defaults

    metadata = {k: v for k, v in metadata.items() if k != "input_signatures"}
    if not isinstance(metadata.get("config"), dict):
        return metadata
    config = with_defaults(metadata["config"])
    # A dataset is made by `dataset.*` alone, a model by the groups finetune reads: the rest of the config its run
    # recorded (a dataset version has train.* too) did not shape it, and a change there is no change to it.
    groups = {"dataset": ("dataset",), "model": MODEL_GROUPS}.get(kind)
    if groups is not None:
        config = {g: config[g] for g in groups if g in config}
    return {**metadata, "config": config}


class _Absent:
    """A key one version's metadata does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def _dict_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Differing leaves as (dotted key, a, b). A subtree only one side has is one entry, not one per leaf;
    lists of records of equal length are compared record by record."""
    changes = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if isinstance(va, dict) and isinstance(vb, dict):
            changes += _dict_diff(va, vb, name)
        elif (isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb)
              and all(isinstance(x, dict) and isinstance(y, dict) for x, y in zip(va, vb))):
            for i, (x, y) in enumerate(zip(va, vb)):
                changes += _dict_diff(x, y, f"{name}.{i}")
        elif va != vb or type(va) is not type(vb):
            changes.append((name, va, vb))
    return changes


def _read(folder) -> tuple[Any, list[str]]:
    """All rows of a dataset version with a ``split`` column; the columns its rows are matched on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import constant

    parts = []
    for split in SPLITS:
        table = pq.read_table(folder / f"{split}.parquet")
        parts.append(table.append_column("split", constant(split, table.num_rows).cast(pa.string())))
    table = pa.concat_tables(parts, promote_options="permissive")
    keys = ["id"] if "id" in table.column_names else [c for c in ("text", "text_pair") if c in table.column_names]
    return table, keys


def _row_diff(folder_a, folder_b, examples: int) -> RowDiff:
    import pyarrow.compute as pc

    table_a, keys_a = _read(folder_a)
    table_b, keys_b = _read(folder_b)
    texts = [c for c in ("text", "text_pair") if c in table_a.column_names and c in table_b.column_names]
    shown = [c for c in ("id", "text", "text_pair") if c in table_a.column_names and c in table_b.column_names]
    if keys_a == keys_b == ["id"] and (table_a.column("id").null_count or table_b.column("id").null_count):
        # An id column can leave rows without one (ids are checked for duplicates, not required): those rows are
        # matched by their text, as a version without ids is; else they would be one null id that matches nothing.
        with_a, with_b = pc.is_valid(table_a.column("id")), pc.is_valid(table_b.column("id"))
        by_id = _match(table_a.filter(with_a), table_b.filter(with_b), ["id"], shown, examples)
        by_text = _match(table_a.filter(pc.invert(with_a)), table_b.filter(pc.invert(with_b)), texts, shown, examples)
        counts = {kind: by_id[0].get(kind, 0) + by_text[0].get(kind, 0) for kind in KINDS}
        found = {kind: (by_id[1].get(kind, []) + by_text[1].get(kind, []))[:examples] for kind in KINDS
                 if kind != "unchanged"}
        key = "id, else text"
    else:
        keys = keys_a if keys_a == keys_b else texts
        counts, found = _match(table_a, table_b, keys, shown, examples)
        key = "id" if keys == ["id"] else "+".join(keys)
    label_a = pc.value_counts(table_a.column("label")).to_pylist()
    label_b = pc.value_counts(table_b.column("label")).to_pylist()
    ca = {d["values"]: d["counts"] for d in label_a}
    cb = {d["values"]: d["counts"] for d in label_b}
    label_counts = {label: (ca.get(label, 0), cb.get(label, 0)) for label in sorted(set(ca) | set(cb))}
    return RowDiff(key=key, counts=counts, examples=found, label_counts=label_counts)


# What a row of one version is in the other, in the order they are told (each row the first that applies). Matched
# by id, a row's text can be `edited`; matched by text, a text can have more or fewer `copies`.
KINDS = ("added", "removed", "relabelled", "edited", "moved", "copies", "unchanged")


def _match(table_a, table_b, keys: list[str], shown: list[str], examples: int
           ) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
    """The rows of two versions matched on `keys`: (rows of each kind, the first `examples` of each kind but unchanged,
    with the `shown` columns)."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline import arrow

    def per_key(table):
        # One row per key: an id is unique in a version; copies of a text share one label (a conflict is
        # invalid at publish) and, split by dataset-publish, one split; `copies` counts them.
        grouped = table.group_by(keys).aggregate([("label", "min"), ("split", "min"), ("label", "count"),
                                                 *((c, "min") for c in shown if c not in keys)])
        names = {"label_min": "label", "split_min": "split", "label_count": "copies", **{f"{c}_min": c for c in shown}}
        return grouped.rename_columns([names.get(c, c) for c in grouped.column_names])

    joined = per_key(table_a).join(per_key(table_b), keys=keys, join_type="full outer",
                                   left_suffix="_a", right_suffix="_b", coalesce_keys=True)
    joined = joined.sort_by([(k, "ascending") for k in keys])  # a hash join's order is not fixed; sorted, the examples are
    in_a = arrow.to_numpy(pc.is_valid(joined.column("copies_a")))
    in_b = arrow.to_numpy(pc.is_valid(joined.column("copies_b")))
    both = in_a & in_b
    same_label = arrow.to_numpy(pc.equal(joined.column("label_a"), joined.column("label_b")), fill=False)
    same_split = arrow.to_numpy(pc.equal(joined.column("split_a"), joined.column("split_b")), fill=False)
    same_copies = arrow.to_numpy(pc.equal(joined.column("copies_a"), joined.column("copies_b")), fill=False)
    same_text = np.ones(len(both), dtype=bool)  # matched by id, a row's text (or pair) can have been edited
    for c in shown:
        if c not in keys:
            # equal, or null on both sides (the id of rows matched by text: they have none)
            same_text &= arrow.to_numpy(pc.or_kleene(pc.equal(joined.column(f"{c}_a"), joined.column(f"{c}_b")),
                                                     pc.and_(pc.is_null(joined.column(f"{c}_a")),
                                                             pc.is_null(joined.column(f"{c}_b")))), fill=False)
    kinds = {
        "added": in_b & ~in_a,
        "removed": in_a & ~in_b,
        "relabelled": both & ~same_label,
        "edited": both & same_label & ~same_text,
        "moved": both & same_label & same_text & ~same_split,
        "copies": both & same_label & same_text & same_split & ~same_copies,
    }
    kinds["unchanged"] = both & same_label & same_text & same_split & same_copies
    if keys == ["id"]:
        del kinds["copies"]  # an id is on one row
    else:
        del kinds["edited"]  # the text is the key

    def value(row: dict, column: str) -> Any:
        """A key column as it is; another (the text, matched by id) as `a` has it, or `b` for an added row."""
        if column in row:
            return row[column]
        return row[f"{column}_a"] if row[f"{column}_a"] is not None else row[f"{column}_b"]

    found: dict[str, list[dict[str, Any]]] = {}
    for kind, mask in kinds.items():
        if kind == "unchanged":
            continue
        rows = joined.take(arrow.from_numpy(mask.nonzero()[0][:examples])).to_pylist()
        found[kind] = [
            {**{c: value(r, c) for c in shown},
             **({"label": r["label_b"], "split": r["split_b"]} if kind == "added" else
                {"label": r["label_a"], "split": r["split_a"]} if kind == "removed" else
                {"label": [r["label_a"], r["label_b"]], "split": [r["split_a"], r["split_b"]],
                 **({"copies": [r["copies_a"], r["copies_b"]]} if kind == "copies" else {}),
                 **({c: [r[f"{c}_a"], r[f"{c}_b"]] for c in shown if c not in keys} if kind == "edited" else {}),
                 # matched by id, a relabelled row's text may have been rewritten too: then both texts
                 **({c: [r[f"{c}_a"], r[f"{c}_b"]] for c in shown if c not in keys and r[f"{c}_a"] != r[f"{c}_b"]}
                    if kind == "relabelled" else {})})}
            for r in rows]
    return {k: int(v.sum()) for k, v in kinds.items()}, found


def format_diff(d: Diff, limit: int = 20) -> str:
    lines = [f"{d.a.ref} -> {d.b.ref} ({d.a.type})"]
    if d.a.digest == d.b.digest:
        lines.append("  same content (equal digests)")
    if d.files is None:
        lines.append(f"  files and rows: not compared ({d.skipped})")
    else:
        changed = [f"{kind} {', '.join(paths)}" for kind, paths in d.files.items() if paths]
        lines.append(f"  files: {'; '.join(changed) if changed else 'the same'}")
    if d.metadata:
        lines.append(f"  metadata ({len(d.metadata)} keys differ):")
        for key, va, vb in sorted(d.metadata, key=lambda change: _telling(change[0]))[:limit]:
            lines.append(f"    {key}: {_list_change(va, vb) or _numbers_change(va, vb) or f'{_short(va)} -> {_short(vb)}'}")
        if len(d.metadata) > limit:
            lines.append(f"    ... and {len(d.metadata) - limit} more (--json lists them all)")
    else:
        lines.append("  metadata: the same")
    if d.rows:
        r = d.rows
        lines.append(f"  rows (matched by {r.key}): " + ", ".join(f"{n} {kind}" for kind, n in r.counts.items()))
        for kind, rows in r.examples.items():
            if rows:
                lines.append(f"    {kind} (first {len(rows)}):")
                for row in rows:
                    lines.append("      " + "  ".join(f"{k}={_short(_unless_same(v), 60)}" for k, v in row.items()))
        moved = [f"{one_line(label)} {a} -> {b}" for label, (a, b) in r.label_counts.items() if a != b]
        lines.append(f"  rows per label: {'; '.join(moved) if moved else 'the same'}")
    return "\n".join(lines)


# What the report lists first, of the metadata keys that differ: what made the version (its config, data, base and
# code), then what it scored; a model's evaluation records (a metric per class each) come last.
_FIRST = ("config", "dataset", "base_model", "training", "code", "packages", "metrics")
_LAST = ("evaluation", "evaluations", "reproductions", "alias_moves")


def _telling(key: str) -> tuple[int, int, str]:
    top = key.split(".", 1)[0]
    if top in _FIRST:
        return 0, _FIRST.index(top), key
    return (2, _LAST.index(top), key) if top in _LAST else (1, 0, key)


def _numbers_change(a: Any, b: Any) -> str | None:
    """Two floats with as few digits as tell them apart (at least 4): ``0.9231 -> 0.8824``, not 16 digits each."""
    if not (isinstance(a, float) and isinstance(b, float)):
        return None
    for digits in range(4, 18):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1]:
            return f"{shown[0]} -> {shown[1]}"
    return f"{a!r} -> {b!r}"


def _unless_same(value: Any) -> Any:
    """A row's [before, after] as one value when it did not change (a moved row keeps its label)."""
    return value[0] if isinstance(value, list) and len(value) == 2 and value[0] == value[1] else value


def _list_change(a: Any, b: Any, width: int = 80) -> str | None:
    """Two lists of plain values too long to show whole (`label_names`), as what changed: the items one has and the
    other not, or an order changed (which, for label names, changes every label id). None for anything else."""
    if not (isinstance(a, list) and isinstance(b, list)) or any(isinstance(x, (dict, list)) for x in (*a, *b)):
        return None
    import json

    def listed(values: list) -> str:
        text = one_line(json.dumps(values, default=str, ensure_ascii=False))
        return text if len(text) <= width else text[: width - 3] + "..."

    if max(len(listed(a)), len(listed(b))) < width:
        return None  # shown whole
    added, removed = [x for x in b if x not in a], [x for x in a if x not in b]
    said = [f"{len(a)} -> {len(b)} items"]
    if added:
        said.append(f"added {listed(added)}")
    if removed:
        said.append(f"removed {listed(removed)}")
    if not added and not removed:
        said.append("the same items in another order" if len(a) == len(b) else "the same items, some repeated")
    elif [x for x in a if x in b] != [x for x in b if x in a]:
        said.append("the items in both in another order")
    return "; ".join(said)


def _short(value: Any, width: int = 80) -> str:
    import json

    if value is ABSENT:
        return "(absent)"
    # a line break or tab inside a text would break the report's lines: written as \n, \t (`one_line`)
    text = one_line(value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str,
                                                                    ensure_ascii=False))  # Höhe, not H\u00f6he
    if isinstance(value, list) and len(value) == 2 and not isinstance(value[0], (dict, list)):
        text = f"{_short(value[0], width // 2)} -> {_short(value[1], width // 2)}"
    return text if len(text) <= width else text[: width - 3] + "..."
