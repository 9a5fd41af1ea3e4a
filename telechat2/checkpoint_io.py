"""Streaming readers and writers for MindSpore `.ckpt` and Hugging Face safetensors files.

A 115B checkpoint is 450 GB, so nothing here holds more than one tensor in memory:
- `CkptWriter` appends one tensor at a time to a `.ckpt` file. The file format is MindSpore's: a sequence of
  serialized `checkpoint_pb2.Checkpoint` messages, one `Value` each; a tensor larger than one slice is written as
  consecutive values with the same tag, which `mindspore.load_checkpoint` joins (this is what MindSpore's own
  `save_checkpoint` does). `mindspore.save_checkpoint` itself needs every tensor materialised up front.
  The tensor bytes are written straight from the array buffer; the framing is protobuf's wire format, which
  `tests/unit/test_convert.py` checks byte-for-byte against `checkpoint_pb2.Checkpoint.SerializeToString`.
- `CkptReader` indexes a `.ckpt` file by walking the protobuf framing without reading tensor contents, then reads
  any tensor (or a row range of it) on demand.
- `SafetensorsWriter` writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is
  known from the plan before any data is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

# MindSpore writes tensors in slices of at most 512 MiB (serialization.SLICE_SIZE); protobuf messages must stay < 2 GiB.
SLICE_BYTES = 512 * 1024 * 1024

# numpy dtype name <-> MindSpore checkpoint tensor_type <-> safetensors dtype.
_NP_TO_MS = {
    "float32": "Float32",
    "float16": "Float16",
    "bfloat16": "BFloat16",
    "float64": "Float64",
    "int8": "Int8",
    "int16": "Int16",
    "int32": "Int32",
    "int64": "Int64",
    "uint8": "UInt8",
    "uint16": "UInt16",
    "uint32": "UInt32",
    "uint64": "UInt64",
    "bool": "Bool",
}
_MS_TO_NP = {v: k for k, v in _NP_TO_MS.items()}
_NP_TO_ST = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}


class CheckpointError(ValueError):
    """A checkpoint file or directory is unusable; the message names the file and the tensor or rank."""


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a name; bfloat16 comes from MindSpore's numpy extension (imported only when needed)."""
    if name == "bfloat16":
        from mindspore.common import np_dtype  # registers bfloat16 with numpy

        return np.dtype(np_dtype.bfloat16)
    return np.dtype(name)


def ms_tensor_type(dtype: np.dtype) -> str:
    try:
        return _NP_TO_MS[np.dtype(dtype).name]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} has no MindSpore checkpoint type") from None


def st_dtype(dtype: np.dtype) -> str:
    try:
        return _NP_TO_ST[np.dtype(dtype).name]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} has no safetensors type") from None


FINITE_CHECK_VALUES = 1 << 24  # non-finite values are looked for 16M values at a time, so memory stays flat


def non_finite(values: np.ndarray) -> tuple[int, int] | None:
    """(how many NaN/Inf values, flat index of the first) in a float array; None when all are finite or the
    dtype is not floating point. bfloat16 is checked through float32, one chunk at a time."""
    kind = values.dtype.name
    if kind != "bfloat16" and not np.issubdtype(values.dtype, np.floating):
        return None
    flat = values.reshape(-1)
    count, first = 0, -1
    for start in range(0, flat.size, FINITE_CHECK_VALUES):
        part = flat[start : start + FINITE_CHECK_VALUES]
        bad = ~np.isfinite(part.astype(np.float32) if kind == "bfloat16" else part)
        n = int(np.count_nonzero(bad))
        if n:
            first = first if count else start + int(np.argmax(bad))
            count += n
    return (count, first) if count else None


def check_finite(where: str, values: np.ndarray, out: np.ndarray) -> None:
    """NaN/Inf in a weight is a broken checkpoint (merge, convert and convert-reversed all refuse it): fail naming
    the tensor (`where`), saying when it is the cast of finite `values` to `out`'s narrower dtype that overflowed."""
    found = non_finite(out)
    if found is None:
        return
    count, first = found
    if out is not values and non_finite(values) is None:
        raise CheckpointError(
            f"{where}: {count} value(s) overflow {out.dtype} (the first at flat index {first}); choose a wider --dtype"
        )
    raise CheckpointError(f"{where} has {count} non-finite value(s) (NaN/Inf), the first at flat index {first}")


# --- protobuf wire format (just what checkpoint.proto uses) -----------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload_len: int) -> bytes:
    """Key and length of a length-delimited field (wire type 2); the payload follows."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def encode_value_header(tag: str, dims: tuple[int, ...], tensor_type: str, content_len: int) -> bytes:
    """Bytes of `Checkpoint{value: Value{tag, tensor: TensorProto{dims, tensor_type, tensor_content}}}` that
    precede the tensor_content bytes; the content itself is written after it, unchanged."""
    tag_b, type_b = tag.encode(), tensor_type.encode()
    # proto2 `repeated int64 dims = 1` is unpacked: one key + varint per dim (negative dims never occur here).
    dims_b = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in dims)
    tensor_head = dims_b + _field_bytes(2, len(type_b)) + type_b + _field_bytes(3, content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = _field_bytes(1, len(tag_b)) + tag_b + _field_bytes(2, tensor_len) + tensor_head
    value_len = len(value_head) - len(tensor_head) + tensor_len
    return _field_bytes(1, value_len) + value_head


class CkptWriter:
    """Write a MindSpore `.ckpt` tensor by tensor into `path + '.partial'`, renamed to `path` on success only."""

    def __init__(self, path: str | os.PathLike, slice_bytes: int = SLICE_BYTES) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.slice_bytes = slice_bytes
        self.names: list[str] = []
        self._file: BinaryIO | None = None

    def __enter__(self) -> CkptWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "wb")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)

    def write(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
        """Append tensor `name`: the chunks, flattened in order, are its values in C order."""
        assert self._file is not None, "use CkptWriter as a context manager"
        if name in self.names:
            raise CheckpointError(f"tensor {name} written twice")
        dtype = np.dtype(dtype)
        tensor_type = ms_tensor_type(dtype)
        expected, written = math.prod(shape) * dtype.itemsize, 0
        per_slice = max(1, self.slice_bytes // dtype.itemsize)
        for chunk in chunks:
            flat = np.ascontiguousarray(chunk).reshape(-1)
            if flat.dtype != dtype:
                raise CheckpointError(f"tensor {name}: chunk of dtype {flat.dtype}, expected {dtype}")
            for start in range(0, flat.size, per_slice):
                part = flat[start : start + per_slice]
                self._file.write(encode_value_header(name, shape, tensor_type, part.nbytes))
                self._file.write(memoryview(part.view(np.uint8)))
                written += part.nbytes
        if written != expected:
            raise CheckpointError(f"tensor {name}: wrote {written} bytes, shape {shape} {dtype} needs {expected}")
        self.names.append(name)


# --- reading ----------------------------------------------------------------------------------------------------


@dataclass
class CkptEntry:
    """Where one tensor's bytes are in a `.ckpt` file (a list of slices, joined in order)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: str
    slices: list[tuple[int, int]] = field(default_factory=list)  # (file offset, byte length)

    @property
    def dtype(self) -> np.dtype:
        if self.tensor_type not in _MS_TO_NP:
            raise CheckpointError(f"tensor {self.name}: unsupported tensor type {self.tensor_type}")
        return numpy_dtype(_MS_TO_NP[self.tensor_type])

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.slices)


def _read_varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class CkptReader:
    """Index of a MindSpore `.ckpt` file; tensors are read on demand, one at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, CkptEntry] = {}
        self.strings: dict[str, bytes] = {}  # str values MindSpore stores beside tensors (rare)
        try:
            self._index()
        except CheckpointError:
            raise
        except (ValueError, UnicodeDecodeError, struct.error) as err:
            raise CheckpointError(f"corrupt checkpoint {self.path}: {err}") from err

    def _index(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            raise CheckpointError(f"corrupt checkpoint {self.path}: empty file")
        with open(self.path, "rb") as f:
            end = size
            if size >= 17:
                f.seek(size - 17)
                if f.read(7) == b"crc_num":  # MindSpore's optional crc trailer
                    end = size - 17
            f.seek(0)
            previous = None
            while f.tell() < end:
                start = f.tell()
                key = _read_varint(f)
                if key != (1 << 3 | 2):
                    raise CheckpointError(
                        f"corrupt checkpoint {self.path}: unexpected bytes at offset {start} "
                        "(not a MindSpore checkpoint, or encrypted)"
                    )
                length = _read_varint(f)
                if length is None or f.tell() + length > end:
                    raise CheckpointError(
                        f"corrupt checkpoint {self.path}: truncated at offset {start} (after tensor {previous})"
                    )
                previous = self._index_value(f, f.tell() + length, previous)
        if not self.entries:
            raise CheckpointError(f"corrupt checkpoint {self.path}: no tensors")

    def _index_value(self, f: BinaryIO, value_end: int, previous: str | None) -> str:
        tag, tensor = None, None
        while f.tell() < value_end:
            key = _read_varint(f)
            length = _read_varint(f)
            if key is None or length is None:
                raise CheckpointError(f"corrupt checkpoint {self.path}: truncated value after tensor {previous}")
            number, body_start = key >> 3, f.tell()
            if number == 1:
                tag = f.read(length).decode()
            elif number == 2:
                tensor = self._parse_tensor(f, body_start + length)
            f.seek(body_start + length)
        if tag is None or tensor is None:
            raise CheckpointError(f"corrupt checkpoint {self.path}: value without tag or tensor after {previous}")
        dims, tensor_type, content = tensor
        if tensor_type == "str":
            f.seek(content[0])
            self.strings[tag] = f.read(content[1])
            return tag
        entry = self.entries.get(tag)
        if entry is None:
            self.entries[tag] = CkptEntry(tag, dims, tensor_type, [content])
        elif tag == previous:  # next slice of the same tensor
            entry.slices.append(content)
        else:
            raise CheckpointError(f"corrupt checkpoint {self.path}: tensor {tag} appears twice")
        return tag

    def _parse_tensor(self, f: BinaryIO, end: int) -> tuple[tuple[int, ...], str, tuple[int, int]]:
        dims: list[int] = []
        tensor_type, content = "", (0, 0)
        while f.tell() < end:
            key = _read_varint(f)
            if key is None:
                raise ValueError("truncated tensor")
            number, wire = key >> 3, key & 7
            if number == 1 and wire == 0:
                dims.append(_read_varint(f))
            elif number == 1 and wire == 2:  # packed dims
                stop = _read_varint(f) + f.tell()
                while f.tell() < stop:
                    dims.append(_read_varint(f))
            elif wire == 2:
                length = _read_varint(f)
                body = f.tell()
                if number == 2:
                    tensor_type = f.read(length).decode()
                elif number == 3:
                    content = (body, length)
                f.seek(body + length)
            else:
                raise ValueError(f"unexpected field {number} (wire type {wire}) in a tensor")
        shape = () if dims == [0] else tuple(dims)  # MindSpore stores scalars as dims [0]
        return shape, tensor_type, content

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor."""
        entry = self.entries[name]
        flat = self.read_flat(name, 0, entry.nbytes // entry.dtype.itemsize)
        return flat.reshape(entry.shape)

    def read_flat(self, name: str, start: int, count: int) -> np.ndarray:
        """`count` values from flat (C-order) index `start`: lets a caller take one expert of a stacked tensor."""
        entry = self.entries[name]
        dtype = entry.dtype
        want_lo, want_hi = start * dtype.itemsize, (start + count) * dtype.itemsize
        if want_hi > entry.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name} holds {entry.nbytes} bytes, asked up to {want_hi}")
        out = np.empty(count, dtype=dtype)
        view = memoryview(out.view(np.uint8))
        pos = filled = 0
        with open(self.path, "rb") as f:
            for offset, length in entry.slices:
                lo, hi = max(want_lo, pos), min(want_hi, pos + length)
                if lo < hi:
                    f.seek(offset + lo - pos)
                    n = f.readinto(view[filled : filled + hi - lo])
                    if n != hi - lo:
                        raise CheckpointError(f"corrupt checkpoint {self.path}: tensor {name} is truncated")
                    filled += n
                pos += length
        return out

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.entries:
            yield name, self.read(name)


# --- safetensors ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the order of `specs` (known before any data)."""

    def __init__(self, path: str | os.PathLike, specs: list[SafetensorsSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        self.metadata = metadata or {"format": "pt"}
        self._next = 0
        self._file: BinaryIO | None = None

    def header(self) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": st_dtype(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> SafetensorsWriter:
        self._file = open(self.path, "wb")
        self._file.write(self.header())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is None and self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            raise CheckpointError(f"{self.path}: tensors never written: {', '.join(missing[:5])}")

    def write(self, name: str, array: np.ndarray) -> None:
        assert self._file is not None, "use SafetensorsWriter as a context manager"
        spec = self.specs[self._next]
        if name != spec.name or tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
            raise CheckpointError(
                f"{self.path}: expected {spec.name} {spec.shape} {spec.dtype}, got {name} {array.shape} {array.dtype}"
            )
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._next += 1
