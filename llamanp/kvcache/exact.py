"""The exact strategies: three ways to remember the whole past of a sequence.

Attention at position t needs the keys and values of every position <= t.
A cache keeps them so that each new token costs one position's worth of work
instead of the whole sequence's. These three give the same numbers and differ
only in cost, which is what `bench/` measures.

Keys and values are stored per layer as [n_kv_heads, head_dim, positions]:
each head's keys are the columns of a [head_dim, positions] matrix, so that
when a single new token attends (decoding), both of its products run along the
positions -- q . keys and weights . values are head_dim dot products or
axpys of `positions` numbers each -- the long, streaming shape that BLAS's
matrix-vector product reads fastest.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import LlamanpError
from .base import KVCache, Param, register, reserve
from .held import HeldCache
from .quantized import DTYPES


@register
class NoCache(KVCache):
    """Remembers nothing: the caller re-runs the whole sequence every step.

    0 bytes per position; every step costs the whole sequence (O(n^2) in all).
    """

    name = "none"
    recompute = True

    def update(self, layer, k, v):
        return k.transpose(1, 2, 0), v.transpose(1, 2, 0)

    def advance(self, n):
        pass  # nothing is kept, so the next call starts at position 0 again


@register
class InplaceCache(KVCache):
    """Preallocated [n_kv, head_dim, max_seq_len] buffers per layer, each new
    position written into place; reading is a slice, no copies.

    Bytes per position: 2 (keys and values) x n_layers x n_kv x head_dim x 4,
    all max_seq_len positions reserved up front (committed as written).
    With dtype= other than f32 the keys and values are stored in fewer bits
    (see llamanp.kvcache.quantized).
    """

    name = "inplace"
    params = {"dtype": Param("f32", "storage", DTYPES)}

    @classmethod
    def build(cls, config, max_seq_len, dtype="f32"):
        if dtype != "f32":   # narrower storage: the slots of a Store
            return HeldCache(config, max_seq_len, dtype=dtype)
        return cls(config, max_seq_len, dtype=dtype)

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        shape = (config.n_layers, config.n_kv_heads, config.head_dim, max_seq_len)
        self.k, self.v = reserve(shape), reserve(shape)

    def update(self, layer, k, v):
        start, end = self.length, self.length + k.shape[0]
        if end > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        self.k[layer, ..., start:end] = k.transpose(1, 2, 0)
        self.v[layer, ..., start:end] = v.transpose(1, 2, 0)
        return self.k[layer, ..., :end], self.v[layer, ..., :end]

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    def copy(self):
        twin = copy.copy(self)
        # fresh buffers; only the filled positions are worth copying
        twin.k, twin.v = reserve(self.k.shape), reserve(self.v.shape)
        twin.k[..., :self.length] = self.k[..., :self.length]
        twin.v[..., :self.length] = self.v[..., :self.length]
        return twin


@register
class ConcatCache(KVCache):
    """Arrays grown with np.concatenate each step, one pair per layer: simple,
    but every step copies the whole cache (O(n) per token, O(n^2) in total).

    Bytes per position: 2 x n_layers x n_kv x head_dim x 4, exactly the
    positions held (no capacity).
    """

    name = "concat"

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.reset()

    def reset(self):
        super().reset()
        empty = np.zeros((self.config.n_kv_heads, self.config.head_dim, 0), np.float32)
        self.k = [empty] * self.config.n_layers
        self.v = [empty] * self.config.n_layers

    def truncate(self, n):
        super().truncate(n)
        self.k = [k[..., :self.length] for k in self.k]
        self.v = [v[..., :self.length] for v in self.v]

    def update(self, layer, k, v):
        if self.length + k.shape[0] > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        self.k[layer] = np.concatenate([self.k[layer][..., :self.length],
                                        k.transpose(1, 2, 0)], axis=2)
        self.v[layer] = np.concatenate([self.v[layer][..., :self.length],
                                        v.transpose(1, 2, 0)], axis=2)
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.k + self.v)

    def copy(self):
        # the arrays are never written in place (update makes new ones), so
        # sharing them is safe; only the lists must be separate
        twin = copy.copy(self)
        twin.k, twin.v = list(self.k), list(self.v)
        return twin
