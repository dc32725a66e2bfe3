"""The `.lmw` file format: one memory-mappable file per model.

The byte layout is specified in docs/lmw-format.md; this module is its
executable form. :func:`read` validates a file completely before anything
uses it, and :func:`write` is its exact mirror, writing atomically (a
temporary file beside the target, renamed at the end).

    offset  size  field
    0       8     magic  b"\\x89LMW\\r\\n\\x1a\\n"
    8       4     format version, uint32 little-endian (1: all tensors f32;
                  2: some stored as f16, bf16 or q8_0, see llamanp/quant.py)
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

from . import inputfile, quant
from .config import Config
from .errors import LlamanpError
from .tokenizer import TokenizerData

MAGIC = b"\x89LMW\r\n\x1a\n"
VERSION = 2            # the newest version: tensors may be f32, f16, bf16 or q8_0
F32_VERSION = 1        # what an all-f32 file is written as, so older readers keep reading it
VERSIONS = (1, 2)      # the versions this module reads
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, reserved, header length
MAX_HEADER_BYTES = 64 << 20         # a sane bound before we try to parse JSON

# dtype names used in the tensor table (spec §3); version 1 files hold only f32
DTYPES = quant.DTYPES


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


def stored_dtype(dtype: str, shape) -> str:
    """The dtype a tensor of `shape` is stored in when a model is written as
    `dtype` (spec §3.1): 1-D tensors (the norms) always as f32, q8_0 matrices
    whose rows are not a multiple of 32 long as f16."""
    quant.check_dtype(dtype)
    if len(shape) < 2:
        return "f32"
    if dtype == "q8_0" and shape[-1] % quant.Q8_BLOCK:
        return "f16"
    return dtype


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
    # read-only views into the mapping, no copies: f32 tensors as float32 arrays,
    # the others as quant.Packed (widened to float32 on demand)
    tensors: dict[str, "np.ndarray | quant.Packed"]

    @property
    def dtypes(self) -> dict[str, str]:
        """{tensor name: stored dtype}."""
        return {name: "f32" if isinstance(t, np.ndarray) else t.dtype
                for name, t in self.tensors.items()}


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
    if version not in VERSIONS:
        raise LlamanpError(f"{path} is .lmw format version {version}, but this llamanp "
                           f"reads versions {VERSIONS[0]} to {VERSIONS[-1]}; upgrade llamanp "
                           "or re-convert")
    if reserved != 0:
        raise _bad(path, "reserved preamble field is not zero")
    if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen > size:
        raise _bad(path, f"header length {hlen} runs past the end of the file (truncated?)")
    try:
        header = inputfile.loads(bytes(mm[PREAMBLE.size:PREAMBLE.size + hlen]), "header")
    except inputfile.JsonFileError as e:
        raise _bad(path, f"{e.where}: {e.problem}") from None
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
    table = _read_tensor_table(path, version, header["tensors"], data_size, regions)
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
    bad_scales = _find_bad_q8_scales(mm, data_start, table)
    if bad_scales:
        raise _bad(path, f"tensor {bad_scales} has a negative, infinite or NaN q8_0 scale")
    # only now, with everything checked, view the tensors in place
    tensors = {name: _view(mm, data_start + off, dtype, shape)
               for name, (dtype, shape, off) in table.items()}
    return LmwFile(path, version, config, tokenizer, metadata, tensors)


def _view(mm, offset: int, dtype: str, shape: tuple):
    if dtype == "f32":
        return np.frombuffer(mm, dtype="<f4", count=int(np.prod(shape)),
                             offset=offset).reshape(shape)
    return quant.Packed.from_buffer(mm, offset, dtype, shape)


def _find_bad_q8_scales(mm, data_start: int, table: dict) -> Optional[str]:
    """The first q8_0 tensor with a scale that is not a finite number >= +0.

    Viewed as uint16, exactly the binary16 values from +0 to +65504 are below
    0x7C00 (+infinity), so the check is one max per tensor: no temporaries,
    one read of the scales (1/17 of the tensor). The views die with this
    frame, so a file rejected here can still be unmapped.
    """
    for name, (dtype, shape, off) in table.items():
        if dtype == "q8_0":
            count = int(np.prod(shape))
            scales = np.frombuffer(mm, "<u2", count // quant.Q8_BLOCK, data_start + off + count)
            if scales.max() >= 0x7C00:
                return name
    return None


def _region(path, entry: dict, what: str, data_size: int) -> tuple[int, int]:
    off, nbytes = entry.get("offset"), entry.get("nbytes")
    if not (isinstance(off, int) and isinstance(nbytes, int)) or off < 0 or nbytes < 0:
        raise _bad(path, f"{what} has no valid offset/nbytes")
    if off % ALIGN:
        raise _bad(path, f"{what} offset {off} is not a multiple of {ALIGN}")
    if off + nbytes > data_size:
        raise _bad(path, f"{what} runs past the end of the file (truncated?)")
    return off, nbytes


def _read_tensor_table(path, version, table, data_size, regions) -> dict:
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
        if dtype not in DTYPES:
            raise _bad(path, f"tensor {name} has unknown dtype {dtype!r}")
        if dtype != "f32" and version < 2:
            raise _bad(path, f"tensor {name} is {dtype}, but a version {version} file "
                       "holds only f32")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n > 0 for n in shape)):
            raise _bad(path, f"tensor {name} has an invalid shape {shape!r}")
        if dtype != "f32" and len(shape) < 2:
            raise _bad(path, f"tensor {name} is 1-D and {dtype}; 1-D tensors are always f32")
        if dtype == "q8_0" and shape[-1] % quant.Q8_BLOCK:
            raise _bad(path, f"tensor {name} is q8_0 but its rows ({shape[-1]}) are not "
                       f"a multiple of {quant.Q8_BLOCK} long")
        off, nbytes = _region(path, entry, f"tensor {name}", data_size)
        need = quant.nbytes(dtype, shape)
        if nbytes != need:
            raise _bad(path, f"tensor {name} has {nbytes} bytes, its shape needs {need} "
                       f"as {dtype}")
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
          force: bool = False, progress: Optional[Callable[[int, int, str], None]] = None,
          dtype: str = "f32"):
    """Write an .lmw file atomically.

    The tensors are stored as `dtype` (f32, f16, bf16 or q8_0; with the
    exceptions of :func:`stored_dtype`), encoded piece by piece as they are
    written. A file with any tensor other than f32 is version 2, an all-f32
    file version 1 (which older readers read too).

    Everything goes to a temporary file in the target's directory, which is
    renamed over `path` only when complete; on any error (or Ctrl-C) the
    temporary file is removed and an existing `path` is left untouched.
    """
    quant.check_dtype(dtype)
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
        kind = stored_dtype(dtype, t.shape)
        nbytes = quant.nbytes(kind, t.shape)
        table.append({"name": t.name, "dtype": kind, "shape": list(t.shape),
                      "offset": end, "nbytes": nbytes})
        end = _align(end + nbytes)
    version = F32_VERSION if all(e["dtype"] == "f32" for e in table) else VERSION
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
            f.write(PREAMBLE.pack(MAGIC, version, 0, len(hbytes)))
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
                _write_encoded(f, t.name, arr, entry)
                del arr   # free it before the next tensor is produced
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


def _write_encoded(f, name: str, arr: np.ndarray, entry: dict) -> None:
    """Write `arr` encoded as entry["dtype"], exactly entry["nbytes"] bytes."""
    written = 0
    try:
        for piece in quant.encode_stream(arr, entry["dtype"]):
            written += f.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
    except LlamanpError as e:
        raise LlamanpError(f"tensor {name}: {e}") from None
    if written != entry["nbytes"]:
        raise LlamanpError(f"internal: tensor {name} took {written} bytes, "
                           f"not {entry['nbytes']}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pad_to(f, offset: int) -> None:
    pos = f.tell()
    if pos > offset:
        raise LlamanpError("internal: .lmw writer went past a region start")
    f.write(b"\0" * (offset - pos))
