"""Paged: keys and values in fixed-size blocks from a shared pool, prefixes shared.

vLLM's PagedAttention and prefix caching (Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023),
in NumPy. A BlockPool holds blocks of `block` positions (every layer's keys and
values for those positions); a sequence's cache is a block table, the list of
its blocks in position order. Position p lives in block table[p // block], at
offset p % block.

Sequences share blocks: forking a cache (beam search, or a batch whose prompts
start alike) copies the table, not the blocks, and counts one more reference
to each. A block is copied only when a sequence writes into it while another
still refers to it (copy-on-write); a block nobody refers to goes back to the
free list. So 8 prompts behind one 512-token system prompt hold its 32 blocks
once, and 4 beams hold their prompt once.

Attention reads a sequence's keys as one [n_kv, head_dim, n] array: a table
whose blocks are consecutive in the pool (a sequence alone) is a view of the
pool, no copy; otherwise its blocks are gathered into a scratch array, one
copy of the sequence per layer and step (as `concat` pays). The numbers are
the full cache's: paged is exact.

Bytes: the pool's arrays (capacity included: it grows by a quarter at a time)
plus the tables; per position 2 x n_layers x n_kv x head_dim x 4, for each
block held once however many sequences share it. A cache's `nbytes` is its
pool's (plus its table): to add up caches that share a pool, use held_nbytes.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import LlamanpError
from .base import KVCache, Param, register, reserve


class BlockPool:
    """Blocks of `block` positions for every layer, with reference counts.

    keys and values: [n_layers, n_kv, head_dim, capacity, block] float32, so
    that a run of consecutive blocks of one layer is a [n_kv, head_dim, run *
    block] view; refs[b]: how many block tables hold block b (0 = free).
    """

    def __init__(self, config, block: int):
        self.config, self.block = config, block
        self.k = self.v = self._blocks(0)
        self.refs = np.zeros(0, np.int32)
        self.free: list[int] = []           # blocks with refs 0, reused lowest first
        self.peak_in_use = 0                # the most blocks held at once
        self.scratch = (np.zeros(0, np.float32), np.zeros(0, np.float32))

    def _blocks(self, n: int) -> np.ndarray:
        c = self.config
        return reserve((c.n_layers, c.n_kv_heads, c.head_dim, n, self.block))

    @property
    def capacity(self) -> int:
        return len(self.refs)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's arrays: blocks (capacity included), counts, scratch."""
        return (self.k.nbytes + self.v.nbytes + self.refs.nbytes
                + self.scratch[0].nbytes + self.scratch[1].nbytes)

    def stats(self) -> dict:
        """Blocks allocated, in use (and at most so far), shared (held by more
        than one table), and table entries (what the sequences would hold
        without sharing)."""
        return {"capacity": self.capacity, "in_use": int((self.refs > 0).sum()),
                "peak_in_use": self.peak_in_use,
                "shared": int((self.refs > 1).sum()), "references": int(self.refs.sum()),
                "block": self.block, "nbytes": self.nbytes}

    def allocate(self, n: int) -> list[int]:
        """n free blocks, each now held once."""
        if len(self.free) < n:
            self._grow(n - len(self.free))
        self.free.sort(reverse=True)        # lowest first: tables stay consecutive
        ids = [self.free.pop() for _ in range(n)]
        self.refs[ids] = 1
        self.peak_in_use = max(self.peak_in_use, self.capacity - len(self.free))
        return ids

    def _grow(self, more: int) -> None:
        old = self.capacity
        new = old + max(more, old // 4, 4)
        k, v = self._blocks(new), self._blocks(new)
        k[..., :old, :], v[..., :old, :] = self.k, self.v
        self.k, self.v = k, v
        self.refs = np.concatenate([self.refs, np.zeros(new - old, np.int32)])
        self.free.extend(range(old, new))

    def share(self, ids) -> None:
        for b in ids:                       # (a table names each block once)
            self.refs[b] += 1

    def release(self, ids) -> None:
        # plain indexing only: this also runs from a cache's __del__, which
        # may come while the interpreter shuts down
        for b in ids:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(int(b))

    def private(self, b: int) -> int:
        """Block b if only one table holds it, else a fresh copy of it (all
        layers) that the caller holds instead (copy-on-write)."""
        if self.refs[b] == 1:
            return b
        (c,) = self.allocate(1)
        self.k[..., c, :] = self.k[..., b, :]
        self.v[..., c, :] = self.v[..., b, :]
        self.release([b])
        return c

    def read(self, layer: int, table: np.ndarray, n: int):
        """Keys and values of the first n positions of `table` in `layer`,
        each [n_kv, head_dim, n]: a view when the blocks are consecutive,
        else gathered into the scratch arrays (valid until the next read)."""
        nb, B = len(table), self.block
        k, v = self.k[layer], self.v[layer]            # [n_kv, hd, capacity, B]
        if nb and table[-1] - table[0] == nb - 1 and (nb < 3 or (np.diff(table) == 1).all()):
            lo = int(table[0])
            return (k[:, :, lo:lo + nb].reshape(*k.shape[:2], nb * B)[..., :n],
                    v[:, :, lo:lo + nb].reshape(*v.shape[:2], nb * B)[..., :n])
        size = k.shape[0] * k.shape[1] * nb * B
        if len(self.scratch[0]) < size:
            self.scratch = (np.empty(size, np.float32), np.empty(size, np.float32))
        out = []
        for src, buf in zip((k, v), self.scratch):
            dst = buf[:size].reshape(*src.shape[:2], nb, B)
            np.take(src, table, axis=2, out=dst)
            out.append(dst.reshape(*src.shape[:2], nb * B)[..., :n])
        return out[0], out[1]


@register
class PagedCache(KVCache):
    """A block table into a BlockPool; forks share blocks, copy-on-write.

    Bytes per position: 2 x n_layers x n_kv x head_dim x 4 per block held,
    counted once per pool however many sequences share it (held_nbytes).
    """

    name = "paged"
    params = {"block": Param(16, "positions per block")}
    #: forks share what they hold: a batch computes a shared prompt prefix once
    #: and forks it (llamanp.batch)
    shares_prefix = True

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.pool = BlockPool(config, options["block"])
        self.table = np.zeros(0, np.int32)
        self._room = None            # the end position the table is ready to write to

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes + self.table.nbytes

    def update(self, layer, k, v):
        start, end = self.length, self.length + k.shape[0]
        if end > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        if self._room != end:        # the first layer of this forward call
            self._make_room(start, end)
        B, pool = self.pool.block, self.pool
        for i in range(start // B, (end - 1) // B + 1):   # the blocks these positions touch
            lo, hi = max(start, i * B), min(end, (i + 1) * B)
            at, rows = slice(lo - i * B, hi - i * B), slice(lo - start, hi - start)
            pool.k[layer, :, :, self.table[i], at] = k[rows].transpose(1, 2, 0)
            pool.v[layer, :, :, self.table[i], at] = v[rows].transpose(1, 2, 0)
        return pool.read(layer, self.table[:(end - 1) // B + 1], end)

    def _make_room(self, start: int, end: int) -> None:
        """Blocks for positions start..end-1, each held by this table alone."""
        B = self.pool.block
        first, need = start // B, (end - 1) // B + 1
        for i in range(first, min(need, len(self.table))):
            self.table[i] = self.pool.private(int(self.table[i]))
        if need > len(self.table):
            new = self.pool.allocate(need - len(self.table))
            self.table = np.concatenate([self.table, np.asarray(new, np.int32)])
        self._room = end

    def advance(self, n):
        super().advance(n)
        self._room = None

    def copy(self):
        twin = copy.copy(self)              # same pool, its own table
        twin.table = self.table.copy()
        self.pool.share(twin.table)
        return twin

    def truncate(self, n):
        super().truncate(n)
        keep = -(-self.length // self.pool.block)
        self.pool.release(self.table[keep:])
        self.table = self.table[:keep].copy()
        self._room = None

    def reset(self):
        self.truncate(0)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None and len(self.table):
            pool.release(self.table)
            self.table = self.table[:0]


def held_nbytes(caches) -> int:
    """Bytes held by several caches together: a pool shared by paged caches
    counts once, their tables each."""
    pools, total = {}, 0
    for c in caches:
        pool = getattr(c, "pool", None)
        if isinstance(pool, BlockPool):
            pools[id(pool)] = pool
            total += c.table.nbytes
        else:
            total += c.nbytes
    return total + sum(p.nbytes for p in pools.values())
