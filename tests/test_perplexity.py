"""Perplexity with a sliding window (llamanp/perplexity.py, llama-np.py --perplexity).

The reference is Hugging Face's guide "Perplexity of fixed-length models",
written out in torch on a transformers LlamaForCausalLM: windows of ctx tokens
at offsets 0, stride, 2*stride, ...; in each, the labels of the tokens an
earlier window already reached are set to -100 so that they are context only,
and the model's own loss (the mean NLL over the valid, shifted labels) times
the number of those labels is summed. (The guide multiplies by "valid labels
- 1" in every window; that is exact only for the first one, whose first label
is dropped by the shift. The reference counts the shifted labels themselves.)

Both sides get the same token ids (llamanp's tokenization), so what is
compared is the windowing and the scoring. The real model is SmolLM2-135M-
Instruct, llamanp running its converted .lmw and transformers dequantizing the
same GGUF to float32, over tests/data/pride-and-prejudice-ch1.txt: the opening
of chapter 1 of Jane Austen's "Pride and Prejudice" (1813, public domain),
written out from memory (it may differ from the printed text in small details).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import refmodels as R
import torch
from conftest import REPO, TOK_CASE, run_cli

from llamanp.errors import LlamanpError
from llamanp.perplexity import PerplexityResult, Window, perplexity, windows

REL_TOL = 1e-3     # |ppl - reference ppl| / reference ppl
AUSTEN = Path(__file__).resolve().parent / "data" / "pride-and-prejudice-ch1.txt"


@pytest.fixture(scope="module", autouse=True)
def _start_conversion(store):
    store.prefetch([TOK_CASE])


# ---------------------------------------------------------------------------
# the reference: HF's recipe, in torch
# ---------------------------------------------------------------------------

@dataclass
class Reference:
    nll_sum: float
    n_scored: int
    windows: int

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll_sum / self.n_scored))


@torch.no_grad()
def hf_windowed(model, ids, ctx: int, stride: int) -> Reference:
    seq = torch.tensor([list(ids)], dtype=torch.long)
    n = seq.size(1)
    nll_sum, n_scored, n_windows = 0.0, 0, 0
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        trg_len = end - prev_end             # the tokens this window is the first to reach
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100          # the overlap is context only
        n_valid = int((labels[:, 1:] != -100).sum())   # the model shifts labels by one
        if n_valid:   # (a last window of one token has nothing to predict)
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
            nll_sum += float(loss) * n_valid
            n_scored += n_valid
            n_windows += 1
        prev_end = end
        if end == n:
            break
    return Reference(nll_sum, n_scored, n_windows)


def rel_diff(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


# ---------------------------------------------------------------------------
# the windows themselves (no model)
# ---------------------------------------------------------------------------

def test_windows_docstring_example():
    assert list(windows(10, 6, 3)) == [Window(0, 6, 1), Window(3, 9, 6), Window(6, 10, 9)]


@pytest.mark.parametrize("n,ctx,stride", [(10, 6, 3), (100, 32, 32), (101, 32, 32),
                                          (97, 32, 7), (33, 32, 31), (5, 64, 32), (9, 2, 1),
                                          (64, 64, 64), (65, 64, 64)])
def test_windows_score_each_token_once(n, ctx, stride):
    ws = list(windows(n, ctx, stride))
    scored = [t for w in ws for t in range(w.scored_from, w.end)]
    assert scored == sorted(set(scored)), "a token is scored twice or out of order"
    assert all(w.end - w.start <= ctx and w.start < w.scored_from < w.end for w in ws)
    assert all(w.start % stride == 0 for w in ws)
    if stride < ctx:
        assert scored == list(range(1, n)), "every token but the first is scored"
    else:   # no overlap: the first token of each window has no context
        assert scored == [t for t in range(n) if t % ctx]


def test_windows_one_token_tail_left_out():
    # 129 tokens, ctx = stride = 64: the last window would be token 128 alone
    assert list(windows(129, 64, 64)) == [Window(0, 64, 1), Window(64, 128, 65)]


# ---------------------------------------------------------------------------
# a tiny random model against transformers
# ---------------------------------------------------------------------------

TINY_TEXT = " ".join(R.tokenizer_corpus(4, seed=7))


@pytest.fixture(scope="module")
def tiny(store):
    model = store.load(TOK_CASE)
    ids = model.tokenizer.encode(TINY_TEXT, bos=True)
    return model, store.reference(TOK_CASE.spec).model, ids


# (n_tokens or None for the whole text, ctx, stride); max_seq_len is 96
TINY_CASES = [
    (None, 96, 96),     # stride == ctx == the model's context
    (None, 96, 48),     # half overlap (the default shape)
    (None, 40, 19),     # the text length (153) is not a multiple of the stride
    (None, 64, 63),
    (None, 2, 1),       # the smallest window: every token predicted from one token
    (129, 64, 64),      # stride == ctx with a one-token last window (left out)
    (50, 96, 48),       # a text shorter than the window: one window
]


@pytest.mark.parametrize("n,ctx,stride", TINY_CASES)
def test_tiny_matches_transformers(tiny, n, ctx, stride):
    model, hf, ids = tiny
    ids = ids[:n]
    if (ctx, stride) == (40, 19):
        assert len(ids) % stride != 0
    got = perplexity(model, ids, ctx, stride)
    want = hf_windowed(hf, ids, ctx, stride)
    diff = rel_diff(got.ppl, want.ppl)
    print(f"tiny n={len(ids)} ctx={ctx} stride={stride}: ppl {got.ppl:.6f} vs {want.ppl:.6f}"
          f" (rel diff {diff:.2e})")
    assert (got.n_scored, got.windows) == (want.n_scored, want.windows)
    assert diff < REL_TOL
    assert got.nll_sum == pytest.approx(want.nll_sum, rel=REL_TOL)
    assert got.n_computed == sum(w.end - w.start for w in windows(len(ids), ctx, stride))


def test_api_refuses_bad_input(tiny):
    model, _, ids = tiny
    for bad_ids, ctx, stride, mention in [
            (ids[:1], 8, 4, "at least 2"), ([], 8, 4, "at least 2"),
            (ids, 1, 1, "ctx=1"), (ids, 97, 48, "ctx=97"),
            (ids, 8, 0, "stride=0"), (ids, 8, 9, "stride=9"),
            ([1, 300], 8, 4, "token id 300"), ([1, -1], 8, 4, "token id -1"),
            ([[1, 2]], 8, 4, "flat sequence"), ([[1], [2, 3]], 8, 4, "flat sequence"),
            ([1.0, 2.0], 8, 4, "flat sequence")]:
        with pytest.raises(LlamanpError, match=re.escape(mention)):
            perplexity(model, bad_ids, ctx, stride)


# ---------------------------------------------------------------------------
# the real model: SmolLM2 through the command line, against transformers
# ---------------------------------------------------------------------------

def test_smollm2_matches_transformers(smollm2_gguf, smollm2_lmw, tmp_path):
    from test_gguf import transformers_from_gguf

    import llamanp
    stats_path = tmp_path / "stats.json"
    # llama-np.py runs while transformers loads and dequantizes the GGUF
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "llama-np.py"), "-w", str(smollm2_lmw), "--perplexity",
         str(AUSTEN), "--ctx", "256", "--stride", "128", "--stats-json", str(stats_path)],
        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ids = llamanp.load(str(smollm2_lmw)).tokenizer.encode(AUSTEN.read_text("utf-8"))
        want = hf_windowed(transformers_from_gguf(smollm2_gguf), ids, 256, 128)
    finally:
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads(stats_path.read_text())
    diff = rel_diff(got["perplexity"], want.ppl)
    print(f"SmolLM2 {len(ids)} tokens, ctx 256, stride 128: ppl {got['perplexity']:.6f} vs "
          f"{want.ppl:.6f} (rel diff {diff:.2e})")
    assert 550 <= len(ids) <= 700 and len(ids) % 128 != 0
    assert (got["tokens"], got["tokens_scored"], got["windows"]) == \
        (len(ids), want.n_scored, want.windows) == (len(ids), len(ids) - 1, 4)
    assert diff < REL_TOL
    assert f"perplexity: {got['perplexity']:.4f}" in stdout


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


REPORT = re.compile(
    r"perplexity: (?P<ppl>\d+\.\d{4})\n"
    r"mean NLL: (?P<nll>\d+\.\d{6}) nats/token\n"
    r"tokens: (?P<tokens>\d+) in the text, (?P<scored>\d+) scored, (?P<computed>\d+) computed\n"
    r"windows: (?P<windows>\d+) \(ctx (?P<ctx>\d+), stride (?P<stride>\d+)\)\n"
    r"time: \d+\.\d\d s \(\d+\.\d tok/s scored\)\n\Z")


@pytest.mark.parametrize("flags,ctx,stride", [
    (["--ctx", "40", "--stride", "19"], 40, 19),
    ([], 96, 48),                          # defaults: min(max_seq_len, 512), ctx / 2
    (["--seqlength", "30"], 30, 15),       # the default window follows --seqlength
    (["--ctx", "33"], 33, 16),
])
def test_cli_report_and_stats_json(store, tiny, text_file, tmp_path, flags, ctx, stride):
    model, _, ids = tiny
    stats_path = tmp_path / "stats.json"
    rc, out, err = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), "--perplexity", text_file,
                           *flags, "--stats-json", stats_path)
    assert rc == 0, err
    assert err == ""
    m = REPORT.match(out)
    assert m, f"unexpected report:\n{out}"
    want: PerplexityResult = perplexity(model, ids, ctx, stride)
    assert (int(m["tokens"]), int(m["scored"]), int(m["computed"]), int(m["windows"]),
            int(m["ctx"]), int(m["stride"])) == \
        (len(ids), want.n_scored, want.n_computed, want.windows, ctx, stride)
    assert float(m["ppl"]) == pytest.approx(want.ppl, abs=6e-5)
    assert float(m["nll"]) == pytest.approx(want.mean_nll, abs=6e-7)
    stats = json.loads(stats_path.read_text())
    assert set(stats) == {"file", "tokens", "ctx", "stride", "windows", "tokens_scored",
                          "tokens_computed", "nll_sum", "mean_nll", "perplexity", "seconds",
                          "tokens_per_second", "peak_rss_mb"}
    assert stats["file"] == str(text_file)
    assert (stats["tokens"], stats["ctx"], stats["stride"], stats["windows"],
            stats["tokens_scored"], stats["tokens_computed"]) == \
        (len(ids), ctx, stride, want.windows, want.n_scored, want.n_computed)
    assert stats["perplexity"] == pytest.approx(want.ppl, rel=1e-9)
    assert stats["nll_sum"] == pytest.approx(want.nll_sum, rel=1e-9)
    assert stats["mean_nll"] == pytest.approx(want.mean_nll, rel=1e-9)
    assert stats["seconds"] > 0 and stats["tokens_per_second"] > 0 and stats["peak_rss_mb"] > 0


def assert_one_line_error(rc, out, err, mention):
    assert rc == 1, f"exit status {rc}\nstdout: {out[-500:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert mention in lines[0], f"{lines[0]!r} should mention {mention!r}"
    assert out == ""


@pytest.mark.parametrize("content,flags,mention", [
    (None, [], "cannot read"),                          # no such file
    (b"", [], "is empty"),
    (b"the cat \xff\xfe saw", [], "not valid UTF-8"),
    (b"x", ["--ctx", "1"], "--ctx) 1 is too small"),
    (b"x", ["--ctx", "97"], "larger than the model's max_seq_len (96)"),
    (b"x", ["--ctx", "64", "--seqlength", "32"], "larger than --seqlength (32)"),
    (b"x", ["--seqlength", "97"], "--seqlength 97"),
    (b"x", ["--stride", "0"], "--stride 0 is outside 1..96"),
    (b"x", ["--ctx", "64", "--stride", "65"], "--stride 65 is outside 1..64"),
    (b"x", ["-i", "the cat"], "cannot be combined with -i"),
], ids=["missing", "empty", "not-utf8", "ctx-1", "ctx-over-max", "ctx-over-seqlength",
        "bad-seqlength", "stride-0", "stride-over-ctx", "with-prompt"])
def test_cli_refusals(store, tmp_path, content, flags, mention):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    stats_path = tmp_path / "stats.json"
    rc, out, err = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), "--perplexity", path,
                           *flags, "--stats-json", stats_path)
    assert_one_line_error(rc, out, err, mention)
    assert not stats_path.exists()


def test_cli_ctx_without_perplexity(store):
    rc, out, err = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), "-i", "the cat",
                           "--ctx", "32")
    assert_one_line_error(rc, out, err, "only apply to --perplexity")


def test_cli_refuses_one_token_text(smollm2_lmw, tmp_path):
    """SmolLM2 adds no BOS, so a one-word text is a single token: nothing to score."""
    path = tmp_path / "one.txt"
    path.write_text("Hello", encoding="utf-8")
    rc, out, err = run_cli("llama-np.py", "-w", smollm2_lmw, "--perplexity", path)
    assert_one_line_error(rc, out, err, "1 token long")
