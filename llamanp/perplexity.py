"""Perplexity of a text under a model, with a sliding window.

A model with a context of `ctx` tokens cannot see a long text all at once, so
the text is scored the way Hugging Face's guide "Perplexity of fixed-length
models" does it: the whole text is tokenized once, then windows of `ctx`
tokens are taken at offsets 0, stride, 2*stride, ... until one reaches the
end of the text (the last window may be shorter). Each window is one
independent forward pass from position 0.

Which tokens a window scores (predicts from the tokens before it):

* the first window scores all its tokens but the first, which has no context;
* every later window scores only the tokens that the previous windows did
  not reach; the rest of it (the overlap, ctx - stride tokens) is context only.

With stride < ctx every token but the very first is therefore scored exactly
once, each with at least ctx - stride tokens of context (except near the start).
With stride == ctx the windows do not overlap and the first token of each
window has no context, so it is not scored either. A smaller stride means more
context per prediction (a lower, more faithful perplexity) and more compute.

    text: t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        ctx 6, stride 3
    window 1  [t0 t1 t2 t3 t4 t5]              scores t1..t5
    window 2           [t3 t4 t5 t6 t7 t8]     scores t6..t8 (t3..t5: context)
    window 3                    [t6 t7 t8 t9]  scores t9

The negative log-likelihood of each scored token is taken from the log-softmax,
in float64, of the model's float32 logits; perplexity = exp(mean NLL).

With kvcache=SPEC (llama-np.py --kvcache SPEC) a window is fed through that
KV cache (llamanp.kvcache) in chunks of KV_CHUNK tokens instead of in one
pass, so that a lossy cache (quantized storage, eviction) shows what it costs:
every chunk attends to what the cache holds of the positions before it, and an
evicting cache evicts after each chunk (so a chunk may see up to KV_CHUNK - 1
positions beyond its budget). An exact cache gives the one-pass numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from . import fileio
from .errors import LlamanpError
from .kvcache import check_spec, make_cache
from .model import Model

DEFAULT_MAX_CTX = 512   # the default window: the model's context, at most this
NLL_ROWS = 64           # log-softmax this many positions at a time (bounds float64 memory)


@dataclass(frozen=True)
class Window:
    """Tokens ids[start:end] run through the model as one sequence; of them,
    ids[scored_from:end] are scored (each predicted from the tokens before it,
    within the window)."""
    start: int
    end: int
    scored_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.scored_from


@dataclass(frozen=True)
class WindowNLL:
    """One window's share of the result."""
    window: Window
    nll_sum: float      # sum of -log p(token | the tokens before it), in nats
    seconds: float


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float          # exp(nll_sum / n_scored)
    nll_sum: float      # total negative log-likelihood of the scored tokens, in nats
    n_scored: int       # tokens scored
    windows: int        # forward passes (windows that score at least one token)
    seconds: float      # time spent in the forward passes and the scoring
    n_computed: int = 0  # token positions run through the model (all windows together)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_scored

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens per second."""
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0


def check_windows(n_tokens: int, ctx: int, stride: int, max_ctx: int) -> None:
    """Refuse a text or window shape that cannot give a perplexity."""
    if n_tokens < 2:
        raise LlamanpError(f"the text is {n_tokens} token{'s' if n_tokens != 1 else ''} long; "
                           "perplexity needs at least 2 (one to predict from, one to score)")
    if not 2 <= ctx <= max_ctx:
        raise LlamanpError(f"window length ctx={ctx} is outside 2..{max_ctx} "
                           "(the model's context)")
    if not 1 <= stride <= ctx:
        raise LlamanpError(f"stride={stride} is outside 1..{ctx} (the window length)")


def windows(n_tokens: int, ctx: int, stride: int) -> Iterator[Window]:
    """The windows over a text of n_tokens tokens, in order (see the module
    docstring). A window that would score nothing (with stride == ctx, a last
    window of one token) is left out."""
    if ctx < 2 or not 1 <= stride <= ctx:
        raise LlamanpError(f"bad window shape ctx={ctx}, stride={stride}: need ctx >= 2 "
                           "and 1 <= stride <= ctx")
    reached = 0   # every token before this one was in an earlier window
    for start in range(0, n_tokens, stride):
        end = min(start + ctx, n_tokens)
        scored_from = max(reached, start + 1)
        if scored_from < end:
            yield Window(start, end, scored_from)
        reached = end
        if end == n_tokens:
            return


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for every row, computed in float64."""
    out = np.empty(len(targets), dtype=np.float64)
    for r in range(0, len(targets), NLL_ROWS):
        rows = logits[r:r + NLL_ROWS].astype(np.float64)
        top = rows.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
        picked = rows[np.arange(len(rows)), targets[r:r + NLL_ROWS]]
        out[r:r + NLL_ROWS] = log_z - picked
    return out


#: a window fed through a KV cache (kvcache=SPEC) goes in chunks of this many tokens
KV_CHUNK = 32


def window_nll(model: Model, ids: np.ndarray, window: Window,
               kvcache: Optional[str] = None) -> float:
    """Sum of the NLLs of the tokens `window` scores: one forward pass over
    the window from position 0 (nothing is carried over from other windows),
    or, with a kvcache spec, chunks of KV_CHUNK tokens through that cache."""
    tokens = ids[window.start:window.end]
    # the logits at position p predict token p+1: the scored tokens need the
    # rows of positions scored_from-1 .. end-2, i.e. the last n_scored+1 rows
    # but the final one (which predicts past the window)
    n_rows = window.n_scored + 1
    if kvcache is None:
        cache = make_cache("none", model.config, len(tokens))
        logits = model.forward(tokens, 0, cache, n_logits=n_rows)[:-1]
    else:
        session = model.session(kvcache, max_seq_len=len(tokens))
        logits = np.concatenate([session.feed(tokens[i:i + KV_CHUNK], all_logits=True)
                                 for i in range(0, len(tokens), KV_CHUNK)])[-n_rows:-1]
    return float(token_nll(logits, ids[window.scored_from:window.end]).sum())


def iter_window_nlls(model: Model, ids, ctx: int, stride: int,
                     kvcache: Optional[str] = None) -> Iterator[WindowNLL]:
    """Score the windows one at a time (for progress reports); see perplexity()."""
    ids = check_ids(model, ids)
    check_windows(len(ids), ctx, stride, model.config.max_seq_len)
    if kvcache is not None:
        check_spec(kvcache)
    for w in windows(len(ids), ctx, stride):
        t0 = time.perf_counter()
        nll = window_nll(model, ids, w, kvcache)
        yield WindowNLL(w, nll, time.perf_counter() - t0)


def perplexity(model: Model, ids, ctx: int, stride: int,
               kvcache: Optional[str] = None) -> PerplexityResult:
    """Perplexity of the token sequence `ids` (BOS included, if wanted) under
    `model`, with windows of `ctx` tokens moved by `stride` (1 <= stride <= ctx;
    see the module docstring for which tokens each window scores). With
    `kvcache` (a spec, see llamanp.kvcache) each window goes through that
    cache in chunks of KV_CHUNK tokens."""
    nll_sum, n_scored, n_windows, n_computed, seconds = 0.0, 0, 0, 0, 0.0
    for part in iter_window_nlls(model, ids, ctx, stride, kvcache):
        nll_sum += part.nll_sum
        n_scored += part.window.n_scored
        n_windows += 1
        n_computed += part.window.end - part.window.start
        seconds += part.seconds
    mean = nll_sum / n_scored
    ppl = math.exp(mean) if mean < 700 else math.inf   # (beyond ~709 exp overflows)
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum,
                            n_scored=n_scored, windows=n_windows, seconds=seconds,
                            n_computed=n_computed)


def check_ids(model: Model, ids) -> np.ndarray:
    """`ids` as an integer array, if every one is in the model's vocabulary."""
    try:
        arr = np.asarray(ids)
    except (ValueError, OverflowError):   # ragged nesting, ints beyond 64 bits
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise LlamanpError("token ids must be a flat sequence of integers")
    arr = arr.astype(np.intp)
    vocab = model.config.vocab_size
    bad = arr[(arr < 0) | (arr >= vocab)]
    if bad.size:
        raise LlamanpError(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1})")
    return arr


# -- the command line (llama-np.py --perplexity FILE) ---------------------------------

def read_text(path: str) -> str:
    """The contents of a UTF-8 text file, refusing a missing, empty or binary one."""
    data = fileio.read_bytes(path, "text file", fileio.TEXT_LIMIT)
    if not data:
        raise LlamanpError(f"{path} is empty; perplexity needs some text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamanpError(f"{path} is not valid UTF-8 text "
                           f"(byte {data[e.start]:#04x} at offset {e.start})") from None


def window_args(ctx: Optional[int], stride: Optional[int], limit: int,
                limit_flag: str) -> tuple[int, int]:
    """--ctx and --stride, defaults filled in: ctx = min(limit, 512) and
    stride = ctx // 2. `limit` is the context the run may use and
    `limit_flag` says where it comes from."""
    if ctx is None:
        ctx = min(limit, DEFAULT_MAX_CTX)
    if ctx < 2:
        raise LlamanpError(f"window length (--ctx) {ctx} is too small: a window needs at "
                           "least 2 tokens")
    if ctx > limit:
        raise LlamanpError(f"--ctx {ctx} is larger than {limit_flag} ({limit})")
    if stride is None:
        stride = max(ctx // 2, 1)
    if not 1 <= stride <= ctx:
        raise LlamanpError(f"--stride {stride} is outside 1..{ctx} (the window length, --ctx)")
    return ctx, stride


def report_text(result: PerplexityResult, n_tokens: int, ctx: int, stride: int) -> str:
    """The few lines llama-np.py prints."""
    return (f"perplexity: {result.ppl:.4f}\n"
            f"mean NLL: {result.mean_nll:.6f} nats/token\n"
            f"tokens: {n_tokens} in the text, {result.n_scored} scored, "
            f"{result.n_computed} computed\n"
            f"windows: {result.windows} (ctx {ctx}, stride {stride})\n"
            f"time: {result.seconds:.2f} s ({result.tokens_per_second:.1f} tok/s scored)\n")


def report_stats(result: PerplexityResult, path: str, n_tokens: int, ctx: int,
                 stride: int) -> dict:
    """What --stats-json records."""
    return {"file": str(path), "tokens": n_tokens, "ctx": ctx, "stride": stride,
            "windows": result.windows, "tokens_scored": result.n_scored,
            "tokens_computed": result.n_computed, "nll_sum": result.nll_sum,
            "mean_nll": result.mean_nll, "perplexity": result.ppl,
            "seconds": round(result.seconds, 6),
            "tokens_per_second": round(result.tokens_per_second, 3)}
