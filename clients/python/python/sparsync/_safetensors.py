"""safetensors files of float32 tensors, as the server reads (``serve --init``) and writes them
(``/api/model.safetensors``), with numpy alone: an 8-byte little-endian header length, a JSON
header (``{name: {dtype, shape, data_offsets}}`` and ``__metadata__``), then the data.

The tensor order is part of a sparsync model (it is the order of the flat vector), so it is
written twice: the data in that order, and the names under the metadata key
``sparsync.order`` (``ORDER_KEY`` in ``src/protocol/model.rs``; keep in sync), which the server
reads first.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import List, Sequence, Tuple, Union

import numpy as np

#: Metadata key of the tensor order (``src/protocol/model.rs``'s ``ORDER_KEY``).
ORDER_KEY = "sparsync.order"

Tensors = List[Tuple[str, np.ndarray]]


def encode(tensors: Sequence[Tuple[str, np.ndarray]]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (converted to little-endian
    float32) in the given order, the order recorded under :data:`ORDER_KEY`."""
    names = [n for n, _ in tensors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tensor names must be unique; repeated: {dupes}")
    if not tensors:
        raise ValueError("no tensors to write (the server needs at least one)")
    header: dict = {"__metadata__": {ORDER_KEY: json.dumps(names)}}
    chunks = []
    offset = 0
    for name, a in tensors:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write(path: Union[str, "os.PathLike[str]"], tensors: Sequence[Tuple[str, np.ndarray]]) -> None:
    """Writes :func:`encode`'s bytes to ``path`` (replacing it whole: a reader never sees half a
    file)."""
    data = encode(tensors)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def decode(data: bytes) -> Tensors:
    """The float32 tensors of a safetensors file, in the server's order: the one recorded under
    :data:`ORDER_KEY` when present, else the order of their data in the file. Raises
    ``ValueError`` saying what is wrong with the file."""
    if len(data) < 8:
        raise ValueError(f"not a safetensors file: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"not a safetensors file: a header of {n} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n :]
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"tensor {name!r}: its header entry {info!r} lacks dtype, shape or data_offsets") from None
        if dtype != "F32":
            raise ValueError(f"tensor {name!r} is {dtype}; sparsync models are F32")
        count = math.prod(shape)
        if not (0 <= start <= end <= len(body)) or end - start != 4 * count:
            raise ValueError(f"tensor {name!r}: data_offsets {[start, end]} do not hold {list(shape)} float32 values")
        a = np.frombuffer(body[start:end], dtype="<f4").astype(np.float32).reshape(shape)
        entries.append((start, name, a))
    if not entries:
        raise ValueError("the safetensors file holds no tensors")
    if ORDER_KEY in meta:
        order = json.loads(meta[ORDER_KEY])
        by_name = {name: a for _, name, a in entries}
        if sorted(order) != sorted(by_name):
            raise ValueError(f"metadata {ORDER_KEY} names {order}, the file holds {sorted(by_name)}")
        return [(name, by_name[name]) for name in order]
    return [(name, a) for _, name, a in sorted(entries, key=lambda e: e[0])]


def read(path: Union[str, "os.PathLike[str]"]) -> Tensors:
    """:func:`decode` of the file at ``path``."""
    with open(path, "rb") as f:
        return decode(f.read())
