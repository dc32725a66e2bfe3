"""Speculative decoding (llamanp.speculative): prompt lookup and a draft model.

- greedy: token for token the output of plain greedy decoding, on many
  prompts, with every proposer and every exact KV cache (the cache is rolled
  back past rejected proposals);
- sampling: the tokens keep the target's distribution. The reference is the
  exact distribution of the first three generated tokens, computed from the
  model's logits in float64; the test is a chi-square goodness of fit at a
  0.1% false-alarm level, and the same test rejects a run whose acceptance
  rule is switched off (so it has the power to see a wrong rule);
- prompt lookup proposes the continuation of the latest earlier occurrence;
- a draft model with another tokenizer is refused in one line; the CLI
  reports proposed / accepted / rate in --stats-json.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_cli
from tinymodel import write_text_model, write_tiny

import llamanp
from llamanp.errors import LlamanpError
from llamanp.sampling import Sampler
from llamanp.speculative import DraftModel, PromptLookup, SpeculativeGeneration


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target = llamanp.load(write_tiny(d / "target.lmw", 64, seed=1, max_seq_len=128))
    draft = llamanp.load(write_tiny(d / "draft.lmw", 64, seed=2, max_seq_len=128))
    return target, draft


def test_prompt_lookup_proposes_the_latest_continuation():
    look = PromptLookup(ngram=2, max_draft=3)
    assert look.propose([5, 6, 1, 2, 7, 8, 9, 1, 2, 3, 4, 0, 1, 2], 3) == ([3, 4, 0], None)
    assert look.propose([1, 2, 7, 1, 2], 5) == ([7, 1, 2], None)   # runs into the tail
    assert look.propose([1, 2, 3, 4], 3) == ([], None)              # no earlier match
    assert look.propose([1, 2, 3, 1, 2], 0) == ([], None)
    assert PromptLookup(ngram=1).propose([4, 9, 4], 2) == ([9, 4], None)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        period = int(rng.integers(2, 7))
        unit = [int(t) for t in rng.integers(0, 64, size=period)]
        out.append(unit * int(rng.integers(2, 5)) + [int(t) for t in rng.integers(0, 64, 3)])
    return out


@pytest.mark.parametrize("kvcache", ["inplace", "concat", "none"])
def test_greedy_output_is_plain_greedy_token_for_token(models, kvcache):
    target, draft = models
    prompts = _prompts(24 if kvcache == "inplace" else 6)
    proposed = 0
    for prompt in prompts:
        plain = list(llamanp.generate(target, prompt, 24, stop_ids=(), kvcache=kvcache))
        for drafter in (PromptLookup(1, 4), PromptLookup(3, 8), DraftModel(draft, target, 4),
                        DraftModel(target, target, 5)):
            gen = SpeculativeGeneration(target, prompt, 24, Sampler(0.0), drafter=drafter,
                                        stop_ids=(), kvcache=kvcache)
            assert list(gen) == plain, (prompt, drafter.name)
            assert gen.stats.generated_tokens == len(plain)
            proposed += gen.stats.proposed
            if isinstance(drafter, DraftModel) and drafter.model is target:
                assert gen.stats.accepted == gen.stats.proposed   # itself: all accepted
    assert proposed > 0


def test_speculation_stops_like_plain_decoding(models):
    """eos ids, the token budget and a full context end it at the same token."""
    target, _ = models
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    plain = list(llamanp.generate(target, prompt, 40, stop_ids=()))
    stop = plain[7]
    for kw in ({"stop_ids": (stop,)}, {"stop_ids": (), "max_seq_len": len(prompt) + 11}):
        want_gen = llamanp.generate(target, prompt, 40, **kw)
        want = list(want_gen)
        gen = SpeculativeGeneration(target, prompt, 40, Sampler(0.0),
                                    drafter=PromptLookup(1, 6), **kw)
        assert list(gen) == want
        assert gen.stats.stop_reason == want_gen.stats.stop_reason
    gen = SpeculativeGeneration(target, prompt, 5, Sampler(0.0), drafter=PromptLookup(1, 8),
                                stop_ids=())
    assert list(gen) == plain[:5] and gen.stats.stop_reason == "length"


def _exact_joint(model, prompt, vocab, temperature):
    """P(x1, x2, x3) after `prompt` at `temperature`, float64, from the logits."""
    def probs(ids):
        z = model.logits(ids)[-1].astype(np.float64) / temperature
        e = np.exp(z - z.max())
        return e / e.sum()
    joint = np.zeros((vocab,) * 3)
    p1 = probs(prompt)
    for a in range(vocab):
        p2 = probs(prompt + [a])
        for b in range(vocab):
            joint[a, b] = p1[a] * p2[b] * probs(prompt + [a, b])
    return joint


def _chi_square_limit(dof: int, z: float = 3.090) -> float:
    """The 99.9% quantile of chi-square with `dof` degrees of freedom
    (Wilson-Hilferty: accurate to a fraction of a percent here)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def _chi_square(counts, expected):
    keep = expected >= 5          # pool the small cells into one
    stat = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    rest_c, rest_e = counts[~keep].sum(), expected[~keep].sum()
    cells = keep.sum() + (rest_e > 0)
    if rest_e > 0:
        stat += (rest_c - rest_e) ** 2 / rest_e
    return stat, cells - 1


def _sampled_triples(runs, make, temperature):
    counts = np.zeros((8,) * 3)
    for seed in range(runs):
        toks = list(make(Sampler(temperature, seed=seed)))
        counts[tuple(toks)] += 1
    return counts


def test_sampling_keeps_the_target_distribution(tmp_path, monkeypatch):
    vocab, temperature, runs = 8, 1.0, 1000
    target = llamanp.load(write_tiny(tmp_path / "t8.lmw", vocab, seed=11, logit_std=1.5))
    draft = llamanp.load(write_tiny(tmp_path / "d8.lmw", vocab, seed=12, logit_std=1.5))
    prompt = [1, 2, 3, 1, 2]
    joint = _exact_joint(target, prompt, vocab, temperature)
    # the (x2, x3) pair: both positions can come out of a checked proposal
    expected = joint.sum(axis=0) * runs

    def speculative_with(drafter):
        return lambda s: SpeculativeGeneration(target, prompt, 3, s, drafter=drafter,
                                               stop_ids=())
    makers = {
        "lookup": speculative_with(PromptLookup(1, 3)),
        "draft": speculative_with(DraftModel(draft, target, 3)),
    }
    for name, make in makers.items():
        counts = _sampled_triples(runs, make, temperature).sum(axis=0)
        stat, dof = _chi_square(counts, expected)
        limit = _chi_square_limit(dof)
        assert stat < limit, f"{name}: chi-square {stat:.1f} >= {limit:.1f} ({dof} dof)"
    # a wrong rule (every proposal accepted) is seen by the same test
    monkeypatch.setattr(SpeculativeGeneration, "_accepts", lambda self, p, q, d: True)
    counts = _sampled_triples(runs, makers["draft"], temperature).sum(axis=0)
    stat, dof = _chi_square(counts, expected)
    assert stat > _chi_square_limit(dof), "the test cannot tell a wrong acceptance rule"


def test_a_draft_model_with_another_tokenizer_is_refused(models, tmp_path):
    target, _ = models
    other = llamanp.load(write_tiny(tmp_path / "other.lmw", 80, seed=3))
    with pytest.raises(LlamanpError) as e:
        DraftModel(other, target)
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value)


def test_cli_reports_proposals_and_prints_the_plain_text(tmp_path, sp_model):
    path = write_text_model(tmp_path / "text.lmw", sp_model, seed=4)
    other = write_tiny(tmp_path / "other.lmw", 300, seed=3)   # no tokenizer embedded
    prompt = "the cat sat on the mat. the cat sat on the"
    base = ["-w", str(path), "-i", prompt, "-n", "24", "--temp", "0"]
    code, plain, _ = run_cli("llama-np.py", *base)
    assert code == 0
    stats = tmp_path / "s.json"
    code, out, err = run_cli("llama-np.py", *base, "--draft", "lookup", "--draft-ngram", "2",
                             "--stats-json", str(stats))
    assert code == 0, err
    assert out == plain
    got = json.loads(stats.read_text())
    assert got["draft"].startswith("lookup") and got["proposed"] >= got["accepted"] >= 0
    assert got["acceptance_rate"] == pytest.approx(got["accepted"] / max(got["proposed"], 1),
                                                   abs=1e-4)
    assert "proposed" in err
    code, _, err = run_cli("llama-np.py", *base, "--draft", str(other))
    assert code != 0 and err.startswith("error:") and "tokenizer" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli("llama-np.py", *base, "--draft", "lookup", "--draft-max", "0")
    assert code != 0 and "--draft-max" in err


def test_speculation_refuses_a_cache_that_cannot_truncate(models):
    target, _ = models
    with pytest.raises(LlamanpError, match="forget"):
        SpeculativeGeneration(target, [1, 2, 3], 4, Sampler(0.0), drafter=PromptLookup(1, 3),
                              stop_ids=(), kvcache="window:size=16")
