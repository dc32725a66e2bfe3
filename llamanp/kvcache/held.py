"""Positions held in the slots of a Store: what every strategy that keeps
some (or all) positions in a given storage type shares.

Slots 0..held-1 are filled; update appends the new block at slots
held..held+T-1 (so it comes last, as attention wants). A strategy with a
budget (`size`) evicts in advance(), after the forward call, down to `size`
slots: it names the slots to drop, and the last filled slots are moved into
the holes below `size` (a swap-remove: O(dropped) copies, never a shift of the
whole cache). Slot order is then no longer position order; `pos` remembers
each slot's original position, and attention does not care about order.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import LlamanpError
from .base import KVCache, Param
from .quantized import DTYPES, make_store

#: the slots a budget-bound cache reserves beyond its budget at first: one
#: prefill chunk's worth (a bigger forward call grows the store)
HEADROOM = 512


class HeldCache(KVCache):
    """Every position, in `dtype` storage: inplace:dtype=... (never evicts).

    Bytes per position: 2 x n_layers x n_kv x (head_dim x the storage's bytes
    per element + its scales), all max_seq_len positions reserved up front.
    """

    name = "inplace"
    params = {"dtype": Param("f32", "storage", DTYPES)}
    #: the budget (positions kept per layer after each forward call), None: all
    size = None

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.dtype = options.get("dtype", "f32")
        self.exact = self.dtype == "f32" and self.size is None
        self.truncates = self.size is None
        cap = max_seq_len if self.size is None else min(max_seq_len, self.size + HEADROOM)
        self.store = make_store(self.dtype, config, cap)
        # each slot's original position, per layer (a budget-less cache holds 0..held-1)
        self.pos = (None if self.size is None
                    else np.zeros((config.n_layers, self.store.capacity), np.int64))
        self.held = 0

    # -- the model's side ------------------------------------------------------------
    def update(self, layer, k, v):
        T = len(k)
        if self.length + T > self.max_seq_len:
            raise LlamanpError(f"context is full ({self.max_seq_len} positions)")
        if self.held + T > self.store.capacity:
            self._grow(self.held + T)
        self.store.write(layer, self.held, k, v)
        if self.pos is not None:
            self.pos[layer, self.held:self.held + T] = np.arange(self.length, self.length + T)
        self.stored(layer, self.held, k)
        return self.store.read(layer, self.held + T)

    def stored(self, layer: int, lo: int, k: np.ndarray) -> None:
        """Hook: keys k [T, n_kv, hd] just went into slots lo.. of `layer`."""

    def advance(self, n):
        super().advance(n)
        self.held += n
        if self.size is not None and self.held > self.size:
            self.evict(self.held - self.size)

    def evict(self, n: int) -> None:
        """Drop n slots in every layer (those choose() names) and fill the
        holes they leave below the new end with the kept slots above it, all
        layers in one indexed copy per array."""
        drops = self.choose(n)                                   # [n_layers, n]
        end = self.held - n
        gone = np.zeros((self.config.n_layers, self.held), bool)
        np.put_along_axis(gone, drops, True, axis=1)
        layers, holes = np.nonzero(gone[:, :end])
        _, movers = np.nonzero(~gone[:, end:])       # as many per layer as holes
        movers += end
        if len(holes):
            self.store.move(layers, movers, holes)
            for name in self.slot_names():
                a = getattr(self, name)
                a[layers, holes] = a[layers, movers]
        self.held = end
        self.evicted(n)

    def choose(self, n: int) -> np.ndarray:
        """The n slots to drop in each layer, [n_layers, n]: drop_all's for
        every layer when the layers agree, else drop()'s per layer."""
        shared = self.drop_all(n)
        if shared is not None:
            return np.broadcast_to(np.asarray(shared), (self.config.n_layers, n))
        return np.stack([self.drop(layer, n) for layer in range(self.config.n_layers)])

    def drop_all(self, n: int):
        """The n slots to drop in every layer, when all layers agree; else None."""
        return None

    def drop(self, layer: int, n: int) -> np.ndarray:
        """The n slots of `layer` to drop."""
        raise NotImplementedError

    def evicted(self, n: int) -> None:
        """Hook: n positions were just dropped from every layer."""

    def _grow(self, need: int) -> None:
        cap = min(max(need, 2 * self.store.capacity), max(need, self.max_seq_len))
        self.store = self.store.resized(cap, self.held)
        for name in self.slot_names():
            old = getattr(self, name)
            new = np.zeros(old.shape[:-1] + (self.store.capacity,), old.dtype)
            new[..., :self.held] = old[..., :self.held]
            setattr(self, name, new)

    def slot_names(self) -> list:
        """The attributes holding per-slot bookkeeping, arrays [n_layers,
        capacity] that move, grow and copy with the slots."""
        return [] if self.pos is None else ["pos"]

    # -- reports --------------------------------------------------------------------
    @property
    def nbytes(self):
        extra = sum(getattr(self, n).nbytes for n in self.slot_names())
        return self.store.nbytes + extra

    def positions(self, layer):
        if self.pos is None:
            return np.arange(self.held)
        return np.sort(self.pos[layer, :self.held])

    # -- the sequence's side ----------------------------------------------------------
    def reset(self):
        super().reset()
        self.held = 0

    def truncate(self, n):
        super().truncate(n)
        self.held = min(self.held, self.length)   # a truncating cache holds 0..length-1

    def copy(self):
        twin = copy.copy(self)
        twin.store = self.store.resized(self.store.capacity, self.held)
        for name in self.slot_names():
            setattr(twin, name, getattr(self, name).copy())
        return twin
