"""Moving values between NumPy, Python and Arrow without importing pandas.

pyarrow imports pandas the first time it converts a Python or NumPy value (``pa.array``,
``pa.scalar``, a Python scalar passed to a compute function) or converts to NumPy
(``to_numpy``): it asks whether the value is a pandas object, or sets up pandas' null values.
That import costs about half a second (and W&B's own question, whether a logged value is a
DataFrame, is answered without it: `pipeline.tracking`), so dataset-publish imports no pandas at
all. These helpers build arrays from their buffers and read buffers back, which asks nothing;
``tests/test_arrow.py`` checks that a whole publish leaves pandas unimported.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-D NumPy array of numbers or booleans as an Arrow array (numbers without a copy)."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype.kind not in "biuf":
        raise TypeError(f"from_numpy takes a 1-D array of numbers or booleans, not {values.dtype} with shape {values.shape}")
    if values.dtype.kind == "b":  # Arrow packs booleans 8 to a byte, least significant bit first
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def strings(values: Iterable[str | None]) -> pa.StringArray:
    """Python strings (None for null) as an Arrow string array."""
    values = list(values)
    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    valid = np.array([v is not None for v in values], dtype=bool)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
                                 null_count=len(values) - int(valid.sum()))


def scalar(value: str | bool | int | float, type: pa.DataType | None = None) -> pa.Scalar:
    """One Python value as an Arrow scalar, for compute functions (`pc.equal(column, scalar("train"))`)."""
    array = strings([value]) if isinstance(value, str) else from_numpy(np.array([value]))
    return (array if type is None else array.cast(type))[0]


def to_numpy(values: pa.Array | pa.ChunkedArray, fill: bool | int | float | None = None) -> np.ndarray:
    """Arrow numbers or booleans as a read-only NumPy array; nulls become `fill` (an error when it is None)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        if fill is None:
            raise ValueError(f"{values.null_count} null(s) in a {values.type} array and no fill value given")
        values = pc.fill_null(values, scalar(fill, values.type))
    n, data = len(values), values.buffers()[1]
    if pa.types.is_boolean(values.type):
        if not n:
            return np.zeros(0, dtype=bool)
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=values.offset + n, bitorder="little")
        return bits[values.offset:].view(bool)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise TypeError(f"to_numpy takes numbers or booleans, not {values.type}")
    dtype = np.dtype(values.type.to_pandas_dtype())
    if not n:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=n, offset=values.offset * dtype.itemsize)
