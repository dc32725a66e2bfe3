"""Row-parallel products of compressed matrices, widened ahead of time.

Decoding one token with compressed weights (f16, bf16, q8_0) widens every
matrix to float32, a piece of rows at a time, and multiplies each piece by
the token's vector (model.Streamed). Widening costs several times what the
product does, so every core widens and multiplies pieces of each matrix:
the caller takes the matrix's pieces from the front, the worker threads
from the back, until they meet.

Widening does not depend on the token, so a worker need not wait for the
vector: while the caller is busy elsewhere (attention, norms, the previous
matrix's pieces), each worker widens the back half of the next matrices
into buffers of its own, up to SLOTS pieces, and multiplies them when their
vector arrives:

    caller:  [attention]    wqkv 0 ->           [rope, attention]   wo 0
    worker:  widen wqkv 1, widen w13 3, w13 2   wqkv 1 ->  widen ...

To know what comes next, the pieces are numbered in the order the forward
pass uses them (layer 0's wqkv, wo, w13, w2, layer 1's, ..., the output
matrix; then again for the next token). A pass that does not follow that
order (one that skips the output matrix, a logit lens that runs it once per
layer) only drops the pieces widened ahead: the order is a guess that can
cost wasted work, never a wrong result.

Each thread multiplies the pieces it widened itself, from its own buffers:
a widened piece never moves between cores (handing 2 MB of float32 from one
core's cache to another's costs more than widening it). NumPy releases the
GIL inside each call, so the threads really run side by side; the pieces are
large (PIECE_ELEMENTS) so that each call takes far longer than handing the
GIL over, and the threads meet about once per piece.

Every piece starts a multiple of ALIGN rows into its matrix. BLAS's
matrix-vector product takes the rows of a call in blocks of at most ALIGN,
from its first row, and computes every full block alike, so the product of
a matrix piece by piece is the product of the whole matrix, bit for bit
(tests/test_parallel.py checks it on real shapes): a compressed model
decodes, with any number of threads, exactly as the float32 model of its
widened weights does on one BLAS thread. (With more, OpenBLAS splits a
float32 matrix-vector product at rows of its own choosing, which can change
the last bits; the products here always run on one BLAS thread, through
threads.one_blas_thread.)

The thread count is threads.wanted_threads() (`--threads N`): N - 1 workers.
One thread means no workers: the caller widens every piece itself.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Optional, Sequence

import numpy as np

from . import threads

#: pieces of a matrix start at multiples of this many rows
ALIGN = 32
#: at least about this many float32 elements per piece (2 MiB): big enough
#: that one NumPy call on it takes far longer than handing the GIL over
PIECE_ELEMENTS = 1 << 19
#: matrices of more than 8 such pieces are cut into pieces of up to this many
#: elements: each piece costs the threads a meeting, and with Llama-3-8B's
#: matrices 1M-element pieces decode q8_0 about 20% faster than 512K ones
#: (SmolLM2's 512K pieces stay as they are)
BIG_PIECE = 1 << 20
#: pieces a worker may hold widened ahead of their vector (2 decode SmolLM2's
#: q8_0 about 5% faster than 4, in 7 alternating rounds; 1 is slower)
SLOTS = 2


def cut_rows(out_dim: int, in_dim: int, piece: Optional[int] = None) -> list[tuple[int, int]]:
    """Rows 0..out_dim-1 as (lo, hi) pieces of about equal size and at most
    about `piece` (PIECE_ELEMENTS) elements each, every cut at a multiple
    of ALIGN rows."""
    if piece is None:     # big matrices in big pieces: fewer meetings of the threads
        piece = max(PIECE_ELEMENTS, min(BIG_PIECE, out_dim * in_dim // 8))
    blocks = -(-out_dim // ALIGN)                        # of ALIGN rows
    n = -(-blocks // max(1, piece // (ALIGN * in_dim)))  # pieces
    cuts = [min(out_dim, ALIGN * (blocks * k // n)) for k in range(n)] + [out_dim]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]     # one row alone is a dot product to NumPy, not BLAS's gemv
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


Use = Callable[[int, np.ndarray], None]


class Ahead:
    """The pieces of a model's compressed matrices, in the order its forward
    pass uses them, multiplied (each_widened) by every thread, and widened
    ahead of time by the workers (see the module docstring).

    `pieces`: quant.Packed (or anything with `.shape` [rows, in],
    `.widen(out=)` and `.keep_scales()`); `matrices`: (first piece, number of pieces) of each
    matrix, in order.
    """

    def __init__(self, pieces: Sequence, matrices: Sequence[tuple[int, int]],
                 slots: Optional[int] = None):
        self.pieces = list(pieces)
        self.matrices = list(matrices)
        self.slots = SLOTS if slots is None else slots
        self.size = max((p.shape[0] * p.shape[1] for p in self.pieces), default=0)
        self.own = np.empty(self.size, np.float32)     # the caller's piece buffer
        self.scale_bytes = None     # q8_0 scales kept as float32, once streaming starts
        self._crew: Optional[_Crew] = None
        self._stop_crew: Optional[weakref.finalize] = None

    @property
    def nbytes(self) -> int:
        """Bytes of float32 the pieces are widened into: the caller's buffer
        and the workers' own."""
        crew = 0 if self._crew is None else self._crew.workers * self.slots * self.size * 4
        return self.own.nbytes + crew + (self.scale_bytes or 0)

    def each_widened(self, first: int, n: int, use: Use) -> None:
        """Call use(j, piece first + j widened: float32 [rows, in]) for each j
        in 0..n-1 -- the pieces of one matrix -- in any order and on any
        thread; the array is valid only during the call."""
        if self.scale_bytes is None:    # saves a step per piece from now on
            self.scale_bytes = sum(p.keep_scales() for p in self.pieces)
        crew = self._crew_now()
        if crew is not None:
            if crew.span.get(first) != n:
                raise ValueError(f"internal: pieces {first}..{first + n - 1} are not a matrix")
            crew.each_widened(first, n, use, self.own)
            return
        for j in range(n):
            piece = self.pieces[first + j]
            use(j, piece.widen(out=_view(self.own, piece)))

    def _crew_now(self) -> Optional["_Crew"]:
        """The workers for the wanted thread count (None for one thread),
        started, restarted or stopped as that count changes."""
        want = threads.wanted_threads() - 1
        crew = self._crew
        if crew is not None and crew.workers == want and crew.usable():
            return crew
        start = 0
        if crew is not None:
            start = crew.stop(settle=True)
            self._stop_crew.detach()
            self._crew = self._stop_crew = None
        if want < 1 or not self.pieces:
            return None
        crew = self._crew = _Crew(self, want, start)
        self._stop_crew = weakref.finalize(self, crew.stop)   # the workers end with this object
        return crew


def _view(buf: np.ndarray, piece) -> np.ndarray:
    """The start of flat float32 `buf`, shaped as `piece`."""
    return buf[:piece.shape[0] * piece.shape[1]].reshape(piece.shape)


class _Crew:
    """The worker threads of an Ahead and what they share with the caller,
    under one lock. Pieces are counted on over tokens (count % n is the
    piece), and so are matrices' starts.

        done    the caller has finished every count before it
        look    the start of the next matrix whose back half the workers may
                widen ahead (at most one token past done)
        floor   matrix start -> the lowest count of it the workers have claimed
        job     the matrix the caller is multiplying now: its counts
                front..back-1 are unclaimed; the caller claims from the
                front, the workers from the back
        owed    the job's counts the workers claimed and have not multiplied
    """

    def __init__(self, ahead: Ahead, workers: int, start: int):
        self.pieces = ahead.pieces
        self.n = len(self.pieces)
        self.span = dict(ahead.matrices)  # a matrix's first piece -> its number of pieces
        self.size, self.slots, self.workers = ahead.size, ahead.slots, workers
        # reentrant: a garbage collection on a worker holding the lock may run
        # Ahead's finalizer, which stops the crew under the same lock
        self.cv = threading.Condition(threading.RLock())
        self.done = self.look = start
        self.floor: dict = {}
        self.job: Optional[tuple[int, int, Use]] = None
        self.front = self.back = self.owed = 0
        self.using = 0                   # workers inside a `use` call now
        self.sleepers = 0                # workers waiting for something to do
        self.waiting = False             # the caller waits for the workers
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.pid = os.getpid()
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True, name="llamanp-widen").start()

    def usable(self) -> bool:
        # a forked child has none of its parent's threads; a worker's error
        # keeps the crew until the next call has raised it (_raise_error)
        return not self.stopped and self.pid == os.getpid()

    def stop(self, settle: bool = False) -> int:
        """Tell the workers to end; returns the caller's position. With
        `settle`, first wait until no worker is inside a `use` call (one the
        caller was interrupted in), so that it writes nothing later."""
        if self.pid != os.getpid():      # forked: the lock may be held by a thread
            self.stopped = True          # that does not exist here
            return self.done
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
            while settle and self.using:
                self.waiting = True       # (a worker leaving `use` then notifies)
                self.cv.wait()
            return self.done

    # -- the caller's side ----------------------------------------------------------
    def each_widened(self, first: int, n: int, use: Use, own: np.ndarray) -> None:
        cv = self.cv
        start = self.done + (first - self.done) % self.n   # the next count of `first`
        end = start + n                  # (only the caller moves done)
        try:
            with cv:
                self._drop_before(start)
                self.front, self.back = start, self.floor.pop(start, end)
                self.owed = end - self.back
                self.job = (start, end, use)
                self.look = max(self.look, end)
                if self.sleepers:
                    cv.notify_all()
            while True:
                with cv:
                    self._raise_error()
                    if self.front < self.back:
                        count = self.front
                        self.front += 1
                    elif self.owed == 0:
                        break
                    else:                      # the rest is the workers': wait
                        self.waiting = True
                        cv.wait()
                        self.waiting = False
                        continue
                piece = self.pieces[count % self.n]
                use(count - start, piece.widen(out=_view(own, piece)))
        finally:
            # also when `use` failed or the caller was interrupted: the job
            # ends, and no worker may call `use` once this returns (its
            # output may be reused); interrupted here too, the crew is
            # dropped, and the next one waits for the workers' last `use`
            try:
                with cv:
                    self.job = None
                    self.waiting = False
                    self._drop_before(end)
                    while self.using:
                        self.waiting = True
                        cv.wait()
                    self.waiting = False
            except BaseException:
                self.stopped = True
                raise

    def _drop_before(self, count: int) -> None:
        """The caller is done with every count before `count` (lock held)."""
        if count > self.done:
            self.done = count
            self.look = max(self.look, count)
            for start in [s for s in self.floor if s < count]:
                del self.floor[start]
            if self.sleepers:
                self.cv.notify_all()

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.stopped = self.error, True
            self.cv.notify_all()
            raise error

    # -- the workers' side ----------------------------------------------------------
    def _next_ahead(self) -> Optional[int]:
        """A count a worker may widen before its vector exists, claimed
        (lock held): the back half of each matrix after the caller's, at most
        one token ahead of the caller."""
        while self.look < self.done + self.n:
            start = self.look
            count = self.span[start % self.n]
            low = self.floor.get(start, start + count)
            if low - 1 >= start + count // 2:
                self.floor[start] = low - 1
                return low - 1
            self.look = start + count
        return None

    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException as e:   # a bug here must not leave the caller waiting
            with self.cv:
                if self.error is None:
                    self.error = e
                self.stopped = True
                self.cv.notify_all()

    def _work_loop(self) -> None:
        cv = self.cv
        bufs = [np.empty(self.size, np.float32) for _ in range(self.slots)]
        free = list(range(self.slots))
        ahead: dict = {}                     # count -> slot: widened, waiting for its vector
        while True:
            use = job = None                 # (holds no caller's arrays while asleep)
            with cv:
                while True:
                    if self.stopped:
                        return
                    for count in [c for c in ahead if c < self.done]:
                        free.append(ahead.pop(count))        # dropped by the caller
                    job = self.job
                    if job is not None:
                        start, end, use = job
                        count = next((c for c in ahead if start <= c < end), None)
                        if count is not None:                # widened ahead: multiply
                            slot, widen = ahead.pop(count), False
                            break
                        if self.back > self.front and free:  # claim from the back
                            self.back -= 1
                            self.owed += 1
                            count, slot, widen = self.back, free.pop(), True
                            break
                    if free:
                        count = self._next_ahead()
                        if count is not None:
                            job, slot, widen = None, free.pop(), True
                            break
                    use = job = None
                    self.sleepers += 1
                    cv.wait()
                    self.sleepers -= 1
                if job is not None:
                    self.using += 1
            piece = self.pieces[count % self.n]
            out = _view(bufs[slot], piece)
            try:
                if widen:
                    piece.widen(out=out)
                if job is not None:
                    use(count - start, out)
                error = None
            except BaseException as e:       # handed to the caller, raised there
                error = e
            with cv:
                if job is not None:
                    self.using -= 1
                    self.owed -= 1
                    free.append(slot)
                elif error is None and count >= self.done:
                    ahead[count] = slot
                else:
                    free.append(slot)
                if error is not None and self.error is None:
                    self.error = error
                if self.waiting or error is not None:
                    cv.notify_all()


# -- whole matrices -----------------------------------------------------------------

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
    jobs[k] on thread k (jobs[0] on the caller) and returns when all are done."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self.broken = False
        self._workers = [_Worker() for _ in range(self.size - 1)]

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


def widen_all(pairs: Sequence[tuple[np.ndarray, "object"]]) -> None:
    """Widen each (float32 buffer, Packed) pair into its buffer, the rows of
    every matrix shared out among the pool's threads (widening is exact
    element by element, so any split gives the same buffer). Used for
    passes of many tokens, which widen a layer whole."""
    rows = pool()
    if rows.size == 1:
        for buf, packed in pairs:
            packed.widen(out=buf)
        return

    for _, packed in pairs:
        packed.look_finite()    # once per tensor, not per slice and pass

    def job(k: int):
        def run():
            for buf, packed in pairs:
                n = len(buf)
                lo, hi = n * k // rows.size, n * (k + 1) // rows.size
                if hi > lo:
                    packed.rows(lo, hi).widen(out=buf[lo:hi])
        return run
    rows.run([job(k) for k in range(rows.size)])
