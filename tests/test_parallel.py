"""Row-parallel decoding of compressed weights (llamanp.parallel).

- the row split covers every row once, in pieces that only cut the
  single-thread chunks at allowed places;
- BLAS's matrix-vector product gives each row the same bits when a call is
  cut at a multiple of parallel.ALIGN rows (the property the split relies on),
  at the shapes of SmolLM2 and Llama-3-8B;
- decoding and prefilling compressed models with 2 and 3 threads gives logits
  bit-identical (np.array_equal) to the single-thread path, with chunk sizes
  that put chunk boundaries at odd rows;
- a worker's exception reaches the caller.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import recode
from tinymodel import write_tiny

import llamanp
from llamanp import model as model_mod
from llamanp import parallel, threads
from llamanp.config import Config


@pytest.fixture
def restore_threads():
    """Tests set the thread count: put back the BLAS's, the environment's
    and llamanp.threads' own record afterwards."""
    import os
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


@pytest.mark.parametrize("out_dim,chunk,n,piece", [
    (960, 455, 2, 113), (576, 455, 2, 113), (3072, 455, 3, 64), (576, 170, 2, 42),
    (49152, 455, 2, 113), (14336, 64, 2, 16), (4096, 18, 2, 4), (64, 64, 3, 200), (5, 5, 4, 1),
])
def test_split_rows_covers_every_row_once_at_allowed_cuts(out_dim, chunk, n, piece):
    plan = parallel.split_rows(out_dim, chunk, n, piece)
    assert len(plan) == n
    pieces = [p for thread in plan for p in thread]
    assert [lo for lo, _ in pieces] == [0] + [hi for _, hi in pieces[:-1]]   # contiguous
    assert pieces[-1][1] == out_dim
    for lo, hi in pieces:
        start = lo - lo % chunk
        assert hi <= min(start + chunk, out_dim), "a piece crosses a chunk boundary"
        assert (lo - start) % parallel.ALIGN == 0
        assert hi == min(start + chunk, out_dim) or (hi - start) % parallel.ALIGN == 0
        assert hi - lo <= max(piece, parallel.ALIGN)
    sizes = [sum(hi - lo for lo, hi in thread) for thread in plan]
    if out_dim >= 4 * n * chunk:     # many chunks: the threads get about equal shares
        assert max(sizes) - min(sizes) <= 2 * parallel.ALIGN


@pytest.mark.parametrize("out_dim,in_dim", [(455, 576), (170, 1536), (64, 4096), (18, 14336),
                                            (131, 320)])
def test_gemv_rows_do_not_depend_on_aligned_cuts(out_dim, in_dim, restore_threads):
    threads.set_threads(1)
    rng = np.random.default_rng(out_dim)
    w = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    x = rng.standard_normal(in_dim).astype(np.float32)
    whole = w @ x
    for cut in range(parallel.ALIGN, out_dim, parallel.ALIGN):
        assert np.array_equal(np.concatenate([w[:cut] @ x, w[cut:] @ x]), whole), cut


def _write_model(path, seed):
    """A small random model whose matrices are several chunks tall once
    STREAM_CHUNK_BYTES is lowered: dim 128, hidden 352, vocab 1000."""
    cfg = Config(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=352,
                 vocab_size=1000, norm_eps=1e-5, max_seq_len=64)
    from llamanp import lmw
    rng = np.random.default_rng(seed)

    def make(name, shape):
        def f():
            scale = 1.0 if name.endswith("norm.weight") else shape[-1] ** -0.5
            base = 1.0 if name.endswith("norm.weight") else 0.0
            return (base + scale * rng.standard_normal(shape)).astype(np.float32)
        return f
    lmw.write(path, cfg, [lmw.TensorSource(n, s, make(n, s))
                          for n, s in lmw.expected_shapes(cfg).items()],
              None, {"source_format": "test"})
    return path


@pytest.mark.parametrize("dtype", ["bf16", "q8_0", "f16"])
def test_threads_give_the_single_thread_logits_bit_for_bit(tmp_path, monkeypatch, dtype,
                                                          restore_threads):
    # 4 * 128 * 77 bytes: chunks of 77 rows for in = 128, 28 rows for in = 352
    monkeypatch.setattr(model_mod, "STREAM_CHUNK_BYTES", 4 * 128 * 77)
    src = _write_model(tmp_path / "m.lmw", seed=3)
    path = recode(src, tmp_path / f"m-{dtype}.lmw", dtype)
    results = {}
    for n in (1, 2, 3):
        threads.set_threads(n)
        m = llamanp.load(path)
        s = m.session(max_seq_len=64)
        prefill = s.feed(list(range(5, 25)), all_logits=True)      # [20, vocab]
        steps = [s.feed([t]) for t in (7, 300, 999, 1, 42, 512)]
        results[n] = (prefill, steps)
    for n in (2, 3):
        assert np.array_equal(results[n][0], results[1][0]), f"prefill, {n} threads"
        for i, (a, b) in enumerate(zip(results[n][1], results[1][1])):
            assert np.array_equal(a, b), f"decode step {i}, {n} threads"


def test_tiny_text_model_generates_the_same_tokens_with_threads(tmp_path, restore_threads):
    src = write_tiny(tmp_path / "t.lmw", 300, seed=5)
    path = recode(src, tmp_path / "t-q8.lmw", "q8_0")
    outs = []
    for n in (1, 2):
        threads.set_threads(n)
        m = llamanp.load(path)
        outs.append(list(llamanp.generate(m, [1, 2, 3], 24, stop_ids=())))
    assert outs[0] == outs[1]


def test_a_worker_error_reaches_the_caller():
    rows = parallel.RowPool(3)
    ran = []

    def boom():
        raise ValueError("in a worker")
    with pytest.raises(ValueError, match="in a worker"):
        rows.run([lambda: ran.append(0), boom, lambda: ran.append(2)])
    assert sorted(ran) == [0, 2]
    rows.run([lambda: ran.append(5)] * 3)     # still usable afterwards
    assert ran.count(5) == 3


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
