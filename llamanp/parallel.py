"""Row-parallel products: every core widens and multiplies its own rows.

Decoding one token with compressed weights (f16, bf16, q8_0) widens every
matrix to float32 a cache-sized piece at a time and multiplies each piece
by the token's vector (model.Streamed). Both steps are NumPy calls that
release the GIL while they run, so Python threads can do them side by side
on different rows of the same matrix:

    thread 0: rows    0..a   widen piece, gemv, widen piece, gemv, ...
    thread 1: rows    a..b   widen piece, gemv, ...
    ...

Each thread owns a scratch buffer for its pieces, and the BLAS runs on one
thread inside them (threads.one_blas_thread): the cores are already busy.
A row's result is the dot product the single-thread path computes, bit for
bit: the pieces only ever split a single-thread chunk at a multiple of ALIGN
rows from its start, and BLAS's matrix-vector kernels take the rows of a
call in blocks of at most ALIGN, from its first row, each block's rows
computed alike (tests/test_parallel.py checks it on the model's shapes).

The pool's size is threads.wanted_threads() (`--threads N`); one thread
means the single-thread path, unchanged.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional, Sequence

import numpy as np

from . import threads

#: pieces of a row-parallel product start at a multiple of this many rows
#: from the start of the single-thread chunk they belong to
ALIGN = 32
#: float32 elements per piece: widened and multiplied while in the L2 cache
PIECE_ELEMENTS = 1 << 16


class _Worker:
    """A daemon thread that runs one job at a time when told to."""

    def __init__(self):
        self.job: Optional[Callable[[], None]] = None
        self.error: Optional[BaseException] = None
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        threading.Thread(target=self._loop, daemon=True, name="llamanp-rows").start()

    def _loop(self) -> None:
        while True:
            self.go.acquire()
            try:
                self.job()
            except BaseException as e:   # handed to the caller, raised there
                self.error = e
            self.job = None
            self.done.release()

    def start(self, job: Callable[[], None]) -> None:
        self.job = job
        self.go.release()

    def wait(self) -> Optional[BaseException]:
        self.done.acquire()
        error, self.error = self.error, None
        return error


class RowPool:
    """`size` threads: the caller and size - 1 workers; run(jobs) runs
    jobs[k] on thread k (jobs[0] on the caller) and returns when all are done.

    Thread k owns scratch(k, n), a float32 buffer it alone writes into.
    """

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self.broken = False
        self._workers = [_Worker() for _ in range(self.size - 1)]
        self._scratch = [np.empty(0, np.float32) for _ in range(self.size)]

    def scratch(self, k: int, n: int) -> np.ndarray:
        """Thread k's flat float32 scratch, at least n elements (grown if needed)."""
        if len(self._scratch[k]) < n:
            self._scratch[k] = np.empty(n, np.float32)
        return self._scratch[k]

    @property
    def scratch_bytes(self) -> int:
        return sum(s.nbytes for s in self._scratch)

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        if self.broken:
            raise RuntimeError("internal: this RowPool was interrupted; use parallel.pool()")
        started = []
        for worker, job in zip(self._workers, jobs[1:]):
            worker.start(job)
            started.append(worker)
        error = None
        try:
            if jobs:
                jobs[0]()
        finally:
            try:
                for worker in started:   # all of them, even if the caller's job failed
                    error = worker.wait() or error
            except BaseException:
                # interrupted (Ctrl-C) while a worker was still busy: its "done"
                # would arrive late and answer the next run, so this pool is
                # not used again (pool() makes a fresh one)
                self.broken = True
                raise
        if error is not None:
            raise error


_pool: Optional[RowPool] = None


def pool() -> RowPool:
    """The process's pool, sized threads.wanted_threads() (rebuilt when that changes)."""
    global _pool
    want = threads.wanted_threads()
    if _pool is None or _pool.size != want or _pool.broken:
        _pool = RowPool(want)
    return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None   # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def split_rows(out_dim: int, chunk: int, n: int, piece: int,
               align: int = ALIGN) -> list[list[tuple[int, int]]]:
    """Rows 0..out_dim-1 of a matrix that the single-thread path multiplies
    `chunk` rows at a time, shared out among n threads as contiguous ranges
    of about out_dim / n rows, cut into pieces of at most `piece` rows: a
    list of (lo, hi) pieces per thread.

    Every cut is a chunk boundary or lies a multiple of `align` rows past
    the start of its chunk, so that each row is computed as in the
    single-thread path (see the module docstring; align=chunk keeps the
    chunks whole). A thread may get no rows.
    """
    piece = max(align, piece - piece % align)

    def cut_near(row: int) -> int:   # the allowed cut nearest to `row`
        start = row - row % chunk
        inside = round((row - start) / align) * align
        return min(start + inside, min(start + chunk, out_dim))

    bounds = [0] + [cut_near(out_dim * k // n) for k in range(1, n)] + [out_dim]
    plan = []
    for lo, hi in zip(bounds, bounds[1:]):
        pieces = []
        while lo < hi:
            end = min(hi, lo - lo % chunk + chunk)             # stay inside the chunk
            step = min(end - lo, piece)
            pieces.append((lo, lo + step))
            lo += step
        plan.append(pieces)
    return plan


def widen_all(pairs: Sequence[tuple[np.ndarray, "object"]]) -> None:
    """Widen each (float32 buffer, Packed) pair into its buffer, the rows of
    every matrix shared out among the pool's threads (widening is exact
    element by element, so any split gives the same buffer)."""
    rows = pool()
    if rows.size == 1:
        for buf, packed in pairs:
            packed.widen(out=buf)
        return

    def job(k: int):
        def run():
            for buf, packed in pairs:
                n = len(buf)
                lo, hi = n * k // rows.size, n * (k + 1) // rows.size
                if hi > lo:
                    packed.rows(lo, hi).widen(out=buf[lo:hi])
        return run
    rows.run([job(k) for k in range(rows.size)])
