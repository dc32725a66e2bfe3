"""The KV-cache subpackage: spec strings, the interface's contract, and every
strategy against the full float32 cache (or a float64 reference attention).

Tiny random models (tests/tinymodel.py); the reference for an exact strategy
is the in-place cache, itself checked against transformers in
test_end_to_end.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import write_text_model, write_tiny

import llamanp
from llamanp.config import Config
from llamanp.errors import LlamanpError
from llamanp.kvcache import STRATEGIES, KVCache, make_cache, parse_spec
from llamanp.kvcache.exact import InplaceCache
from llamanp.kvcache.quantized import DTYPES, Stored, make_store
from llamanp.model import attention


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("kv") / "tiny.lmw", 64, max_seq_len=256)
    return llamanp.load(path)


#: head_dim 32: the smallest that q8_0 / q4_0 blocks (and kivi's groups) divide
WIDE = Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96,
              vocab_size=64, max_seq_len=512)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return llamanp.load(write_tiny(tmp_path_factory.mktemp("kv") / "wide.lmw", 64,
                                   config=WIDE))


def ids(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(1, 64, n)]


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))


# -- spec strings ---------------------------------------------------------------------

def test_parse_spec():
    assert parse_spec("inplace") == ("inplace", {})
    assert parse_spec(" sinks:size=512, sinks=4 ") == ("sinks", {"size": "512", "sinks": "4"})


@pytest.mark.parametrize("spec, words", [
    ("foo", ["unknown kvcache strategy 'foo'", "inplace", "concat", "none"]),
    ("", ["kvcache spec"]),
    ("inplace:size", ["not key=value"]),
    ("inplace:dtype=f32,dtype=f32", ["given twice"]),
    ("inplace:colour=red", ["unknown key 'colour'", "dtype="]),
    ("inplace:dtype=q9", ["dtype=q9 is not allowed", "f32"]),
    ("none:dtype=f32", ["unknown key 'dtype'", "none takes no options"]),
    ("sinks:size=4,sinks=4", ["size=4 must be larger than sinks=4"]),
    ("sinks:size=64,shift=1,dtype=q8_0", ["shift=1", "dtype=q8_0", "dtype=f32"]),
    ("sinks:shift=2", ["shift=2 is not allowed", "0|1"]),
    ("h2o:size=16,recent=20", ["recent=20 must be at most size=16"]),
    ("snapkv:size=64,kernel=4", ["kernel=4 must be odd"]),
    ("snapkv:size=16", ["size=16 must be larger than window=32"]),
    ("window:size=0", ["size=0 is not allowed", "an integer >= 1"]),
    ("kivi:bits=3", ["bits=3 is not allowed", "2|4"]),
    ("window:budget=3", ["unknown key 'budget'", "size=N"]),
])
def test_bad_specs_get_one_line(wide, spec, words):
    """Unknown names, keys and values, and options that contradict each other
    (a budget smaller than the sinks, a dtype the strategy cannot hold)."""
    with pytest.raises(LlamanpError) as e:
        make_cache(spec, wide.config, 64)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_names_and_spec_strings(tiny):
    assert {"none", "inplace", "concat"} <= set(STRATEGIES)
    c = make_cache("inplace:dtype=f32", tiny.config, 16)
    assert isinstance(c, InplaceCache) and isinstance(c, KVCache)
    assert c.spec == c.strategy == "inplace" and c.exact and c.truncates


# -- the exact strategies -------------------------------------------------------------

@pytest.mark.parametrize("spec", ["none", "inplace", "concat"])
def test_exact_strategies_report_bytes_and_positions(tiny, spec):
    cfg = tiny.config
    s = tiny.session(spec, max_seq_len=40)
    s.feed(ids(30))
    c = s.cache
    assert c.length == (0 if spec == "none" else 30)
    per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    want = {"none": 0, "inplace": 40 * per_position, "concat": 30 * per_position}[spec]
    assert c.nbytes == want
    assert list(c.positions(0)) == list(range(c.length))


class Watching(InplaceCache):
    """The in-place cache, plus a record of every observe() call."""
    name = "watching-test"
    wants_weights = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def observe(self, layer, weights, sums, first, total):
        rows = weights.shape[1]
        group = self.config.n_heads // self.config.n_kv_heads
        normalised = weights / sums[..., None]
        self.seen.append((layer, first, rows // group, total, normalised.sum(-1)))


@pytest.mark.parametrize("fill1", [False, True])
def test_observe_sees_every_query_and_changes_nothing(tiny, fill1):
    n = 150   # more than one attention block of queries
    want = tiny.logits(ids(n), "inplace")
    cache = Watching(tiny.config, n)
    s = tiny.session("inplace", max_seq_len=n)
    s.cache = cache
    got = s.feed(ids(n), fill1=fill1, all_logits=True)
    assert rel(got, want) <= 1e-5
    for layer in range(tiny.config.n_layers):
        calls = [c for c in cache.seen if c[0] == layer]
        covered = sorted(q for _, first, m, _, _ in calls for q in range(first, first + m))
        assert covered == list(range(n)) if not fill1 else covered == [0] * n
        for *_, row_sums in calls:
            np.testing.assert_allclose(row_sums, 1.0, rtol=1e-5)


# -- quantized storage --------------------------------------------------------------

def test_q8_0_and_q4_0_are_llama_cpp_blocks():
    """The stored codes and scales are byte for byte what the gguf package
    (llama.cpp's Python reference) makes of each position's head_dim numbers."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    x = np.random.default_rng(1).standard_normal((2, 32, 7)).astype(np.float32)  # [n_kv, hd, T]
    x[0, :, 3] = 0   # an all-zero block
    for dtype, kind, code_bytes in (("q8_0", gguf.GGMLQuantizationType.Q8_0, 32),
                                    ("q4_0", gguf.GGMLQuantizationType.Q4_0, 16)):
        store = make_store(dtype, WIDE, 8)
        store.write(0, 0, x.transpose(2, 0, 1), x.transpose(2, 0, 1))
        want = quants.quantize(x.transpose(0, 2, 1).reshape(-1, 32), kind)   # [rows, 2 + code]
        codes = store.slots("k", 0, 0, 7).transpose(0, 2, 1).reshape(-1, code_bytes)
        scales = store.slots("k_d", 0, 0, 7).transpose(0, 2, 1).reshape(-1)
        assert (codes.view(np.uint8) == want[:, 2:]).all(), dtype
        assert (scales.view(np.uint8).reshape(-1, 2) == want[:, :2]).all(), dtype
        got = store.widen("k", 0, 0, 7)
        ref = quants.dequantize(want, kind).reshape(2, 7, 32).transpose(0, 2, 1)
        np.testing.assert_array_equal(got, ref)


def test_f16_and_bf16_round_to_nearest_even():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((2, 32, 5)).astype(np.float32) * 100
    for dtype, tdtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        store = make_store(dtype, WIDE, 8)
        store.write(1, 2, x.transpose(2, 0, 1), x.transpose(2, 0, 1))
        want = torch.from_numpy(x).to(tdtype).float().numpy()
        np.testing.assert_array_equal(store.widen("v", 1, 2, 7), want)


def reference_attention(q, keys, values, start):
    """softmax(q k^T / sqrt(hd)) v in float64, causal over the last T keys,
    over dense [n_kv, hd, seen] keys/values."""
    T, n_heads, hd = q.shape
    n_kv, _, seen = keys.shape
    k = keys.astype(np.float64).repeat(n_heads // n_kv, axis=0)
    v = values.astype(np.float64).repeat(n_heads // n_kv, axis=0)
    s = np.einsum("thd,hds->ths", q.astype(np.float64), k) / np.sqrt(hd)
    future = np.arange(seen)[None, :] > (start + np.arange(T))[:, None]
    s[:, :, :][np.broadcast_to(future[:, None, :], s.shape)] = -np.inf
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("ths,hds->thd", w, v).reshape(T, n_heads * hd)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("T", [1, 150])
def test_attention_over_stored_equals_float64_reference(dtype, T, monkeypatch):
    """Attention over narrow storage, widened a page of positions at a time
    (pages of 64 here, the last one partial), against float64 attention over
    the whole dequantized cache."""
    from llamanp.kvcache import quantized
    monkeypatch.setattr(quantized, "BLOCK_BYTES", 4 * 2 * 32 * 64)
    rng = np.random.default_rng(3)
    seen = 700
    store = make_store(dtype, WIDE, seen)
    assert store.block == 64
    kv = rng.standard_normal((2, seen, 2, 32)).astype(np.float32)
    store.write(1, 0, kv[0], kv[1])
    keys, values = store.read(1, seen)
    assert isinstance(keys, Stored)
    q = rng.standard_normal((T, 4, 32)).astype(np.float32) * 3
    got = attention(q, keys, values, seen - T)
    want = reference_attention(q, keys.widen(), values.widen(), seen - T)
    assert rel(got, want) <= 1e-5


class FakeQuant(InplaceCache):
    """The in-place cache holding what gguf's reference quantizer gives back
    (quantize, then dequantize) instead of each position's keys and values."""
    name = "fakequant-test"

    def __init__(self, config, max_seq_len, kind):
        super().__init__(config, max_seq_len)
        self.kind = kind

    def update(self, layer, k, v):
        from gguf import quants
        hd = k.shape[-1]
        def roundtrip(x):
            return quants.dequantize(quants.quantize(x.reshape(-1, hd), self.kind),
                                     self.kind).reshape(x.shape).astype(np.float32)
        return super().update(layer, roundtrip(k), roundtrip(v))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_cache_logits_equal_dequantized_reference(wide, dtype):
    """The whole model, the prompt in one call. (One token at a time the
    single-query products sum in another order, and a difference of one
    float32 ulp can move a number across a rounding boundary of the next
    layer's quantizer; test_attention_over_stored_equals_float64_reference
    covers that path.)"""
    fill1 = False
    gguf = pytest.importorskip("gguf")
    kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
    n = 200
    s = wide.session("inplace", max_seq_len=n)
    s.cache = FakeQuant(wide.config, n, kind)
    want = s.feed(ids(n), fill1=fill1, all_logits=True)
    got = wide.session(f"inplace:dtype={dtype}", max_seq_len=n).feed(
        ids(n), fill1=fill1, all_logits=True)
    assert rel(got, want) <= 1e-5


def smollm2_shape() -> Config:
    return Config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                  hidden_dim=1536, vocab_size=49152, max_seq_len=8192, tied_embeddings=True)


@pytest.mark.parametrize("spec, ratio", [("inplace:dtype=q8_0", 0.27),
                                         ("inplace:dtype=q4_0", 0.15),
                                         ("inplace:dtype=f16", 0.51),
                                         ("sinks:size=512,dtype=q8_0", 0.28),
                                         ("kivi:bits=2,residual=0", 0.15)])
def test_narrow_storage_bytes_measured_from_arrays(spec, ratio):
    """nbytes is the sum of the arrays' nbytes (capacity reserved, committed
    only as written, and the page widened for attention): the SmolLM2 shape,
    8192 positions (sinks: 1024 slots, where that one page, 393 KB, is 0.8%
    of the float32 cache)."""
    cfg = smollm2_shape()
    f32 = make_cache(spec.split(":")[0] + ":size=512" if spec.startswith("sinks")
                     else "inplace", cfg, 8192)
    narrow = make_cache(spec, cfg, 8192)
    rng = np.random.default_rng(0)
    for cache in (f32, narrow):     # 64 positions in, and read once as attention would
        for layer in range(cfg.n_layers):
            keys, _ = cache.update(layer, *rng.standard_normal((2, 64, 3, 64), np.float32))
            if isinstance(keys, Stored):
                next(keys.blocks())
        cache.advance(64)
    assert narrow.nbytes <= ratio * f32.nbytes, (narrow.nbytes / f32.nbytes)


def test_kivi_quantizes_whole_groups_and_keeps_the_residual(wide):
    s = wide.session("kivi:bits=4,group=32,residual=64", max_seq_len=300)
    s.feed(ids(150))
    c = s.cache
    assert c.quantized == 96 and c.length - c.quantized <= 64      # 150 - 96 = 54
    for _ in range(20):
        s.feed([5])
    assert c.quantized == 128 and c.length == 170


# -- eviction ---------------------------------------------------------------------

EVICTING = ["window", "sinks", "sinks:shift=1", "h2o", "h2o:recent=10", "tova", "knorm",
            "random", "snapkv"]


def with_size(spec: str, size: int) -> str:
    return spec + ("," if ":" in spec else ":") + f"size={size}"


@pytest.mark.parametrize("fill1", [False, True])
@pytest.mark.parametrize("spec", EVICTING + ["kivi:residual=160"])
def test_budget_at_least_the_sequence_gives_the_full_cache(wide, spec, fill1):
    """A budget (or kivi's residual) that holds every position: exactly the
    full cache's logits."""
    n = 160
    want = wide.session("inplace", max_seq_len=n).feed(ids(n), fill1=fill1, all_logits=True)
    spec = spec if spec.startswith("kivi") else with_size(spec, n)
    got = wide.session(spec, max_seq_len=n).feed(ids(n), fill1=fill1, all_logits=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", ["kivi:residual=32", "kivi:bits=4,residual=128"])
def test_kivi_takes_a_call_longer_than_its_float32_tail(wide, spec):
    """One forward call of many more positions than residual + group: the
    float32 tail grows to hold them all, and since nothing is quantized until
    the call ends, the call's logits are exactly the full cache's."""
    n = 500
    want = wide.session("inplace", max_seq_len=n).feed(ids(n), all_logits=True)
    s = wide.session(spec, max_seq_len=n)
    got = s.feed(ids(n), all_logits=True)
    np.testing.assert_array_equal(got, want)
    assert s.cache.length - s.cache.quantized <= s.cache.residual


@pytest.mark.parametrize("spec", EVICTING)
def test_eviction_keeps_the_budget_after_every_call(wide, spec):
    size = 48
    s = wide.session(with_size(spec, size), max_seq_len=300)
    s.feed(ids(100))                                  # one call: evicted after it
    c = s.cache
    snap = spec.startswith("snapkv")
    for step in range(40):
        for layer in range(wide.config.n_layers):
            pos = c.positions(layer)
            assert len(pos) == (size + step if snap else size)
            assert len(set(pos)) == len(pos) and pos.max() < c.length
            if not spec.startswith(("tova", "knorm", "random")):   # these may drop the newest
                assert pos.max() == c.length - 1
        s.feed([7])
    assert c.length == 140
    if spec.startswith(("window", "sinks")):
        first = [0, 1, 2, 3] if spec.startswith("sinks") else []
        assert list(c.positions(1)) == first + list(range(140 - size + len(first), 140))
    if spec.startswith("h2o"):
        recent = 10 if "recent" in spec else size // 2
        assert set(range(140 - recent, 140)) <= set(c.positions(0))


@pytest.mark.parametrize("spec", ["window", "sinks", "h2o", "tova"])
def test_batched_and_fill1_agree_while_the_prompt_fits(wide, spec):
    """The documented rule: eviction happens after each forward call. A prompt
    within the budget is not evicted whether it comes in one call or one token
    at a time; decoding then evicts at the same steps, so the logits agree.
    (knorm is left out: in this tiny model a repeated token's keys have the
    same norm but for float32 rounding, and which of two tied keys goes is
    decided by that rounding.)"""
    prompt, more = ids(40), ids(30, seed=5)
    runs = []
    for fill1 in (False, True):
        s = wide.session(with_size(spec, 48), max_seq_len=100)
        s.feed(prompt, fill1=fill1)
        runs.append(np.stack([s.feed([t]) for t in more]))
    assert rel(runs[1], runs[0]) <= 1e-5


def test_sinks_shift_rotates_the_sinks_to_cache_positions(wide):
    """shift=1: after d evictions the sink keys are the originals rotated on by
    d positions (checked with the model's own RoPE table)."""
    from llamanp.model import apply_rope
    size, n = 20, 50
    plain = wide.session(f"sinks:size={size}", max_seq_len=n)
    shifted = wide.session(f"sinks:size={size},shift=1", max_seq_len=n)
    for s in (plain, shifted):
        s.feed(ids(n))
    d = n - size
    for layer in range(2):
        orig = plain.cache.store.planes["k"][layer][..., :4]             # [n_kv, hd, 4]
        rot = wide.rope.get(d, 1)[0, 0]                                    # [hd/2]
        want = apply_rope(np.ascontiguousarray(orig.transpose(2, 0, 1)), rot)
        got = shifted.cache.store.planes["k"][layer][..., :4].transpose(2, 0, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(shifted.cache.store.planes["k"][layer][..., 4:size],
                                      plain.cache.store.planes["k"][layer][..., 4:size])


def test_fork_and_reset_of_an_evicting_cache(wide):
    """A fork evicts on its own: feeding it does not change the original."""
    s = wide.session("h2o:size=32", max_seq_len=200)
    s.feed(ids(60))
    twin = s.fork()
    twin.feed(ids(10, seed=7))
    fresh = wide.session("h2o:size=32", max_seq_len=200)
    fresh.feed(ids(60))
    np.testing.assert_array_equal(s.feed(ids(5, seed=8)), fresh.feed(ids(5, seed=8)))
    s.reset()
    assert s.cache.length == 0 and len(s.cache.positions(0)) == 0


# -- the strategy written from scratch in docs/kv-cache.md ---------------------------

def doc_strategy_code() -> str:
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "kv-cache.md").read_text(encoding="utf-8")
    section = doc.split("## Writing a strategy", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_strategy_runs_as_written_and_equals_window(wide):
    code = doc_strategy_code()
    strategy = code[code.index("@register"):]
    assert len(strategy.strip().splitlines()) < 40       # the class, imports aside
    namespace: dict = {}
    try:
        exec(compile(code, "docs/kv-cache.md", "exec"), namespace)
        assert "recent" in STRATEGIES
        n = 120
        want = wide.session("inplace", max_seq_len=n).feed(ids(n), all_logits=True)
        got = wide.session(f"recent:size={n}", max_seq_len=n).feed(ids(n), all_logits=True)
        np.testing.assert_array_equal(got, want)
        for fill1 in (False, True):
            runs = []
            for spec in ("recent:size=40", "window:size=40"):
                s = wide.session(spec, max_seq_len=n)
                s.feed(ids(60), fill1=fill1)
                runs.append(np.stack([s.feed([t]) for t in ids(30, seed=4)]))
                assert list(s.cache.positions(1)) == list(range(50, 90))
            assert rel(runs[0], runs[1]) <= 1e-6
        s = wide.session("recent:size=40", max_seq_len=n)
        s.feed(ids(50))
        with pytest.raises(LlamanpError, match="cannot go back"):
            s.cache.truncate(10)
        s.cache.truncate(0)
        assert s.cache.length == 0 and s.cache.nbytes == 0
    finally:
        STRATEGIES.pop("recent", None)


# -- refusals -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["inplace:dtype=q8_0", "inplace:dtype=q4_0",
                                  "window:dtype=q8_0", "kivi"])
def test_a_head_dim_the_blocks_do_not_divide_is_refused(tiny, spec):
    with pytest.raises(LlamanpError, match="head_dim"):
        make_cache(spec, tiny.config, 16)     # head_dim 8


def test_chat_refuses_drop_oldest_with_an_evicting_cache(tmp_path, sp_model):
    from llamanp.console import Chat
    model = llamanp.load(write_text_model(tmp_path / "text.lmw", sp_model))
    with pytest.raises(LlamanpError, match="drop-oldest needs a KV cache that can forget"):
        Chat(model, template="llama2", kvcache="sinks:size=32", context_policy="drop-oldest")
    Chat(model, template="llama2", kvcache="sinks:size=32")      # stop: fine


def test_cli_kvcache_spec_errors_are_one_line(tmp_path):
    from conftest import run_cli
    rc, out, err = run_cli("llama-np.py", "-w", str(tmp_path / "none.lmw"), "-i", "x",
                           "--kvcache", "sinks:size=2,sinks=4")
    assert rc != 0 and err.count("\n") == 1 and err.startswith("error: kvcache sinks")


@pytest.mark.parametrize("spec", ["h2o:size=40,dtype=q8_0", "sinks:size=40,dtype=q4_0",
                                  "window:size=40,dtype=bf16", "window:size=40"])
def test_evicting_caches_grow_for_a_long_call(wide, spec, monkeypatch):
    """A forward call longer than the budget's headroom: the store and its
    bookkeeping arrays grow together, and pages round both up alike."""
    from llamanp.kvcache import held
    monkeypatch.setattr(held, "HEADROOM", 8)
    s = wide.session(spec, max_seq_len=512)
    s.feed(ids(100))
    s.feed(ids(400, seed=2))
    assert len(s.cache.positions(0)) == 40 and s.cache.length == 500
    assert s.cache.pos.shape[1] == s.cache.store.capacity


@pytest.mark.parametrize("spec", ["h2o", "tova", "snapkv"])
def test_strategies_reading_weights_give_the_last_logits_too(wide, spec):
    """Only the last position's logits asked for: the last layer still runs
    every query for a strategy that reads the weights, then keeps the last."""
    n = 100
    want = wide.session("inplace", max_seq_len=n).feed(ids(n))
    got = wide.session(with_size(spec, n), max_seq_len=n).feed(ids(n))
    assert got.shape == want.shape and rel(got, want) <= 1e-5
