"""Key/value caches: three ways to remember the past of a sequence.

Attention at position t needs the keys and values of every position <= t.
A cache keeps them so that each new token costs one position's worth of work
instead of the whole sequence's. The three strategies give the same numbers and
differ only in cost, which is what `bench/` measures:

  none     keep nothing; every step recomputes the whole sequence (O(n^2)).
  inplace  preallocate [n_kv_heads, head_dim, max_seq_len] per layer and write
           each new position into it; reading is a slice, no copies.
  concat   grow arrays with np.concatenate each step: simple, but every step
           copies the whole cache (O(n) per token, O(n^2) in total).

Keys and values are stored per layer as [n_kv_heads, head_dim, positions]:
each head's keys are the columns of a [head_dim, positions] matrix, so that
when a single new token attends (decoding), both of its products run along the
positions -- q . keys and weights . values are head_dim dot products or
axpys of `positions` numbers each -- the long, streaming shape that BLAS's
matrix-vector product reads fastest.
"""

from __future__ import annotations

import copy
import mmap

import numpy as np

from .config import Config
from .errors import LlamanpError

STRATEGIES = ("none", "inplace", "concat")


class KVCache:
    """Interface: `length` positions are held; `update` appends a block."""

    strategy = ""
    #: True if the model must be re-run over the whole sequence each step
    recompute = False

    def __init__(self, config: Config, max_seq_len: int):
        self.config = config
        self.max_seq_len = max_seq_len
        self.length = 0

    def update(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Add k, v ([T, n_kv, head_dim], as the projections give them) at
        positions length..length+T-1 of `layer`; return all keys and values so
        far, each [n_kv, head_dim, length+T]."""
        raise NotImplementedError

    def advance(self, n: int) -> None:
        """Called once all layers have been updated with n new positions."""
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        """Forget every position from n on."""
        self.length = min(self.length, n)

    def copy(self) -> "KVCache":
        """An independent cache holding the same positions (for forking a sequence)."""
        return copy.copy(self)   # right for NoCache, which holds nothing


class NoCache(KVCache):
    """Remembers nothing: the caller re-runs the whole sequence every step."""

    strategy = "none"
    recompute = True

    def update(self, layer, k, v):
        return k.transpose(1, 2, 0), v.transpose(1, 2, 0)

    def advance(self, n):
        pass  # nothing is kept, so the next call starts at position 0 again


def reserve(shape) -> np.ndarray:
    """A float32 array whose memory is committed only as it is written.

    An anonymous memory mapping gets its pages on first write, 4 KiB at a
    time. (np.empty would do the same, but numpy asks for transparent huge
    pages on large arrays, and then the first position written in each
    layer's and head's stretch of the cache commits a whole 2 MiB page.)
    """
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count, 1) * 4), np.float32, count).reshape(shape)


class InplaceCache(KVCache):
    """Preallocated buffers written at the current position."""

    strategy = "inplace"

    def __init__(self, config, max_seq_len):
        super().__init__(config, max_seq_len)
        shape = (config.n_layers, config.n_kv_heads, config.head_dim, max_seq_len)
        self.k, self.v = reserve(shape), reserve(shape)

    def update(self, layer, k, v):
        start, end = self.length, self.length + k.shape[0]
        if end > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        self.k[layer, ..., start:end] = k.transpose(1, 2, 0)
        self.v[layer, ..., start:end] = v.transpose(1, 2, 0)
        return self.k[layer, ..., :end], self.v[layer, ..., :end]

    def copy(self):
        twin = copy.copy(self)
        # fresh buffers; only the filled positions are worth copying
        twin.k, twin.v = reserve(self.k.shape), reserve(self.v.shape)
        twin.k[..., :self.length] = self.k[..., :self.length]
        twin.v[..., :self.length] = self.v[..., :self.length]
        return twin


class ConcatCache(KVCache):
    """Arrays grown by concatenation, one pair per layer."""

    strategy = "concat"

    def __init__(self, config, max_seq_len):
        super().__init__(config, max_seq_len)
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

    def copy(self):
        # the arrays are never written in place (update makes new ones), so
        # sharing them is safe; only the lists must be separate
        twin = copy.copy(self)
        twin.k, twin.v = list(self.k), list(self.v)
        return twin


def make_cache(strategy: str, config: Config, max_seq_len: int) -> KVCache:
    classes = {"none": NoCache, "inplace": InplaceCache, "concat": ConcatCache}
    if strategy not in classes:
        raise LlamanpError(f"unknown kv-cache strategy {strategy!r}; "
                           f"choose one of {', '.join(STRATEGIES)}")
    return classes[strategy](config, max_seq_len)
