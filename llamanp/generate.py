"""Generation: prefill the prompt, then sample one token at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import LlamanpError
from .model import Model
from .sampling import Sampler


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_computed: int = 0   # positions run through the model for the prompt
    computed_tokens: int = 0   # ... in all (more than prompt + output when there
                               # is no KV cache: it recomputes the past each step)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""      # "eos", "length" (max tokens) or "context"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of the prefill; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Generation:
    """An iterator over generated token ids; `.stats` fills in as it runs.

    The stop token itself is not yielded.
    """

    def __init__(self, model: Model, prompt_ids, max_new_tokens: int, sampler: Sampler,
                 kvcache: str = "inplace", fill1: bool = False,
                 stop_ids: Optional[Iterable[int]] = None, max_seq_len: Optional[int] = None):
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise LlamanpError("the prompt is empty; give at least one token")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
            raise LlamanpError(f"the number of tokens to generate must be >= 0, "
                               f"got {max_new_tokens}")
        self.session = model.session(kvcache, max_seq_len)
        ctx = self.session.max_seq_len
        if len(prompt_ids) > ctx:
            raise LlamanpError(f"the prompt is {len(prompt_ids)} tokens but the context is "
                               f"{ctx}; shorten the prompt or raise the sequence length "
                               f"(the model allows {model.config.max_seq_len})")
        if stop_ids is None:
            stop_ids = model.tokenizer.stop_ids if model.tokenizer is not None else ()
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.prompt_ids, self.max_new_tokens = prompt_ids, max_new_tokens
        self.sampler, self.fill1 = sampler, fill1
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self._steps = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._steps)

    def _run(self):
        s, st = self.session, self.stats
        if self.max_new_tokens == 0:
            st.stop_reason = "length"
            return
        t0 = time.perf_counter()
        logits = s.feed(self.prompt_ids, fill1=self.fill1)
        st.prefill_seconds = time.perf_counter() - t0
        st.prompt_computed = st.computed_tokens = s.computed
        while True:
            if len(s.tokens) >= s.max_seq_len:  # no position left for another token
                st.stop_reason = "context"
                return
            token = self.sampler(logits)
            if token in self.stop_ids:
                st.stop_reason = "eos"
                return
            st.generated_tokens += 1
            yield token
            if st.generated_tokens >= self.max_new_tokens:
                st.stop_reason = "length"
                return
            t1 = time.perf_counter()
            logits = s.feed([token])
            st.decode_seconds += time.perf_counter() - t1
            st.computed_tokens = s.computed


def generate(model: Model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             kvcache: str = "inplace", fill1: bool = False,
             stop_ids: Optional[Iterable[int]] = None,
             max_seq_len: Optional[int] = None) -> Generation:
    """Generate up to `max_new_tokens` ids after `prompt_ids` (an iterator).

    Stops early at any of `stop_ids` (default: the tokenizer's end-of-sequence
    ids; pass () to never stop early) or when the context is full.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    return Generation(model, prompt_ids, max_new_tokens, sampler, kvcache, fill1,
                      stop_ids, max_seq_len)
