"""The `.lmw` file format: one memory-mappable file per model.

The byte layout is specified in docs/lmw-format.md; this module is its
executable form. :func:`read` validates a file completely before anything
uses it, and :func:`write` is its exact mirror, writing atomically (a
temporary file beside the target, renamed at the end).

    offset  size  field
    0       8     magic  b"\\x89LMW\\r\\n\\x1a\\n"
    8       4     format version, uint32 little-endian (1)
    12      4     reserved, must be 0
    16      8     header length N, uint64 little-endian
    24      N     header: UTF-8 JSON object
    ...           zero padding up to the next multiple of 64: the data section
                  starts there; every region in it starts at a multiple of 64
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .config import Config
from .errors import LlamanpError
from .tokenizer import TokenizerData

MAGIC = b"\x89LMW\r\n\x1a\n"
VERSION = 1
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, reserved, header length
MAX_HEADER_BYTES = 64 << 20         # a sane bound before we try to parse JSON

# dtype names used in the tensor table. Only f32 is readable in version 1; the
# others are reserved so later versions can add them without renaming.
DTYPES = {"f32": np.dtype("<f4")}
RESERVED_DTYPES = ("f16", "bf16", "q8_0")


# --- the tensors a model file must hold ------------------------------------------

def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an .lmw for `cfg` holds, in file order, with its shape.

    The attention projections are stored fused: rows [0, q_dim) of `wqkv` are
    wq, then wk, then wv (kv_dim rows each). `w13` is the SwiGLU gate (w1) on
    top of the up projection (w3). One matrix product instead of three (two)
    is what makes decoding fast, so the file stores them that way.
    """
    qkv_rows = cfg.q_dim + 2 * cfg.kv_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (cfg.dim,)
        shapes[p + "attention.wqkv.weight"] = (qkv_rows, cfg.dim)
        shapes[p + "attention.wo.weight"] = (cfg.dim, cfg.q_dim)
        shapes[p + "ffn_norm.weight"] = (cfg.dim,)
        shapes[p + "feed_forward.w13.weight"] = (2 * cfg.hidden_dim, cfg.dim)
        shapes[p + "feed_forward.w2.weight"] = (cfg.dim, cfg.hidden_dim)
    shapes["norm.weight"] = (cfg.dim,)
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --- reading ------------------------------------------------------------------------

@dataclass
class LmwFile:
    """A validated, memory-mapped .lmw file."""
    path: str
    version: int
    config: Config
    tokenizer: Optional[TokenizerData]
    metadata: dict
    tensors: dict[str, np.ndarray]   # read-only views into the mapping, no copies


def read(path) -> LmwFile:
    """Open and validate `path`; raise LlamanpError with one clear line if bad."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LlamanpError(f"cannot open model {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < PREAMBLE.size:
            raise LlamanpError(f"{path} is not an .lmw model file (too short: {size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm, size)
    except LlamanpError:
        mm.close()
        raise


def _bad(path, what) -> LlamanpError:
    return LlamanpError(f"{path} is damaged: {what}; re-run convert.py to recreate it")


def _parse(path: str, mm: mmap.mmap, size: int) -> LmwFile:
    magic, version, reserved, hlen = PREAMBLE.unpack_from(mm, 0)
    if magic != MAGIC:
        raise LlamanpError(f"{path} is not an .lmw model file (wrong magic); "
                           "convert checkpoints with convert.py first")
    if version != VERSION:
        raise LlamanpError(f"{path} is .lmw format version {version}, but this llamanp "
                           f"reads version {VERSION}; upgrade llamanp or re-convert")
    if reserved != 0:
        raise _bad(path, "reserved preamble field is not zero")
    if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen > size:
        raise _bad(path, f"header length {hlen} runs past the end of the file (truncated?)")
    try:
        header = json.loads(bytes(mm[PREAMBLE.size:PREAMBLE.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    for key in ("config", "tensors"):
        if key not in header:
            raise _bad(path, f"header has no '{key}'")

    data_start = _align(PREAMBLE.size + hlen)
    data_size = size - data_start
    try:
        config = Config.from_dict(header["config"])
    except LlamanpError as e:
        raise _bad(path, str(e)) from None

    regions = []  # (offset, nbytes, what) for the overlap / truncation checks
    table = _read_tensor_table(path, header["tensors"], data_size, regions)
    _check_expected(path, config, table)

    tokenizer = None
    th = header.get("tokenizer")
    if th is not None:
        if not isinstance(th, dict):
            raise _bad(path, "tokenizer section is not an object")
        off, nbytes = _region(path, th, "tokenizer", data_size)
        regions.append((off, nbytes, "tokenizer"))
        blob = bytes(mm[data_start + off:data_start + off + nbytes])
        fields = {k: v for k, v in th.items() if k not in ("offset", "nbytes")}
        try:
            tokenizer = TokenizerData.from_header(fields, blob)
        except LlamanpError as e:
            raise _bad(path, f"tokenizer section: {e}") from None

    _check_layout(path, regions, data_size)
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _bad(path, "metadata is not an object")
    # only now, with everything checked, view the tensors in place
    tensors = {name: np.frombuffer(mm, dtype=DTYPES[dtype], count=int(np.prod(shape)),
                                   offset=data_start + off).reshape(shape)
               for name, (dtype, shape, off) in table.items()}
    return LmwFile(path, version, config, tokenizer, metadata, tensors)


def _region(path, entry: dict, what: str, data_size: int) -> tuple[int, int]:
    off, nbytes = entry.get("offset"), entry.get("nbytes")
    if not (isinstance(off, int) and isinstance(nbytes, int)) or off < 0 or nbytes < 0:
        raise _bad(path, f"{what} has no valid offset/nbytes")
    if off % ALIGN:
        raise _bad(path, f"{what} offset {off} is not a multiple of {ALIGN}")
    if off + nbytes > data_size:
        raise _bad(path, f"{what} runs past the end of the file (truncated?)")
    return off, nbytes


def _read_tensor_table(path, table, data_size, regions) -> dict:
    """Check every entry of the tensor table; return {name: (dtype, shape, offset)}."""
    if not isinstance(table, list):
        raise _bad(path, "tensor table is not a list")
    tensors = {}
    for entry in table:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _bad(path, "tensor table entry without a name")
        name = entry["name"]
        if name in tensors:
            raise _bad(path, f"tensor {name} appears twice")
        dtype = entry.get("dtype")
        if dtype in RESERVED_DTYPES:
            raise LlamanpError(f"{path}: tensor {name} is stored as {dtype}, which this "
                               "llamanp cannot read yet; re-convert with the default f32")
        if dtype not in DTYPES:
            raise _bad(path, f"tensor {name} has unknown dtype {dtype!r}")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n > 0 for n in shape)):
            raise _bad(path, f"tensor {name} has an invalid shape {shape!r}")
        off, nbytes = _region(path, entry, f"tensor {name}", data_size)
        count = int(np.prod(shape, dtype=np.int64))
        if nbytes != count * DTYPES[dtype].itemsize:
            raise _bad(path, f"tensor {name} has {nbytes} bytes, its shape needs "
                       f"{count * DTYPES[dtype].itemsize}")
        regions.append((off, nbytes, f"tensor {name}"))
        tensors[name] = (dtype, tuple(shape), off)
    return tensors


def _check_expected(path, config: Config, table: dict) -> None:
    want = expected_shapes(config)
    missing = [n for n in want if n not in table]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _bad(path, f"tensor {missing[0]}{more} missing")
    extra = [n for n in table if n not in want]
    if extra:
        raise _bad(path, f"unexpected tensor {extra[0]} for this config")
    for name, shape in want.items():
        if table[name][1] != shape:
            raise _bad(path, f"tensor {name} has shape {list(table[name][1])}, "
                       f"the config needs {list(shape)}")


def _check_layout(path, regions, data_size) -> None:
    """Regions must not overlap, and the file must end where the last one ends."""
    regions.sort()
    end = 0
    for off, nbytes, what in regions:
        if off < end:
            raise _bad(path, f"{what} overlaps the previous region")
        end = off + nbytes
    if end != data_size:
        if end < data_size:
            raise _bad(path, f"{data_size - end} unexpected bytes after the last tensor")
        raise _bad(path, "file is truncated")


# --- writing ------------------------------------------------------------------------

@dataclass
class TensorSource:
    """A tensor to write: its name, shape, and a function that produces it."""
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


def write(path, config: Config, tensors: Iterable[TensorSource],
          tokenizer: Optional[TokenizerData] = None, metadata: Optional[dict] = None,
          force: bool = False, progress: Optional[Callable[[int, int, str], None]] = None):
    """Write an .lmw file atomically.

    Everything goes to a temporary file in the target's directory, which is
    renamed over `path` only when complete; on any error (or Ctrl-C) the
    temporary file is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    if path.exists() and not force:
        raise LlamanpError(f"{path} already exists; pass --force to overwrite it")
    tensors = list(tensors)
    want = expected_shapes(config)
    if [t.name for t in tensors] != list(want):
        raise LlamanpError("internal: tensors do not match the config's expected set")

    table, end = [], 0
    for t in tensors:
        if tuple(t.shape) != want[t.name]:
            raise LlamanpError(f"tensor {t.name} has shape {list(t.shape)}, the config "
                               f"needs {list(want[t.name])}")
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * 4
        table.append({"name": t.name, "dtype": "f32", "shape": list(t.shape),
                      "offset": end, "nbytes": nbytes})
        end = _align(end + nbytes)
    header = {"config": config.to_dict(), "tensors": table, "metadata": metadata or {}}
    blob = b""
    if tokenizer is not None:
        blob = tokenizer.data
        header["tokenizer"] = dict(tokenizer.header(), offset=end, nbytes=len(blob))
    hbytes = json.dumps(header, indent=1).encode("utf-8")
    data_start = _align(PREAMBLE.size + len(hbytes))

    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise LlamanpError(f"cannot write in {directory}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, VERSION, 0, len(hbytes)))
            f.write(hbytes)
            _pad_to(f, data_start)
            for i, (t, entry) in enumerate(zip(tensors, table)):
                if progress:
                    progress(i, len(tensors), t.name)
                _pad_to(f, data_start + entry["offset"])
                arr = np.ascontiguousarray(t.load(), dtype="<f4")
                if arr.shape != tuple(t.shape):
                    raise LlamanpError(f"tensor {t.name}: source gave shape "
                                       f"{list(arr.shape)}, expected {list(t.shape)}")
                f.write(memoryview(arr).cast("B"))
            if tokenizer is not None:
                _pad_to(f, data_start + header["tokenizer"]["offset"])
                f.write(blob)
            if progress:
                progress(len(tensors), len(tensors), "")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a model is not
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pad_to(f, offset: int) -> None:
    pos = f.tell()
    if pos > offset:
        raise LlamanpError("internal: .lmw writer went past a region start")
    f.write(b"\0" * (offset - pos))
