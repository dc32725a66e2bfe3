"""The `.lmw` file format: one memory-mappable file per model.

The byte layout is specified in docs/lmw-format.md; this module is its
executable form. :func:`read` validates a file completely before anything
uses it, and :func:`write` is its exact mirror, writing atomically (a
temporary file beside the target, renamed at the end).

    offset  size  field
    0       8     magic  b"\\x89LMW\\r\\n\\x1a\\n"
    8       4     format version, uint32 little-endian (1: all tensors f32;
                  2: some stored as f16, bf16 or q8_0, see llamanp/quant.py;
                  3: as 2, with a CRC-32 of the header and of every region)
    12      4     version 3: CRC-32 of the header bytes, uint32 little-endian;
                  versions 1 and 2: reserved, must be 0
    16      8     header length N, uint64 little-endian
    24      N     header: UTF-8 JSON object
    ...           zero padding up to the next multiple of 64: the data section
                  starts there; every region in it starts at a multiple of 64
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from . import fileio, inputfile, quant
from .config import Config
from .errors import LlamanpError
from .tokenizer import TokenizerData

MAGIC = b"\x89LMW\r\n\x1a\n"
VERSION = 3            # the newest version, the one written: CRC-32s of every region
QUANT_VERSION = 2      # from this version on, tensors may be f16, bf16 or q8_0
CRC_VERSION = 3        # from this version on, the header and every region carry a CRC-32
VERSIONS = (1, 2, 3)   # the versions this module reads
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header CRC-32 (or 0), header length
MAX_HEADER_BYTES = 64 << 20         # a sane bound before we try to parse JSON
MAX_DIMS = 4                        # tensors are 1-D or 2-D; many more axes mean damage
CRC_PLACEHOLDER = "0" * 8           # what the writer puts in the header before it knows

# dtype names used in the tensor table (spec §3); version 1 files hold only f32
DTYPES = quant.DTYPES


# --- the tensors a model file must hold ------------------------------------------

#: the tensors of each transformer block, in file order
LAYER_TENSORS = ("attention_norm.weight", "attention.wqkv.weight", "attention.wo.weight",
                 "ffn_norm.weight", "feed_forward.w13.weight", "feed_forward.w2.weight")

def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an .lmw for `cfg` holds, in file order, with its shape.

    The attention projections are stored fused: rows [0, q_dim) of `wqkv` are
    wq, then wk, then wv (kv_dim rows each). `w13` is the SwiGLU gate (w1) on
    top of the up projection (w3). One matrix product instead of three (two)
    is what makes decoding fast, so the file stores them that way.
    """
    qkv_rows = cfg.q_dim + 2 * cfg.kv_dim
    layer = dict(zip(LAYER_TENSORS, [(cfg.dim,), (qkv_rows, cfg.dim), (cfg.dim, cfg.q_dim),
                                     (cfg.dim,), (2 * cfg.hidden_dim, cfg.dim),
                                     (cfg.dim, cfg.hidden_dim)]))
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        for name, shape in layer.items():
            shapes[f"layers.{i}.{name}"] = shape
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
    # where each region (tensors by name, and "tokenizer") is in the file, as
    # (offset, nbytes), and the CRC-32 the header gives for it (version 3 on;
    # loading does not check the tensors' ones, llamanp.verify does)
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    checksums: dict[str, int] = field(default_factory=dict)

    @property
    def dtypes(self) -> dict[str, str]:
        """{tensor name: stored dtype}."""
        return {name: "f32" if isinstance(t, np.ndarray) else t.dtype
                for name, t in self.tensors.items()}


def read(path) -> LmwFile:
    """Open and validate `path`; raise LlamanpError with one clear line if bad."""
    path = str(path)
    with fileio.open_regular(path, "model") as f:
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
    magic, version, header_crc, hlen = PREAMBLE.unpack_from(mm, 0)
    if magic != MAGIC:
        raise LlamanpError(f"{path} is not an .lmw model file (wrong magic); "
                           "convert checkpoints with convert.py first")
    if version not in VERSIONS:
        raise LlamanpError(f"{path} is .lmw format version {version}, but this llamanp "
                           f"reads versions {VERSIONS[0]} to {VERSIONS[-1]}; upgrade llamanp "
                           "or re-convert")
    if version < CRC_VERSION and header_crc != 0:
        raise _bad(path, "reserved preamble field is not zero")
    if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen > size:
        raise _bad(path, f"header length {hlen} runs past the end of the file (truncated?)")
    hbytes = bytes(mm[PREAMBLE.size:PREAMBLE.size + hlen])
    # the header is small and everything depends on it: its CRC is checked on
    # every load (the tensors' only by llamanp.verify, to keep loading mmap-fast)
    if version >= CRC_VERSION and zlib.crc32(hbytes) != header_crc:
        raise _bad(path, "the header's CRC-32 does not match")
    try:
        header = inputfile.loads(hbytes, "header")
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
    checksums = {}
    table = _read_tensor_table(path, version, header["tensors"], data_size, regions,
                               checksums)
    _check_expected(path, config, table)

    tokenizer = None
    th = header.get("tokenizer")
    if th is not None:
        if not isinstance(th, dict):
            raise _bad(path, "tokenizer section is not an object")
        off, nbytes = _region(path, th, "tokenizer", data_size)
        regions.append((off, nbytes, "tokenizer"))
        blob = bytes(mm[data_start + off:data_start + off + nbytes])
        if version >= CRC_VERSION:
            # read whole and parsed at every load anyway, so checked every time
            checksums["tokenizer"] = _crc_field(path, th, "tokenizer")
            if zlib.crc32(blob) != checksums["tokenizer"]:
                raise _bad(path, "the tokenizer's CRC-32 does not match")
        fields = {k: v for k, v in th.items() if k not in ("offset", "nbytes", "crc32")}
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
    places = {what.removeprefix("tensor "): (data_start + off, nbytes)
              for off, nbytes, what in regions}
    return LmwFile(path, version, config, tokenizer, metadata, tensors, places, checksums)


def _crc_field(path, entry: dict, what: str) -> int:
    """The CRC-32 of a region, as the header gives it: 8 lowercase hex digits."""
    crc = entry.get("crc32")
    if not (isinstance(crc, str) and len(crc) == 8 and all(c in "0123456789abcdef" for c in crc)):
        raise _bad(path, f"{what} has no valid crc32 (8 hex digits)")
    return int(crc, 16)


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


def _read_tensor_table(path, version, table, data_size, regions, checksums) -> dict:
    """Check every entry of the tensor table; return {name: (dtype, shape, offset)}.

    Every size is checked with Python integers against the bytes the file
    holds before numpy sees it, so no product of a shape can wrap around."""
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
        if dtype != "f32" and version < QUANT_VERSION:
            raise _bad(path, f"tensor {name} is {dtype}, but a version {version} file "
                       "holds only f32")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and 0 < len(shape) <= MAX_DIMS
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                        for n in shape)):
            raise _bad(path, f"tensor {name} has an invalid shape {_short(shape)}")
        if math.prod(shape) > data_size:   # every dtype takes at least a byte a value
            raise _bad(path, f"tensor {name} has shape {_short(shape)}, more values than "
                       "the file has bytes")
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
        if version >= CRC_VERSION:
            checksums[name] = _crc_field(path, entry, f"tensor {name}")
        tensors[name] = (dtype, tuple(shape), off)
    return tensors


def _short(value, limit: int = 60) -> str:
    """repr(value) for an error line, cut short; `value` comes from JSON, so it
    is small enough to format whole (the header is bounded)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_expected(path, config: Config, table: dict) -> None:
    # the layer count sizes the table of expected shapes: check it against the
    # tensors present first, so that a huge one costs nothing
    per_file = 2 + (0 if config.tied_embeddings else 1)
    if config.n_layers > (len(table) - per_file) // len(LAYER_TENSORS):
        raise _bad(path, f"the config has {config.n_layers} layers, but the file holds "
                   f"{len(table)} tensors, too few for them")
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
                      "offset": end, "nbytes": nbytes, "crc32": CRC_PLACEHOLDER})
        end = _align(end + nbytes)
    header = {"config": config.to_dict(), "tensors": table, "metadata": metadata or {}}
    blob = b""
    if tokenizer is not None:
        blob = tokenizer.data
        header["tokenizer"] = dict(tokenizer.header(), offset=end, nbytes=len(blob),
                                   crc32=f"{zlib.crc32(blob):08x}")
    # the CRCs are known only once the tensors are written: the header goes out
    # with placeholders of the same width first, and is rewritten in place
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
                entry["crc32"] = f"{_write_encoded(f, t.name, arr, entry):08x}"
                del arr   # free it before the next tensor is produced
            if tokenizer is not None:
                _pad_to(f, data_start + header["tokenizer"]["offset"])
                f.write(blob)
            _rewrite_header(f, header, len(hbytes))
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


def _write_encoded(f, name: str, arr: np.ndarray, entry: dict) -> int:
    """Write `arr` encoded as entry["dtype"], exactly entry["nbytes"] bytes;
    return their CRC-32, computed piece by piece as they go out."""
    written, crc = 0, 0
    try:
        for piece in quant.encode_stream(arr, entry["dtype"]):
            raw = memoryview(np.ascontiguousarray(piece)).cast("B")
            crc = zlib.crc32(raw, crc)
            written += f.write(raw)
    except LlamanpError as e:
        raise LlamanpError(f"tensor {name}: {e}") from None
    if written != entry["nbytes"]:
        raise LlamanpError(f"internal: tensor {name} took {written} bytes, "
                           f"not {entry['nbytes']}")
    return crc


def _rewrite_header(f, header: dict, length: int) -> None:
    """Put the header, its CRCs now filled in, over the placeholder one."""
    hbytes = json.dumps(header, indent=1).encode("utf-8")
    if len(hbytes) != length:
        raise LlamanpError("internal: the .lmw header changed length when its CRCs were set")
    end = f.tell()
    f.seek(0)
    f.write(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(hbytes), length))
    f.write(hbytes)
    f.seek(end)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pad_to(f, offset: int) -> None:
    pos = f.tell()
    if pos > offset:
        raise LlamanpError("internal: .lmw writer went past a region start")
    f.write(b"\0" * (offset - pos))
