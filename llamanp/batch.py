"""Several prompts generated together: one forward pass per step for all.

Decoding one sequence reads every weight once per token; decoding B sequences
together reads them once per step for all B, which is where batching pays. The
prompts may differ in length: their tokens are concatenated into one ragged
batch (no padding), every row-wise operation runs over all of them at once,
and attention runs per sequence against its own KV cache, at its own
positions. A sequence that finishes leaves the batch; the others go on.

Each sequence's numbers are the ones it would get alone (up to float rounding
in the matrix products), so greedy results equal running each prompt alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import LlamanpError
from .model import Model, feed_batch
from .sampling import Sampler


@dataclass
class BatchStats:
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0               # batched forward passes after the prefill

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
    logits = feed_batch(sessions, prompts)         # one ragged prefill for all prompts
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
    return result
