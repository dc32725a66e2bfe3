"""Reader for GGUF files, llama.cpp's model format (architecture "llama").

A GGUF file is a small header and a data section. The header holds typed
key/value metadata (hyper-parameters under ``llama.*``, the tokenizer under
``tokenizer.*``) and one record per tensor: its name, its shape, its GGML
element type (F32, F16, BF16, or a block quantization such as Q8_0, Q4_1, the
K-quants or the IQ types) and where its bytes are. The header is first
checked against the file's size (:func:`header_problem`); then the ``gguf``
package (llama.cpp's gguf-py) parses it and memory-maps the file. This module
maps names and hyper-parameters onto llamanp's, and dequantizes each tensor to
float32 with ``gguf.quants.dequantize`` when the writer asks for it, one
tensor at a time.

Facts about the files llama.cpp writes, which the code relies on:

* Shapes are stored innermost first (``ne0`` is the length of a row), so a
  linear layer of ``[out_features, in_features]`` is recorded as
  ``[in, out]``; reversed, they are llamanp's row-major ``[out, in]``, and
  the bytes are already in that order.
* Query and key rows are in Meta's interleaved-pair RoPE layout. llama.cpp's
  ``convert_hf_to_gguf.py`` permutes Hugging Face's rotate-half rows back
  (``LlamaModel.permute``), because llama.cpp's "normal" RoPE rotates adjacent
  pairs; transformers' GGUF loader undoes that permutation again
  (``LlamaTensorProcessor._reverse_permute_weights``). So the rows are taken
  as they are. tests/test_gguf.py checks this against transformers on a real
  llama.cpp-converted model.
* Llama 3.1-style RoPE scaling is not described by metadata: the converter
  stores a ``rope_freqs.weight`` tensor of per-frequency divisors instead
  (pair i turns at ``theta^(-2i/head_dim) / rope_freqs[i]``). llamanp keeps
  the scaling as parameters, so the divisors are matched to the "llama3"
  formula (:func:`llama3_scaling_from_divisors`) and refused if they do not
  follow it. Other scaling types (``llama.rope.scaling.type`` linear, yarn,
  longrope) are refused by name.
* A model whose output matrix is the token embedding has no
  ``output.weight`` tensor.

Tensor names, GGUF -> canonical (N = layer):

    token_embd.weight          tok_embeddings.weight
    output_norm.weight         norm.weight
    output.weight              output.weight             (absent: tied)
    blk.N.attn_norm.weight     layers.N.attention_norm.weight
    blk.N.attn_q.weight        layers.N.attention.wq.weight
    blk.N.attn_k.weight        layers.N.attention.wk.weight
    blk.N.attn_v.weight        layers.N.attention.wv.weight
    blk.N.attn_output.weight   layers.N.attention.wo.weight
    blk.N.ffn_norm.weight      layers.N.ffn_norm.weight
    blk.N.ffn_gate.weight      layers.N.feed_forward.w1.weight
    blk.N.ffn_down.weight      layers.N.feed_forward.w2.weight
    blk.N.ffn_up.weight        layers.N.feed_forward.w3.weight

The tokenizer (the ``tokenizer.*`` metadata) is handed, as plain Python
values, to :func:`llamanp.convert.tokenizers.tokenizer_from_gguf`; that step is
separate from the weights and skipped where that module is not available.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import mmap
import os
import re
import struct
from typing import Any, Optional

import numpy as np

from .. import inputfile
from ..config import Config, RopeScaling
from ..errors import LlamanpError, brief
from .checkpoint import Checkpoint, SourceTensor, check_canonical_tensors, few_names

ARCHITECTURE = "llama"
_PREFIX = ARCHITECTURE + "."

_GLOBAL_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_LAYER_TENSOR_NAME = re.compile(r"^blk\.(0|[1-9][0-9]*)\.(\w+)\.weight$")
_ROPE_FREQS = "rope_freqs.weight"

_REQUIRED = object()     # marks a metadata key without a default


def _gguf_package():
    """The gguf package (llama.cpp's gguf-py), which parses and dequantizes."""
    try:
        import gguf  # the package, not this module: imports are absolute
    except ImportError:
        raise LlamanpError("reading GGUF files needs the gguf package, a dependency of "
                           "llamanp that is missing here: pip install gguf") from None
    return gguf


# --- opening the file ----------------------------------------------------------------------

def _open(path: str, where: str):
    """A GGUFReader over the file, or one line saying why the file is unreadable."""
    gguf = _gguf_package()
    try:
        problem = header_problem(path)
    except OSError as e:
        raise LlamanpError(f"cannot read {path}: {e.strerror or e}") from None
    if problem is not None:
        raise LlamanpError(f"{where} is not a readable GGUF file: {problem}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:          # damage that header_problem does not look for
        raise LlamanpError(f"{where} is not a readable GGUF file: "
                           f"{_first_line(f'{type(e).__name__}: {e}')}") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _printable(text: str) -> str:
    """A name read from the file, fit for a one-line message even if it is garbage."""
    if len(text) > 120:
        text = text[:120] + "..."
    return text if text and text.isprintable() else repr(text)


# Before the gguf package parses a file, its header is walked once by the
# format specification, checking every count and length against the size of
# the file. The package's reader trusts them: a damaged array length can make
# it loop for hours, and other damage stops it with an exception that does not
# say where. The walk costs a fraction of the parse (0.1 s for a 49k-token
# vocabulary) and names the first problem. The layout:
#   "GGUF", uint32 version, uint64 tensor count, uint64 metadata count,
#   metadata: (string key, uint32 value type, value) ...,
#   tensor records: (string name, uint32 n_dims, uint64 dims[n_dims],
#                    uint32 GGML type, uint64 offset into the data section) ...,
#   padding to the alignment (general.alignment, default 32), data section.
# Strings are a uint64 byte length and UTF-8 bytes; an array is a uint32 element
# type, a uint64 count and the elements.

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_NESTING = 8       # llama.cpp writes flat arrays; nesting is allowed, a little


class _EndOfFile(Exception):
    """The header walk ran past the end of the file."""


class _HeaderWalker:
    """Reads the header's little-endian fields in order, refusing to read past the end."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise _EndOfFile(what)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"the {what} is not valid UTF-8") from None

    def skip_value(self, value_type: int, key: str, depth: int = 0) -> None:
        if value_type in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[value_type], f"value of {key}")
        elif value_type == _STRING:
            self.take(self.u64(f"value of {key}"), f"value of {key}")
        elif value_type == _ARRAY:
            if depth >= _MAX_ARRAY_NESTING:     # bounded recursion, here and in the gguf package
                raise ValueError(f"metadata {key} nests arrays more than "
                                 f"{_MAX_ARRAY_NESTING} deep")
            element_type = self.u32(f"value of {key}")
            count = self.u64(f"value of {key}")
            if element_type in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[element_type], f"value of {key}")
            else:
                for _ in range(count):
                    self.skip_value(element_type, key, depth + 1)
        else:
            raise ValueError(f"metadata {key} has unknown value type {value_type}")


def header_problem(path) -> Optional[str]:
    """What is wrong with a GGUF file's structure, or None: the header can be
    parsed within the file, and every tensor's data lies within it."""
    with inputfile.open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "the file is empty"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk_header(_HeaderWalker(data), size)


def _walk_header(walk: _HeaderWalker, file_size: int) -> Optional[str]:
    gguf = _gguf_package()
    try:
        if walk.take(4, "magic") != b"GGUF":
            return "it does not start with the bytes GGUF"
        version = walk.u32("version")
        if version & 0xFFFF == 0 and version:
            return "it is a big-endian GGUF file; llamanp reads little-endian files only"
        if version not in (2, 3):
            return f"it is GGUF version {version}; the gguf package reads versions 2 and 3"
        n_tensors = walk.u64("tensor count")
        n_metadata = walk.u64("metadata count")
        alignment = _DEFAULT_ALIGNMENT
        seen: set[str] = set()
        for _ in range(n_metadata):
            key = _printable(walk.string("metadata key"))
            if key in seen:
                return f"metadata key {key} appears twice"
            seen.add(key)
            value_type = walk.u32(f"type of {key}")
            if key == "general.alignment" and value_type == 4:
                alignment = walk.u32(f"value of {key}")
                if alignment == 0 or alignment & (alignment - 1):
                    return f"general.alignment is {alignment}, not a power of two"
            else:
                walk.skip_value(value_type, key)
        records = []
        for _ in range(n_tensors):
            name = _printable(walk.string("tensor name"))
            n_dims = walk.u32(f"dimensions of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                return f"tensor {name} has {n_dims} dimensions"
            dims = [walk.u64(f"shape of {name}") for _ in range(n_dims)]
            type_id = walk.u32(f"type of {name}")
            offset = walk.u64(f"offset of {name}")
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                return (f"tensor {name} has GGML type id {type_id}, which is unknown (to "
                        "the installed gguf package); the file is damaged or too new")
            records.append((name, dims, qtype, offset))
    except _EndOfFile as e:
        return f"the file is truncated: it ends inside the header (in the {e})"
    except ValueError as e:
        return str(e)
    data_start = -(-walk.pos // alignment) * alignment
    names: set[str] = set()
    spans = []
    for name, dims, qtype, offset in records:
        if name in names:
            return f"tensor {name} appears twice"
        names.add(name)
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:        # dims[0] is the length of a row
            return (f"tensor {name} has rows of {dims[0]} values, not a whole number of "
                    f"{qtype.name} blocks of {block_size}")
        if offset % alignment:
            return (f"tensor {name} starts at offset {offset} of the data section, not a "
                    f"multiple of the alignment {alignment}")
        nbytes = math.prod(dims) // block_size * block_bytes
        end = data_start + offset + nbytes
        if end > file_size:
            return (f"the file is truncated: tensor {name} needs bytes up to {end} but the "
                    f"file has {file_size}")
        spans.append((offset, offset + nbytes, name))
    return _overlap(spans)


def _overlap(spans: list) -> Optional[str]:
    """Two tensors whose bytes overlap (each byte of data belongs to one tensor), or None."""
    spans = sorted(s for s in spans if s[0] < s[1])
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            return f"tensors {first} and {second} claim the same bytes of the data section"
    return None


# --- metadata ------------------------------------------------------------------------------

def _field_value(reader, key: str, where: str) -> Any:
    """A metadata value as plain Python: str, int, float, bool, or a list of those."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise LlamanpError(f"{where}: metadata {key} is not valid UTF-8; "
                           "the file is damaged") from None


class _Hyperparameters:
    """Typed access to the ``llama.*`` metadata, with one-line errors."""

    def __init__(self, reader, where: str):
        self.reader, self.where = reader, where

    def raw(self, name: str) -> Any:
        return _field_value(self.reader, _PREFIX + name, self.where)

    def _get(self, name: str, default):
        value = self.raw(name)
        if isinstance(value, list):     # some keys may hold one value per layer
            if value and all(v == value[0] for v in value):
                value = value[0]
            else:
                raise LlamanpError(f"{self.where}: {_PREFIX}{name} varies between layers "
                                   f"({few_names([str(v) for v in value])}); llamanp runs "
                                   "models whose layers are all alike")
        if value is None:
            if default is _REQUIRED:
                raise LlamanpError(f"{self.where} lacks the metadata key {_PREFIX}{name}; "
                                   "it is not a complete llama GGUF")
            return default
        return value

    def positive_int(self, name: str, default=_REQUIRED) -> int:
        value = self._get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LlamanpError(f"{self.where}: {_PREFIX}{name} must be a positive integer, "
                               f"got {brief(value)}")
        return value

    def positive_number(self, name: str, default=_REQUIRED) -> float:
        value = self._get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or value <= 0:
            raise LlamanpError(f"{self.where}: {_PREFIX}{name} must be a positive number, "
                               f"got {brief(value)}")
        return float(value)


def _check_architecture(reader, where: str) -> None:
    architecture = _field_value(reader, "general.architecture", where)
    if architecture is None:
        raise LlamanpError(f"{where} has no general.architecture; it is not a GGUF model file")
    if architecture != ARCHITECTURE:
        raise LlamanpError(f"{where} is a GGUF of architecture {brief(architecture)}; "
                           "llamanp converts llama only")


def _refuse_unsupported(hp: _Hyperparameters, where: str) -> None:
    """Features the llama architecture can carry but llamanp does not run."""
    experts = hp.raw("expert_count")
    if isinstance(experts, int) and experts > 0:
        raise LlamanpError(f"{where} is a mixture-of-experts model ({experts} experts); "
                           "llamanp runs dense Llama models only")
    scaling = hp.raw("rope.scaling.type")
    if scaling not in (None, "none"):
        raise LlamanpError(f"{where} uses {brief(scaling)} RoPE scaling "
                           f"({_PREFIX}rope.scaling.type); llamanp supports only Llama 3 "
                           "('llama3') scaling")
    linear = hp.raw("rope.scale_linear")           # the key older files used
    if linear is not None and linear != 1.0:
        raise LlamanpError(f"{where} uses 'linear' RoPE scaling ({_PREFIX}rope.scale_linear = "
                           f"{linear}); llamanp supports only Llama 3 ('llama3') scaling")


# --- tensors ---------------------------------------------------------------------------------

def _canonical_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_NAME.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"layers.{int(match.group(1))}.{_LAYER_TENSORS[match.group(2)]}.weight"
    return None


@functools.lru_cache(maxsize=None)
def can_dequantize(qtype) -> bool:
    """Whether the installed gguf package turns this GGML type into float32.

    Asked of the package itself, by dequantizing one block of zero bytes, so
    that every type it supports (now or in a later version) is accepted.
    """
    gguf = _gguf_package()
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError):
        return False
    return True


def _loader(tensor, shape: tuple[int, ...]):
    """Read and dequantize one tensor, only when called."""
    def load() -> np.ndarray:
        values = _gguf_package().quants.dequantize(tensor.data, tensor.tensor_type)
        return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    return load


def _logical_shape(tensor) -> tuple[int, ...]:
    """The shape outermost first: GGUF records it innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _tensors(reader, where: str) -> tuple[dict[str, SourceTensor], Optional[np.ndarray]]:
    """Canonical tensors (lazy), and the rope_freqs divisors if the file has them."""
    tensors: dict[str, SourceTensor] = {}
    unknown, rope_divisors = [], None
    for tensor in reader.tensors:
        if not can_dequantize(tensor.tensor_type):
            raise LlamanpError(f"{where}: tensor {_printable(tensor.name)} is stored as "
                               f"{tensor.tensor_type.name}, which the gguf package cannot "
                               "dequantize; llamanp needs float or quantized weights it can "
                               "turn into float32")
        shape = _logical_shape(tensor)
        if tensor.name == _ROPE_FREQS:
            rope_divisors = _loader(tensor, shape)().astype(np.float64)
            continue
        name = _canonical_name(tensor.name)
        if name is None:
            unknown.append(_printable(tensor.name))
        else:
            tensors[name] = SourceTensor(shape, _loader(tensor, shape))
    if unknown:
        raise LlamanpError(f"{where} has tensor(s) {few_names(unknown)} that a plain Llama "
                           "model does not have; llamanp reads plain Llama models only")
    return tensors, rope_divisors


# --- RoPE scaling from rope_freqs ------------------------------------------------------------

def llama3_scaling_from_divisors(divisors: np.ndarray, head_dim: int,
                                 theta: float) -> Optional[RopeScaling]:
    """Parameters of "llama3" scaling that reproduce per-frequency RoPE divisors.

    Returns None when every divisor is 1 (no scaling). The formula (see
    docs/lmw-format.md) keeps frequencies whose wavelength is below
    A = L/high_freq_factor, divides those above B = L/low_freq_factor by
    `factor`, and in between divides by d with
    ``1/d = (1 - s)/factor + s``, ``s = (1/λ - 1/B) / (1/A - 1/B)``.
    So `factor` is the largest divisor, and the "blended" divisors lie on a
    straight line in (1/λ, s) whose ends give A and B; only L/low and
    L/high matter, so L can be chosen freely. Meta's constants (low 1,
    high 4, L 8192) are tried first, then the line fitted to the blended
    divisors (which needs two of them). Whatever is proposed is accepted
    only if llamanp's own RoPE reproduces every divisor; otherwise a
    LlamanpError says that the divisors follow no llama3 scaling.
    """
    from ..model import rope_frequencies

    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return None
    base = rope_frequencies(head_dim, theta, None)
    factor = float(divisors.max())
    candidates = [RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)]
    candidates += _fitted_scalings(divisors, 2 * math.pi / base, factor)
    for scaling in candidates:
        implied = base / rope_frequencies(head_dim, theta, scaling)
        if np.allclose(implied, divisors, rtol=1e-5, atol=0):
            return scaling
    raise LlamanpError("rope_freqs.weight holds per-frequency RoPE divisors that follow "
                       "no Llama 3 ('llama3') scaling; llamanp cannot run this RoPE variant")


def _fitted_scalings(divisors: np.ndarray, wavelengths: np.ndarray,
                     factor: float) -> list[RopeScaling]:
    """Scalings read off the blended divisors (none when fewer than two)."""
    if factor <= 1.0:
        return []
    blended = (divisors > 1.0 + 1e-6) & (divisors < factor * (1.0 - 1e-6))
    if blended.sum() < 2:
        return []
    s = (1.0 / divisors[blended] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(1.0 / wavelengths[blended], s, 1)
    if slope <= 0 or not 0 < -intercept < 1:
        return []
    short_edge = slope / (1.0 - intercept)       # A = L / high_freq_factor
    long_edge = slope / -intercept               # B = L / low_freq_factor
    context = max(1, round(long_edge))           # L, so that low_freq_factor is about 1
    exact = RopeScaling(factor=factor, low_freq_factor=context / long_edge,
                        high_freq_factor=context / short_edge,
                        original_max_position_embeddings=context)
    tidy = RopeScaling(factor=_tidy(factor), low_freq_factor=_tidy(exact.low_freq_factor),
                       high_freq_factor=_tidy(exact.high_freq_factor),
                       original_max_position_embeddings=context)
    return [tidy, exact]


def _tidy(x: float) -> float:
    """x to 6 significant digits: the fit recovers round numbers up to float32 noise."""
    return float(f"{x:.6g}")


# --- the configuration -----------------------------------------------------------------------

def _config(hp: _Hyperparameters, tensors: dict, rope_divisors: Optional[np.ndarray],
            where: str) -> Config:
    dim = hp.positive_int("embedding_length")
    n_heads = hp.positive_int("attention.head_count")
    n_kv_heads = hp.positive_int("attention.head_count_kv", default=n_heads)
    if hp.raw("attention.key_length") is not None:
        head_dim = hp.positive_int("attention.key_length")
    elif hp.raw("rope.dimension_count") is not None:
        head_dim = hp.positive_int("rope.dimension_count")
    elif dim % n_heads:
        raise LlamanpError(f"{where}: embedding_length {dim} is not a multiple of "
                           f"head_count {n_heads}, and no attention.key_length is given")
    else:
        head_dim = dim // n_heads
    if hp.positive_int("attention.value_length", default=head_dim) != head_dim:
        raise LlamanpError(f"{where}: attention.value_length differs from the key head "
                           f"width {head_dim}; llamanp needs keys and values of one width")
    rotated = hp.positive_int("rope.dimension_count", default=head_dim)
    if rotated != head_dim:
        raise LlamanpError(f"{where}: RoPE rotates {rotated} of the {head_dim} components "
                           "of each head (rope.dimension_count); llamanp rotates whole heads")

    embedding = tensors.get("tok_embeddings.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise LlamanpError(f"{where} lacks a 2-d token_embd.weight; it is not a Llama model")
    theta = hp.positive_number("rope.freq_base", default=10000.0)
    rope_scaling = None
    if rope_divisors is not None:
        if rope_divisors.shape != (head_dim // 2,):
            raise LlamanpError(f"{where}: rope_freqs.weight must hold {head_dim // 2} divisors "
                               f"(one per rotated pair), but its shape is "
                               f"{list(rope_divisors.shape)}")
        if not np.all(np.isfinite(rope_divisors) & (rope_divisors > 0)):
            raise LlamanpError(f"{where}: rope_freqs.weight holds divisors that are not "
                               "positive finite numbers; the file is damaged")
        try:
            rope_scaling = llama3_scaling_from_divisors(rope_divisors, head_dim, theta)
        except LlamanpError as e:
            raise LlamanpError(f"{where}: {e}") from None

    n_layers = hp.positive_int("block_count")
    in_file = _layers_in_file(tensors)
    if n_layers > in_file:
        raise LlamanpError(f"{where}: {_PREFIX}block_count is {n_layers} but the file holds "
                           f"tensors for {in_file} layer(s); it is incomplete or damaged")

    cfg = Config(dim=dim, n_layers=n_layers,
                 n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                 hidden_dim=hp.positive_int("feed_forward_length"),
                 vocab_size=hp.positive_int("vocab_size", default=embedding.shape[0]),
                 norm_eps=hp.positive_number("attention.layer_norm_rms_epsilon"),
                 rope_theta=theta, rope_scaling=rope_scaling,
                 max_seq_len=hp.positive_int("context_length"),
                 tied_embeddings="output.weight" not in tensors)
    cfg.validate()
    return cfg


def _layers_in_file(tensors: dict) -> int:
    """1 + the highest layer number among the tensors (0 if there are none)."""
    numbers = [int(name.split(".")[1]) for name in tensors if name.startswith("layers.")]
    return max(numbers, default=-1) + 1


# --- the tokenizer ---------------------------------------------------------------------------

def tokenizer_metadata(reader, where: str) -> dict:
    """Every ``tokenizer.*`` key with its value as plain Python values."""
    return {key: _field_value(reader, key, where)
            for key in reader.fields if key.startswith("tokenizer.")}


def _read_tokenizer(reader, where: str):
    """TokenizerData from the metadata, or None (also when no reader for it exists)."""
    if importlib.util.find_spec(f"{__package__}.tokenizers") is None:
        return None
    from .tokenizers import tokenizer_from_gguf
    return tokenizer_from_gguf(tokenizer_metadata(reader, where))


# --- public entry point ----------------------------------------------------------------------

def read_gguf(path) -> Checkpoint:
    """Read a llama GGUF file: hyper-parameters, lazily dequantized tensors, tokenizer."""
    path = os.fspath(path)
    where = os.path.basename(path) or path
    reader = _open(path, where)
    _check_architecture(reader, where)
    hp = _Hyperparameters(reader, where)
    _refuse_unsupported(hp, where)
    tensors, rope_divisors = _tensors(reader, where)
    cfg = _config(hp, tensors, rope_divisors, where)
    check_canonical_tensors(tensors, cfg, where)

    type_counts = collections.Counter(t.tensor_type.name for t in reader.tensors
                                      if t.name != _ROPE_FREQS)
    types = [name for name, _ in type_counts.most_common()]
    metadata = {"gguf_tensor_types": dict(type_counts.most_common())}
    model_name = _field_value(reader, "general.name", where)
    if isinstance(model_name, str):
        metadata["gguf_name"] = model_name
    if rope_divisors is not None:
        metadata["gguf_rope_freqs"] = ("matched to llama3 scaling" if cfg.rope_scaling
                                       else "all ones: no scaling")
    return Checkpoint(config=cfg, tensors=tensors,
                      tokenizer=_read_tokenizer(reader, where),
                      source=f"GGUF ({', '.join(types)})", metadata=metadata)
