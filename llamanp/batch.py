"""Several prompts generated together: one forward pass per step for all.

Decoding one sequence reads every weight once per token; decoding B sequences
together reads them once per step for all B, which is where batching pays. The
prompts may differ in length: their tokens are concatenated into one ragged
batch (no padding), every row-wise operation runs over all of them at once,
and attention runs per sequence against its own KV cache, at its own
positions. A sequence that finishes leaves the batch; the others go on.

Each sequence's numbers are the ones it would get alone (up to float rounding
in the matrix products), so greedy results equal running each prompt alone.

With a cache whose forks share what they hold (`paged`), prompts that start
alike (a system prompt) share it: every prefix two or more prompts have in
common is computed once, in a session that the prompts' sessions are forked
from, so its blocks are held once for the whole batch (vLLM's prefix caching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import LlamanpError
from .kvcache.paged import held_nbytes
from .model import Model, Session, feed_batch
from .sampling import Sampler


@dataclass
class BatchStats:
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0               # batched forward passes after the prefill
    kv_bytes: int = 0            # bytes the caches hold at the end (shared blocks once)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Aggregate: tokens produced by the decode steps, all sequences, per second."""
        produced = self.generated_tokens - self.prompts   # the first tokens come from prefill
        return max(produced, 0) / self.decode_seconds if self.decode_seconds else 0.0


class BatchResult(list):
    """One list of generated ids per prompt (stop tokens not included), plus `.stats`."""
    stats: BatchStats


def generate_batch(model: Model, prompts: Iterable, max_new_tokens: int,
                   kvcache: str = "inplace", stop_ids: Optional[Iterable[int]] = None,
                   max_seq_len: Optional[int] = None, seed: Optional[int] = None,
                   **sampler_options) -> BatchResult:
    """Generate up to `max_new_tokens` after each prompt, all in one batch.

    `sampler_options` are Sampler's keyword arguments (temperature, top_k, ...);
    each sequence gets its own sampler, seeded seed, seed+1, ... when `seed` is
    given, so a batch reproduces.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise LlamanpError("no prompts to generate from")
    if any(not p for p in prompts):
        raise LlamanpError("a prompt is empty; every prompt needs at least one token")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise LlamanpError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    if stop_ids is None:
        stop_ids = model.tokenizer.stop_ids if model.tokenizer is not None else ()
    stops = frozenset(int(i) for i in stop_ids)
    sessions = [model.session(kvcache, max_seq_len) for _ in prompts]
    for s, p in zip(sessions, prompts):
        if len(p) > s.max_seq_len:
            raise LlamanpError(f"a prompt is {len(p)} tokens but the context is {s.max_seq_len}")
    samplers = [Sampler(seed=None if seed is None else seed + i, **sampler_options)
                for i in range(len(prompts))]

    result = BatchResult([] for _ in prompts)
    stats = result.stats = BatchStats(prompts=len(prompts),
                                      prompt_tokens=sum(map(len, prompts)))
    if max_new_tokens == 0:
        return result
    t0 = time.perf_counter()
    rest = prompts
    if getattr(sessions[0].cache, "shares_prefix", False):
        sessions, rest = shared_prefix_sessions(model, kvcache, max_seq_len, prompts)
    logits = feed_batch(sessions, rest)            # one ragged prefill for all prompts
    stats.prefill_seconds = time.perf_counter() - t0
    active = list(range(len(prompts)))
    while active:
        going, tokens = [], []
        for row, b in enumerate(active):
            s = sessions[b]
            if len(s.tokens) >= s.max_seq_len:     # no position left for another token
                continue
            token = samplers[b](logits[row], s.tokens)
            if token in stops:
                continue
            result[b].append(token)
            if len(result[b]) < max_new_tokens:
                going.append(b)
                tokens.append([token])
        stats.generated_tokens = sum(map(len, result))
        if not going:
            break
        t0 = time.perf_counter()
        logits = feed_batch([sessions[b] for b in going], tokens)
        stats.decode_seconds += time.perf_counter() - t0
        stats.steps += 1
        active = going
    stats.kv_bytes = held_nbytes([s.cache for s in sessions])
    return result


def shared_prefixes(prompts: list) -> list[int]:
    """For each prompt, the length of the longest prefix it shares with another
    prompt, short of its last token (whose logits must be computed)."""
    shared = [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    # in lexicographic order, a prompt's longest common prefix with any other
    # prompt is the one with a neighbour
    for a, b in zip(order, order[1:]):
        pa, pb = prompts[a], prompts[b]
        n = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
        shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
    return [min(n, len(p) - 1) for n, p in zip(shared, prompts)]


def shared_prefix_sessions(model: Model, kvcache: str, max_seq_len: Optional[int],
                           prompts: list) -> tuple[list[Session], list]:
    """Sessions for `prompts`, forked from one root, that already hold every
    prefix shared by two or more prompts (each computed once, shorter ones
    first, a longer one forked from the longest shorter one inside it);
    returns them and what is left of each prompt to feed."""
    shared = shared_prefixes(prompts)
    done = {(): model.session(kvcache, max_seq_len)}      # prefix -> session holding it
    for n, i in sorted((n, i) for i, n in enumerate(shared) if n):
        prefix = tuple(prompts[i][:n])
        if prefix in done:
            continue
        base = max((p for p in done if prefix[:len(p)] == p), key=len)
        s = done[base].fork()
        s.feed(prefix[len(base):])
        done[prefix] = s
    sessions = [done[tuple(p[:n])].fork() for p, n in zip(prompts, shared)]
    return sessions, [p[n:] for p, n in zip(prompts, shared)]
