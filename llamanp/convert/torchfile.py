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
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlamanpError

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

@dataclass(frozen=True)
class StorageType:
    """Stands in for torch.FloatStorage & co. while unpickling: just a dtype."""
    dtype: str


class TorchDtype(str):
    """A torch dtype object met in the pickle (e.g. torch.float16), kept as its name."""


@dataclass(eq=False)
class Storage:
    """One ``data/<key>`` member: a flat, read-only array over the memory map."""
    key: str
    dtype: str
    data: np.ndarray = field(repr=False)

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
        data = self._storage.data
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
        ("collections", "OrderedDict"): collections.OrderedDict,
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
    for name, obj in (("set", set), ("frozenset", frozenset), ("slice", slice),
                      ("bytearray", bytearray), ("complex", complex)):
        allowed[("builtins", name)] = obj
    return allowed


_ALLOWED = _allowed_globals()


class _Malformed(Exception):
    """Internal: the pickle is well-formed but does not describe tensors sensibly."""


def _refuse_lazy_bits(metadata) -> None:
    # torch can mark a tensor "negate/conjugate on read"; we never produce those.
    if metadata and any(metadata.values()):
        raise LlamanpError("the checkpoint holds a tensor with lazy conj/neg bits; "
                           "call .resolve_conj().resolve_neg() on it before saving")


def _is_index_tuple(t) -> bool:
    return isinstance(t, tuple) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in t)


def _make_tensor(storage, storage_offset, size, stride) -> TorchTensor:
    """Check that the view fits inside its storage, then wrap it."""
    if not isinstance(storage, Storage):
        raise _Malformed("a tensor was rebuilt from something that is not a storage")
    size, stride = tuple(size), tuple(stride)
    if not (isinstance(storage_offset, int) and storage_offset >= 0
            and _is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride)):
        raise _Malformed(f"bad tensor geometry offset={storage_offset!r} "
                         f"size={size!r} stride={stride!r}")
    if all(n > 0 for n in size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(storage.data):
            raise _Malformed(f"a tensor of shape {list(size)} reaches element {last} of "
                             f"storage {storage.key}, which has only {len(storage.data)}")
    return TorchTensor(storage, storage_offset, size, stride)


def _retype_storage(storage: Storage, dtype: str) -> Storage:
    """View an untyped (byte) storage as elements of ``dtype``."""
    itemsize = _NUMPY_DTYPES[dtype].itemsize
    n = len(storage.data) // itemsize
    return Storage(storage.key, dtype, storage.data[:n * itemsize].view(_NUMPY_DTYPES[dtype]))


# -- the zip archive ------------------------------------------------------------

_LOCAL_HEADER_SIZE = 30          # fixed part of a zip local file header
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"


class _Archive:
    """The zip directory of a torch file plus a memory map of its bytes."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        try:
            with zipfile.ZipFile(path) as zf:
                self.members = {info.filename: info for info in zf.infolist()}
                self.prefix = self._find_prefix()
                self.pickle_bytes = zf.read(f"{self.prefix}/data.pkl")
                self._check_byteorder(zf)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                raise LlamanpError(f"{path}: no such file") from None
            raise LlamanpError(f"{self.name} is a damaged zip archive ({e}); "
                               "re-download or re-save it") from None
        self.bytes = np.memmap(path, dtype=np.uint8, mode="r")
        self.storages: dict[str, Storage] = {}

    def _find_prefix(self) -> str:
        pickles = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise LlamanpError(f"{self.name} is a zip archive but not a PyTorch checkpoint "
                               "(no <name>/data.pkl inside); save it with torch.save")
        return pickles[0][:-len("/data.pkl")]

    def _check_byteorder(self, zf: zipfile.ZipFile) -> None:
        member = f"{self.prefix}/byteorder"
        if member in self.members and zf.read(member).strip() != b"little":
            raise LlamanpError(f"{self.name} was saved on a big-endian machine; "
                               "re-save it on a little-endian one (x86, ARM)")

    def storage(self, key: str, dtype: str, numel: int) -> Storage:
        """The flat array of storage ``key``; the same object each time it is named."""
        found = self.storages.get(key)
        if found is None:
            found = Storage(key, dtype, self._member_array(key, dtype, numel))
            self.storages[key] = found
        elif found.dtype != dtype:
            raise _Malformed(f"storage {key} is named as both {found.dtype} and {dtype}")
        return found

    def _member_array(self, key: str, dtype: str, numel: int) -> np.ndarray:
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise LlamanpError(f"{self.name} is damaged: tensor data {name} is missing; "
                               "re-download or re-save it")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise LlamanpError(f"{self.name}: member {name} is compressed or encrypted, "
                               "which torch.save never does; re-save it with torch.save")
        nbytes = numel * _NUMPY_DTYPES[dtype].itemsize
        if info.file_size < nbytes:
            raise LlamanpError(f"{self.name} is damaged: {name} holds {info.file_size} bytes "
                               f"but its tensor needs {nbytes}; re-download or re-save it")
        start = self._data_start(info)
        if start + nbytes > len(self.bytes):
            raise LlamanpError(f"{self.name} is truncated: {name} runs past the end of "
                               "the file; re-download or re-save it")
        return self.bytes[start:start + nbytes].view(_NUMPY_DTYPES[dtype])

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's bytes begin: after its local header, name and extra field."""
        at = info.header_offset
        header = bytes(self.bytes[at:at + _LOCAL_HEADER_SIZE])
        if len(header) < _LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER_MAGIC:
            raise LlamanpError(f"{self.name} is damaged: bad zip header for "
                               f"{info.filename}; re-download or re-save it")
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
        return at + _LOCAL_HEADER_SIZE + name_len + extra_len


# -- the restricted unpickler -------------------------------------------------------

class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and tensors; refuses every other global."""

    def __init__(self, archive: _Archive):
        super().__init__(io.BytesIO(archive.pickle_bytes))
        self._archive = archive

    def find_class(self, module: str, name: str):
        if module == "__builtin__":          # Python 2's name, still written by protocol 2
            module = "builtins"
        found = _ALLOWED.get((module, name))
        if found is None:
            raise LlamanpError(f"refusing to load {self._archive.name}: it references "
                               f"{module}.{name}, which could run code; llamanp only loads "
                               "plain tensors and containers")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Malformed(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, StorageType) and isinstance(key, str)
                and isinstance(numel, int) and numel >= 0):
            raise _Malformed(f"bad storage reference {pid!r:.80}")
        return self._archive.storage(key, storage_type.dtype, numel)


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


def load(path) -> object:
    """Unpickle a torch.save file; tensors come back as :class:`TorchTensor`.

    Containers (dict, OrderedDict, list, tuple, set) and plain values come back
    as themselves, torch.Size as a tuple, torch dtypes as :class:`TorchDtype`.
    Raises LlamanpError for anything malformed or not allow-listed.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        _refuse_non_zip(path)
    archive = _Archive(path)
    try:
        return _TensorUnpickler(archive).load()
    except LlamanpError:
        raise
    except _Malformed as e:
        raise LlamanpError(f"{archive.name} is malformed: {e}; re-download or re-save it") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, RecursionError, OverflowError) as e:
        raise LlamanpError(f"{archive.name} is malformed: its data.pkl does not unpickle "
                           f"({type(e).__name__}: {e}); re-download or re-save it") from None
