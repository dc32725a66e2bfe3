"""Generation: prefill the prompt, then sample one token at a time.

Generation ends at the first of: an end-of-sequence id (the stop token is not
yielded), a stop string in the decoded text, the token budget, the time
budget, a full context, a `choose` hook that says stop, or an interrupt
(Ctrl-C, see Generation.interrupt). `stats.stop_reason` says which, in the
words of STOP_REASONS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import LlamanpError
from .model import Model
from .sampling import Sampler, SamplingStep, descending, log_softmax
from .tokenizer import StreamDecoder

# why generation ended: stats.stop_reason -> what a summary line says
STOP_REASONS = {
    "eos": "end of text",
    "stop": "stop string",
    "length": "-n reached",
    "context": "context full",
    "time": "time limit",
    "user": "stopped by the user",
    "interrupted": "interrupted",
}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_computed: int = 0   # positions run through the model for the prompt
    computed_tokens: int = 0   # ... in all (more than prompt + output when there
                               # is no KV cache: it recomputes the past each step)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # "eos", "length" (max tokens), "context" (full), "stop" (a stop string),
    # "time" (max_time), "user" (the choose hook stopped it) or "interrupted"
    stop_reason: str = ""
    stop_string: Optional[str] = None  # the stop string found, when stop_reason == "stop"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of the prefill; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class TokenLogprobs:
    """One step's log-probabilities under the model (log-softmax of the raw logits,
    before penalties and temperature, as OpenAI's and llama.cpp's logprobs)."""
    token: int
    logprob: float
    top: list = field(default_factory=list)   # [(id, logprob)] of the N most likely, best first


def token_logprobs(logits: np.ndarray, token: int, n: int) -> TokenLogprobs:
    logp = log_softmax(logits)
    return TokenLogprobs(token, float(logp[token]),
                         [(int(i), float(logp[i])) for i in descending(logp, n)])


class StopStringFilter:
    """Streams decoded text, holding back whatever might be the start of a stop string.

    Text is released only once no stop string can begin inside it, so released
    text is final; when a stop string appears, the text before it is released
    and `found` says which string it was.
    """

    def __init__(self, decoder: StreamDecoder, stops: tuple):
        self.decoder, self.stops = decoder, stops
        self.pending = ""                 # decoded, not yet released
        self.found: Optional[str] = None

    def push(self, token: int) -> str:
        self.pending += self.decoder.push(token)
        hit = self._first_stop()
        if hit is not None:
            start, self.found = hit
            released, self.pending = self.pending[:start], ""
            return released
        cut = self._held_back_from()
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released

    def flush(self) -> str:
        """All the rest (generation ended without a stop string so far)."""
        self.pending += self.decoder.flush()
        hit = self._first_stop()
        released = self.pending if hit is None else self.pending[:hit[0]]
        self.found = None if hit is None else hit[1]
        self.pending = ""
        return released

    def _first_stop(self) -> Optional[tuple[int, str]]:
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        return min(hits) if hits else None

    def _held_back_from(self) -> int:
        """The start of the longest tail of `pending` that begins some stop string."""
        text = self.pending
        if not self.stops:
            return len(text)
        for start in range(max(len(text) - max(map(len, self.stops)) + 1, 0), len(text)):
            if any(s.startswith(text[start:]) for s in self.stops):
                return start
        return len(text)


def check_stop_strings(stop) -> tuple:
    """A tuple of non-empty strings (a single string is one stop string)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stop:
        if not isinstance(s, str) or s == "":
            raise LlamanpError(f"stop strings must be non-empty text, got {s!r}")
    return stop


class Generation:
    """An iterator over generated token ids; `.stats` fills in as it runs.

    The stop token itself is not yielded. With a tokenizer, `.text` is the
    continuation's text so far, and final: with stop strings it never holds
    a stop string or anything after one (the token that completed the stop
    string is still yielded, since part of it may come before the string).
    `.ids` lists the ids yielded so far. With `logprobs=N`, `.logprobs[i]` is the
    TokenLogprobs of the i-th yielded token. `choose(step)` may replace the
    sampler's pick (`step.token`) by returning another id, or stop generation
    by returning None.
    `max_new_tokens=None` sets no limit: it runs to a stop or a full context.
    `prompt_ids` may also be text, encoded with the model's tokenizer (see
    prompt_token_ids); `.prompt_ids` holds the ids. `hooks`
    (see llamanp.inspect) run in every forward pass, prompt and each step.
    """

    def __init__(self, model: Model, prompt_ids, max_new_tokens: Optional[int],
                 sampler: Sampler,
                 kvcache: str = "inplace", fill1: bool = False,
                 stop_ids: Optional[Iterable[int]] = None, max_seq_len: Optional[int] = None,
                 *, stop=(), max_time: Optional[float] = None, logprobs: int = 0,
                 choose: Optional[Callable[[SamplingStep], Optional[int]]] = None,
                 hooks=None):
        prompt_ids = prompt_token_ids(model, prompt_ids)
        if not prompt_ids:
            raise LlamanpError("the prompt is empty; give at least one token")
        if not (max_new_tokens is None or (isinstance(max_new_tokens, int)
                                           and not isinstance(max_new_tokens, bool)
                                           and max_new_tokens >= 0)):
            raise LlamanpError(f"the number of tokens to generate must be >= 0 (or None: "
                               f"no limit), got {max_new_tokens!r}")
        if max_time is not None and not (isinstance(max_time, (int, float))
                                         and math.isfinite(max_time) and max_time > 0):
            raise LlamanpError(f"max time must be a number of seconds > 0, got {max_time}")
        if not (isinstance(logprobs, int) and logprobs >= 0):
            raise LlamanpError(f"logprobs must be an integer >= 0 (how many alternatives "
                               f"to report; 0 = off), got {logprobs}")
        stop = check_stop_strings(stop)
        tok = model.tokenizer
        if stop and tok is None:
            raise LlamanpError("stop strings need a tokenizer to decode the text; load the "
                               "model with one")
        self.session = model.session(kvcache, max_seq_len, hooks)
        ctx = self.session.max_seq_len
        if len(prompt_ids) > ctx:
            raise LlamanpError(f"the prompt is {len(prompt_ids)} tokens but the context is "
                               f"{ctx}; shorten the prompt or raise the sequence length "
                               f"(the model allows {model.config.max_seq_len})")
        if stop_ids is None:
            stop_ids = tok.stop_ids if tok is not None else ()
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.prompt_ids, self.max_new_tokens = prompt_ids, max_new_tokens
        self.sampler, self.fill1, self.choose = sampler, fill1, choose
        self.max_time, self.n_logprobs = max_time, logprobs
        self.text = ""
        self.ids: list[int] = []       # the ids yielded so far
        self.logprobs: list[TokenLogprobs] = []
        self._tokenizer = tok
        self._text = StopStringFilter(tok.stream(at_start=False), stop) if tok else None
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self._steps = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._steps)

    def interrupt(self) -> None:
        """End generation here (after a KeyboardInterrupt, say): stop_reason
        becomes "interrupted", and `.ids`, `.logprobs`, the token count and
        `.text` agree again, wherever the interrupt cut the bookkeeping short.
        The text is decoded again from the ids; what was released before is a
        prefix of it."""
        self._steps.close()
        st, n = self.stats, len(self.ids)
        if self.n_logprobs:
            n = min(n, len(self.logprobs))
        del self.ids[n:], self.logprobs[n:]
        st.generated_tokens = n
        if self._text is not None:
            f = self._text
            self._text = StopStringFilter(self._tokenizer.stream(at_start=False), f.stops)
            self.text = "".join(self._text.push(t) for t in self.ids) + self._text.flush()
        st.stop_reason, st.stop_string = "interrupted", None

    def _run(self):
        try:
            yield from self._loop()
        finally:
            self._end_text()

    def _loop(self):
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
            token = self._next_token(logits)
            if token is None:
                st.stop_reason = "user"
                return
            if (yield from self._emit(token, logits, t0)):
                return
            t1 = time.perf_counter()
            logits = s.feed([token])
            st.decode_seconds += time.perf_counter() - t1
            st.computed_tokens = s.computed

    def _emit(self, token: int, logits, t0: float):
        """Yield `token` (chosen from `logits`) unless it is a stop id; True
        when generation ends with it (generation started at time t0)."""
        st = self.stats
        if token in self.stop_ids:
            st.stop_reason = "eos"
            return True
        if self.n_logprobs:
            self.logprobs.append(token_logprobs(logits, token, self.n_logprobs))
        self.ids.append(token)
        st.generated_tokens += 1
        self._add_text(token)
        yield token
        if self._text is not None and self._text.found is not None:
            st.stop_reason, st.stop_string = "stop", self._text.found
            return True
        if self.max_new_tokens is not None and st.generated_tokens >= self.max_new_tokens:
            st.stop_reason = "length"
            return True
        if self.max_time is not None and time.perf_counter() - t0 >= self.max_time:
            st.stop_reason = "time"
            return True
        return False

    def _next_token(self, logits) -> Optional[int]:
        """The sampler's pick, or the choose hook's; None = stop."""
        step = self.sampler.step(logits, self.session.tokens)
        token = step.token if self.choose is None else self.choose(step)
        if token is not None:
            token = int(token)
            if not 0 <= token < len(logits):
                raise LlamanpError(f"chosen token id {token} is outside the vocabulary "
                                   f"(0..{len(logits) - 1})")
            self.sampler.accept(step, token)
        return token

    def _add_text(self, token: int) -> None:
        if self._text is not None:
            self.text += self._text.push(token)

    def _end_text(self) -> None:
        """Release the held-back text: generation ended some other way."""
        f = self._text
        if f is not None and f.found is None:
            self.text += f.flush()
            if f.found is not None:   # completed only by the decoder's last characters
                self.stats.stop_reason, self.stats.stop_string = "stop", f.found


def prompt_token_ids(model: Model, prompt) -> list[int]:
    """The prompt as token ids: ids are taken as they are; text is encoded with
    the model's tokenizer, beginning with its BOS token if it has one (as
    llama-np.py, transformers and llama.cpp do)."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise LlamanpError("a text prompt needs a tokenizer; load the model with one "
                               "(llamanp.load(path, tokenizer=...)) or pass token ids")
        return model.tokenizer.encode(prompt, bos=True)
    try:
        return [int(i) for i in prompt]
    except (TypeError, ValueError):
        raise LlamanpError("the prompt must be text or a list of token ids") from None


def generate(model: Model, prompt_ids, max_new_tokens: Optional[int],
             temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, repeat_last_n: int = 64, mirostat: int = 0,
             mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
             seed: Optional[int] = None, stop=(), stop_ids: Optional[Iterable[int]] = None,
             max_time: Optional[float] = None, kvcache: str = "inplace", fill1: bool = False,
             max_seq_len: Optional[int] = None, logprobs: int = 0, hooks=None) -> Generation:
    """Generate up to `max_new_tokens` ids after `prompt_ids` (an iterator).

    `prompt_ids` is a list of ids, or text (encoded by the model's tokenizer,
    with its BOS token if it has one). `max_new_tokens=None`: no limit.

    Sampling is described in llamanp.sampling (temperature 0 = greedy). Stops
    early at any of `stop_ids` (default: the tokenizer's end-of-sequence ids;
    pass () to never stop early), at a stop string (`stop`; read the text from
    `.text`), after `max_time` seconds, or when the context is full. `hooks`
    ([(name or predicate, fn)], see llamanp.inspect) hold through the whole run.
    """
    sampler = Sampler(temperature, top_k, top_p, seed, min_p=min_p,
                      repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                      repeat_last_n=repeat_last_n, mirostat=mirostat,
                      mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta)
    return Generation(model, prompt_ids, max_new_tokens, sampler, kvcache, fill1, stop_ids,
                      max_seq_len, stop=stop, max_time=max_time, logprobs=logprobs,
                      hooks=hooks)
