"""pipeline.arrow: the pandas-free conversions agree with pyarrow's own, and a publish's data path needs no pandas."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import arrow
from tests.conftest import REPO


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint8", "uint64", "float32", "float64", "bool"])
@pytest.mark.parametrize("n", [0, 1, 13, 64])
def test_from_numpy_and_back_agree_with_pyarrow(dtype, n):
    values = (np.arange(n) % 3 == 1) if dtype == "bool" else (np.arange(n) * 7 - 20).astype(dtype)
    converted = arrow.from_numpy(values)
    assert converted.equals(pa.array(values))
    assert converted.type == pa.array(values).type
    assert np.array_equal(arrow.to_numpy(converted), values) and arrow.to_numpy(converted).dtype == values.dtype


def test_to_numpy_reads_slices_and_chunks_where_their_bits_start():
    bits = np.array([True, False, True, True, False, False, True, False, True, True, False], dtype=bool)
    array = arrow.from_numpy(bits)
    for start in range(len(bits)):  # a slice of a bitmap starts mid-byte
        assert arrow.to_numpy(array.slice(start)).tolist() == bits[start:].tolist()
    numbers = arrow.from_numpy(np.arange(10, dtype=np.int64))
    assert arrow.to_numpy(numbers.slice(3, 4)).tolist() == [3, 4, 5, 6]
    chunked = pa.chunked_array([numbers.slice(0, 2), numbers.slice(7), numbers.slice(0, 0)])
    assert arrow.to_numpy(chunked).tolist() == [0, 1, 7, 8, 9]
    assert arrow.to_numpy(pa.chunked_array([], pa.int32())).dtype == np.int32


def test_to_numpy_fills_nulls_only_when_told_how():
    with_nulls = pa.array([1, None, 3], pa.int32())
    assert arrow.to_numpy(with_nulls, fill=-1).tolist() == [1, -1, 3]
    assert arrow.to_numpy(pa.array([True, None, False]), fill=True).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="1 null"):
        arrow.to_numpy(with_nulls)
    with pytest.raises(TypeError, match="numbers or booleans, not string"):
        arrow.to_numpy(pa.array(["a"]))
    with pytest.raises(TypeError, match="1-D array of numbers"):
        arrow.from_numpy(np.array(["a"], dtype=object))


def test_strings_and_scalars_agree_with_pyarrow():
    values = ["train", None, "", "naïve ☕ 日本", None]
    assert arrow.strings(values).equals(pa.array(values, pa.string()))
    assert arrow.strings(values).null_count == 2
    assert arrow.strings([]).equals(pa.array([], pa.string()))
    assert arrow.scalar("train").equals(pa.scalar("train"))
    assert arrow.scalar(0).equals(pa.scalar(0))
    assert arrow.scalar(True).equals(pa.scalar(True))
    assert arrow.scalar("\x1f", pa.binary()).equals(pa.scalar(b"\x1f"))


def test_reading_validating_and_splitting_leave_pandas_unimported(tmp_path):
    """pyarrow imports pandas (half a second) on its first conversion from Python or to NumPy; W&B's
    warm-up thread imports it while the data is prepared, which only overlaps if the data path never
    waits for it. Bad rows (dropped), repeated texts and sentence pairs take every branch of validation."""
    lines = ["id,text,topic,label"]
    for i in range(60):
        lines.append(f"r{i},question {i % 30},topic {i % 3},{['a', 'b', 'c'][i % 3]}")
    lines += ["r0,dup id,topic,a", "x1,,topic,b", "x2,no label,topic,", "x3,question 1,topic 1,c"]
    src = tmp_path / "data.csv"
    src.write_text("\n".join(lines) + "\n")
    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.stages.dataset_publish import prepare\n"
        f"cfg = load_config(None, ['dataset.name=t', 'model.name=m', 'dataset.source={src}', 'dataset.id_column=id',\n"
        f"                         'dataset.text_pair_column=topic', 'dataset.on_invalid=drop', 'tracking.dir={tmp_path / 'track'}'])\n"
        "tables, manifest, dropped = prepare(cfg)\n"
        "print(sum(manifest['num_rows'].values()), dropped.num_rows, manifest['repeated_texts'], 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kept, dropped, repeated, pandas_imported = out.stdout.split()
    assert (int(kept) + int(dropped), pandas_imported) == (64, "False")
    assert int(dropped) >= 3 and int(repeated) > 0


def test_the_reader_s_warnings_leave_pandas_unimported(tmp_path):
    """The warnings of a CSV read (a backslash before a quote, a TSV that looks unquoted) take Arrow scalars, not
    Python values, which pyarrow converts by importing pandas."""
    src = tmp_path / "spark.csv"
    src.write_text('id,text,label\n1,"he said \\"hi\\" today",a\n', encoding="utf-8")
    tsv = tmp_path / "glue.tsv"
    tsv.write_text('id\ttext\tlabel\n1\t"Hello," she said\ta\n', encoding="utf-8")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.data import Columns, read_files\n"
        f"for p in (Path({str(src)!r}), Path({str(tsv)!r})):\n"
        "    read_files([p], Columns(text='text', label='label', id='id'), p)\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "holds a backslash before a quote" in out.stderr and "goes on after the next quote" in out.stderr
    assert out.stdout.split() == ["False"]


def test_a_whole_publish_imports_no_pandas_and_w_and_b_still_spots_a_dataframe(tmp_path):
    """W&B asks of each logged value whether it is a DataFrame, importing pandas to ask; `pipeline.tracking`
    answers from sys.modules instead, so a whole dataset-publish (run, tables, charts) imports no pandas,
    while a real DataFrame, once pandas is imported, is still one to W&B (a Table can be made from it)."""
    src = tmp_path / "data.csv"
    src.write_text("text,label\n" + "".join(f"question {i},{'abc'[i % 3]}\n" for i in range(30)))
    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.stages import dataset_publish\n"
        f"cfg = load_config(None, ['dataset.name=t', 'model.name=m', 'dataset.source={src}', 'tracking.dir={tmp_path / 'track'}'])\n"
        "result = dataset_publish.run(cfg)\n"
        "print(result.status, 'pandas' in sys.modules)\n"
        "import pandas as pd, wandb, wandb.util\n"
        "frame = pd.DataFrame({'label': ['a'], 'rows': [1]})\n"
        "print(wandb.util.is_pandas_data_frame(frame), wandb.util.is_pandas_data_frame([frame]), "
        "[[str(v) for v in row] for row in wandb.Table(dataframe=frame).data])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ok False", "True False [['a', '1']]"]
