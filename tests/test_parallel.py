"""Row-parallel products of compressed weights, widened ahead (llamanp.parallel).

- the pieces cover every row once, cut at multiples of parallel.ALIGN rows;
- BLAS's matrix-vector product gives each row the same bits when a call is
  cut at a multiple of parallel.ALIGN rows (the property the pieces rely on),
  at the shapes of SmolLM2 and Llama-3-8B;
- a compressed model decodes exactly as the float32 model of its widened
  weights does (np.array_equal), with 1, 2 and 3 threads, and prefills and
  checks a few tokens at once the same with every thread count;
- the crew's protocol, on random call orders (skipped matrices, repeated
  ones, thread counts changing): every piece is handed over once, widened
  right, and never after each_widened returned;
- a worker's exception, and one raised on the caller's side, reach the
  caller and leave the model working; a forked child and a deleted model
  leave no worker behind.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
from conftest import recode
from tinymodel import write_tiny

import llamanp
from llamanp import parallel, threads
from llamanp.config import Config
from llamanp.quant import Packed


@pytest.fixture
def restore_threads():
    """Tests set the thread count: put back the BLAS's, the environment's
    and llamanp.threads' own record afterwards."""
    wanted, blas = threads._wanted, threads.get_threads()
    env = {v: os.environ.get(v) for v in threads.ENV_VARS}
    yield
    if blas is not None:
        threads.set_threads(blas)
    threads._wanted = wanted
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2048 elements and 2 slots per worker: the small test
    models' matrices are then several pieces each, and the workers' slots
    run out."""
    monkeypatch.setattr(parallel, "PIECE_ELEMENTS", 2048)
    monkeypatch.setattr(parallel, "SLOTS", 2)


def _widen_threads() -> set:
    return {t for t in threading.enumerate() if t.name == "llamanp-widen"}


@pytest.mark.parametrize("out_dim,in_dim", [
    (960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576),       # SmolLM2
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),  # Llama 3 8B
    (5, 7), (33, 64), (64, 320), (1000, 128)])
def test_cut_rows_covers_every_row_once_at_aligned_cuts(out_dim, in_dim):
    pieces = parallel.cut_rows(out_dim, in_dim)
    assert [lo for lo, _ in pieces] == [0] + [hi for _, hi in pieces[:-1]]   # contiguous
    assert pieces[-1][1] == out_dim
    assert all(lo % parallel.ALIGN == 0 and hi > lo for lo, hi in pieces)
    # pieces of PIECE_ELEMENTS, or of up to BIG_PIECE for matrices 8 times that
    size = max(parallel.PIECE_ELEMENTS, min(parallel.BIG_PIECE, out_dim * in_dim // 8))
    biggest = max(size, parallel.ALIGN * in_dim)
    assert all((hi - lo) * in_dim <= biggest * 1.1 for lo, hi in pieces)
    rows = [hi - lo for lo, hi in pieces[:-1]]
    if rows:                                  # about equal, but for the last
        assert max(rows) - min(rows) <= parallel.ALIGN


@pytest.mark.parametrize("out_dim,in_dim", [(455, 576), (170, 1536), (64, 4096), (18, 14336),
                                            (131, 320)])
def test_gemv_rows_do_not_depend_on_aligned_cuts(out_dim, in_dim, restore_threads):
    threads.set_threads(1)
    rng = np.random.default_rng(out_dim)
    w = rng.standard_normal((out_dim, in_dim), dtype=np.float32)
    x = rng.standard_normal(in_dim, dtype=np.float32)
    whole = w @ x
    for cut in range(parallel.ALIGN, out_dim, parallel.ALIGN):
        assert np.array_equal(np.concatenate([w[:cut] @ x, w[cut:] @ x]), whole), cut


@pytest.mark.parametrize("out_dim,in_dim", [(960, 576), (49152, 576), (4096, 14336),
                                            (33, 16385), (65, 9000), (97, 4097), (1, 576),
                                            (31, 64)])
def test_the_pieces_multiply_as_the_whole_matrix_does(out_dim, in_dim, restore_threads):
    """Piece by piece, every row gets the whole matrix-vector product's bits
    (cut_rows never leaves one row alone: NumPy hands a single row to a dot
    product, whose sum is not gemv's)."""
    threads.set_threads(1)
    rng = np.random.default_rng(out_dim * in_dim)
    w = rng.standard_normal((out_dim, in_dim), dtype=np.float32)
    x = rng.standard_normal(in_dim, dtype=np.float32)
    pieces = parallel.cut_rows(out_dim, in_dim, piece=4096)       # small pieces: many cuts
    assert len(pieces) == 1 or all(hi - lo > 1 for lo, hi in pieces)
    assert np.array_equal(np.concatenate([w[lo:hi] @ x for lo, hi in pieces]), w @ x)


#: a small model whose matrices are several pieces each with small_pieces
SMALL = Config(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=352,
               vocab_size=1000, norm_eps=1e-5, max_seq_len=64)


def _write_model(path, seed):
    return write_tiny(path, SMALL.vocab_size, seed=seed, config=SMALL)


@pytest.mark.parametrize("dtype", ["bf16", "q8_0", "f16"])
def test_compressed_decoding_is_the_float32_models_bit_for_bit(tmp_path, dtype, small_pieces,
                                                               restore_threads):
    src = _write_model(tmp_path / "m.lmw", seed=3)
    path = recode(src, tmp_path / f"m-{dtype}.lmw", dtype)
    plain = recode(path, tmp_path / "m-deq.lmw", "f32")      # the values `dtype` means

    def run(file, n):
        threads.set_threads(n)
        m = llamanp.load(file)
        s = m.session(max_seq_len=64)
        prefill = s.feed(list(range(5, 25)), all_logits=True)     # 20 rows: whole layers
        steps = [s.feed([t]) for t in (7, 300, 999, 1, 42, 512)]  # 1 row: streamed
        few = s.feed([3, 9, 27, 81, 243], all_logits=True)        # 5 rows: streamed
        return prefill, steps, few, s.feed([4])
    assert len(llamanp.load(path)._ahead.pieces) > 3 * 4 * 2      # several per matrix
    f32 = run(plain, 1)
    one = run(path, 1)
    # (the prefill's logits are not compared with the float32 model's: a
    # compressed output matrix is multiplied by pieces there too, and a
    # matrix-matrix product's bits depend on how its columns are cut)
    for i, (a, b) in enumerate(zip(one[1], f32[1])):
        assert np.array_equal(a, b), f"decode step {i}: not the float32 model's bits"
    for n in (2, 3):
        more = run(path, n)
        assert np.array_equal(more[0], one[0]), f"prefill, {n} threads"
        for i, (a, b) in enumerate(zip(more[1], one[1])):
            assert np.array_equal(a, b), f"decode step {i}, {n} threads"
        assert np.array_equal(more[2], one[2]), f"5 rows at once, {n} threads"
        assert np.array_equal(more[3], one[3]), f"decode after them, {n} threads"


def test_tiny_text_model_generates_the_same_tokens_with_threads(tmp_path, restore_threads):
    src = write_tiny(tmp_path / "t.lmw", 300, seed=5)
    path = recode(src, tmp_path / "t-q8.lmw", "q8_0")
    outs = []
    for n in (1, 2):
        threads.set_threads(n)
        m = llamanp.load(path)
        outs.append(list(llamanp.generate(m, [1, 2, 3], 24, stop_ids=())))
    assert outs[0] == outs[1]


class _Piece:
    """A piece for the protocol tests: a Packed, whose widening can be made
    to fail on the workers' threads."""

    fail_on_workers = False

    def __init__(self, packed: Packed):
        self.packed, self.shape = packed, packed.shape

    def keep_scales(self) -> int:
        return self.packed.keep_scales()

    def widen(self, out):
        if self.fail_on_workers and threading.current_thread().name == "llamanp-widen":
            raise ValueError("cannot widen this piece")
        return self.packed.widen(out=out)


def _protocol_model(seed: int):
    """An Ahead over 6 matrices of 1..5 pieces of random bf16/q8_0 rows, and
    each piece's widened values."""
    rng = np.random.default_rng(seed)
    pieces, matrices = [], []
    for count in (3, 1, 5, 2, 4, 1):
        matrices.append((len(pieces), count))
        for _ in range(count):
            rows = int(rng.integers(1, 5)) * parallel.ALIGN
            w = rng.standard_normal((rows, 64)).astype(np.float32)
            pieces.append(_Piece(Packed.encode(w, str(rng.choice(["bf16", "q8_0"])))))
    want = [p.packed.widen() for p in pieces]
    return parallel.Ahead(pieces, matrices, slots=2), matrices, want


@pytest.mark.parametrize("seed", range(6))
def test_every_piece_is_handed_over_once_in_any_call_order(seed, restore_threads):
    ahead, matrices, want = _protocol_model(seed)
    rng = np.random.default_rng(100 + seed)
    order = list(range(len(matrices))) * 3                  # as a forward pass uses them
    order += [int(rng.integers(len(matrices))) for _ in range(40)]   # skips, repeats, backwards
    order += list(range(len(matrices))) * 2
    for step, m in enumerate(order):
        threads.set_threads(1 + step // 25 % 3)          # 1, 2, 3 threads in turn
        first, count = matrices[m]
        seen, open_ = [], [True]

        def use(j, w, first=first, seen=seen, open_=open_):
            assert open_[0], "a piece was handed over after each_widened returned"
            assert np.array_equal(w, want[first + j]), (m, j)
            seen.append(j)
        ahead.each_widened(first, count, use)
        open_[0] = False
        assert sorted(seen) == list(range(count)), (step, m, seen)


def test_a_workers_error_reaches_the_caller_and_the_next_call_works(restore_threads):
    threads.set_threads(2)
    ahead, matrices, want = _protocol_model(7)
    _Piece.fail_on_workers = True
    try:
        with pytest.raises(ValueError, match="cannot widen"):
            for _ in range(20):           # the workers widen some pieces ahead: they fail
                for first, count in matrices:
                    ahead.each_widened(first, count, lambda j, w: None)
    finally:
        _Piece.fail_on_workers = False
    first, count = matrices[2]
    got = {}
    ahead.each_widened(first, count, lambda j, w: got.setdefault(j, w.copy()))
    assert all(np.array_equal(got[j], want[first + j]) for j in range(count))


def test_an_error_in_the_callers_product_leaves_no_worker_writing(restore_threads):
    threads.set_threads(2)
    ahead, matrices, want = _protocol_model(8)
    first, count = matrices[2]
    calls = []

    def use(j, w):
        calls.append(j)
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ahead.each_widened(first, count, use)
    after = len(calls)
    for first2, count2 in matrices:            # the next calls are whole and right
        seen = []
        ahead.each_widened(first2, count2, lambda j, w, f=first2: (
            seen.append(j), np.testing.assert_array_equal(w, want[f + j])))
        assert sorted(seen) == list(range(count2))
    assert len(calls) == after                # nothing more of the interrupted call


def test_a_workers_error_recorded_between_calls_is_raised_by_the_next(restore_threads):
    threads.set_threads(2)
    ahead, matrices, want = _protocol_model(9)
    first, count = matrices[0]
    ahead.each_widened(first, count, lambda j, w: None)
    crew = ahead._crew
    with crew.cv:                        # as a worker records a failed widening
        crew.error = ValueError("widening ahead failed")
    with pytest.raises(ValueError, match="widening ahead failed"):
        ahead.each_widened(*matrices[1], lambda j, w: None)
    seen = []                            # then a new crew, and right pieces
    ahead.each_widened(*matrices[2], lambda j, w: seen.append(
        np.array_equal(w, want[matrices[2][0] + j])))
    assert seen == [True] * matrices[2][1] and ahead._crew is not crew


def test_an_interrupt_while_posting_a_matrix_leaves_the_crew_right(monkeypatch,
                                                                   restore_threads):
    threads.set_threads(2)
    ahead, matrices, want = _protocol_model(10)
    for first, count in matrices:        # workers now hold pieces widened ahead
        ahead.each_widened(first, count, lambda j, w: None)
    crew = ahead._crew
    real = crew._drop_before
    calls = []

    def interrupted(count):
        calls.append(count)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(count)
    monkeypatch.setattr(crew, "_drop_before", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ahead.each_widened(*matrices[0], lambda j, w: None)
    for _ in range(2):
        for first, count in matrices:
            seen = []
            ahead.each_widened(first, count, lambda j, w, f=first: seen.append(
                (j, np.array_equal(w, want[f + j]))))
            assert sorted(seen) == [(j, True) for j in range(count)]


def test_deleting_a_model_ends_its_workers(tmp_path, small_pieces, restore_threads):
    threads.set_threads(2)
    path = recode(_write_model(tmp_path / "m.lmw", seed=5), tmp_path / "m8.lmw", "q8_0")
    before = _widen_threads()        # (other tests' models may end theirs meanwhile)
    m = llamanp.load(path)
    m.session(max_seq_len=8).feed([1])
    mine = _widen_threads() - before
    assert len(mine) == 1
    del m
    gc.collect()
    for _ in range(100):
        if not any(t.is_alive() for t in mine):
            break
        threading.Event().wait(0.01)
    assert not any(t.is_alive() for t in mine)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_a_forked_child_decodes_without_its_parents_workers(tmp_path, small_pieces,
                                                           restore_threads):
    threads.set_threads(2)
    path = recode(_write_model(tmp_path / "m.lmw", seed=6), tmp_path / "m8.lmw", "bf16")
    m = llamanp.load(path)
    s = m.session(max_seq_len=16)
    s.feed([1, 2])
    want = s.fork().feed([3])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: its workers are gone
        import signal
        signal.alarm(20)                        # a hang ends the child, not the test
        try:
            got = s.feed([3])
            os.write(write, got.tobytes())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    assert np.array_equal(np.frombuffer(data, np.float32), want)


def test_widen_at_load_runs_the_dequantized_float32_model(tmp_path):
    """load(widen=True) holds float32 arrays and computes exactly what the
    float32 file of the dequantized weights computes; widened_bytes is their size."""
    src = _write_model(tmp_path / "m.lmw", seed=4)
    packed = recode(src, tmp_path / "m-q8.lmw", "q8_0")
    plain = recode(packed, tmp_path / "m-deq.lmw", "f32")      # the values q8_0 means
    wide = llamanp.load(packed, widen=True)
    ref = llamanp.load(plain)
    assert isinstance(wide.output, np.ndarray) and wide.buffer_bytes == 0
    compressed = [w for w in llamanp.load(packed).file.tensors.values()
                  if not isinstance(w, np.ndarray)]
    assert wide.widened_bytes == sum(4 * int(np.prod(w.shape)) for w in compressed) > 0
    ids = list(range(3, 40))
    assert np.array_equal(wide.logits(ids), ref.logits(ids))
    assert np.array_equal(wide.logits(ids, fill1=True), ref.logits(ids, fill1=True))
    assert llamanp.load(plain, widen=True).widened_bytes == 0


def test_cli_widen_at_load_reports_its_memory(tmp_path, sp_model):
    import json

    from conftest import run_cli
    from tinymodel import write_text_model
    path = recode(write_text_model(tmp_path / "t.lmw", sp_model, seed=2), tmp_path / "t8.lmw",
                  "q8_0")
    base = ["-w", str(path), "-i", "the cat", "-n", "8", "--temp", "0"]
    code, plain, _ = run_cli("llama-np.py", *base)
    code, out, err = run_cli("llama-np.py", *base, "--widen-at-load", "--stats-json",
                             str(tmp_path / "s.json"))
    assert code == 0 and out == plain
    assert "widened at load" in err
    assert json.loads((tmp_path / "s.json").read_text())["widened_at_load_mb"] > 0


def test_an_interrupted_pool_is_replaced(monkeypatch, restore_threads):
    threads.set_threads(2)
    rows = parallel.pool()
    worker = rows._workers[0]
    real_wait = worker.wait

    def interrupted():
        real_wait()
        raise KeyboardInterrupt
    monkeypatch.setattr(worker, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rows.run([lambda: None, lambda: None])
    assert rows.broken and parallel.pool() is not rows
