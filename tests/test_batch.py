"""Batched prompts: one forward pass per step for all, results as if run alone.

The reference for each sequence is llamanp's own single-sequence path, which
tests/test_end_to_end.py checks against transformers; here the claim under test
is that batching changes nothing.
"""

import json

import numpy as np
import pytest
from conftest import TOK_CASE, run_cli

import llamanp

PROMPT_LENGTHS = (3, 11, 7, 1, 20, 5)


@pytest.fixture(scope="module")
def model(store):
    return llamanp.load(store.lmw(TOK_CASE))


def random_prompts(model, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("kvcache", ["inplace", "concat"])
def test_greedy_batch_equals_one_by_one(model, kvcache):
    prompts = random_prompts(model)
    batch = llamanp.generate_batch(model, prompts, 12, kvcache=kvcache, stop_ids=())
    alone = [list(llamanp.generate(model, p, 12, stop_ids=())) for p in prompts]
    assert batch == alone
    assert batch.stats.generated_tokens == 12 * len(prompts)
    assert batch.stats.steps == 11   # one forward pass per step for the whole batch


def test_ragged_prefill_logits_equal_separate_runs(model):
    """The batched prefill's last-token logits equal each prompt's own."""
    prompts = random_prompts(model, seed=1)
    sessions = [model.session() for _ in prompts]
    got = llamanp.model.feed_batch(sessions, prompts)
    for row, p in zip(got, prompts):
        want = model.logits(p)[-1]
        assert np.abs(row - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_finished_sequences_leave_the_batch(model):
    """A stop id ends one sequence while the others go on, as they would alone."""
    prompts = random_prompts(model, seed=2)
    free = [list(llamanp.generate(model, p, 10, stop_ids=())) for p in prompts]
    stop = free[0][3]                       # a token the first sequence reaches
    batch = llamanp.generate_batch(model, prompts, 10, stop_ids=[stop])
    alone = [list(llamanp.generate(model, p, 10, stop_ids=[stop])) for p in prompts]
    assert batch == alone
    assert len(batch[0]) <= 3


def test_context_limit_per_sequence(model):
    prompts = random_prompts(model, seed=3)
    batch = llamanp.generate_batch(model, prompts, 50, stop_ids=(), max_seq_len=24)
    for p, out in zip(prompts, batch):
        assert len(p) + len(out) == 24
        assert out == list(llamanp.generate(model, p, 50, stop_ids=(), max_seq_len=24))


def test_seeded_sampling_reproduces(model):
    prompts = random_prompts(model, seed=4)
    kw = dict(temperature=1.0, top_k=20, seed=7, stop_ids=())
    assert llamanp.generate_batch(model, prompts, 8, **kw) == \
        llamanp.generate_batch(model, prompts, 8, **kw)


def test_bad_batches(model):
    with pytest.raises(llamanp.LlamanpError):
        llamanp.generate_batch(model, [], 4)
    with pytest.raises(llamanp.LlamanpError):
        llamanp.generate_batch(model, [[1, 2], []], 4)
    with pytest.raises(llamanp.LlamanpError):
        llamanp.generate_batch(model, [[1, 2]], 4, kvcache="none")


def test_cli_batch_equals_separate_runs(store, tmp_path):
    lines = ["the little cat", "once upon a time there was a dog", "the big red ball"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(lines) + "\n\n")
    stats = tmp_path / "stats.json"
    w = store.lmw(TOK_CASE)
    rc, out, err = run_cli("llama-np.py", "-w", w, "-f", f, "--batch", "-n", "9", "--temp", "0",
                           "--stats-json", stats)
    assert rc == 0, err
    singles = []
    for line in lines:
        rc1, out1, err1 = run_cli("llama-np.py", "-w", w, "-i", line, "-n", "9", "--temp", "0")
        assert rc1 == 0, err1
        singles.append(out1)
    assert out == "\n".join(singles)
    record = json.loads(stats.read_text())
    assert record["prompts"] == 3 and record["decode_tokens_per_second"] > 0


def test_cli_batch_needs_a_file(store):
    rc, out, err = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), "-i", "the cat", "--batch")
    assert rc == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
