"""Sampling and generation: penalties, truncation, Mirostat, stop conditions,
log-probabilities, and the inspection flags of llama-np.py.

Every expected value here is computed in the test from the published formulas
(CTRL / llama.cpp penalties, nucleus and min-p truncation, Mirostat v1 and v2
from the Mirostat paper as llama.cpp implements it), in plain Python, not with
llamanp's own helpers. The command-line tests drive the real llama-np.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import REPO
from tinymodel import write_text_model

import llamanp
from llamanp.errors import LlamanpError
from llamanp.generate import Generation, StopStringFilter
from llamanp.sampling import Sampler, apply_penalties

PROMPT = "the little cat"


# -- plain-Python references ------------------------------------------------------

def ref_softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def ref_log_softmax(z):
    z = [float(v) for v in z]
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def renormalised(p, keep):
    mass = sum(p[i] for i in keep)
    return [p[i] / mass if i in keep else 0.0 for i in range(len(p))]


def ref_mirostat_v2(logits, mu, temperature=1.0):
    p = ref_softmax([v / temperature for v in logits])
    keep = {i for i, q in enumerate(p) if -math.log2(q) <= mu}
    return renormalised(p, keep or {max(range(len(p)), key=p.__getitem__)})


def ref_mirostat_v1(logits, mu, temperature=1.0, m=100):
    p = ref_softmax([v / temperature for v in logits])
    n = len(p)
    order = sorted(range(n), key=lambda i: -p[i])
    num = den = 0.0
    for i in range(min(m, n) - 1):           # 0-based: ranks i+1 and i+2
        t = math.log((i + 2) / (i + 1))
        b = math.log(p[order[i]] / p[order[i + 1]])
        num, den = num + t * b, den + t * t
    s_hat = num / den
    eps = s_hat - 1
    k = (eps * 2 ** mu / (1 - n ** -eps)) ** (1 / s_hat)
    k = min(max(int(k), 1), n)
    return renormalised(p, set(order[:k])), k


def assert_probs(got, want, tol=1e-9):
    got = [float(v) for v in got]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol, f"token {i}: {g} != {w}\n got {got}\nwant {want}"


# -- penalties ------------------------------------------------------------------------

LOGITS6 = [3.0, -2.0, 0.5, 0.0, 1.5, -0.5]


def test_penalties_by_hand():
    # window counts: token 0 three times, 1, 3 and 5 once; 2 and 4 unseen
    window = [0, 0, 1, 3, 0, 5]
    got = apply_penalties(np.array(LOGITS6, np.float32), window, repetition=2.0,
                          frequency=0.5, presence=0.25)
    want = [3.0 / 2 - 3 * 0.5 - 0.25,     # positive: divided
            -2.0 * 2 - 0.5 - 0.25,        # negative: multiplied
            0.5,                          # unseen
            0.0 - 0.5 - 0.25,             # zero stays zero under the repetition penalty
            1.5,
            -0.5 * 2 - 0.5 - 0.25]
    assert_probs(got, want, 1e-12)
    assert want == [-0.25, -4.75, 0.5, -0.75, 1.5, -1.75]


def test_each_penalty_alone():
    window = [4, 4, 1]
    cases = [(dict(repetition=1.25), [3.0, -2.5, 0.5, 0.0, 1.2, -0.5]),
             (dict(frequency=0.3), [3.0, -2.3, 0.5, 0.0, 0.9, -0.5]),
             (dict(presence=0.7), [3.0, -2.7, 0.5, 0.0, 0.8, -0.5])]
    for kw, want in cases:
        assert_probs(apply_penalties(LOGITS6, window, **kw), want, 1e-12)


@pytest.mark.parametrize("last_n,counted", [(3, [2, 5, 5]), (-1, [0, 4, 4, 4, 2, 5, 5]),
                                            (0, []), (100, [0, 4, 4, 4, 2, 5, 5])])
def test_penalty_window_is_the_last_n_tokens(last_n, counted):
    history = [0, 4, 4, 4, 2, 5, 5]
    s = Sampler(1.0, repetition_penalty=1.5, frequency_penalty=0.1, presence_penalty=0.2,
                repeat_last_n=last_n)
    want = apply_penalties(LOGITS6, counted, 1.5, 0.1, 0.2)
    # temperature 1, no truncation: the distribution is the softmax of the penalised logits
    assert_probs(s.probabilities(np.array(LOGITS6), history), ref_softmax(list(want)))


def test_greedy_applies_penalties_before_argmax():
    logits = np.array(LOGITS6, np.float32)
    assert Sampler(0.0)(logits, [0, 0]) == 0
    # token 0 (3.0) penalised by 3 becomes 1.0 < 1.5: token 4 wins
    assert Sampler(0.0, repetition_penalty=3.0)(logits, [0, 0]) == 4
    assert Sampler(0.0, presence_penalty=2.0)(logits, [0]) == 4
    assert Sampler(0.0, frequency_penalty=0.8)(logits, [0, 0]) == 4
    assert Sampler(0.0, frequency_penalty=0.8)(logits, [0]) == 0       # 2.2 > 1.5


# -- temperature, top-k, top-p, min-p ---------------------------------------------------

P6 = [0.04, 0.4, 0.1, 0.25, 0.06, 0.15]
LOG_P6 = np.log(np.array(P6))


@pytest.mark.parametrize("kw,kept", [
    (dict(top_k=3), {1, 3, 5}),
    (dict(top_p=0.6), {1, 3}),                      # cumulative .4, .65
    (dict(top_p=0.85), {1, 3, 5, 2}),               # .4, .65, .8, .9
    (dict(min_p=0.3), {1, 3, 5}),                   # p >= .12
    (dict(min_p=0.5), {1, 3}),                      # p >= .2
    (dict(top_k=2, top_p=0.6), {1}),                # top-p on the top-2 renormalised: .615
    (dict(top_k=4, top_p=0.8, min_p=0.5), {1, 3}),  # .444 .722 .889 -> 3; then p >= .222
    (dict(temperature=2.0, top_p=0.5), {1, 3, 5}),  # sqrt(p) normalised: .277 .219 .170
    (dict(top_k=0, top_p=1.0, min_p=0.0), {0, 1, 2, 3, 4, 5}),
])
def test_truncation_sets(kw, kept):
    kw = {"temperature": 1.0, **kw}
    got = Sampler(**kw).probabilities(LOG_P6)
    p = ref_softmax([v / kw["temperature"] for v in LOG_P6])
    assert_probs(got, renormalised(p, kept), 1e-12)


def test_temperature_scales_logits():
    got = Sampler(0.5).probabilities(LOG_P6)
    assert_probs(got, ref_softmax([v / 0.5 for v in LOG_P6]), 1e-12)


# -- Mirostat ----------------------------------------------------------------------------

def zipf_logits(n, s, seed):
    rng = np.random.default_rng(seed)
    return -s * np.log(np.arange(1, n + 1)) + 0.3 * rng.standard_normal(n)


@pytest.mark.parametrize("mu", [0.5, 3.0, 6.0, 10.0])
def test_mirostat_v2_truncation(mu):
    logits = zipf_logits(50, 1.1, 0)
    s = Sampler(1.0, mirostat=2)
    s.mu = mu
    assert_probs(s.probabilities(logits), ref_mirostat_v2(list(logits), mu))


@pytest.mark.parametrize("mu", [1.0, 4.0, 7.0, 9.0, 30.0])
def test_mirostat_v1_truncation(mu):
    logits = zipf_logits(300, 1.2, 1)
    s = Sampler(1.0, mirostat=1)
    s.mu = mu
    want, k = ref_mirostat_v1(list(logits), mu)
    assert_probs(s.probabilities(logits), want)
    assert np.count_nonzero(s.probabilities(logits)) == k


def test_mirostat_v1_k_covers_the_range():
    """The cases above reach one token, a few, and the whole vocabulary."""
    logits = list(zipf_logits(300, 1.2, 1))
    ks = [ref_mirostat_v1(logits, mu)[1] for mu in (1.0, 4.0, 7.0, 9.0, 30.0)]
    assert ks[0] == 1 and 1 < ks[1] < ks[2] < ks[3] < 300 and ks[-1] == 300, ks


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_mu_follows_the_surprise(version):
    """mu starts at 2 tau; after each token, mu -= eta (surprise - tau), the
    surprise being -log2 of the token's probability after truncation."""
    tau, eta, temp = 3.0, 0.2, 0.8
    s = Sampler(temp, mirostat=version, mirostat_tau=tau, mirostat_eta=eta, seed=11)
    mu = 2 * tau
    assert s.mu == mu
    ref = ref_mirostat_v1 if version == 1 else ref_mirostat_v2
    rng = np.random.default_rng(5)
    for step in range(25):
        logits = zipf_logits(150, 1.0 + rng.random(), step)
        want = ref(list(logits), mu, temperature=temp)
        want = want[0] if version == 1 else want
        assert_probs(s.probabilities(logits), want, 1e-9)
        token = s(logits)
        assert want[token] > 0, "drew a truncated token"
        mu -= eta * (-math.log2(want[token]) - tau)
        assert abs(s.mu - mu) < 1e-9, (step, s.mu, mu)


def test_mirostat_keeps_the_surprise_near_tau():
    """What Mirostat is for: the average surprise of the drawn tokens tracks tau."""
    tau = 2.5
    s = Sampler(1.0, mirostat=2, mirostat_tau=tau, seed=3)
    logits = zipf_logits(400, 1.05, 2)
    surprises = []
    for _ in range(600):
        p = s.probabilities(logits)
        token = s(logits)
        surprises.append(-math.log2(p[token]))
    assert abs(np.mean(surprises[100:]) - tau) < 0.3, np.mean(surprises[100:])


# -- the draw ---------------------------------------------------------------------------

def test_seeded_sampler_reproduces():
    logits = zipf_logits(100, 0.8, 4)

    def draws(seed, **kw):
        s = Sampler(0.9, 20, 0.95, seed, **kw)
        return [s(logits, [1, 2, 3]) for _ in range(60)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(7, mirostat=2) == draws(7, mirostat=2)


def test_draw_distribution_chi_square():
    """20000 draws at T=0.7 with top-k 4 follow the renormalised softmax: no
    filtered token ever comes, and Pearson's chi-square is below the 0.999
    quantile for 3 degrees of freedom (16.27). The seed is fixed: no flakiness."""
    logits = np.array([1.0, 2.0, 0.2, 1.6, -1.0, 0.9])
    s = Sampler(0.7, 4, 1.0, seed=2024)
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=6)
    p = ref_softmax([v / 0.7 for v in logits])
    want = renormalised(p, {1, 3, 0, 5})
    assert counts[2] == counts[4] == 0
    chi2 = sum((counts[i] - n * want[i]) ** 2 / (n * want[i]) for i in (0, 1, 3, 5))
    assert chi2 < 16.27, (chi2, counts, want)


def test_positional_arguments_and_no_history_still_work():
    s = Sampler(0.5, 10, 0.9, 42)
    assert (s.temperature, s.top_k, s.top_p) == (0.5, 10, 0.9)
    assert 0 <= s(np.zeros(30, np.float32)) < 30
    assert Sampler()(np.array([0.0, 2.0, 1.0])) == 1


@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top-k"), (dict(top_k=2.5), "top-k"),
    (dict(top_p=0.0), "top-p"), (dict(top_p=1.01), "top-p"),
    (dict(min_p=-0.1), "min-p"), (dict(min_p=2.0), "min-p"),
    (dict(repetition_penalty=0.0), "repetition"), (dict(repetition_penalty=-1.0), "repetition"),
    (dict(frequency_penalty=float("inf")), "frequency"),
    (dict(presence_penalty=float("nan")), "presence"),
    (dict(repeat_last_n=-2), "repeat-last-n"),
    (dict(mirostat=3), "mirostat"), (dict(mirostat=-1), "mirostat"),
    (dict(mirostat_tau=0.0), "tau"), (dict(mirostat_eta=-0.1), "eta"),
])
def test_bad_values_are_refused_in_one_line(kw, word):
    with pytest.raises(LlamanpError) as e:
        Sampler(**kw)
    assert word in str(e.value) and "\n" not in str(e.value)


# -- generation: stop strings, time, logprobs, the choose hook -----------------------------

class FakeDecoder:
    """Each token id is an index into a list of text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, id):
        return self.pieces[id]

    def flush(self):
        return ""


def test_stop_string_filter_holds_back_possible_starts():
    pieces = ["hello E", "N", "D more", "E", "X", "tail"]
    f = StopStringFilter(FakeDecoder(pieces), ("END",))
    assert [f.push(0), f.push(1), f.push(2)] == ["hello ", "", ""]
    assert f.found == "END"
    f = StopStringFilter(FakeDecoder(pieces), ("END",))
    assert [f.push(3), f.push(4), f.push(5)] == ["", "EX", "tail"]
    assert f.found is None
    f = StopStringFilter(FakeDecoder(["ab", "cd", "ef"]), ("de", "bcd"))
    assert [f.push(0), f.push(1)] == ["a", ""]          # "bcd" starts before "de"
    assert f.found == "bcd"
    f = StopStringFilter(FakeDecoder(["a", "b"]), ("bX",))
    assert (f.push(0), f.push(1), f.flush()) == ("a", "", "b")   # released at the end


@pytest.fixture(scope="module")
def text_model_path(sp_model, tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("sampling") / "text.lmw", sp_model)


@pytest.fixture(scope="module")
def model(text_model_path):
    return llamanp.load(str(text_model_path))


@pytest.fixture(scope="module")
def prompt_ids(model):
    return model.tokenizer.encode(PROMPT, bos=True)


def greedy_with_text(model, ids, n):
    gen = llamanp.generate(model, ids, n, stop_ids=())
    return list(gen), gen.text


def piece_texts(model, ids):
    """The text each token adds to the continuation (the CLI's stream)."""
    stream = model.tokenizer.stream(at_start=False)
    return [stream.push(i) for i in ids]


def stop_across_a_token_boundary(model, ids, text):
    """A 3-character string that first occurs spanning two tokens."""
    pieces, end = piece_texts(model, ids), 0
    for piece in pieces[:-1]:
        end += len(piece)
        for s in (text[end - 1:end + 2], text[end - 2:end + 1]):
            if len(s) == 3 and 0 < text.find(s) and text.find(s) in (end - 1, end - 2):
                return s
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_strings_api(model, prompt_ids):
    out, text = greedy_with_text(model, prompt_ids, 40)
    stop = stop_across_a_token_boundary(model, out, text)
    gen = llamanp.generate(model, prompt_ids, 40, stop=[stop, "never appears"], stop_ids=())
    got = list(gen)
    assert gen.text == text[:text.find(stop)]
    assert stop not in gen.text
    assert gen.stats.stop_reason == "stop" and gen.stats.stop_string == stop
    # the ids run up to the token that completed the stop string, and no further
    assert got == out[:len(got)]
    assert stop in "".join(piece_texts(model, got))
    assert stop not in "".join(piece_texts(model, got[:-1]))


def test_stop_strings_never_printed_by_the_cli(model, prompt_ids, text_model_path, tmp_path):
    out, text = greedy_with_text(model, prompt_ids, 40)
    stop = stop_across_a_token_boundary(model, out, text)
    stats = tmp_path / "stats.json"
    rc, so, se = llama_np(text_model_path, "-n", 40, "--temp", 0, "--stop", stop, "--stop", "zzz",
                          "--stats-json", stats)
    assert rc == 0, se
    assert so == PROMPT + text[:text.find(stop)] + "\n"
    st = json.loads(stats.read_text())
    assert st["stop_reason"] == "stop" and st["stop_string"] == stop


def test_max_time(model, prompt_ids):
    gen = llamanp.generate(model, prompt_ids, 30, max_time=1e-9, stop_ids=())
    assert len(list(gen)) == 1 and gen.stats.stop_reason == "time"   # checked after a token

    class SlowSampler(Sampler):
        def step(self, logits, history=()):
            time.sleep(0.02)
            return super().step(logits, history)

    gen = Generation(model, prompt_ids, 60, SlowSampler(), stop_ids=(), max_time=0.1)
    n = len(list(gen))
    assert gen.stats.stop_reason == "time" and 3 <= n < 12, n
    gen = llamanp.generate(model, prompt_ids, 5, max_time=60.0, stop_ids=())
    assert len(list(gen)) == 5 and gen.stats.stop_reason == "length"


def test_logprobs_are_log_softmax_of_the_model_logits(model, prompt_ids):
    """Per generated token: its log-probability and the top N, under the model's own
    distribution (raw logits), whatever the penalties and temperature did."""
    gen = llamanp.generate(model, prompt_ids, 12, temperature=0.9, seed=2, logprobs=4,
                           repetition_penalty=1.3, top_k=20, stop_ids=())
    out = list(gen)
    assert len(gen.logprobs) == len(out) == 12
    logits = model.logits(prompt_ids + out)
    for i, (token, lp) in enumerate(zip(out, gen.logprobs)):
        want = ref_log_softmax(logits[len(prompt_ids) - 1 + i])
        assert lp.token == token
        assert abs(lp.logprob - want[token]) < 1e-4
        best = sorted(range(len(want)), key=lambda j: -want[j])[:4]
        assert [v for _, v in lp.top] == pytest.approx([want[j] for j in best], abs=1e-4)
        assert {j for j, _ in lp.top} == set(best)


def test_choose_hook_can_override_and_stop(model, prompt_ids):
    picks = []

    def choose(step):
        picks.append(step.token)
        return None if len(picks) == 4 else step.top(3)[2]     # always the third best

    gen = Generation(model, prompt_ids, 20, Sampler(0.0), stop_ids=(), choose=choose)
    out = list(gen)
    assert len(out) == 3 and gen.stats.stop_reason == "user"
    logits = model.logits(prompt_ids + out)
    for i, token in enumerate(out):
        assert token == int(np.argsort(-logits[len(prompt_ids) - 1 + i])[2])


def test_generate_keyword_api(model, prompt_ids):
    a = list(llamanp.generate(model, prompt_ids, 10, temperature=0.8, top_k=30, top_p=0.9,
                              min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.1,
                              presence_penalty=0.1, repeat_last_n=16, seed=9, stop_ids=()))
    b = list(llamanp.generate(model, prompt_ids, 10, temperature=0.8, top_k=30, top_p=0.9,
                              min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.1,
                              presence_penalty=0.1, repeat_last_n=16, seed=9, stop_ids=(),
                              kvcache="concat", fill1=True))
    assert a == b and len(a) == 10
    with pytest.raises(LlamanpError):
        llamanp.generate(model, prompt_ids, 5, stop=[""])
    with pytest.raises(LlamanpError):
        llamanp.generate(model, prompt_ids, 5, max_time=0)


# -- the command line ---------------------------------------------------------------------

def llama_np(model_path, *args, stdin=None, prompt=PROMPT):
    """(exit status, stdout, stderr) of `llama-np.py -w MODEL -i PROMPT ARGS`, with stdin."""
    cmd = [sys.executable, str(REPO / "llama-np.py"), "-w", str(model_path), "-i", prompt,
           *map(str, args)]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, input=stdin or "", capture_output=True,
                       text=True, encoding="utf-8", timeout=120)
    return p.returncode, p.stdout, p.stderr


def continuation_text(model, ids):
    stream = model.tokenizer.stream(at_start=False)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def test_you_pick_with_piped_choices(model, prompt_ids, text_model_path, tmp_path):
    """At --temp 0 the sampler's pick is the argmax. Choices: 2nd candidate, Enter,
    1st, a wrong answer (asked again) then 3rd, then q."""
    hist = tmp_path / "h.jsonl"
    rc, so, se = llama_np(text_model_path, "-n", 20, "--temp", 0, "--you-pick",
                          "--sampler-history", hist, stdin="2\n\n1\nbanana\n3\nq\n")
    assert rc == 0, se
    ranks, ids = [1, 0, 0, 2], list(prompt_ids)
    for rank in ranks:
        ids.append(int(np.argsort(-model.logits(ids)[-1], kind="stable")[rank]))
    chosen = ids[len(prompt_ids):]
    assert so == PROMPT + continuation_text(model, chosen) + "\n"
    assert "1." in se and "sampler" in se
    steps = [json.loads(line) for line in hist.read_text().splitlines()]
    assert [s["chosen"] for s in steps] == chosen + [None]
    assert [s["chosen_by"] for s in steps] == ["user", "sampler", "sampler", "user", "user"]


def test_you_pick_end_of_input_lets_the_sampler_finish(model, prompt_ids, text_model_path):
    rc, so, se = llama_np(text_model_path, "-n", 6, "--temp", 0, "--you-pick", stdin="3\n")
    assert rc == 0, se
    first = int(np.argsort(-model.logits(prompt_ids)[-1], kind="stable")[2])
    rest = list(llamanp.generate(model, prompt_ids + [first], 5, stop_ids=()))
    assert so == PROMPT + continuation_text(model, [first] + rest) + "\n"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_you_pick_from_a_terminal(model, prompt_ids, text_model_path):
    """The same through a pseudo-terminal as stdin, the way a person uses it."""
    controller, terminal = os.openpty()
    try:
        os.write(controller, b"4\nq\n")       # typed ahead; the line discipline keeps it
        cmd = [sys.executable, str(REPO / "llama-np.py"), "-w", str(text_model_path), "-i",
               PROMPT, "-n", "5", "--temp", "0", "--you-pick"]
        p = subprocess.run(cmd, cwd=REPO, stdin=terminal, capture_output=True, text=True,
                           encoding="utf-8", timeout=120,
                           env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    finally:
        os.close(terminal)
        os.close(controller)
    assert p.returncode == 0, p.stderr
    fourth = int(np.argsort(-model.logits(prompt_ids)[-1], kind="stable")[3])
    assert p.stdout == PROMPT + continuation_text(model, [fourth]) + "\n"


def test_sampler_history_matches_the_output(model, prompt_ids, text_model_path, tmp_path):
    hist = tmp_path / "h.jsonl"
    rc, so, se = llama_np(text_model_path, "-n", 15, "--temp", 0.9, "--topk", 8, "--seed", 7,
                          "--sampler-history", hist)
    assert rc == 0, se
    steps = [json.loads(line) for line in hist.read_text().splitlines()]
    chosen = [s["chosen"] for s in steps]
    generated = [t for t in chosen if t not in model.tokenizer.stop_ids]
    assert so == PROMPT + continuation_text(model, generated) + "\n"
    logits = model.logits(prompt_ids + generated)
    for i, s in enumerate(steps):
        assert s["step"] == i + 1 and s["chosen"] == s["sampler_pick"]
        assert s["chosen_by"] == "sampler"
        assert s["chosen_text"] == model.tokenizer.token_bytes(s["chosen"]).decode("utf-8",
                                                                                   "replace")
        p_model = ref_softmax(list(logits[len(prompt_ids) - 1 + i]))
        cands = s["candidates"]
        assert len(cands) == 10
        assert [c["p"] for c in cands] == pytest.approx([p_model[c["id"]] for c in cands],
                                                        abs=1e-5)
        assert all(a["p"] >= b["p"] for a, b in zip(cands, cands[1:]))   # best first
        sampler_p = [c["p_sampler"] for c in cands]
        assert sum(sampler_p) == pytest.approx(1.0) and sampler_p[8:] == [0.0, 0.0]  # top-k 8
        assert s["chosen"] in [c["id"] for c in cands[:8]]


def test_logprobs_flag(model, prompt_ids, text_model_path, tmp_path):
    stats = tmp_path / "s.json"
    rc, so, se = llama_np(text_model_path, "-n", 6, "--temp", 0, "--logprobs", 3,
                          "--stats-json", stats)
    assert rc == 0, se
    lps = json.loads(stats.read_text())["logprobs"]
    gen = llamanp.generate(model, prompt_ids, 6, logprobs=3, stop_ids=())
    out = list(gen)
    assert [e["id"] for e in lps] == out
    for e, lp in zip(lps, gen.logprobs):
        assert e["logprob"] == pytest.approx(lp.logprob, abs=1e-9)
        assert [t["id"] for t in e["top"]] == [i for i, _ in lp.top]
        assert [t["logprob"] for t in e["top"]] == pytest.approx([v for _, v in lp.top], abs=1e-9)
    lines = [line for line in se.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 6 and f"{lps[0]['logprob']:.3f}" in lines[0]


def test_penalties_and_mirostat_flags_reproduce(text_model_path):
    args = [["--temp", 0.9, "--seed", 5, "--mirostat", 2, "--mirostat-tau", 3,
             "--mirostat-eta", 0.2],
            ["--temp", 0.9, "--seed", 5, "--mirostat", 1],
            ["--temp", 0, "--repeat-penalty", 1.5, "--repeat-last-n", 8,
             "--frequency-penalty", 0.2, "--presence-penalty", 0.1, "--min-p", 0.1]]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda a: llama_np(text_model_path, "-n", 16, *a), args + args))
    for (rc, so, se), again in zip(runs, runs[len(args):]):
        assert rc == 0, se
        assert (rc, so) == again[:2]


BAD_FLAGS = [("--temp", "-1"), ("--topp", "1.5"), ("--topp", "0"), ("--min-p", "2"),
             ("--min-p", "-0.5"), ("--mirostat", "3"), ("--mirostat-tau", "0"),
             ("--mirostat-eta", "-1"), ("--repeat-penalty", "0"), ("--repeat-last-n", "-5"),
             ("--frequency-penalty", "nan"), ("--beams", "0"), ("--beams", "-2"),
             ("--beams", "2", "--you-pick"), ("--beams", "2", "--logprobs", "2"),
             ("--length-penalty", "inf", "--beams", "2"), ("--stop", ""),
             ("--max-time", "0"), ("--max-time", "-3"), ("--logprobs", "-1"),
             ("--mirostat", "x")]


def test_bad_flags_are_one_line_errors(text_model_path, tmp_path):
    def run(args):
        stats = tmp_path / ("-".join(args).replace("/", "_") + ".json")
        return args, stats, llama_np(text_model_path, *args, "--stats-json", stats)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, BAD_FLAGS))
    for args, stats, (rc, so, se) in results:
        lines = se.strip().splitlines()
        assert rc in (1, 2), (args, rc, se)
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, se)
        assert "Traceback" not in se and so == "" and not stats.exists(), (args, so)
