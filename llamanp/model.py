"""The Llama transformer, forward pass only, in float32 NumPy.

Data flow (one call of Model.forward over T new tokens at positions p..p+T-1):

    tokens ─► embedding ─► x [T, dim]
    for each layer:
        x += wo · attention(rope(q), rope(k), v)    q,k,v = wqkv · rmsnorm(x)
        x += w2 · (silu(w1 · h) * (w3 · h))          h = rmsnorm(x)
    logits = output · rmsnorm(x)

Weights are read-only views into the memory-mapped .lmw file (f32 files), or
are widened to float32 one layer at a time into buffers reused for every layer
(f16 / bf16 / q8_0 files). Everything that does not depend on the tokens (RoPE
tables, weight views, buffers) is prepared once at load time, so the per-token
work is a handful of large NumPy calls, and their results land in arrays a
Workspace lends again and again (the run state), not in fresh temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from . import lmw, parallel, threads
from .config import Config, RopeScaling
from .errors import LlamanpError
from .kvcache import KVCache, make_cache
from .quant import Packed
from .tokenizer import Tokenizer

# --- the maths ----------------------------------------------------------------------

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out=None) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, for each row of x [T, dim]
    (into `out` if given)."""
    dim = x.shape[-1]
    if len(x) == 1:   # decoding: one dot product, and the scale is a scalar
        scale = np.float32(1 / math.sqrt(float(x[0] @ x[0]) / dim + eps))
    else:
        scale = 1 / np.sqrt(np.einsum("td,td->t", x, x)[:, None] / dim + eps)
    out = np.multiply(x, weight, out=out)
    out *= scale
    return out


def linear(x: np.ndarray, w_t, out=None) -> np.ndarray:
    """x @ W^T: x is [T, in], w_t is W^T [in, out], a transposed view of W [out, in]
    (or a Streamed compressed W).

    One row (decoding) is a matrix-vector product on W itself: BLAS's gemv
    streams the weights faster than a one-row gemm does, and streaming the
    weights is all that decoding one token costs. A few rows (checking
    speculative proposals, small batches) are W @ x^T: OpenBLAS runs that
    order 1.3 times as fast as x @ W^T for up to STREAM_ROWS rows on
    SmolLM2's matrices (and slower for many).
    """
    if isinstance(w_t, Streamed):
        return w_t.times(x, out)
    if x.shape[0] == 1:
        return np.matmul(w_t.T, x[0], out=None if out is None else out[0])[None]
    if x.shape[0] <= STREAM_ROWS:
        y = np.matmul(w_t.T, x.T).T        # [T, out], a view of the [out, T] product
        if out is None:
            return np.ascontiguousarray(y)
        np.copyto(out, y)
        return out
    return np.matmul(x, w_t, out=out)


#: up to this many tokens in a pass (decoding; checking a few speculative
#: proposals) stream compressed layers through the cache instead of widening
#: them whole: a few rows do too little arithmetic to pay for writing every
#: widened weight out to memory and reading it back
STREAM_ROWS = 16


class Streamed:
    """A compressed matrix W [out, in] (a Packed), multiplied a piece of rows
    at a time: each piece is widened into a float32 buffer that is still in
    the CPU's cache when the product reads it. For a few tokens this beats
    widening W whole (which writes it all out to memory and reads it back);
    for many tokens the whole widened matrix and one gemm win, except for
    the output matrix, which is never widened whole.

    The pieces are the model's parallel.Ahead pieces first..first+len-1:
    with more than one thread, worker threads widen them ahead of time. The
    product runs on one BLAS thread (the other cores are widening), and
    gives every row the bits of the whole matrix's product (parallel.ALIGN).
    """

    def __init__(self, ahead: parallel.Ahead, first: int, bounds: list, shape: tuple):
        self.ahead = ahead
        self.first = first                # the index of this matrix's first piece
        self.bounds = bounds              # (lo, hi) rows of each piece
        self.shape = shape                # (out, in)

    def times(self, x: np.ndarray, out=None) -> np.ndarray:
        """x @ W^T for rows x [T, in], float32 [T, out] (into `out` if given);
        one row is a matrix-vector product per piece, as in linear()."""
        y = np.empty((len(x), self.shape[0]), np.float32) if out is None else out
        bounds = self.bounds
        if len(x) == 1:
            def use(j, w):
                lo, hi = bounds[j]
                np.matmul(w, x[0], out=y[0, lo:hi])
        else:      # W @ x^T: see linear()
            def use(j, w):
                lo, hi = bounds[j]
                np.copyto(y[:, lo:hi], np.matmul(w, x.T).T)
        with threads.one_blas_thread():
            self.ahead.each_widened(self.first, len(bounds), use)
        return y


def stream_all(matrices: list) -> tuple[parallel.Ahead, list]:
    """The compressed matrices (Packed [out, in], in the order a forward pass
    multiplies by them) cut into pieces: one parallel.Ahead over all of
    them, and a Streamed for each."""
    pieces, streamed = [], []
    for w in matrices:
        bounds = parallel.cut_rows(*w.shape)
        streamed.append((len(pieces), bounds, w.shape))
        pieces.extend(w.rows(lo, hi) for lo, hi in bounds)
    ahead = parallel.Ahead(pieces, [(first, len(bounds)) for first, bounds, _ in streamed])
    return ahead, [Streamed(ahead, first, bounds, shape) for first, bounds, shape in streamed]


_MINUS_LOG2_E = np.float32(-math.log2(math.e))


def swiglu(gate_up: np.ndarray, hidden: int, out=None) -> np.ndarray:
    """silu(gate) * up, where gate_up = [gate | up] along the last axis.

    silu(g) = g * sigmoid(g) = g / (1 + e^-g), with e^-g taken as
    2^(-g log2 e): NumPy's exp2 is faster than its exp. Computed in one
    array (`out` if given): at prefill sizes fresh temporaries cost more than
    the arithmetic. The power may overflow to inf for very negative g;
    g/inf = -0 is the right limit.
    """
    gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
    out = np.multiply(gate, _MINUS_LOG2_E, out=out)
    with np.errstate(over="ignore"):
        np.exp2(out, out=out)
    out += 1
    np.divide(gate, out, out=out)
    out *= up
    return out


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Optional[RopeScaling]) -> np.ndarray:
    """The rotation speed (radians per position) of each of head_dim/2 pairs.

    Pair i turns at theta^(-2i/head_dim). Llama 3.1 scaling slows down the
    low frequencies (long wavelengths) by `factor`, keeps the high ones, and
    blends smoothly in between, so the model can reach past its original
    training context.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return freqs
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor    # longer than this: fully scaled
    high_wavelen = old_ctx / scaling.high_freq_factor  # shorter than this: untouched
    wavelen = 2 * math.pi / freqs
    smooth = ((old_ctx / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    return np.where(wavelen < high_wavelen, freqs,
                    np.where(wavelen > low_wavelen, freqs / scaling.factor, blended))


class RopeTable:
    """The rotation e^(i * position * frequency) of every position and pair,
    as complex64 [positions, head_dim/2]: computed once, grown on demand."""

    def __init__(self, config: Config):
        self.freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.limit = config.max_seq_len
        self.rot = np.zeros((0, len(self.freqs)), np.complex64)

    def get(self, start: int, n: int) -> np.ndarray:
        """The rotations of positions start..start+n-1, [n, 1, head_dim/2]."""
        self._grow(start + n)
        return self.rot[start:start + n, None, :]

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The rotations of arbitrary positions, [len(positions), 1, head_dim/2]."""
        self._grow(int(positions.max()) + 1)
        return self.rot[positions, None, :]

    def _grow(self, end: int) -> None:
        if end > len(self.rot):
            size = min(max(end, 2 * len(self.rot), 256), max(self.limit, end))
            # angles in float64, so that far positions keep their precision
            angles = np.outer(np.arange(size, dtype=np.float64), self.freqs)
            self.rot = (np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64)


def apply_rope(x: np.ndarray, rot: np.ndarray, out=None) -> np.ndarray:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its angle.

    x is [T, heads, head_dim] (its last axis contiguous); this is Meta's layout
    (HF checkpoints are permuted into it at conversion time). Read as complex
    numbers a + ib, the rotation of a pair is one complex multiplication:
    (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos).
    The result goes into `out` (float32, shaped as x) if given.
    """
    z = np.multiply(x.view(np.complex64), rot,
                    out=None if out is None else out.view(np.complex64))
    return z.view(np.float32)


#: queries per block in causal attention: a block only looks at the keys up to
#: its own last position, which skips most of the masked-out upper triangle
#: and keeps the score matrices cache-sized
ATTENTION_BLOCK = 128

#: the causal mask of a block's queries (rows) against the block's own keys
#: (columns): a key at or before the query is in its past, a later one in its
#: future. A smaller block uses the top-left corner.
_PAST = np.tril(np.ones((ATTENTION_BLOCK, ATTENTION_BLOCK), np.float32))

#: softmax's sums must land in this range when the scores are exponentiated
#: without first subtracting their maximum (see softmax_parts)
_SAFE_SUMS = (2.0 ** -100, 2.0 ** 64)


class Workspace:
    """Named float32 arrays reused from call to call (llama2.c's RunState).

    Each role (the normalised input, q/k/v, the scores, ...) gets one buffer,
    allocated the first time and grown when a call needs more. Temporaries
    of prefill size made fresh in every layer cost a page fault per 4 KiB
    page, several microseconds each on a virtual machine; these pay them
    once. An array taken for a role is valid until that role is taken again.
    """

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def take(self, role: str, shape) -> np.ndarray:
        n = math.prod(shape)
        buf = self.buffers.get(role)
        if buf is None or len(buf) < n:
            buf = self.buffers[role] = np.empty(n, np.float32)
        return buf[:n].reshape(shape)


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
              work: Optional[Workspace] = None, observe=None) -> np.ndarray:
    """Grouped-query causal attention: softmax(q k^T / sqrt(hd)) v.

    q: [T, n_heads, hd], the queries of the last T of the keys/values
    [n_kv, hd, start+T] (llamanp.kvcache's layout): `start` keys come before
    the block (in any order), then the block's own T, which the causal mask
    covers. Query head h uses kv head h // group, as Meta's repeat_kv does;
    grouping the queries instead of repeating the keys keeps it one batched
    matmul per block, without copying the cache. `work` lends the score
    matrices and the outputs. `observe(weights, sums, first)`, if given, is
    shown each query block's unnormalised weights [n_kv, rows, seen] and their
    sums, rows ordered (query, head of the group) from query `first` on (the
    KV-cache strategies that evict by attention read them there).

    The softmax is taken in base 2: 2^(s * log2 e) = e^s, and folding log2 e
    into the (small) query scale lets NumPy's exp2 run, which is faster than
    its exp.
    """
    T, n_heads, hd = q.shape
    n_kv = keys.shape[0]
    group = n_heads // n_kv
    scale = np.float32(math.log2(math.e) / math.sqrt(hd))
    if T == 1:
        # [n_kv, group, 1, hd] against [n_kv, 1, hd, seen]: one query per head
        qg = (q * scale).reshape(n_kv, group, 1, hd)
        return attend_one(qg, keys, values, observe).reshape(1, n_heads * hd)
    # queries as [n_kv, T, group, hd]: a block of consecutive queries is then
    # one contiguous [n * group, hd] matrix per kv head (rows ordered t, g)
    work = work if work is not None else Workspace()
    qg = work.take("queries", (n_kv, T, group, hd))
    np.multiply(q.reshape(T, n_kv, group, hd).transpose(1, 0, 2, 3), scale, out=qg)
    out = work.take("mixed", (n_kv, T, group, hd))
    for t0 in range(0, T, ATTENTION_BLOCK):
        t1 = min(T, t0 + ATTENTION_BLOCK)
        n, seen = t1 - t0, start + t1             # this block sees keys 0..seen-1
        attend_block(qg[:, t0:t1].reshape(n_kv, n * group, hd),
                     keys[..., :seen], values[..., :seen],
                     out[:, t0:t1].reshape(n_kv, n * group, hd), group,
                     work.take("scores", (n_kv, n * group, seen)),
                     None if observe is None else lambda w, sums: observe(w, sums, t0))
    result = work.take("attention", (T, n_kv, group, hd))
    result[:] = out.transpose(1, 0, 2, 3)
    return result.reshape(T, n_heads * hd)


def attend_block(qb: np.ndarray, keys: np.ndarray, values: np.ndarray, out: np.ndarray,
                 group: int, buf: np.ndarray, observe=None) -> None:
    """n consecutive queries (the last of them at the last key), rows of qb
    [n_kv, n * group, hd] ordered (t, g), against keys/values [n_kv, hd, seen];
    writes the attention output into `out` [n_kv, n * group, hd]; the scores
    go into `buf` [n_kv, n * group, seen]. `observe(weights, sums)` is shown
    the weights before they are used.

    Every key before the block is in every query's past: only the block's own
    n keys need the causal mask.
    """
    n_kv, rows, _ = qb.shape
    n, seen = rows // group, keys.shape[2]
    weights, sums = softmax_parts(
        lambda: times_keys(qb, keys, out=buf),                 # [n_kv, rows, seen]
        lambda scores: scores.reshape(n_kv, n, group, seen)[..., seen - n:],
        _PAST[:n, None, :n])
    if observe is not None:
        observe(weights, sums)
    times_values(weights, values, out=out)
    out /= sums[..., None]


def attend_one(qg: np.ndarray, keys: np.ndarray, values: np.ndarray,
               observe=None) -> np.ndarray:
    """A single query per head, qg [n_kv, group, 1, hd] (scaled), against
    keys/values [n_kv, hd, seen]; returns [n_kv, group, 1, hd].
    `observe(weights [n_kv, group, seen], sums [n_kv, group], 0)` is shown
    the weights before they are used.

    Both products are matrix-vector products, batched over the heads in one
    call each: numpy hands each head to BLAS's gemv, which streams the cache
    faster than the general matrix product does for a handful of rows (and
    streaming the cache is all that decoding costs at long contexts). No
    mask: a single new token sees everything.
    """
    n_kv, group, _, hd = qg.shape
    # The two kinds of storage keep their own shapes on purpose: the scores'
    # shape decides how BLAS sums them (the plain path's [n_kv, group, 1,
    # seen] makes every head's softmax sum a call of its own), and changing
    # it would change the last bits of every result computed so far.
    if not isinstance(keys, np.ndarray):     # narrow storage, widened block by block
        w, sums = softmax_parts(lambda: times_keys(qg.reshape(n_kv, group, hd), keys))
        if observe is not None:
            observe(w, sums, 0)
        mixed = times_values(w, values)
        mixed /= sums[..., None]
        return mixed.reshape(n_kv, group, 1, hd)
    # [n_kv, group, 1, hd] @ [n_kv, 1, hd, seen] -> [n_kv, group, 1, seen]
    w, sums = softmax_parts(lambda: np.matmul(qg, keys[:, None]))
    if observe is not None:
        observe(w.reshape(n_kv, group, -1), sums.reshape(n_kv, group), 0)
    # [n_kv, 1, hd, seen] @ [n_kv, group, seen, 1] -> [n_kv, group, hd, 1]
    mixed = np.matmul(values[:, None], w.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    mixed /= sums[..., None]
    return mixed


def times_keys(q: np.ndarray, keys, out=None) -> np.ndarray:
    """The scores q @ keys: q [n_kv, rows, hd], keys [n_kv, hd, seen] ->
    [n_kv, rows, seen].

    Keys kept in narrow storage (llamanp.kvcache.quantized) come a block of
    positions at a time, widened into a buffer that stays in the CPU cache
    while it is multiplied. For a few rows (decoding) a block-quantized store
    hands over its integer codes and their scales separately: each 32-wide
    slice of head_dim is multiplied on its own and the scales are applied to
    the few scores, not to the many codes.
    """
    if isinstance(keys, np.ndarray):
        return np.matmul(q, keys, out=out)
    n_kv, rows, hd = q.shape
    if out is None:
        out = np.empty((n_kv, rows, keys.shape[2]), np.float32)
    for lo, hi, block, scale in keys.blocks(fold=rows <= FOLD_ROWS):
        if scale is None:
            np.matmul(q, block, out=out[..., lo:hi])
            continue
        nb = scale.shape[1]          # [n_kv, nb, hi-lo]: one scale per slice and position
        part = np.matmul(q.reshape(n_kv, rows, nb, hd // nb).transpose(0, 2, 1, 3),
                         block.reshape(n_kv, nb, hd // nb, hi - lo))   # [n_kv, nb, rows, n]
        part *= scale[:, :, None, :]
        np.sum(part, axis=1, out=out[..., lo:hi])
    return out


def times_values(w: np.ndarray, values, out=None) -> np.ndarray:
    """The mix w @ values^T: w [n_kv, rows, seen], values [n_kv, hd, seen] ->
    [n_kv, rows, hd], block by block for narrow storage (see times_keys:
    there the scales go into the weights)."""
    if isinstance(values, np.ndarray):
        return np.matmul(w, values.transpose(0, 2, 1), out=out)
    n_kv, rows, _ = w.shape
    hd = values.shape[1]
    if out is None:
        out = np.empty((n_kv, rows, hd), np.float32)
    for lo, hi, block, scale in values.blocks(fold=rows <= FOLD_ROWS):
        if scale is None:
            part = np.matmul(w[..., lo:hi], block.transpose(0, 2, 1))
        else:
            nb = scale.shape[1]
            ws = w[:, None, :, lo:hi] * scale[:, :, None, :]          # [n_kv, nb, rows, n]
            part = np.matmul(ws, block.reshape(n_kv, nb, hd // nb, hi - lo).transpose(0, 1, 3, 2))
            part = part.transpose(0, 2, 1, 3).reshape(n_kv, rows, hd)
        if lo == 0:
            out[...] = part
        else:
            out += part
    return out


#: up to this many query rows, block-quantized keys and values are multiplied
#: as codes with their scales applied to the (few) results (see times_keys)
FOLD_ROWS = 16


def softmax_parts(scores_of, own_keys=None, past=None):
    """Softmax without its division: (2^scores, their sums over the last
    axis). `scores_of()` computes the scores (the power overwrites them);
    `own_keys(scores)` is the view of the scores that the causal mask `past`
    (1 for a key in the query's past, 0 for one in its future) covers.

    Softmax does not change when a constant is taken off a row, so the usual
    subtraction of each row's maximum is only there to keep 2^s inside
    float32. Attention scores are almost always far from the edges (|s| < 100),
    so that pass and its reduction are skipped at first and the sums are
    checked instead (see _sums_safe); in the rare case they fail, the scores
    are computed again and shifted. The mask zeroes the future keys' weights
    after the power (2^-inf is 0 too, but NumPy's exp2 is several times slower
    on arrays with -inf in them); before a shift they get -inf, so that they
    stay out of the maxima. The sums come from a matrix-vector product with
    ones, which BLAS runs faster than a NumPy reduction; the caller divides
    the (narrow) attention output by them, which is cheaper than dividing the
    (wide) weights.
    """
    for shift in (False, True):
        scores = scores_of()
        own = own_keys(scores) if own_keys is not None else None
        if shift:
            if own is not None:
                np.copyto(own, -np.inf, where=past == 0)
            scores -= scores.max(axis=-1, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            np.exp2(scores, out=scores)
            if own is not None:
                own *= past         # inf * 0 is NaN: it fails the sums check
        sums = np.matmul(scores, np.ones(scores.shape[-1], np.float32))
        if shift or _sums_safe(sums):
            return scores, sums


def _sums_safe(sums: np.ndarray) -> bool:
    """True if every softmax sum is one that the unshifted power can be
    trusted with: not so small that the terms have gone subnormal (then the
    weights lose precision), and not so large that a term, or the weights'
    product with the values, could overflow. NaN fails too."""
    lo, hi = _SAFE_SUMS
    return bool(((sums > lo) & (sums < hi)).all())


# --- weights ------------------------------------------------------------------------

@dataclass
class Segment:
    """One sequence's share of a ragged batch: n new tokens, at positions
    start..start+n-1, whose keys and values go into `cache`."""
    cache: KVCache
    start: int
    n: int


@dataclass
class Layer:
    attention_norm: np.ndarray  # [dim]
    wqkv_t: np.ndarray          # [dim, q_dim + 2 kv_dim]  (transposed view, no copy)
    wo_t: np.ndarray            # [q_dim, dim]
    ffn_norm: np.ndarray        # [dim]
    w13_t: np.ndarray           # [dim, 2 hidden]
    w2_t: np.ndarray            # [hidden, dim]


# A block's tensors: the Layer field each one fills, and its name in the file.
_LAYER_TENSORS = (("attention_norm", "attention_norm.weight"),
                  ("wqkv_t", "attention.wqkv.weight"),
                  ("wo_t", "attention.wo.weight"),
                  ("ffn_norm", "ffn_norm.weight"),
                  ("w13_t", "feed_forward.w13.weight"),
                  ("w2_t", "feed_forward.w2.weight"))

class Model:
    """A Llama model over a memory-mapped .lmw file.

    float32 weights are used in place. Weights stored compressed (f16, bf16,
    q8_0: see llamanp.quant) are widened to float32 one layer at a time, into
    buffers allocated once and shared by all layers, so memory stays about
    the file plus one layer's float32 weights; a pass of a few tokens
    (decoding) streams them instead, piece by piece, every core widening its
    own pieces (see Streamed, llamanp.parallel). These buffers, and the
    attention's reused score matrices, make a Model unsafe to run from
    several threads at once.
    """

    def __init__(self, file: lmw.LmwFile, tokenizer: Optional[Tokenizer] = None,
                 widen: bool = False):
        self.file = file
        self.path = file.path
        self.config = cfg = file.config
        self.tokenizer = tokenizer
        t = file.tensors
        #: bytes of float32 arrays that compressed weights were widened into
        #: at load time (widen=True), instead of layer by layer as they run
        self.widened_bytes = 0
        if widen:
            t = self._widen_at_load(t)
        self.tok_embeddings = t["tok_embeddings.weight"]   # float32 array or Packed
        self.output = self.tok_embeddings if cfg.tied_embeddings else t["output.weight"]
        self.norm = t["norm.weight"]
        # One float32 buffer per compressed matrix role (wqkv, wo, w13, w2),
        # shaped as stored; the Layers of all layers view the same buffers
        # (passes of many tokens widen a layer whole). Passes of a few tokens
        # stream the compressed matrices instead, piece by piece, in the
        # order of the forward pass (stream_all).
        self._buffers: dict[str, np.ndarray] = {}
        self._layers: list[Layer] = []            # float32 [in, out] views
        self._to_widen: list[list] = []           # per layer: (buffer, Packed) pairs
        in_order = []          # (layer, field, Packed): the compressed matrices, as used
        for i in range(cfg.n_layers):
            fields, packed = {}, []
            for field, name in _LAYER_TENSORS:
                w = t[f"layers.{i}.{name}"]
                if isinstance(w, Packed):
                    buf = self._buffers.get(field)
                    if buf is None:
                        buf = self._buffers[field] = np.empty(w.shape, np.float32)
                    packed.append((buf, w))
                    in_order.append((i, field, w))
                    w = buf
                fields[field] = w.T if field.endswith("_t") else w
            self._layers.append(Layer(**fields))
            self._to_widen.append(packed)
        self._widened: Optional[int] = None       # the layer now in the buffers
        if isinstance(self.output, Packed):
            in_order.append((None, "output", self.output))
        self._ahead, streamed = stream_all([w for _, _, w in in_order])
        # the same Layers with their compressed matrices Streamed
        swap: list[dict] = [{} for _ in range(cfg.n_layers)]
        self._output_streamed = None
        for (i, field, _), s in zip(in_order, streamed):
            if i is None:
                self._output_streamed = s
            else:
                swap[i][field] = s
        self._streamed = [replace(layer, **swap[i]) for i, layer in enumerate(self._layers)]
        self.rope = RopeTable(cfg)
        self._work = Workspace()                  # the run state, reused

    def _widen_at_load(self, tensors: dict) -> dict:
        """`tensors` with every compressed one widened to a float32 array, so
        that the model then runs as a float32 file does: no widening per
        token, for the memory of the float32 weights."""
        tensors = dict(tensors)
        packed = [(name, w) for name, w in tensors.items() if isinstance(w, Packed)]
        # one buffer, the tensors one after the other in the file's order, as
        # a float32 file lays them out: decoding reads them in that order
        sizes = [-(-int(np.prod(w.shape)) // 16) * 16 for _, w in packed]   # 64-byte steps
        flat = np.empty(sum(sizes), np.float32)
        pairs, at = [], 0
        for (name, w), size in zip(packed, sizes):
            tensors[name] = flat[at:at + int(np.prod(w.shape))].reshape(w.shape)
            pairs.append((tensors[name], w))
            at += size
        parallel.widen_all(pairs)
        self.widened_bytes = sum(buf.nbytes for buf, _ in pairs)
        return tensors

    # -- the weights, as float32 --------------------------------------------------
    def layer_weights(self, i: int) -> Layer:
        """Layer i's weights as float32 arrays (matrices as [in, out] views).

        float32 tensors are views of the file: nothing to do. Compressed ones
        are widened into the shared buffers, so the arrays of a compressed
        layer are only valid until weights of another layer are asked for.
        """
        if self._to_widen[i] and self._widened != i:
            parallel.widen_all(self._to_widen[i])
            self._widened = i
        return self._layers[i]

    def embed(self, tokens) -> np.ndarray:
        """The embedding rows of `tokens`, a new float32 array [len(tokens), dim]."""
        ids = np.asarray(tokens, dtype=np.intp)
        if isinstance(self.tok_embeddings, Packed):
            return self.tok_embeddings.take(ids).widen()
        return self.tok_embeddings[ids]

    def output_logits(self, h: np.ndarray) -> np.ndarray:
        """output · h for normalised rows h [n, dim]: float32 logits [n, vocab].

        A compressed output matrix is streamed (widened a few rows at a time
        into the scratch buffer and multiplied chunk by chunk), never whole.
        """
        if self._output_streamed is not None:
            return linear(h, self._output_streamed)
        return linear(h, self.output.T)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the float32 buffers that compressed weights are widened into."""
        return sum(b.nbytes for b in self._buffers.values()) + self._ahead.nbytes

    # -- the forward pass ----------------------------------------------------------
    def forward(self, tokens, start: int, cache: KVCache, n_logits: int = 1,
                hooks=None) -> np.ndarray:
        """Run `tokens` (at positions start, start+1, ...) through the model.

        Keys and values go into `cache`; returns the logits of the last
        `n_logits` positions, float32 [n_logits, vocab].
        """
        return self.forward_batch(tokens, [Segment(cache, start, len(tokens))], n_logits, hooks)

    def forward_batch(self, tokens, segments: list["Segment"], n_logits: int = 1,
                      hooks=None) -> np.ndarray:
        """A ragged batch: several sequences' new tokens, concatenated.

        Segment j owns the next segments[j].n tokens. Everything but attention
        is row-wise, so all rows share each weight matrix product (one read of
        the weights for the whole batch); attention runs per segment, against
        that sequence's own cache. Returns the logits of the last `n_logits`
        positions of every segment, stacked in segment order.

        The last layer runs its queries, wo and feed-forward only for those
        positions: every layer's keys and values are needed (they go into the
        cache), but the other rows' outputs of the last layer would only feed
        logits nobody asked for (llama.cpp skips them the same way).

        `hooks` (a llamanp.inspect.HookSet, or None) is called with the value
        at each named point (embed, blocks.{i}.resid_pre, ...); a hook may
        change the value in place. See llamanp.inspect.
        """
        if len(tokens) <= STREAM_ROWS and self._ahead.pieces:
            # compressed weights streamed: the other cores widen them, and a
            # BLAS thread pool would only fight them for the cores
            with threads.one_blas_thread():
                return self._forward_batch(tokens, segments, n_logits, hooks)
        return self._forward_batch(tokens, segments, n_logits, hooks)

    def _forward_batch(self, tokens, segments, n_logits, hooks) -> np.ndarray:
        cfg = self.config
        T = len(tokens)
        H, eps = cfg.hidden_dim, cfg.norm_eps
        n_qk, k_end = cfg.n_heads + cfg.n_kv_heads, cfg.q_dim + cfg.kv_dim
        if len(segments) == 1:
            rot = self.rope.get(segments[0].start, T)
        else:
            rot = self.rope.at(np.concatenate(
                [np.arange(s.start, s.start + s.n) for s in segments]))

        n_logits = min(n_logits, min(s.n for s in segments))
        x = self.embed(tokens)                                       # [T, dim], a copy
        if hooks:
            hooks("embed", x)
        # the run state: one array per role, reused by every layer
        work = self._work
        h = work.take("normed", (T, cfg.dim))
        qkv = work.take("qkv", (T, k_end + cfg.kv_dim))
        qk = work.take("rotated", (T, n_qk, cfg.head_dim))
        gate_up = work.take("gate_up", (T, 2 * H))
        act = work.take("swiglu", (T, H))
        delta = work.take("delta", (T, cfg.dim))
        for i in range(cfg.n_layers):
            layer = self._streamed[i] if T <= STREAM_ROWS else self.layer_weights(i)
            if hooks:
                hooks.block(i, resid_pre=x)
            # attention block: q and k are rotated together, in one call
            rmsnorm(x, layer.attention_norm, eps, out=h)
            if hooks:
                hooks.block(i, attn_in=h)
            linear(h, layer.wqkv_t, out=qkv)
            apply_rope(qkv[:, :k_end].reshape(T, n_qk, cfg.head_dim), rot, out=qk)
            q, k = qk[:, :cfg.n_heads], qk[:, cfg.n_heads:]
            v = qkv[:, k_end:].reshape(T, cfg.n_kv_heads, cfg.head_dim)
            if hooks:
                hooks.block(i, q=q, k=k, v=v)
            # (hooks see every row of every layer: the last one is not cut short)
            last = n_logits if i == cfg.n_layers - 1 and not hooks else None
            mixed = self._attend(i, q, k, v, segments, last, hooks)
            if len(mixed) < len(x):    # the last layer: only the wanted rows go on
                x = x[self._last_rows(segments, n_logits)]
            n = len(x)
            attn_out = linear(mixed, layer.wo_t, out=delta[:n])
            if hooks:
                hooks.block(i, attn_out=attn_out)
            x += attn_out
            if hooks:
                hooks.block(i, resid_mid=x)
            # feed-forward block (SwiGLU)
            rmsnorm(x, layer.ffn_norm, eps, out=h[:n])
            if hooks:
                hooks.block(i, mlp_in=h[:n])
            linear(h[:n], layer.w13_t, out=gate_up[:n])
            if hooks:
                hooks.block(i, gate=gate_up[:n, :H], up=gate_up[:n, H:])
            swiglu(gate_up[:n], H, out=act[:n])
            if hooks:
                hooks.block(i, act=act[:n])
            mlp_out = linear(act[:n], layer.w2_t, out=delta[:n])
            if hooks:
                hooks.block(i, mlp_out=mlp_out)
            x += mlp_out
            if hooks:
                hooks.block(i, resid_post=x)
        if hooks:
            x = x[self._last_rows(segments, n_logits)]
        for s in segments:
            s.cache.advance(s.n)
        normed = rmsnorm(x, self.norm, eps)
        if hooks:
            hooks("final_norm", normed)
        logits = self.output_logits(normed)
        if hooks:
            hooks("logits", logits)
        return logits

    @staticmethod
    def _last_rows(segments, n: int) -> np.ndarray:
        """The indices of each segment's last n rows in the batch."""
        ends = np.cumsum([s.n for s in segments])
        return np.concatenate([np.arange(e - n, e) for e in ends])

    def _attend(self, layer: int, q, k, v, segments, last: Optional[int] = None,
                hooks=None) -> np.ndarray:
        """Store each segment's keys/values in its cache and attend over them:
        all of a segment's queries, or (`last`) only its last ones. Hooks on
        the attention's insides get a plain attention that shows them."""
        attend = hooks.attention(layer) if hooks and hooks.inside_attention(layer) else attention

        def one(s, q, k, v):
            keys, values = s.cache.update(layer, k, v)
            before = keys.shape[2] - s.n       # keys held before this block
            if not s.cache.wants_weights:
                skip = 0 if last is None else s.n - last
                return attend(q[skip:], keys, values, before + skip, self._work)
            # a strategy that reads the weights sees every query's
            def observe(weights, sums, first):
                s.cache.observe(layer, weights, sums, first, s.n)
            out = attend(q, keys, values, before, self._work, observe)
            return out if last is None else out[s.n - last:]
        if len(segments) == 1:
            return one(segments[0], q, k, v)
        per = [s.n if last is None else last for s in segments]
        out = np.empty((sum(per), q.shape[1] * q.shape[2]), np.float32)
        row = at = 0
        for s, m in zip(segments, per):
            out[at:at + m] = one(s, q[row:row + s.n], k[row:row + s.n], v[row:row + s.n])
            row, at = row + s.n, at + m
        return out

    # -- conveniences ---------------------------------------------------------------
    def session(self, kvcache: str = "inplace", max_seq_len: Optional[int] = None,
                hooks=None) -> "Session":
        return Session(self, kvcache, max_seq_len, hooks)

    def logits(self, ids, kvcache: str = "inplace", fill1: bool = False) -> np.ndarray:
        """Logits for every position of `ids`, float32 [len(ids), vocab], fresh state."""
        return self.session(kvcache, max_seq_len=max(len(ids), 1)).feed(
            ids, fill1=fill1, all_logits=True)

    def run_with_hooks(self, ids, hooks) -> np.ndarray:
        """Logits of every position of `ids` ([len(ids), vocab]) from one forward
        pass with `hooks` = [(name or predicate, fn(value, name))]; see llamanp.inspect."""
        from .inspect import run_with_hooks  # imported on use, as chat is
        return run_with_hooks(self, ids, hooks)

    def run_with_cache(self, ids, names=None, hooks=()):
        """(logits, {hook point: a copy of its value}) from one forward pass over
        `ids`; `names`: None (all), a list of hook points or a predicate."""
        from .inspect import run_with_cache
        return run_with_cache(self, ids, names, hooks)

    def chat_prompt(self, messages, add_generation_prompt: bool = True,
                    template=None) -> list:
        """Token ids of a conversation ([{"role", "content"}, ...]) in this
        model's chat template, or in `template` (a name); see llamanp.chat."""
        from . import chat  # chat depends on nothing here; imported on use
        return chat.render(self, messages, template, add_generation_prompt)


#: a long prompt is run through the model this many tokens at a time (as
#: llama.cpp's micro-batches are): the products are as efficient at 512 rows
#: as at more, and the run state's arrays stay a bounded size
PREFILL_BATCH = 512


class Session:
    """The run state of one sequence: its tokens so far and its KV cache, and
    the hooks (llamanp.inspect) that every forward pass of it calls."""

    def __init__(self, model: Model, kvcache: str = "inplace",
                 max_seq_len: Optional[int] = None, hooks=None):
        limit = model.config.max_seq_len
        self.max_seq_len = limit if max_seq_len is None else max_seq_len
        if not 0 < self.max_seq_len <= limit:
            raise LlamanpError(f"sequence length {self.max_seq_len} is outside 1..{limit} "
                               "(the model's max_seq_len)")
        self.model = model
        self.cache = make_cache(kvcache, model.config, self.max_seq_len)
        self.tokens: list[int] = []
        self.computed = 0  # token positions actually run through the model
        self.hooks = None
        if hooks:
            from .inspect import HookSet
            self.hooks = HookSet.of(model.config, hooks)

    def reset(self) -> None:
        self.tokens.clear()
        self.cache.reset()

    def fork(self) -> "Session":
        """An independent copy of this state (tokens and cache): the two can
        then be fed different continuations, as beam search does."""
        twin = object.__new__(type(self))
        twin.__dict__ = dict(vars(self), tokens=list(self.tokens), cache=self.cache.copy())
        return twin

    def feed(self, ids, fill1: bool = False, all_logits: bool = False) -> np.ndarray:
        """Append `ids` and return the logits of the last one ([vocab]), or of
        all of them ([len(ids), vocab]) with all_logits.

        fill1 runs them one at a time, as decoding does, instead of in
        batches of up to PREFILL_BATCH.
        """
        ids = self.check(ids)
        if fill1:
            chunks = [[i] for i in ids]
        elif self.cache.recompute:    # no cache: the whole sequence is run anyway
            chunks = [ids]
        else:
            chunks = [ids[i:i + PREFILL_BATCH] for i in range(0, len(ids), PREFILL_BATCH)]
        outs = [self._run(chunk, all_logits) for chunk in chunks]
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def check(self, ids) -> list[int]:
        """`ids` as ints, if they are valid tokens that fit in the context."""
        ids = [int(i) for i in ids]
        if not ids:
            raise LlamanpError("nothing to feed: the token list is empty")
        if len(self.tokens) + len(ids) > self.max_seq_len:
            raise LlamanpError(f"{len(self.tokens) + len(ids)} tokens do not fit in the "
                               f"context of {self.max_seq_len}")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise LlamanpError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _run(self, chunk: list[int], all_logits: bool) -> np.ndarray:
        n_out = len(chunk) if all_logits else 1
        self.tokens.extend(chunk)
        if self.cache.recompute:   # no cache: the whole sequence, every time
            self.computed += len(self.tokens)
            return self.model.forward(self.tokens, 0, self.cache, n_out, self.hooks)
        self.computed += len(chunk)
        return self.model.forward(chunk, self.cache.length, self.cache, n_out, self.hooks)


def feed_batch(sessions: list[Session], chunks: list) -> np.ndarray:
    """Feed sessions[j] the ids chunks[j], all in one ragged forward pass;
    returns the logits of each chunk's last token, [len(sessions), vocab]."""
    if any(s.cache.recompute for s in sessions):
        raise LlamanpError("batched generation needs a KV cache; use --kvcache inplace or concat")
    chunks = [s.check(ids) for s, ids in zip(sessions, chunks)]
    segments = [Segment(s.cache, s.cache.length, len(ids)) for s, ids in zip(sessions, chunks)]
    for s, ids in zip(sessions, chunks):
        s.tokens.extend(ids)
        s.computed += len(ids)
    return sessions[0].model.forward_batch([t for ids in chunks for t in ids], segments)


def load(path, tokenizer=None, widen: bool = False) -> Model:
    """Open a .lmw model (memory-mapped and validated).

    `tokenizer` overrides the embedded one: a path or a Tokenizer. With
    `widen`, compressed weights (f16, bf16, q8_0) are widened to float32 once,
    here, and the model runs at a float32 file's speed for the memory of the
    float32 weights (Model.widened_bytes); without it they are widened as
    they are used, a layer (or, decoding, a piece of a matrix) at a time.
    """
    file = lmw.read(path)
    if tokenizer is None:
        tok = Tokenizer.from_data(file.tokenizer) if file.tokenizer is not None else None
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
    return Model(file, tok, widen=widen)
