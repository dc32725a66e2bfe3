"""The paged cache: the in-place cache's numbers, blocks shared between forks.

The reference is the in-place cache (whose logits tests/test_end_to_end.py
checks against transformers): paged must give the same logits within 1e-5
relative in every way a sequence is fed -- in one call, one token at a time,
forked, truncated, batched with prompts that share a prefix, in beam search --
while holding a block that several sequences share only once.
"""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import write_tiny

import llamanp
from llamanp.kvcache import make_cache
from llamanp.kvcache.paged import PagedCache, held_nbytes

VOCAB = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("paged") / "tiny.lmw"
    return llamanp.load(str(write_tiny(path, VOCAB, seed=3, max_seq_len=640)))


def ids_of(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("spec", ["paged", "paged:block=1", "paged:block=5", "paged:block=64"])
def test_logits_equal_inplace(model, spec):
    ids = ids_of(150)
    ref = model.logits(ids, "inplace")
    assert rel(model.logits(ids, spec), ref) <= 1e-5
    ref1 = model.logits(ids, "inplace", fill1=True)
    assert rel(model.logits(ids, spec, fill1=True), ref1) <= 1e-5


def test_forks_share_blocks_and_copy_on_write(model):
    ids = ids_of(140, seed=1)
    s = model.session("paged:block=8", max_seq_len=200)
    s.feed(ids[:100])                          # 12 full blocks and a half-full one
    pool = s.cache.pool
    assert pool.stats()["in_use"] == 13
    forks = [s.fork() for _ in range(3)]
    assert pool.stats()["in_use"] == 13 and pool.stats()["references"] == 4 * 13
    outs = [f.feed(ids[100 + 10 * i:110 + 10 * i], all_logits=True) for i, f in enumerate(forks)]
    # each fork copied only the half-full block it wrote into, then took new ones
    st = pool.stats()
    assert st["shared"] == 12 and st["in_use"] == 13 + 3 * 2
    for i, out in enumerate(outs):       # each fork's numbers are its own sequence's
        alone = model.logits(ids[:100] + ids[100 + 10 * i:110 + 10 * i], "inplace")
        assert rel(out, alone[100:]) <= 1e-5
    # the parent writes into its own half-full block, now held by it alone
    s.feed(ids[130:140])
    assert rel(s.feed([ids[0]]), model.logits(ids[:100] + ids[130:140] + ids[:1])[-1]) <= 1e-5
    before = pool.stats()["in_use"]
    del forks, outs
    assert pool.stats()["in_use"] < before     # dropped forks give their blocks back


def test_truncate_then_refeed(model):
    ids = ids_of(120, seed=2)
    s = model.session("paged:block=16", max_seq_len=200)
    s.feed(ids[:100])
    twin = s.fork()
    s.cache.truncate(37)
    del s.tokens[37:]
    out = s.feed(ids[37:60], all_logits=True)
    assert rel(out, model.logits(ids[:60])[37:]) <= 1e-5
    # the twin still has its own 100 positions
    assert rel(twin.feed(ids[100:101]), model.logits(ids[:101])[-1]) <= 1e-5


def test_nbytes_measured_from_the_pool_arrays(model):
    cache = make_cache("paged:block=16", model.config, 640)
    assert isinstance(cache, PagedCache)
    s = model.session("paged:block=16", max_seq_len=640)
    s.feed(ids_of(100))
    pool = s.cache.pool
    arrays = pool.k.nbytes + pool.v.nbytes + pool.refs.nbytes + sum(a.nbytes for a in pool.scratch)
    assert s.cache.nbytes == arrays + s.cache.table.nbytes
    twin = s.fork()
    # shared storage counts once
    assert held_nbytes([s.cache, twin.cache]) == arrays + 2 * s.cache.table.nbytes


def test_batch_sharing_a_512_token_prefix(model):
    """8 prompts behind one 512-token prefix: the same outputs as in-place
    caches, in at most 0.3x the bytes of 8 in-place caches sized exactly to the
    sequences (the smallest an in-place cache can be)."""
    prefix, rest = ids_of(512, seed=4), ids_of(8 * 24, seed=5)
    prompts = [prefix + rest[24 * i:24 * (i + 1)] for i in range(8)]
    new = 8
    runs = {spec: llamanp.generate_batch(model, prompts, new, kvcache=spec, stop_ids=(),
                                         max_seq_len=512 + 24 + new)
            for spec in ("inplace", "paged")}
    assert runs["paged"] == runs["inplace"]
    inplace = runs["inplace"].stats.kv_bytes
    cache = make_cache("inplace", model.config, 512 + 24 + new)
    assert inplace == 8 * cache.nbytes
    assert runs["paged"].stats.kv_bytes <= 0.3 * inplace


def test_batch_prefixes_nested_and_distinct(model):
    """Prompts with nested shared prefixes and one sharing nothing: the same
    greedy output as each prompt alone."""
    a, b, c = ids_of(40, 6), ids_of(30, 7), ids_of(20, 8)
    prompts = [a + b, a + b + c, a + c, c, a[:17] + [1, 2, 3], a + b]
    batch = llamanp.generate_batch(model, prompts, 6, kvcache="paged", stop_ids=())
    assert batch == [list(llamanp.generate(model, p, 6, stop_ids=())) for p in prompts]


def test_beam_search_shares_the_prompt(model, monkeypatch):
    prompt = ids_of(200, seed=9)            # 12.5 blocks of 16
    made = []
    session = model.session
    monkeypatch.setattr(model, "session", lambda *a, **k: made.append(session(*a, **k))
                        or made[-1])
    runs = {spec: llamanp.beam_search(model, prompt, 4, 6, stop_ids=(), kvcache=spec,
                                      max_seq_len=206)
            for spec in ("inplace", "paged")}
    assert [b.ids for b in runs["paged"]] == [b.ids for b in runs["inplace"]]
    assert np.allclose([b.logprob for b in runs["paged"]],
                       [b.logprob for b in runs["inplace"]], rtol=1e-5)
    # the beams hold the prompt's 12 full blocks once; each beam has its own
    # copy of the half-full 13th (copied when it wrote its tokens there), and
    # during a step the 4 old beams and the 4 new ones are alive together:
    # at most 12 + 2 x 4 blocks, where copies would take 4 x 13
    pool = made[-1].cache.pool
    assert 13 < pool.stats()["peak_in_use"] <= 12 + 2 * 4
    one = make_cache("inplace", model.config, 206).nbytes
    assert runs["inplace"].stats.peak_kv_bytes == 4 * one
    assert runs["paged"].stats.peak_kv_bytes < runs["inplace"].stats.peak_kv_bytes


def test_cli_paged_beams_and_batch(tmp_path, sp_model, cli):
    """--kvcache paged on the command line: beams and a batch sharing a prefix
    give the in-place cache's output, and the program ends cleanly."""
    from tinymodel import write_text_model
    model = write_text_model(tmp_path / "t.lmw", sp_model, seed=5, max_seq_len=96)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the system prompt is long and shared, then a\n"
                       "the system prompt is long and shared, then b\n")
    for args in (["-i", "hello there", "--beams", "3"], ["-f", prompts, "--batch"]):
        runs = [cli("llama-np.py", "-w", model, *args, "-n", "6", "--temp", "0",
                    "--kvcache", kv) for kv in ("inplace", "paged")]
        assert [r[0] for r in runs] == [0, 0]
        assert runs[1][1] == runs[0][1]
        assert "Traceback" not in runs[1][2] and "Exception" not in runs[1][2]
