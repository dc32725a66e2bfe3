"""Keys and values in fewer bits: the stores behind dtype=, and KIVI.

A Store keeps the keys and values of `capacity` slots per layer, each kind
(k, v) as one or more planes [n_layers, n_kv, rows, capacity], slots last as
in the exact caches (each row of a head is a long contiguous stretch, the
shape the products stream fastest). float32 storage is read as plain array
views; anything narrower through a Stored, which widens a block of several
hundred positions at a time into a buffer small enough to stay in the CPU
cache while attention multiplies it (model.times_keys / times_values): the
whole cache is never widened at once, and narrow storage is read once per
step, in its narrow form.

Storage types, along head_dim (bytes per position per layer per kv head):

  f32   4 x head_dim x 2 (keys and values)
  f16   2 x head_dim x 2: IEEE half precision
  bf16  2 x head_dim x 2: the top 16 bits of float32 (round to nearest even)
  q8_0  (head_dim + head_dim/32 x 2) x 2: llama.cpp's block of 32 int8 with
        one float16 scale d = max|x| / 127, x = d q
  q4_0  (head_dim/2 + head_dim/32 x 2) x 2: llama.cpp's block of 32 4-bit
        codes with one float16 scale d = m / -8 (m the value of largest
        magnitude), x = d (q - 8); byte j holds element j (low nibble) and
        element j + 16 (high nibble) of its block
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import LlamanpError
from ..quant import Q8_BLOCK, encode_bf16, encode_q8_0, widen_f16
from .base import KVCache, Param, register, reserve

#: storage types a position-holding strategy can keep its keys and values in
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QBLOCK = Q8_BLOCK      # llama.cpp's q8_0 / q4_0 block length
BLOCK_BYTES = 1 << 19  # a widened block of positions: about this many bytes of float32


class Store:
    """float32 slots: what attention reads is a view, nothing is widened.

    Planes: name -> array [n_layers, n_kv, rows, capacity]; a narrower
    subclass describes its planes (`layout`), how to encode new keys or
    values [n_kv, hd, T] into them (`encode`) and how to widen slots back
    into a float32 [n_kv, hd, B] buffer (`decode`), and keeps its planes in
    pages of `block` slots, [n_layers, pages, n_kv, rows, block]: a page is
    then one contiguous stretch of memory, which widens in one fast pass (a
    strided stretch of small codes casts several times slower).
    """

    dtype = "f32"

    def __init__(self, config, capacity: int):
        self.config = config
        # slots per page: a power of two whose float32 widening is about BLOCK_BYTES
        per = BLOCK_BYTES // (4 * config.n_kv_heads * config.head_dim)
        self.block = max(QBLOCK, 1 << max(per, 1).bit_length() - 1)
        self.paged = self.dtype != "f32"
        self.capacity = -(-capacity // self.block) * self.block if self.paged else capacity
        self.planes = {}
        for kind in ("k", "v"):
            for suffix, (rows, dtype) in self.layout(config.head_dim).items():
                head = (config.n_kv_heads, rows)
                shape = ((config.n_layers, self.capacity // self.block) + head + (self.block,)
                         if self.paged else (config.n_layers,) + head + (self.capacity,))
                self.planes[kind + suffix] = reserve(shape, dtype)
        self.scratch = None   # the widened block, allocated on first use

    @staticmethod
    def layout(hd: int) -> dict:
        """plane suffix -> (rows per kv head, numpy dtype)."""
        return {"": (hd, np.float32)}

    def encode(self, x: np.ndarray) -> dict:
        """x [n_kv, hd, T] float32 -> {plane suffix: [n_kv, rows, T]}."""
        return {"": x}

    def decode(self, parts: dict, out: np.ndarray) -> np.ndarray:
        """{plane suffix: [n_kv, rows, B]} -> out [n_kv, hd, B] float32."""
        np.copyto(out, parts[""])
        return out

    # -- slots ---------------------------------------------------------------------
    def pieces(self, lo: int, hi: int):
        """(lo, hi) pieces of slots lo..hi-1 that stay within one page."""
        while lo < hi:
            end = min(hi, (lo // self.block + 1) * self.block) if self.paged else hi
            yield lo, end
            lo = end

    def slots(self, name: str, layer: int, lo: int, hi: int) -> np.ndarray:
        """Slots lo..hi-1 (within one page) of plane `name` in `layer`, [n_kv, rows, hi-lo]."""
        plane = self.planes[name]
        if not self.paged:
            return plane[layer, ..., lo:hi]
        page, at = divmod(lo, self.block)
        return plane[layer, page, ..., at:at + hi - lo]

    def write(self, layer: int, lo: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [T, n_kv, hd] in slots lo..lo+T-1 of `layer`."""
        for kind, x in (("k", k), ("v", v)):
            for suffix, part in self.encode(x.transpose(1, 2, 0)).items():
                for a, b in self.pieces(lo, lo + len(x)):
                    self.slots(kind + suffix, layer, a, b)[...] = part[..., a - lo:b - lo]

    def read(self, layer: int, n: int):
        """What attention reads of slots 0..n-1: keys, values [n_kv, hd, n]."""
        if not self.paged:
            return self.planes["k"][layer, ..., :n], self.planes["v"][layer, ..., :n]
        return Stored(self, "k", layer, n), Stored(self, "v", layer, n)

    def widen(self, kind: str, layer: int, lo: int, hi: int, out=None) -> np.ndarray:
        """Slots lo..hi-1 of `kind` (k or v) in `layer` as float32
        [n_kv, hd, hi-lo] (into `out`, C-contiguous, if given)."""
        if out is None:
            out = np.empty((self.config.n_kv_heads, self.config.head_dim, hi - lo), np.float32)
        for a, b in self.pieces(lo, hi):
            parts = {name[1:]: self.slots(name, layer, a, b)
                     for name in self.planes if name[0] == kind}
            piece = out if (a, b) == (lo, hi) else np.empty(out.shape[:2] + (b - a,), np.float32)
            self.decode(parts, piece)
            if piece is not out:
                out[..., a - lo:b - lo] = piece
        return out

    def move(self, layer, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy slots src to slots dst (compaction after an eviction); `layer`
        is an int or an array of layers paired with src and dst."""
        for plane in self.planes.values():
            if self.paged:
                plane[layer, dst // self.block, ..., dst % self.block] = \
                    plane[layer, src // self.block, ..., src % self.block]
            else:
                plane[layer, ..., dst] = plane[layer, ..., src]

    def resized(self, capacity: int, n: int) -> "Store":
        """A new store of `capacity` slots holding this one's first n."""
        twin = type(self)(self.config, capacity)
        for name, plane in self.planes.items():
            if self.paged:
                pages = -(-n // self.block)
                twin.planes[name][:, :pages] = plane[:, :pages]
            else:
                twin.planes[name][..., :n] = plane[..., :n]
        return twin

    @property
    def nbytes(self) -> int:
        """The planes, and the page widened for attention once there is one."""
        scratch = 0 if self.scratch is None else self.scratch.nbytes
        return sum(p.nbytes for p in self.planes.values()) + scratch


class Stored:
    """Slots 0..n-1 of one kind (keys or values) of one layer of a store, as
    attention reads them: shape [n_kv, hd, n], widened block by block.

    The store (a Store, or Kivi) provides config, block, scratch and
    widen(kind, layer, lo, hi, out), and may provide scaled_codes (see blocks).
    """

    def __init__(self, store, kind: str, layer: int, n: int):
        self.store, self.kind, self.layer = store, kind, layer
        cfg = store.config
        self.shape = (cfg.n_kv_heads, cfg.head_dim, n)

    def __getitem__(self, index):
        """Only [..., :n], the first n slots (what causal attention slices)."""
        _, cut = index
        return Stored(self.store, self.kind, self.layer, len(range(self.shape[2])[cut]))

    def blocks(self, fold: bool = False):
        """(lo, hi, float32 [n_kv, hd, hi-lo], None) over the slots, a block at
        a time; each block is only valid until the next one is asked for.
        With `fold`, a store of scaled blocks may give its codes and their
        scales [n_kv, hd/32, hi-lo] instead (x = code x scale per 32 numbers)."""
        s, (n_kv, hd, n) = self.store, self.shape
        if s.scratch is None:
            s.scratch = np.empty(s.block * n_kv * hd, np.float32)
        for lo in range(0, n, s.block):
            hi = min(n, lo + s.block)
            out = s.scratch[:n_kv * hd * (hi - lo)].reshape(n_kv, hd, hi - lo)
            if fold and hasattr(s, "scaled_codes"):
                yield (lo, hi) + s.scaled_codes(self.kind, self.layer, lo, hi, out)
            else:
                yield lo, hi, s.widen(self.kind, self.layer, lo, hi, out), None

    def widen(self) -> np.ndarray:
        """All of it as one float32 array [n_kv, hd, n] (for tests and references)."""
        return self.store.widen(self.kind, self.layer, 0, self.shape[2])


class F16Store(Store):
    dtype = "f16"

    @staticmethod
    def layout(hd):
        return {"": (hd, np.float16)}

    def encode(self, x):
        return {"": x.astype(np.float16)}

    def decode(self, parts, out):
        return widen_f16(np.ascontiguousarray(parts[""]), out)


class BF16Store(Store):
    dtype = "bf16"

    @staticmethod
    def layout(hd):
        return {"": (hd, np.uint16)}

    def encode(self, x):
        return {"": encode_bf16(x)}

    def decode(self, parts, out):
        wide = out.view(np.uint32)
        np.copyto(wide, parts[""])
        wide <<= 16
        return out


class Q8Store(Store):
    dtype = "q8_0"

    @staticmethod
    def layout(hd):
        return {"": (hd, np.int8), "_d": (hd // QBLOCK, np.float16)}

    def encode(self, x):
        # llamanp.quant's (llama.cpp's) quantizer works along the last axis
        q, d = encode_q8_0(x.transpose(0, 2, 1))
        return {"": q.transpose(0, 2, 1), "_d": d.transpose(0, 2, 1)}

    def decode(self, parts, out):
        np.copyto(out, parts[""])                      # int8 -> float32, in the cache
        n_kv, hd, B = out.shape
        out.reshape(n_kv, hd // QBLOCK, QBLOCK, B)[...] *= \
            parts["_d"].astype(np.float32)[:, :, None, :]
        return out

    def scaled_codes(self, kind, layer, lo, hi, out):
        """The codes of slots lo..hi-1 (within one page) as float32 (into
        `out`) and their scales [n_kv, hd/32, n]."""
        np.copyto(out, self.slots(kind, layer, lo, hi))
        return out, self.slots(kind + "_d", layer, lo, hi).astype(np.float32)


class Q4Store(Store):
    dtype = "q4_0"

    @staticmethod
    def layout(hd):
        return {"": (hd // 2, np.uint8), "_d": (hd // QBLOCK, np.float16)}

    def encode(self, x):
        n_kv, hd, T = x.shape
        blocks = x.reshape(n_kv, hd // QBLOCK, QBLOCK, T)
        # as ggml's reference quantizer: the signed value of largest magnitude
        # maps to -8, codes are x / d + 8.5 truncated, at most 15
        at = np.abs(blocks).argmax(axis=2)[:, :, None, :]
        d = np.take_along_axis(blocks, at, axis=2)[:, :, 0, :] / np.float32(-8)
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, (blocks * inv[:, :, None, :] + np.float32(8.5)).astype(np.int8))
        q = q.astype(np.uint8)
        half = QBLOCK // 2
        packed = q[:, :, :half] | (q[:, :, half:] << 4)          # [n_kv, nb, 16, T]
        return {"": packed.reshape(n_kv, hd // 2, T), "_d": d.astype(np.float16)}

    def decode(self, parts, out):
        self.unpack(parts[""], out)
        n_kv, hd, B = out.shape
        out.reshape(n_kv, hd // QBLOCK, QBLOCK, B)[...] *= \
            parts["_d"].astype(np.float32)[:, :, None, :]
        return out

    @staticmethod
    def unpack(packed, out):
        """4-bit codes -> their values q - 8 as float32, into out [n_kv, hd, B]."""
        n_kv, hd, B = out.shape
        packed = packed.reshape(n_kv, hd // QBLOCK, QBLOCK // 2, B)
        wide = out.reshape(n_kv, hd // QBLOCK, QBLOCK, B)
        half = QBLOCK // 2
        np.bitwise_and(packed, 15, out=wide[:, :, :half], casting="unsafe")
        np.right_shift(packed, 4, out=wide[:, :, half:], casting="unsafe")
        wide -= 8
        return out

    def scaled_codes(self, kind, layer, lo, hi, out):
        """The codes' values q - 8 as float32 (see Q8Store.scaled_codes)."""
        self.unpack(self.slots(kind, layer, lo, hi), out)
        return out, self.slots(kind + "_d", layer, lo, hi).astype(np.float32)


STORES = {s.dtype: s for s in (Store, F16Store, BF16Store, Q8Store, Q4Store)}


def make_store(dtype: str, config, capacity: int) -> Store:
    """The store of `dtype`, refusing a head_dim its blocks do not divide."""
    if dtype in ("q8_0", "q4_0") and config.head_dim % QBLOCK:
        raise LlamanpError(f"kvcache dtype={dtype} needs a head_dim that is a multiple of "
                           f"{QBLOCK} (this model's is {config.head_dim}); use f16 or bf16")
    return STORES[dtype](config, capacity)


@register
class Kivi(KVCache):
    """KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
    for KV Cache"): keys quantized per channel (each channel's `group`
    consecutive positions share a scale and a minimum: key outliers live in
    fixed channels), values per token (each position's `group` consecutive
    channels share them), both asymmetric min/max to `bits` bits, and the
    most recent `residual` positions kept in float32. After each forward call
    the oldest float32 positions are quantized, a whole group at a time,
    until at most `residual` remain.

    Bytes per position, per layer and kv head: head_dim x bits / 8 x 2 for the
    codes, plus float16 scale and minimum: 2 x 2 x head_dim / group for the
    keys (per channel and group) and as much for the values (per group of
    channels); the float32 residual adds 8 x head_dim per position in it.
    """

    name = "kivi"
    params = {"bits": Param("2", "bits per number", ("2", "4")),
              "group": Param(32, "numbers sharing a scale"),
              "residual": Param(128, "recent positions in float32", low=0)}
    exact = False
    truncates = False

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.bits, self.group = int(options["bits"]), options["group"]
        self.residual = options["residual"]
        L, n_kv, hd = config.n_layers, config.n_kv_heads, config.head_dim
        if hd % self.group or hd % (8 // self.bits):
            raise LlamanpError(f"kvcache kivi: group={self.group} must divide head_dim "
                               f"({hd} in this model)")
        groups = max_seq_len // self.group + 1
        shape = (L, n_kv, hd * self.bits // 8, max_seq_len)
        self.codes = {"k": reserve(shape, np.uint8), "v": reserve(shape, np.uint8)}
        # keys: per channel and group of positions; values: per group of channels
        self.scale = {"k": reserve((L, n_kv, hd, groups), np.float16),
                      "v": reserve((L, n_kv, hd // self.group, max_seq_len), np.float16)}
        self.low = {k: reserve(a.shape, np.float16) for k, a in self.scale.items()}
        tail = min(max_seq_len, self.residual + self.group)   # grown by a long call
        self.tail = {"k": np.zeros((L, n_kv, hd, tail), np.float32),
                     "v": np.zeros((L, n_kv, hd, tail), np.float32)}
        self.quantized = 0        # positions 0..quantized-1 are quantized
        self.block = max(self.group, BLOCK_BYTES // (4 * n_kv * hd) // self.group * self.group)
        self.scratch = None

    # -- the model's side ------------------------------------------------------------
    def update(self, layer, k, v):
        T, n = len(k), self.length - self.quantized      # n: float32 positions held
        if self.length + T > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        size = self.tail["k"].shape[-1]
        if n + T > size:      # a call longer than the tail: at least double it
            more = max(n + T, 2 * size) - size
            self.tail = {kind: np.concatenate(
                             [t, np.zeros(t.shape[:-1] + (more,), np.float32)], axis=-1)
                         for kind, t in self.tail.items()}
        self.tail["k"][layer, ..., n:n + T] = k.transpose(1, 2, 0)
        self.tail["v"][layer, ..., n:n + T] = v.transpose(1, 2, 0)
        if self.quantized == 0:    # all in float32 still: plain views
            return self.tail["k"][layer, ..., :n + T], self.tail["v"][layer, ..., :n + T]
        end = self.length + T
        return Stored(self, "k", layer, end), Stored(self, "v", layer, end)

    def advance(self, n):
        super().advance(n)
        while self.length - self.quantized > self.residual \
                and self.length - self.quantized >= self.group:
            self.quantize_group()

    def quantize_group(self) -> None:
        """Move the oldest `group` float32 positions into quantized storage."""
        g, lo = self.group, self.quantized
        for kind in ("k", "v"):
            x = self.tail[kind][..., :g]                        # [L, n_kv, hd, g]
            if kind == "k":   # per channel: min/max over the group's positions
                low, scale = self.minmax(x, axis=-1)
                self.low[kind][..., lo // g] = low
                self.scale[kind][..., lo // g] = scale
                low, scale = (a[..., lo // g, None].astype(np.float32)
                              for a in (self.low[kind], self.scale[kind]))
                codes = self.encode(x, low, scale)
            else:             # per token: min/max over groups of channels
                L, n_kv, hd, _ = x.shape
                xg = x.reshape(L, n_kv, hd // g, g, g)
                low, scale = self.minmax(xg, axis=3)
                self.low[kind][..., lo:lo + g] = low
                self.scale[kind][..., lo:lo + g] = scale
                low, scale = (a[..., lo:lo + g][:, :, :, None].astype(np.float32)
                              for a in (self.low[kind], self.scale[kind]))
                codes = self.encode(xg, low, scale).reshape(x.shape)
            self.codes[kind][..., lo:lo + g] = self.pack(codes)
            t = self.tail[kind]
            n = self.length - lo
            t[..., :n - g] = t[..., g:n].copy()
        self.quantized += g

    def minmax(self, x, axis):
        """The float16 minimum and step of `bits`-bit codes over `axis`."""
        low = x.min(axis=axis)
        step = (x.max(axis=axis) - low) / (2 ** self.bits - 1)
        return low.astype(np.float16), step.astype(np.float16)

    def encode(self, x, low, scale):
        inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
        return np.clip(np.rint((x - low) * inv), 0, 2 ** self.bits - 1).astype(np.uint8)

    def pack(self, codes):
        """codes [..., hd, P] -> bytes [..., hd * bits / 8, P]: 8 / bits
        consecutive channels per byte, the first in the lowest bits."""
        per = 8 // self.bits
        c = codes.reshape(codes.shape[:-2] + (codes.shape[-2] // per, per, codes.shape[-1]))
        out = c[..., 0, :].copy()
        for j in range(1, per):
            out |= c[..., j, :] << (j * self.bits)
        return out

    # -- reading (Stored asks) ------------------------------------------------------
    def widen(self, kind, layer, lo, hi, out=None):
        """Positions lo..hi-1 of `kind` in `layer` as float32 [n_kv, hd, hi-lo]
        (into `out` if given)."""
        cfg = self.config
        if out is None:
            out = np.empty((cfg.n_kv_heads, cfg.head_dim, hi - lo), np.float32)
        q = min(hi, self.quantized)
        if lo < q:
            self.dequantize(kind, layer, lo, q, out[..., :q - lo])
        if hi > q:
            a = max(lo, q)
            out[..., a - lo:] = self.tail[kind][layer, ..., a - self.quantized:hi - self.quantized]
        return out

    def dequantize(self, kind, layer, lo, hi, out):
        per, mask = 8 // self.bits, 2 ** self.bits - 1
        n_kv, hd, B = out.shape
        wide = out.reshape(n_kv, hd // per, per, B)
        packed = self.codes[kind][layer, ..., lo:hi]
        for j in range(per):
            np.copyto(wide[:, :, j], (packed >> (j * self.bits)) & mask)
        g = self.group
        if kind == "k":
            cols = np.arange(lo, hi) // g
            scale = self.scale[kind][layer][..., cols].astype(np.float32)
            low = self.low[kind][layer][..., cols].astype(np.float32)
            out *= scale
            out += low
        else:
            grouped = out.reshape(n_kv, hd // g, g, B)
            grouped *= self.scale[kind][layer, ..., lo:hi][:, :, None].astype(np.float32)
            grouped += self.low[kind][layer, ..., lo:hi][:, :, None].astype(np.float32)
        return out

    # -- reports and the sequence's side ------------------------------------------
    @property
    def nbytes(self):
        arrays = [*self.codes.values(), *self.scale.values(), *self.low.values(),
                  *self.tail.values()] + ([] if self.scratch is None else [self.scratch])
        return sum(a.nbytes for a in arrays)

    def reset(self):
        super().reset()
        self.quantized = 0

    def truncate(self, n):
        if self.quantized <= n < self.length:   # only float32 positions go
            self.length = n
        else:
            super().truncate(n)

    def copy(self):
        twin = copy.copy(self)
        twin.scratch = None
        for name in ("codes", "scale", "low", "tail"):
            setattr(twin, name, {k: a.copy() for k, a in getattr(self, name).items()})
        return twin
