"""Read PyTorch checkpoint files (``.pt`` / ``.pth``) without importing torch.

Since version 1.6, ``torch.save`` writes a zip archive (members stored, not
compressed) laid out like this::

    <prefix>/data.pkl        the pickled object tree (dicts, lists, tensors...)
    <prefix>/byteorder       b"little" or b"big" (absent in early files: little)
    <prefix>/data/<key>      the raw bytes of one storage, one member per key
    <prefix>/version, .format_version, .storage_alignment, ...  (not needed)

Inside ``data.pkl`` a tensor is a call ``_rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, hooks[, metadata])`` whose ``storage`` argument
is a *persistent id* ``("storage", <torch.FloatStorage etc.>, key, location,
numel)``; the storage class gives the element type, ``key`` names the member.
Offsets, sizes and strides count elements, not bytes.

Unpickling runs whatever callables the pickle names, so a ``.pt`` file from a
stranger can run arbitrary code under a plain ``pickle.load``. This reader
resolves every name the pickle asks for against a short allow-list of
harmless rebuild functions of its own and refuses everything else *before*
anything is called. Tensors come back as :class:`TorchTensor`, a zero-copy
view into a memory map of the file: nothing is read until asked for.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import inputfile
from ..errors import LlamanpError, brief

# -- element types ------------------------------------------------------------

# torch dtype name -> how its elements are stored. NumPy has no bfloat16, so a
# bfloat16 element is kept as its raw 16 bits (uint16) and widened on demand.
_NUMPY_DTYPES = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "complex128": np.dtype("<c16"),
    "complex64": np.dtype("<c8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# The legacy typed-storage classes torch still names in pickles, by element type.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# torch's aliases for dtypes (torch.float is torch.float32, ...).
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16",
                  "long": "int64", "int": "int32", "short": "int16",
                  "cfloat": "complex64", "cdouble": "complex128"}

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

# dtypes torch may name that NumPy cannot hold; met in a tensor they are refused clearly.
_UNREADABLE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                      "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "qint8", "quint8",
                      "qint32", "quint4x2", "quint2x4")


# -- what tensors come back as -----------------------------------------------

@dataclass(frozen=True, slots=True)
class StorageType:
    """Stands in for torch.FloatStorage & co. while unpickling: just a dtype.

    Shared by every load, so it cannot be changed: frozen, no __dict__, and a
    pickle that tries to set its state is refused.
    """
    dtype: str

    def __setstate__(self, state):
        raise _Malformed("the pickle tries to set attributes on a storage type")


class TorchDtype(str):
    """A torch dtype object met in the pickle (e.g. torch.float16), kept as its name."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _Malformed("the pickle tries to set attributes on a dtype")


@dataclass(eq=False)
class Storage:
    """One ``data/<key>`` member: a flat, read-only array over the memory map.

    :meth:`values` checks the member's CRC-32 the first time it is called.
    """
    key: str
    dtype: str
    data: np.ndarray = field(repr=False)
    archive: Optional["_Archive"] = field(default=None, repr=False)
    member: str = ""

    def values(self) -> np.ndarray:
        if self.archive is not None:
            self.archive.verify(self.member)
        return self.data

    def __setstate__(self, state):
        raise _Malformed("the pickle tries to set attributes on a storage")


class TorchTensor:
    """A tensor of a torch checkpoint, not yet read.

    ``shape``, ``stride`` and ``storage_offset`` are torch's (in elements);
    ``dtype`` is torch's dtype name ('float32', 'bfloat16', ...). Two tensors
    that are views of one storage have the same ``storage_key``; see
    :meth:`same_data_as`.
    """

    def __init__(self, storage: Storage, storage_offset: int,
                 shape: tuple[int, ...], stride: tuple[int, ...]):
        self._storage = storage
        self.storage_offset = storage_offset
        self.shape = shape
        self.stride = stride

    @property
    def dtype(self) -> str:
        return self._storage.dtype

    @property
    def storage_key(self) -> str:
        return self._storage.key

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_floating_point(self) -> bool:
        return self.dtype in _FLOAT_DTYPES

    def same_data_as(self, other: "TorchTensor") -> bool:
        """True when both are the very same view of the very same storage (tied weights)."""
        return (isinstance(other, TorchTensor)
                and self._storage is other._storage
                and self.storage_offset == other.storage_offset
                and self.shape == other.shape and self.stride == other.stride)

    def numpy(self) -> np.ndarray:
        """A read-only view of the elements; bfloat16 comes back as its raw uint16 bits."""
        data = self._storage.values()
        if self.size == 0:
            return np.zeros(self.shape, dtype=data.dtype)
        itemsize = data.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            data[self.storage_offset:], shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride), writeable=False)

    def float32(self) -> np.ndarray:
        """The values as a C-contiguous float32 array (bfloat16 and float16 widen exactly)."""
        if not self.is_floating_point:
            raise LlamanpError(f"a tensor of shape {list(self.shape)} holds {self.dtype} values, "
                               "not floating-point weights; the checkpoint is not a model "
                               "llamanp reads")
        values = self.numpy()
        if self.dtype == "bfloat16":
            # bfloat16 is the top half of a float32: shift the bits into place.
            bits = np.asarray(values, dtype=np.uint32, order="C")
            bits <<= 16
            return bits.view(np.float32)
        # (np.asarray, not np.ascontiguousarray, which turns 0-d into 1-d)
        return np.asarray(values, dtype=np.float32, order="C")

    def __setstate__(self, state):
        # Only a crafted pickle would BUILD onto a tensor; never let it rewrite one.
        raise _Malformed("the pickle tries to set attributes on a tensor")

    def __repr__(self) -> str:
        return f"TorchTensor(shape={list(self.shape)}, dtype={self.dtype})"


# -- the allow-list -----------------------------------------------------------

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
    """What torch._utils._rebuild_tensor_v2 means, done with NumPy."""
    _refuse_lazy_bits(metadata)
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
    """Newer dtypes (uint16, ...) arrive as untyped bytes plus a torch dtype."""
    _refuse_lazy_bits(metadata)
    if not isinstance(storage, Storage) or storage.dtype != "uint8" \
            or not isinstance(dtype, TorchDtype):
        raise _Malformed("_rebuild_tensor_v3 got arguments of the wrong kind")
    if dtype not in _NUMPY_DTYPES:
        raise LlamanpError(f"the checkpoint holds a {dtype} tensor, a type llamanp "
                           "cannot read; convert it to float32, float16 or bfloat16 first")
    typed = _retype_storage(storage, dtype)
    return _make_tensor(typed, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """An nn.Parameter is just its tensor to us."""
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """A Parameter with Python attributes: the attributes are dropped."""
    return data


def _torch_size(dims=()):
    return tuple(dims)


def _torch_device(kind, index=None):
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Malformed(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding, errors)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> the harmless object that stands in for it."""
    allowed = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch", "UntypedStorage"): StorageType("uint8"),
        ("torch.storage", "UntypedStorage"): StorageType("uint8"),
        ("_codecs", "encode"): _codecs_encode,
    }
    for cls, dtype in _STORAGE_CLASSES.items():
        allowed[("torch", cls)] = StorageType(dtype)
    for name in list(_NUMPY_DTYPES) + list(_DTYPE_ALIASES) + list(_UNREADABLE_DTYPES):
        allowed[("torch", name)] = TorchDtype(_DTYPE_ALIASES.get(name, name))
    # Plain containers (find_class renames protocol 2's "__builtin__" first).
    # (bytearray is left out: bytearray(n) would allocate whatever n asks for)
    for name, obj in (("set", _set), ("frozenset", _frozenset), ("slice", slice),
                      ("complex", complex)):
        allowed[("builtins", name)] = obj
    return allowed




class _Malformed(Exception):
    """Internal: the pickle is well-formed but does not describe tensors sensibly."""


def _refuse_lazy_bits(metadata) -> None:
    # torch can mark a tensor "negate/conjugate on read"; we never produce those.
    if metadata and any(metadata.values()):
        raise LlamanpError("the checkpoint holds a tensor with lazy conj/neg bits; "
                           "call .resolve_conj().resolve_neg() on it before saving")


def _is_index(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < _MAX_EXTENT


def _is_index_tuple(t) -> bool:
    return isinstance(t, tuple) and len(t) <= _MAX_NDIM and all(_is_index(n) for n in t)


def _make_tensor(storage, storage_offset, size, stride) -> TorchTensor:
    """Check that the view fits inside its storage, element for element, then wrap it."""
    if not isinstance(storage, Storage):
        raise _Malformed("a tensor was rebuilt from something that is not a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        raise _Malformed(f"bad tensor geometry size={brief(size)} stride={brief(stride)}")
    size, stride = tuple(size), tuple(stride)
    if not (_is_index(storage_offset) and _is_index_tuple(size) and _is_index_tuple(stride)
            and len(size) == len(stride)):
        raise _Malformed(f"bad tensor geometry offset={brief(storage_offset)} "
                         f"size={brief(size)} stride={brief(stride)}")
    if all(n > 0 for n in size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(storage.data):
            raise _Malformed(f"a tensor of shape {list(size)} reaches element {last} of "
                             f"storage {_shown(storage.key)}, which has only "
                             f"{len(storage.data)}")
        _refuse_overlap(size, stride)
    return TorchTensor(storage, storage_offset, size, stride)


def _refuse_overlap(size: tuple, stride: tuple) -> None:
    """Each element of the tensor must be a distinct element of its storage.

    A zero stride (or strides that interleave) would let a few stored values
    stand for a huge tensor. Taking the dimensions from the smallest stride up,
    each stride must step past everything the smaller ones reach, as in any
    view torch makes by slicing, transposing or permuting a dense tensor.
    """
    reach = 0                                   # the furthest offset the inner dims reach
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s <= reach:
            raise _Malformed(f"a tensor of shape {list(size)} with strides {list(stride)} "
                             "uses some stored elements more than once")
        reach += (n - 1) * s


def _retype_storage(storage: Storage, dtype: str) -> Storage:
    """View an untyped (byte) storage as elements of ``dtype``."""
    itemsize = _NUMPY_DTYPES[dtype].itemsize
    n = len(storage.data) // itemsize
    return Storage(storage.key, dtype, storage.data[:n * itemsize].view(_NUMPY_DTYPES[dtype]),
                   storage.archive, storage.member)


# -- the zip archive ------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # the fixed 30 bytes of a local file header
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_MAX_ZIP_VERSION = 63            # what zipfile reads ("version needed to extract" 6.3)
_ENCRYPTED, _STRONG_ENCRYPTION, _PATCHED, _UTF8_NAME = 0x1, 0x40, 0x20, 0x800
_CRC_CHUNK = 16 << 20            # storages are checked piece by piece, never copied whole
_MAX_PICKLE_BYTES = 32 << 20     # data.pkl of a 405B model shard is ~100 KB
_MAX_SMALL_MEMBER = 64           # byteorder ("little") and the like


class _Archive:
    """The zip directory of a torch file plus a memory map of its bytes.

    Storages are read at their own offsets through the memory map (no copy),
    so the checks zipfile makes when it reads a member are made here, once,
    for every member: the local header agrees with the central directory
    (magic, name, compression, no encryption, a version zipfile reads), the
    data lies inside the file and overlaps no other member, and no name
    appears twice. The CRC-32 of a storage is checked the first time its
    values are asked for (:meth:`verify`), in pieces; small members
    (data.pkl, byteorder) are read whole, bounded before they are inflated.
    """

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                struct.error, NotImplementedError, UnicodeDecodeError, OverflowError,
                IndexError, KeyError) as e:
            raise self.damaged(f"{type(e).__name__}: {_first_line(e)}") from None
        self.bytes = np.memmap(path, dtype=np.uint8, mode="r")
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.members:
                raise self.damaged(f"it names member {_shown(info.filename)} twice")
            self.members[info.filename] = info
        self._data_start = {info.filename: self._checked_member(info) for info in infos}
        self._check_no_overlaps(infos)
        self._verified: set[str] = set()
        self.prefix = self._find_prefix()
        self.pickle_bytes = self.read_small(f"{self.prefix}/data.pkl", _MAX_PICKLE_BYTES)
        self._check_byteorder()
        self.storages: dict[str, Storage] = {}

    def damaged(self, why: str) -> LlamanpError:
        return LlamanpError(f"{self.name} is a damaged zip archive ({why}); "
                            "re-download or re-save it")

    # -- the checks zipfile makes when it opens a member --------------------------------
    def _checked_member(self, info: zipfile.ZipInfo) -> int:
        """Check one member's local header against the directory; where its data begins."""
        what = f"member {_shown(info.filename)}"
        if info.extract_version > _MAX_ZIP_VERSION:
            raise self.damaged(f"{what} needs zip version {info.extract_version / 10:.1f} "
                               "to extract, newer than any reader supports")
        at = info.header_offset
        raw = bytes(self.bytes[at:at + _LOCAL_HEADER.size])
        if len(raw) < _LOCAL_HEADER.size or raw[:4] != _LOCAL_HEADER_MAGIC:
            raise self.damaged(f"{what} has no local header where the directory says")
        (_, version, flags, method, _, _, _, _, _, name_len, extra_len) = \
            _LOCAL_HEADER.unpack(raw)
        for bits in (flags, info.flag_bits):
            if bits & (_ENCRYPTED | _STRONG_ENCRYPTION):
                raise LlamanpError(f"{self.name}: {what} is encrypted, which torch.save never "
                                   "does; re-save it with torch.save")
            if bits & _PATCHED:
                raise self.damaged(f"{what} is compressed patched data")
        if version > _MAX_ZIP_VERSION:
            raise self.damaged(f"{what} needs zip version {version / 10:.1f} to extract")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise LlamanpError(f"{self.name}: {what} uses compression method "
                               f"{info.compress_type}; torch.save stores members "
                               "uncompressed, so re-save it with torch.save")
        if method != info.compress_type:
            raise self.damaged(f"{what}: the local header says compression {method}, "
                               f"the directory {info.compress_type}")
        start = at + _LOCAL_HEADER.size
        name = bytes(self.bytes[start:start + name_len])
        encoding = "utf-8" if flags & _UTF8_NAME else "cp437"
        if name.decode(encoding, errors="replace") != info.orig_filename:
            raise self.damaged(f"the directory's {what} points at a member named "
                               f"{_shown(name.decode(encoding, errors='replace'))}")
        data_start = start + name_len + extra_len
        if data_start + info.compress_size > len(self.bytes):
            raise LlamanpError(f"{self.name} is truncated: {what} runs past the end of the "
                               "file; re-download or re-save it")
        return data_start

    def _check_no_overlaps(self, infos: list) -> None:
        """Every byte belongs to one member at most (zipfile refuses overlapping entries)."""
        spans = sorted((i.header_offset, self._data_start[i.filename] + i.compress_size,
                        i.filename) for i in infos)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self.damaged(f"members {_shown(first)} and {_shown(second)} overlap")

    # -- reading --------------------------------------------------------------------------
    def read_small(self, name: str, limit: int) -> bytes:
        """A whole small member, size bounded before it is inflated, CRC-32 checked."""
        info = self.members[name]
        if info.file_size > limit:
            raise LlamanpError(f"{self.name}: {name} claims {info.file_size} bytes, more than "
                               f"the {limit} such a member ever needs; the file is damaged "
                               "or hostile")
        start = self._data_start[name]
        raw = bytes(self.bytes[start:start + info.compress_size])
        if info.compress_type == zipfile.ZIP_DEFLATED:
            try:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(raw, limit + 1)
                complete = inflater.eof
            except zlib.error as e:
                raise self.damaged(f"{name} does not inflate: {_first_line(e)}") from None
        else:
            data, complete = raw, True
        if len(data) != info.file_size or not complete:
            raise self.damaged(f"{name} holds {len(data)} bytes, not the {info.file_size} "
                               "the directory says")
        if zlib.crc32(data) != info.CRC:
            raise self.damaged(f"the CRC-32 of {name} does not match")
        return data

    def verify(self, name: str) -> None:
        """Check the CRC-32 of a stored member, once, a piece at a time (no copy)."""
        if name in self._verified:
            return
        info, start = self.members[name], self._data_start[name]
        crc = 0
        for at in range(start, start + info.file_size, _CRC_CHUNK):
            end = min(at + _CRC_CHUNK, start + info.file_size)
            crc = zlib.crc32(memoryview(self.bytes[at:end]), crc)
        if crc != info.CRC:
            raise LlamanpError(f"{self.name} is damaged: the CRC-32 of {name} does not "
                               "match, so its tensor data is corrupt; re-download or "
                               "re-save it")
        self._verified.add(name)

    def _find_prefix(self) -> str:
        pickles = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise LlamanpError(f"{self.name} is a zip archive but not a PyTorch checkpoint "
                               "(no <name>/data.pkl inside); save it with torch.save")
        return pickles[0][:-len("/data.pkl")]

    def _check_byteorder(self) -> None:
        member = f"{self.prefix}/byteorder"
        if member in self.members \
                and self.read_small(member, _MAX_SMALL_MEMBER).strip() != b"little":
            raise LlamanpError(f"{self.name} was saved on a big-endian machine; "
                               "re-save it on a little-endian one (x86, ARM)")

    def storage(self, key: str, dtype: str, numel: int) -> Storage:
        """The flat array of storage ``key``; the same object each time it is named."""
        found = self.storages.get(key)
        if found is None:
            found = Storage(key, dtype, self._member_array(key, dtype, numel),
                            self, f"{self.prefix}/data/{key}")
            self.storages[key] = found
        elif found.dtype != dtype:
            raise _Malformed(f"storage {_shown(key)} is named as both {found.dtype} and {dtype}")
        return found

    def _member_array(self, key: str, dtype: str, numel: int) -> np.ndarray:
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise LlamanpError(f"{self.name} is damaged: tensor data {_shown(name)} is "
                               "missing; re-download or re-save it")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise LlamanpError(f"{self.name}: member {_shown(name)} is compressed, which "
                               "torch.save never does; re-save it with torch.save")
        nbytes = numel * _NUMPY_DTYPES[dtype].itemsize
        if info.file_size < nbytes:
            raise LlamanpError(f"{self.name} is damaged: {_shown(name)} holds {info.file_size} "
                               f"bytes but its tensor needs {nbytes}; re-download or "
                               "re-save it")
        start = self._data_start[name]
        return self.bytes[start:start + nbytes].view(_NUMPY_DTYPES[dtype])


def _shown(name) -> str:
    """A member or storage name for a message: as it is if short and printable."""
    if isinstance(name, str) and len(name) <= 120 and name.isprintable():
        return name
    return brief(name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# -- the restricted unpickler -------------------------------------------------------

_MAX_OPCODES = 1 << 22           # a 405B model shard's data.pkl runs ~30,000
_MAX_TEXT_NUMBER = 40            # protocol-0 INT/LONG/GET/PUT arguments, in characters
_MAX_NDIM = 16
_MAX_EXTENT = 1 << 48            # sizes, strides and offsets, in elements


def _hash_safe(key) -> bool:
    """Keys whose hashes a pickle cannot make collide: str and bytes (randomised
    hashes), floats, and ints below 2**61 (each its own hash). Tuples are left
    out: colliding tuples of integers are easy to compute."""
    if isinstance(key, (str, bytes, float, type(None))):
        return True
    return isinstance(key, int) and -(1 << 60) < key < (1 << 60)


def _check_keys(keys) -> None:
    for key in keys:
        if not _hash_safe(key):
            raise _Malformed(f"a dict or set key is a {type(key).__name__} "
                             f"({brief(key, 40)}); checkpoints key by names and numbers")


def _ordered_dict(items=()):
    """collections.OrderedDict, but only with keys that cannot flood its hash table."""
    if isinstance(items, dict):
        items = list(items.items())
    pairs = list(items)
    _check_keys(k for k, _ in pairs)
    return collections.OrderedDict(pairs)


def _set(items=()):
    items = list(items)
    _check_keys(items)
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


def _counted(handler):
    """Wrap an opcode handler so that every opcode counts against the bound."""
    def run(self):
        self._opcodes += 1
        if self._opcodes > _MAX_OPCODES:
            raise _Malformed(f"its data.pkl runs more than {_MAX_OPCODES} pickle opcodes")
        handler(self)
    return run


class _TensorUnpickler(pickle._Unpickler):
    """Rebuilds plain containers and tensors; refuses every other global.

    The pure-Python unpickler, so that each opcode can be bounded: BUILD,
    INST, OBJ and NEWOBJ (which torch.save never writes for tensors and
    containers) are refused, dict and set keys must hash safely, memo indices
    and protocol-0 numbers are short, and the opcodes run are counted.
    """

    def __init__(self, archive: _Archive):
        super().__init__(io.BytesIO(archive.pickle_bytes))
        self._archive = archive
        self._opcodes = 0

    def find_class(self, module: str, name: str):
        if module == "__builtin__":          # Python 2's name, still written by protocol 2
            module = "builtins"
        found = _ALLOWED.get((module, name))
        if found is None:
            raise LlamanpError(f"refusing to load {self._archive.name}: it references "
                               f"{_shown(module)}.{_shown(name)}, which "
                               "could run code; llamanp only loads plain tensors and "
                               "containers")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Malformed(f"unknown persistent id {brief(pid)}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, StorageType) and isinstance(key, str)
                and isinstance(numel, int) and 0 <= numel < _MAX_EXTENT):
            raise _Malformed(f"bad storage reference {brief(pid)}")
        return self._archive.storage(key, storage_type.dtype, numel)

    # -- bounded opcodes (installed in _DISPATCH below) ----------------------------------

    def _build(self):
        """BUILD only as Module.state_dict() needs it: attributes (its _metadata) on an
        OrderedDict this load made. Anything else, above all the shared stand-ins of
        the allow-list, is refused."""
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if type(target) is not collections.OrderedDict:
            raise _Malformed(f"the pickle tries to set attributes on a "
                             f"{type(target).__name__}")
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise _Malformed("the pickle sets an OrderedDict's attributes from a "
                             f"{type(state).__name__}")
        vars(target).update(state)

    def _setitem(self):
        _check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def _keys_then_values(self, handler):
        _check_keys(self.stack[0::2])          # the items since MARK: key, value, key, ...
        handler(self)

    def _members(self, handler):
        _check_keys(self.stack)                # the items since MARK
        handler(self)

    def _global(self):
        """GLOBAL, but a name cut short by the end of the data is damage, not a name."""
        module, name = self.readline(), self.readline()
        if not (module.endswith(b"\n") and name.endswith(b"\n")):
            raise _Malformed("its data.pkl ends in the middle of a global's name")
        self.append(self.find_class(module[:-1].decode("utf-8"), name[:-1].decode("utf-8")))

    def _put(self):
        index = int(self.readline()[:-1])
        if not 0 <= index < (1 << 32):
            raise _Malformed("a memo index is out of range")
        self.memo[index] = self.stack[-1]


def _short_text(handler):
    """A protocol-0 number opcode whose text argument must be short (int() of a long
    digit string takes quadratic time)."""
    def run(self):
        read_line = self.readline
        line = read_line()
        if len(line) > _MAX_TEXT_NUMBER:
            raise _Malformed(f"it holds a number of more than {_MAX_TEXT_NUMBER} digits")
        self.readline = lambda: line
        try:
            handler(self)
        finally:
            self.readline = read_line
    return run


def _refused(opcode: str):
    def refuse(self):
        raise _Malformed(f"its data.pkl uses the pickle opcode {opcode}, which a "
                         "checkpoint of tensors never needs")
    return refuse


def _dispatch() -> dict:
    """pickle's opcode table with the bounded handlers, every opcode counted."""
    U, T = pickle._Unpickler, _TensorUnpickler
    table = dict(U.dispatch)
    # objects built from classes, and protocol 5's buffers (BYTEARRAY8 allocates
    # whatever length it names before reading a byte)
    for name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BYTEARRAY8", "NEXT_BUFFER",
                 "READONLY_BUFFER"):
        table[getattr(pickle, name)[0]] = _refused(name)
    table[pickle.BUILD[0]] = T._build
    table[pickle.GLOBAL[0]] = T._global
    table[pickle.SETITEM[0]] = T._setitem
    table[pickle.SETITEMS[0]] = lambda self: self._keys_then_values(U.load_setitems)
    table[pickle.DICT[0]] = lambda self: self._keys_then_values(U.load_dict)
    table[pickle.ADDITEMS[0]] = lambda self: self._members(U.load_additems)
    table[pickle.FROZENSET[0]] = lambda self: self._members(U.load_frozenset)
    table[pickle.PUT[0]] = _short_text(T._put)
    for op, handler in ((pickle.INT, U.load_int), (pickle.LONG, U.load_long),
                        (pickle.GET, U.load_get)):
        table[op[0]] = _short_text(handler)
    return {code: _counted(handler) for code, handler in table.items()}


_TensorUnpickler.dispatch = _dispatch()
_ALLOWED = _allowed_globals()


# -- public entry point -----------------------------------------------------------

def _refuse_non_zip(path: str) -> None:
    """Explain what a file that is not a zip archive probably is."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise LlamanpError(f"{path}: no such file") from None
    except OSError as e:
        raise LlamanpError(f"cannot read {path}: {e.strerror}") from None
    if head.startswith(_LOCAL_HEADER_MAGIC):
        raise LlamanpError(f"{name} is a truncated or damaged zip archive; "
                           "re-download or re-save it")
    # Before 1.6, torch.save wrote a bare pickle stream (or, very early, a tar).
    if head[:1] == b"\x80" or head[257:262] == b"ustar":
        raise LlamanpError(f"{name} is in PyTorch's legacy (pre-1.6) format, which llamanp "
                           "does not read; re-save it with a recent torch "
                           "(torch.save(torch.load(f), f)) and try again")
    raise LlamanpError(f"{name} is not a PyTorch checkpoint (not a zip archive written "
                       "by torch.save)")


def is_zip(path) -> bool:
    """Does the file end like a zip archive? (zipfile.is_zipfile, except that an end
    record it cannot use, such as a multi-disk one, counts as a damaged zip.)"""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, struct.error, OverflowError):
        return True


def load(path) -> object:
    """Unpickle a torch.save file; tensors come back as :class:`TorchTensor`.

    Containers (dict, OrderedDict, list, tuple, set) and plain values come back
    as themselves, torch.Size as a tuple, torch dtypes as :class:`TorchDtype`.
    Raises LlamanpError for anything malformed or not allow-listed.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise LlamanpError(f"{path}: no such file")
    inputfile.require_regular(path)            # a FIFO would block zipfile for ever
    if not is_zip(path):
        _refuse_non_zip(path)
    archive = _Archive(path)
    try:
        return _TensorUnpickler(archive).load()
    except LlamanpError:
        raise
    except _Malformed as e:
        raise LlamanpError(f"{archive.name} is malformed: {e}; re-download or re-save it") \
            from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, RecursionError, OverflowError,
            struct.error) as e:
        raise LlamanpError(f"{archive.name} is malformed: its data.pkl does not unpickle "
                           f"({type(e).__name__}: {_first_line(e)}); re-download or "
                           "re-save it") from None


def state_dict(obj, where: str, what: str = "model state_dict") -> dict:
    """`obj` as a state_dict: a dict of tensors under string names, or one clear error."""
    if not isinstance(obj, dict):
        raise LlamanpError(f"{where} is not a {what} (expected a dict of tensors, found "
                           f"{type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise LlamanpError(f"{where}: the {what} has a key {brief(key, 40)} of type "
                               f"{type(key).__name__}; tensor names are strings")
        if not isinstance(value, TorchTensor):
            raise LlamanpError(f"{where}: {what} entry {brief(key)} is a "
                               f"{type(value).__name__}, not a tensor")
    return obj
