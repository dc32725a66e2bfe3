"""Beam search against an exhaustive search, and Session.fork.

The reference enumerates every continuation of a tiny model (vocabulary 8):
each prefix is scored with fresh `m.logits` over the whole sequence (no cache,
no forks), and sequences are ranked by logprob / length ** length_penalty.
When the beam is wide enough to hold every prefix (K = 7^2 = 49 live prefixes
for 3 steps with one stop id), beam search is exact, so its K best must be
the exhaustive K best, ids and log-probabilities.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from tinymodel import write_text_model, write_tiny

import llamanp
from llamanp.beam import beam_score
from llamanp.errors import LlamanpError

VOCAB, EOS = 8, 2
PROMPT = [1, 5, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llamanp.load(str(write_tiny(tmp_path_factory.mktemp("beam") / "v8.lmw", VOCAB,
                                       seed=4, max_seq_len=16, logit_std=2.0)))


def log_softmax(z):
    z = [float(v) for v in z]
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def exhaustive(model, prompt, steps, stop):
    """Every finished continuation (ending at a stop id, or `steps` long without
    one) with its log-probability, from full-sequence logits."""
    memo = {}

    def next_logprobs(prefix):
        if prefix not in memo:
            memo[prefix] = log_softmax(model.logits(list(prompt) + list(prefix))[-1])
        return memo[prefix]

    found = []

    def walk(prefix, logprob):
        for t, lp in enumerate(next_logprobs(prefix)):
            seq = prefix + (t,)
            if t in stop or len(seq) == steps:
                found.append((list(seq), logprob + lp))
            else:
                walk(seq, logprob + lp)

    walk((), 0.0)
    return found


def best(found, k, length_penalty):
    return sorted(found, key=lambda f: -beam_score(f[1], len(f[0]), length_penalty))[:k]


def assert_same_beams(got, want):
    assert [b.ids for b in got] == [ids for ids, _ in want]
    assert [b.logprob for b in got] == pytest.approx([lp for _, lp in want], abs=1e-4)


def test_exhaustive_without_stop_tokens(tiny):
    found = exhaustive(tiny, PROMPT, 3, stop=())
    assert len(found) == VOCAB ** 3
    got = llamanp.beam_search(tiny, PROMPT, VOCAB ** 2, 3, stop_ids=())
    assert_same_beams(got, best(found, VOCAB ** 2, 1.0))


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5, -1.0])
def test_exhaustive_with_a_stop_token(tiny, length_penalty, early_stopping):
    found = exhaustive(tiny, PROMPT, 3, stop=(EOS,))
    assert len(found) == 1 + 7 + 49 * 8     # stop as the 1st or 2nd token, or any 3rd token
    k = 49
    want = best(found, k, length_penalty)
    lengths = {len(ids) for ids, _ in want}
    got = llamanp.beam_search(tiny, PROMPT, k, 3, length_penalty=length_penalty,
                              early_stopping=early_stopping, stop_ids=(EOS,))
    assert_same_beams(got, want)
    if length_penalty == -1.0:
        assert 1 in lengths and 2 in lengths, "short sequences should rank well"


def test_beams_are_true_log_probabilities(tiny):
    """Narrow beams are not exact, but every beam's logprob is its sequence's, the
    list is ranked by score, and all cache strategies find the same beams."""
    runs = {kv: llamanp.beam_search(tiny, PROMPT, 3, 7, stop_ids=(EOS,), kvcache=kv)
            for kv in ("inplace", "concat", "none")}
    beams = runs["inplace"]
    assert len(beams) == 3
    for kv, other in runs.items():
        assert [b.ids for b in other] == [b.ids for b in beams], kv
    scores = [beam_score(b.logprob, len(b.ids), 1.0) for b in beams]
    assert scores == sorted(scores, reverse=True)
    for b in beams:
        assert (b.ids[-1] == EOS) or len(b.ids) == 7
        assert EOS not in b.ids[:-1]
        logits = tiny.logits(PROMPT + b.ids)
        want = sum(log_softmax(logits[len(PROMPT) - 1 + i])[t] for i, t in enumerate(b.ids))
        assert b.logprob == pytest.approx(want, abs=1e-4)
    overall = best(exhaustive(tiny, PROMPT, 4, stop=(EOS,)), 1, 1.0)[0]
    short = llamanp.beam_search(tiny, PROMPT, 3, 4, stop_ids=(EOS,))[0]
    assert beam_score(short.logprob, len(short.ids), 1.0) <= \
        beam_score(overall[1], len(overall[0]), 1.0) + 1e-5


def test_early_stopping_is_exact_and_saves_work(tiny, monkeypatch):
    """Stopping once no live beam can beat the K-th finished one gives the same
    beams as running to the end, with fewer forward passes."""
    feeds = [0]
    feed = llamanp.Session.feed

    def counting_feed(self, ids, **kw):
        feeds[0] += 1
        return feed(self, ids, **kw)

    monkeypatch.setattr(llamanp.Session, "feed", counting_feed)
    saved = []
    for length_penalty, k in itertools.product((0.0, -1.0, 1.0), (1, 3, 5)):
        runs = []
        for early_stopping in (True, False):
            feeds[0] = 0
            runs.append((llamanp.beam_search(tiny, PROMPT, k, 12, length_penalty,
                                             early_stopping, stop_ids=(EOS,)), feeds[0]))
        assert runs[0][0] == runs[1][0], (length_penalty, k)
        assert runs[0][1] <= runs[1][1]
        saved.append(runs[0][1] < runs[1][1])
    assert any(saved)


def test_one_beam_is_greedy(tiny):
    greedy = list(llamanp.generate(tiny, PROMPT, 10, stop_ids=()))
    (beam,) = llamanp.beam_search(tiny, PROMPT, 1, 10, stop_ids=())
    assert beam.ids == greedy
    # with a stop token and no length normalisation, greedy up to its stop
    for prompt in itertools.product(range(3, VOCAB), repeat=2):
        gen = llamanp.generate(tiny, list(prompt), 10, stop_ids=(EOS,))
        out = list(gen)
        if gen.stats.stop_reason == "eos":
            (beam,) = llamanp.beam_search(tiny, list(prompt), 1, 10, length_penalty=0.0,
                                          stop_ids=(EOS,))
            assert beam.ids == out + [EOS]
            return
    pytest.fail("no prompt made greedy decoding stop")


def test_context_and_zero_tokens(tiny):
    assert llamanp.beam_search(tiny, PROMPT, 3, 0) == [([], 0.0)]
    beams = llamanp.beam_search(tiny, PROMPT, 2, 50, stop_ids=(), max_seq_len=6)
    assert [len(b.ids) for b in beams] == [3, 3]              # 6 positions - 3 of prompt


@pytest.mark.parametrize("kw", [dict(beams=0), dict(beams=-1), dict(beams=1.5),
                                dict(max_new_tokens=-1),
                                dict(length_penalty=float("nan"))])
def test_bad_arguments(tiny, kw):
    args = {"beams": 2, "max_new_tokens": 4, **kw}
    with pytest.raises(LlamanpError) as e:
        llamanp.beam_search(tiny, PROMPT, **args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kvcache", ["inplace", "concat", "none"])
def test_session_fork_is_independent(tiny, kvcache):
    s = tiny.session(kvcache)
    s.feed(PROMPT)
    twin = s.fork()
    a = [s.feed([4]), s.feed([6])]
    b = [twin.feed([7])]
    c = twin.fork()
    b.append(twin.feed([0]))
    c_out = c.feed([5])
    tol = 1e-5
    assert np.abs(a[1] - tiny.logits(PROMPT + [4, 6])[-1]).max() < tol
    assert np.abs(b[1] - tiny.logits(PROMPT + [7, 0])[-1]).max() < tol
    assert np.abs(c_out - tiny.logits(PROMPT + [7, 5])[-1]).max() < tol
    assert s.tokens == PROMPT + [4, 6] and c.tokens == PROMPT + [7, 5]


def test_cli_beams(sp_model, tmp_path):
    from conftest import run_cli

    path = write_text_model(tmp_path / "text.lmw", sp_model)
    stats = tmp_path / "s.json"
    rc, so, se = run_cli("llama-np.py", "-w", path, "-i", "the cat", "-n", 12, "--beams", 3,
                         "--length-penalty", 0.5, "--stats-json", stats)
    assert rc == 0, se
    m = llamanp.load(str(path))
    ids = m.tokenizer.encode("the cat", bos=True)
    beams = llamanp.beam_search(m, ids, 3, 12, length_penalty=0.5)
    body = [t for t in beams[0].ids if t not in m.tokenizer.stop_ids]
    stream = m.tokenizer.stream(at_start=False)
    assert so == "the cat" + "".join(stream.push(t) for t in body) + stream.flush() + "\n"
    st = json.loads(stats.read_text())
    assert st["beams"] == 3 and [h["ids"] for h in st["hypotheses"]] == [b.ids for b in beams]
    assert se.count("beam ") == 3
