"""The KV-cache subpackage: spec strings, the interface's contract, and every
strategy against the full float32 cache (or a float64 reference attention).

Tiny random models (tests/tinymodel.py); the reference for an exact strategy
is the in-place cache, itself checked against transformers in
test_end_to_end.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import write_tiny

import llamanp
from llamanp.errors import LlamanpError
from llamanp.kvcache import STRATEGIES, KVCache, make_cache, parse_spec
from llamanp.kvcache.exact import InplaceCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("kv") / "tiny.lmw", 64, max_seq_len=256)
    return llamanp.load(path)


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
])
def test_bad_specs_get_one_line(tiny, spec, words):
    with pytest.raises(LlamanpError) as e:
        make_cache(spec, tiny.config, 16)
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
