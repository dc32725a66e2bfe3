"""Read ``.safetensors`` files without the safetensors library (or torch).

The format (huggingface/safetensors) is deliberately simple::

    8 bytes   N, the length of the header: little-endian uint64
    N bytes   the header: a UTF-8 JSON object
                {"<tensor name>": {"dtype": "BF16", "shape": [4096, 4096],
                                   "data_offsets": [begin, end]},
                 ...,
                 "__metadata__": {"format": "pt", ...}}      (optional, text -> text)
    the rest  the byte buffer; begin/end count bytes from its start (8 + N)

Every tensor is a contiguous, row-major run of little-endian elements, so it
can be viewed in place through a memory map: :func:`load` checks the header
and returns lazy :class:`SafetensorsTensor` objects, and nothing is read until
a tensor is asked for its values.

Because the header is trusted to say where the bytes are, it is checked first:
its length must fit in the file, every dtype must be known, every region must
lie inside the buffer and be exactly as long as its shape says, and no two
regions may overlap. A file that lies gets one clear error, never a crash or a
tensor made of some other tensor's bytes.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np

from .. import inputfile
from ..errors import LlamanpError, brief

__all__ = ["SafetensorsTensor", "load", "read_metadata"]

# safetensors dtype name -> how one element is stored. NumPy has no bfloat16 or
# float8, so those are kept as their raw bits and widened (or refused) on demand.
_ELEMENT_TYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# The element types a model's weights can be read from (widened to float32).
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

_LENGTH = struct.Struct("<Q")
# The reference implementation refuses larger headers; so do we, before reading one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_METADATA_KEY = "__metadata__"
_MAX_DIMS = 8            # torch allows more, but no weight has more than a few


class SafetensorsTensor:
    """One tensor of a safetensors file, not yet read.

    ``dtype`` is the file's name for the element type ("F32", "BF16", ...);
    ``shape`` is a tuple of ints, outermost first.
    """

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], raw: np.ndarray,
                 where: str):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self._raw = raw          # the tensor's bytes, a read-only view of the memory map
        self._where = where      # the file name, for error messages

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def is_floating_point(self) -> bool:
        """True when :meth:`float32` can read the values."""
        return self.dtype in _FLOAT_TYPES

    def numpy(self) -> np.ndarray:
        """The elements in place (read-only); bfloat16 and float8 come back as raw bits."""
        return self._raw.view(_ELEMENT_TYPES[self.dtype]).reshape(self.shape)

    def float32(self) -> np.ndarray:
        """The values as a C-contiguous float32 array.

        float32 is returned as a view of the file, float16 and bfloat16 widen
        exactly, float64 is rounded to the nearest float32.
        """
        if not self.is_floating_point:
            raise LlamanpError(f"{self._where}: tensor {self.name} holds {self.dtype} values, "
                               "not float32/float16/bfloat16 weights; llamanp cannot convert "
                               "a quantized or non-model tensor")
        values = self.numpy()
        if self.dtype == "BF16":
            # bfloat16 is the top half of a float32: shift the bits into place.
            bits = values.astype(np.uint32)
            bits <<= 16
            return bits.view(np.float32)
        # np.asarray keeps a float32 tensor as a view instead of copying it
        return np.asarray(values, dtype=np.float32, order="C")

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.name!r}, dtype={self.dtype}, shape={list(self.shape)})"


# -- reading the header ---------------------------------------------------------

def _bad(where: str, problem: str) -> LlamanpError:
    return LlamanpError(f"{where}: {problem}; the file is damaged or not a safetensors file")


def _refuse_duplicate_keys(pairs: list) -> dict:
    """json.loads hook: a name given twice would make the header ambiguous."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _DuplicateKey(Exception):
    pass


def _read_header(path: str, where: str) -> tuple[dict, int, int]:
    """The parsed header, the offset of the byte buffer, and the file size."""
    with inputfile.open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < _LENGTH.size:
            raise _bad(where, f"only {size} bytes long, too short for a header")
        try:
            (n,) = _LENGTH.unpack(f.read(_LENGTH.size))
            if n > size - _LENGTH.size:
                raise _bad(where, f"the header claims {n} bytes but the file has only "
                                  f"{size - _LENGTH.size} after the length field")
            if n > _MAX_HEADER_BYTES:
                raise _bad(where, f"the header claims {n} bytes, over the 100 MB limit")
            text = f.read(n)
        except OSError as e:
            raise LlamanpError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = inputfile.loads(text, where, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as e:
        raise _bad(where, f"the header names {brief(e.args[0])} twice") from None
    except inputfile.JsonFileError as e:
        raise _bad(where, f"the header is not UTF-8 JSON within bounds ({e.problem})") from None
    if not isinstance(header, dict):
        raise _bad(where, "the header is not a JSON object")
    return header, _LENGTH.size + n, size


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _checked_entry(name: str, entry, buffer_size: int, where: str) -> tuple[str, tuple, int, int]:
    """(dtype, shape, begin, end) of one header entry, after checking it."""
    if not isinstance(entry, dict):
        raise _bad(where, f"the header entry of tensor {brief(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ELEMENT_TYPES:
        raise _bad(where, f"tensor {brief(name)} has unknown dtype {brief(dtype)} (known: "
                          f"{', '.join(_ELEMENT_TYPES)})")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS \
            or not all(_is_count(d) for d in shape):
        raise _bad(where, f"tensor {brief(name)} has shape {brief(shape)}, not a list of "
                          f"at most {_MAX_DIMS} sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)):
        raise _bad(where, f"tensor {brief(name)} has data_offsets {brief(offsets)}, "
                          "not [begin, end]")
    begin, end = offsets
    if not begin <= end <= buffer_size:
        raise _bad(where, f"tensor {brief(name)} claims bytes {begin}..{end} but the data "
                          f"section has {buffer_size} bytes")
    nbytes = math.prod(shape) * _ELEMENT_TYPES[dtype].itemsize
    if end - begin != nbytes:
        raise _bad(where, f"tensor {brief(name)} is {dtype} {shape}, which is {nbytes} bytes, "
                          f"but its data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_no_overlaps(regions: list[tuple[int, int, str]], where: str) -> None:
    """Each byte of the buffer belongs to at most one tensor."""
    previous_end, previous_name = 0, None
    for begin, end, name in sorted(r for r in regions if r[0] < r[1]):
        if begin < previous_end:
            raise _bad(where, f"tensors {brief(previous_name)} and {brief(name)} claim the "
                              "same bytes")
        previous_end, previous_name = end, name


def _checked_metadata(header: dict, where: str) -> dict:
    metadata = header.get(_METADATA_KEY, {})
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _bad(where, f"{_METADATA_KEY} is not a JSON object")
    return metadata


# -- public entry points ----------------------------------------------------------

def load(path) -> dict[str, SafetensorsTensor]:
    """The tensors of a safetensors file, by name, in file order; nothing read yet."""
    path = os.fspath(path)
    where = os.path.basename(path)
    header, data_start, file_size = _read_header(path, where)
    _checked_metadata(header, where)
    buffer_size = file_size - data_start
    entries = {name: _checked_entry(name, entry, buffer_size, where)
               for name, entry in header.items() if name != _METADATA_KEY}
    _check_no_overlaps([(b, e, name) for name, (_, _, b, e) in entries.items()], where)
    data = _map(path, where)
    tensors: dict[str, SafetensorsTensor] = {}
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        raw = data[data_start + begin:data_start + end]
        tensors[name] = SafetensorsTensor(name, dtype, shape, raw, where)
    return tensors


def read_metadata(path) -> dict:
    """The optional ``__metadata__`` object of a safetensors file ({} when absent)."""
    path = os.fspath(path)
    where = os.path.basename(path)
    header, _, _ = _read_header(path, where)
    return dict(_checked_metadata(header, where))


def _map(path: str, where: str) -> np.ndarray:
    """The whole file as read-only bytes, memory-mapped (it is never empty here)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise LlamanpError(f"cannot map {where}: {e.strerror}") from None
