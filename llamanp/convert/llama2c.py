"""Readers for Andrej Karpathy's llama2.c checkpoints.

Two kinds of file come out of llama2.c:

* the training checkpoint ``ckpt.pt`` written by train.py: a torch.save'd dict
  ``{"model_args": {...}, "model": state_dict, "optimizer": ..., ...}`` whose
  state_dict already uses Meta's tensor names (keys may carry the
  ``_orig_mod.`` prefix that torch.compile adds);
* the exported ``model.bin`` that run.c reads, float32 only:

  - version 0 ("legacy"): seven int32 ``dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, vocab_size, max_seq_len``; a *negative* vocab_size means the
    classifier is not the token embedding and is stored at the very end.
    Weights follow in run.c order: token embedding, every layer's attention
    norm, every wq, wk, wv, wo, every ffn norm, w1, w2, w3, the final norm, two
    RoPE tables (cos, sin; max_seq_len * head_dim/2 floats each, recomputed by
    us and skipped) and, if unshared, the classifier.
  - version 1: uint32 magic "ak42" (0x616b3432), int32 version = 1, the same
    seven int32, a uint8 "classifier is shared" flag, zero padding to 256
    bytes; then every attention norm, every ffn norm, the final norm, the
    token embedding, every wq, wk, wv, wo, w1, w2, w3 and, if unshared, the
    classifier. No RoPE tables.
  - version 2 is int8 (Q8_0) and is not read here.

llama2.c models use head_dim = dim / n_heads, RoPE base 10000 and RMSNorm
epsilon 1e-5 (run.c hard-codes it), and rotate interleaved pairs like Meta's
code, so their q/k rows are already in the canonical layout.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

import numpy as np

from .. import inputfile
from ..config import Config
from ..errors import LlamanpError, brief
from . import torchfile
from .checkpoint import (
    Checkpoint,
    SourceTensor,
    canonical_shapes,
    check_canonical_tensors,
    layer_tensor_names,
    require_float_tensors,
)

# Buffers some model.py variants save next to the weights; all are recomputed.
_IGNORED_KEYS = {"rope.freqs", "freqs_cis", "freqs_cos", "freqs_sin"}
_COMPILE_PREFIX = "_orig_mod."

_MAGIC = 0x616B3432                  # "ak42" as a little-endian uint32
_PARAMS = struct.Struct("<7i")       # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq
_V1_HEADER_BYTES = 256
_FLOAT_BYTES = 4


# --- shared checks ------------------------------------------------------------------

def _positive_int(value, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LlamanpError(f"{where}: {what} must be a positive integer, got {brief(value)}")
    return value


def _positive_number(value, what: str, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not 0 < value <= sys.float_info.max:
        raise LlamanpError(f"{where}: {what} must be a positive number, got {brief(value)}")
    return float(value)


# --- the training checkpoint (.pt) ------------------------------------------------

def is_llama2c_pt(obj) -> bool:
    """Does an unpickled torch file look like a llama2.c training checkpoint?"""
    return (isinstance(obj, dict) and isinstance(obj.get("model_args"), dict)
            and isinstance(obj.get("model"), dict))


def _strip_compile_prefix(state: dict, where: str) -> dict:
    """Drop the `_orig_mod.` that torch.compile puts in front of every key."""
    out = {}
    for key, value in torchfile.state_dict(state, where, "model").items():
        name = key[len(_COMPILE_PREFIX):] if key.startswith(_COMPILE_PREFIX) else key
        if name in out:
            raise LlamanpError(f"{where} has {brief(name)} both with and without the "
                               f"{_COMPILE_PREFIX} prefix; the state_dict is inconsistent")
        out[name] = value
    return out


def _is_tied(state: dict) -> bool:
    """llama2.c ties output.weight to the embedding: same storage, or at least same values."""
    emb, out = state.get("tok_embeddings.weight"), state.get("output.weight")
    if out is None:
        return True            # only the embedding was kept: it is the classifier too
    if emb is None or emb.shape != out.shape:
        return False
    return emb.same_data_as(out) or bool(np.array_equal(emb.float32(), out.float32()))


def _pt_config(args: dict, state: dict, tied: bool, where: str) -> Config:
    dim = _positive_int(args.get("dim"), "model_args.dim", where)
    n_layers = _positive_int(args.get("n_layers"), "model_args.n_layers", where)
    n_heads = _positive_int(args.get("n_heads"), "model_args.n_heads", where)
    n_kv = args.get("n_kv_heads")
    n_kv_heads = n_heads if n_kv is None else _positive_int(n_kv, "model_args.n_kv_heads", where)
    vocab_size = _positive_int(args.get("vocab_size"), "model_args.vocab_size", where)
    max_seq_len = _positive_int(args.get("max_seq_len", 2048), "model_args.max_seq_len", where)
    if dim % n_heads:
        raise LlamanpError(f"{where}: dim {dim} is not a multiple of n_heads {n_heads}")
    # hidden_dim is usually None in model_args (derived from multiple_of); the
    # weights themselves are the authority.
    w1 = state.get(layer_tensor_names(0)[6])
    if w1 is None or len(w1.shape) != 2:
        raise LlamanpError(f"{where} lacks a 2-d layers.0.feed_forward.w1.weight; "
                           "it is not a llama2.c model checkpoint")
    hidden_dim = w1.shape[0]
    declared = args.get("hidden_dim")
    if declared is not None and declared != hidden_dim:
        raise LlamanpError(f"{where}: model_args.hidden_dim is {declared} but w1 has "
                           f"{hidden_dim} rows; the checkpoint is inconsistent")
    norm_eps = _positive_number(args.get("norm_eps", 1e-5), "model_args.norm_eps", where)
    cfg = Config(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 head_dim=dim // n_heads, hidden_dim=hidden_dim, vocab_size=vocab_size,
                 norm_eps=norm_eps, rope_theta=10000.0, max_seq_len=max_seq_len,
                 tied_embeddings=tied)
    cfg.validate()
    return cfg


def _lazy(tensor: torchfile.TorchTensor) -> SourceTensor:
    return SourceTensor(tuple(tensor.shape), tensor.float32)


def read_llama2c_pt(path, tree=None) -> Checkpoint:
    """Read a llama2.c train.py checkpoint; `tree` is torchfile.load(path) if already done."""
    where = os.path.basename(os.fspath(path))
    if tree is None:
        tree = torchfile.load(path)
    if not is_llama2c_pt(tree):
        raise LlamanpError(f"{where} is not a llama2.c training checkpoint "
                           "(expected a dict with 'model_args' and 'model')")
    state = _strip_compile_prefix(tree["model"], where)
    require_float_tensors(state, where)
    tied = _is_tied(state)
    cfg = _pt_config(tree["model_args"], state, tied, where)
    weights = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    if tied:
        weights.pop("output.weight", None)
    check_canonical_tensors(weights, cfg, where)
    return Checkpoint(config=cfg, tensors={k: _lazy(v) for k, v in weights.items()},
                      source="llama2.c checkpoint (.pt)")


# --- the exported model (.bin) -------------------------------------------------------

@dataclass
class BinHeader:
    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int          # always positive here
    max_seq_len: int
    shared_classifier: bool
    header_bytes: int


def _read_bin_header(path: str) -> BinHeader:
    """Parse the header; raise LlamanpError if it cannot be a llama2.c header."""
    where = os.path.basename(path)
    with inputfile.open_regular(path) as f:
        head = f.read(_V1_HEADER_BYTES)
    if len(head) < _PARAMS.size:
        raise LlamanpError(f"{where} is too short to be a llama2.c model")
    if struct.unpack_from("<I", head)[0] == _MAGIC:
        return _versioned_header(head, where)
    dim, hidden, layers, heads, kv_heads, vocab, seq = _PARAMS.unpack_from(head)
    # Legacy files signal an unshared classifier with a negative vocab_size.
    return BinHeader(0, dim, hidden, layers, heads, kv_heads, abs(vocab), seq,
                     shared_classifier=vocab > 0, header_bytes=_PARAMS.size)


def _versioned_header(head: bytes, where: str) -> BinHeader:
    if len(head) < _V1_HEADER_BYTES:
        raise LlamanpError(f"{where} is truncated inside its 256-byte llama2.c header")
    version = struct.unpack_from("<i", head, 4)[0]
    if version == 2:
        raise LlamanpError(f"{where} is a llama2.c version-2 (int8 Q8_0) export, which "
                           "llamanp does not read; export with --version 1 (float32) instead")
    if version != 1:
        raise LlamanpError(f"{where} is a llama2.c export of unknown version {version}; "
                           "export with --version 1 (float32) instead")
    params = _PARAMS.unpack_from(head, 8)
    shared = head[8 + _PARAMS.size]
    return BinHeader(1, *params, shared_classifier=bool(shared),
                     header_bytes=_V1_HEADER_BYTES)


def _check_header(h: BinHeader, where: str) -> None:
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                 "vocab_size", "max_seq_len"):
        if getattr(h, name) <= 0:
            raise LlamanpError(f"{where}: header field {name} is {getattr(h, name)}; "
                               "the file is not a llama2.c model or is damaged")
    if h.dim % h.n_heads or h.n_heads % h.n_kv_heads:
        raise LlamanpError(f"{where}: header says dim {h.dim}, {h.n_heads} heads, "
                           f"{h.n_kv_heads} kv heads, which do not divide evenly; "
                           "the file is not a llama2.c model or is damaged")


def _bin_config(h: BinHeader) -> Config:
    cfg = Config(dim=h.dim, n_layers=h.n_layers, n_heads=h.n_heads, n_kv_heads=h.n_kv_heads,
                 head_dim=h.dim // h.n_heads, hidden_dim=h.hidden_dim,
                 vocab_size=h.vocab_size, norm_eps=1e-5, rope_theta=10000.0,
                 max_seq_len=h.max_seq_len, tied_embeddings=h.shared_classifier)
    cfg.validate()
    return cfg


def _per_layer(cfg: Config, index: int) -> list[tuple[str, tuple[int, ...]]]:
    """One weight kind (index into layer_tensor_names) for every layer, in order."""
    shapes = canonical_shapes(cfg)
    names = [layer_tensor_names(i)[index] for i in range(cfg.n_layers)]
    return [(n, shapes[n]) for n in names]


# Positions of each weight kind in layer_tensor_names.
_ATT_NORM, _WQ, _WK, _WV, _WO, _FFN_NORM, _W1, _W2, _W3 = range(9)
_ROPE_TABLES = "(rope tables)"      # a skipped region, not a tensor


def _bin_layout(cfg: Config, version: int, rope_tables: bool) -> list[tuple[str, tuple]]:
    """The (name, shape) sequence of the float32 payload, in file order."""
    embedding = ("tok_embeddings.weight", (cfg.vocab_size, cfg.dim))
    final_norm = ("norm.weight", (cfg.dim,))
    if version == 0:
        layout = [embedding, *_per_layer(cfg, _ATT_NORM)]
        for kind in (_WQ, _WK, _WV, _WO, _FFN_NORM, _W1, _W2, _W3):
            layout += _per_layer(cfg, kind)
        layout.append(final_norm)
        if rope_tables:   # cos and sin, max_seq_len x head_dim/2 each
            layout.append((_ROPE_TABLES, (2, cfg.max_seq_len, cfg.head_dim // 2)))
    else:
        layout = [*_per_layer(cfg, _ATT_NORM), *_per_layer(cfg, _FFN_NORM),
                  final_norm, embedding]
        for kind in (_WQ, _WK, _WV, _WO, _W1, _W2, _W3):
            layout += _per_layer(cfg, kind)
    if not cfg.tied_embeddings:
        layout.append(("output.weight", (cfg.vocab_size, cfg.dim)))
    return layout


def _payload_floats(layout) -> int:
    return sum(int(np.prod(shape)) for _, shape in layout)


def _expected_floats(cfg: Config, rope_tables: bool) -> int:
    """The payload size the header implies, by arithmetic (a bogus header may claim
    billions of layers, so do not build the layout before the size has matched)."""
    d, q, kv, hid = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    per_layer = 2 * d + q * d + 2 * kv * d + d * q + 3 * hid * d
    total = cfg.n_layers * per_layer + d + cfg.vocab_size * d
    if not cfg.tied_embeddings:
        total += cfg.vocab_size * d
    if rope_tables:
        total += cfg.max_seq_len * cfg.head_dim      # two tables of head_dim/2 columns
    return total


def _choose_layout(path: str, h: BinHeader, cfg: Config):
    """The layout whose size matches the file exactly (v0 may lack the RoPE tables)."""
    where = os.path.basename(path)
    size = os.path.getsize(path)
    options = [True, False] if h.version == 0 else [False]
    expected = []
    for rope_tables in options:
        nbytes = h.header_bytes + _FLOAT_BYTES * _expected_floats(cfg, rope_tables)
        if nbytes == size:
            return _bin_layout(cfg, h.version, rope_tables)
        expected.append(nbytes)
    implied = " or ".join(str(n) for n in expected)
    if size < min(expected):
        raise LlamanpError(f"{where} is truncated: its header implies {implied} bytes but "
                           f"the file has {size}; re-export or re-download it")
    if size > max(expected):
        raise LlamanpError(f"{where} has {size - max(expected)} bytes beyond what its header "
                           f"implies ({implied}); it is not a float32 llama2.c export "
                           "or is damaged")
    raise LlamanpError(f"{where} is {size} bytes, which fits neither {expected[0]} (with RoPE "
                       f"tables) nor {expected[1]} (without); the file is damaged")


def _slice(flat: np.ndarray, start: int, shape: tuple) -> SourceTensor:
    count = int(np.prod(shape))

    def load() -> np.ndarray:
        # A view of the memory map; converted only if the host is not little-endian.
        return np.asarray(flat[start:start + count].reshape(shape), dtype=np.float32)
    return SourceTensor(tuple(shape), load)


def is_llama2c_bin(path) -> bool:
    """Does `path` look like a llama2.c export: the magic, or a legacy header whose size fits?"""
    path = os.fspath(path)
    try:
        with inputfile.open_regular(path) as f:
            if f.read(4) == struct.pack("<I", _MAGIC):
                return True       # any version: the reader explains what it cannot read
        h = _read_bin_header(path)
        _check_header(h, path)
        _choose_layout(path, h, _bin_config(h))
        return True
    except (LlamanpError, OSError):
        return False


def read_llama2c_bin(path) -> Checkpoint:
    """Memory-map a llama2.c float32 export (version 0 or 1)."""
    path = os.fspath(path)
    where = os.path.basename(path)
    if not os.path.lexists(path):
        raise LlamanpError(f"{path}: no such file")
    h = _read_bin_header(path)
    _check_header(h, where)
    cfg = _bin_config(h)
    layout = _choose_layout(path, h, cfg)
    flat = np.memmap(path, dtype="<f4", mode="r", offset=h.header_bytes,
                     shape=(_payload_floats(layout),))
    tensors, at = {}, 0
    for name, shape in layout:
        if name != _ROPE_TABLES:
            tensors[name] = _slice(flat, at, shape)
        at += int(np.prod(shape))
    check_canonical_tensors(tensors, cfg, where)
    return Checkpoint(config=cfg, tensors=tensors,
                      source=f"llama2.c export (.bin version {h.version})",
                      metadata={"llama2c_bin_version": h.version})
