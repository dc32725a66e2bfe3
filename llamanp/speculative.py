"""Speculative decoding: guess a few tokens cheaply, let the model check them
all in one pass.

Decoding costs one pass over the weights per token, and a pass over k + 1
rows costs about the same as over one (the weights are read, and for
compressed files widened, once; only the arithmetic grows). So a proposer
guesses up to k next tokens d1..dk; the model runs [y, d1..dk] (y: the token
just chosen) in one batched forward pass, which gives its distributions
p0..pk for the positions after y, d1, ..., dk; the guesses are checked in
order, and the cache is rolled back past the first one that fails.

Checking d_i against p = p_{i-1} (the target's sampling distribution there,
penalties and truncation included) and q (the proposer's distribution for
d_i; one-hot for a proposer that does not sample):

    accept d_i with probability min(1, p(d_i) / q(d_i));
    at the first rejection, draw the token from norm(max(0, p - q)) and stop;
    if all k are accepted, draw one more from p_k.

Every token so drawn has exactly the target's distribution (Leviathan et
al. 2023, Chen et al. 2023); with greedy decoding p is one-hot at the
argmax, so the output is plain greedy decoding's, token for token, and each
step yields between 1 and k + 1 tokens.

Proposers (one small class each, one method: propose):

    PromptLookup   the continuation of the latest earlier occurrence of the
                   last n tokens in the context (prompt-lookup decoding): free,
                   and right whenever the output copies its input
    DraftModel     a smaller model with the same tokenizer, run greedily
                   (its own KV cache, kept in step with the accepted tokens)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import LlamanpError
from .generate import Generation, GenerationStats
from .kvcache import require
from .sampling import SamplingStep


@dataclass
class SpeculativeStats(GenerationStats):
    draft: str = ""
    proposed: int = 0       # tokens proposed in all
    accepted: int = 0       # ... of which the model accepted
    verify_passes: int = 0  # batched forward passes that checked proposals

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class PromptLookup:
    """Proposes what followed the latest earlier occurrence of the context's
    last `ngram` tokens (nothing when they occur only at the end)."""

    def __init__(self, ngram: int = 3, max_draft: int = 8):
        if ngram < 1 or max_draft < 1:
            raise LlamanpError(f"prompt lookup needs ngram >= 1 and max_draft >= 1, "
                               f"got {ngram} and {max_draft}")
        self.ngram, self.max_draft = ngram, max_draft
        self.name = f"lookup (ngram {ngram})"

    def propose(self, tokens: list, k: int) -> tuple[list, Optional[list]]:
        """Up to k tokens to follow `tokens`, and None: the proposal is not
        drawn from a distribution (q is one-hot)."""
        n = self.ngram
        if k < 1 or len(tokens) <= n:
            return [], None
        seq = np.asarray(tokens)
        tail = seq[-n:]
        # starts j < len - n of every earlier window equal to the tail, latest first
        starts = np.flatnonzero(seq[:len(seq) - n] == tail[0])
        for j in starts[::-1]:
            if np.array_equal(seq[j:j + n], tail):
                return [int(t) for t in seq[j + n:j + n + k]], None
        return [], None


class DraftModel:
    """A smaller model's greedy continuation. Its session follows the
    target's tokens: each call rolls it back to the common prefix and feeds
    the rest, then decodes k tokens one at a time."""

    def __init__(self, draft, target, max_draft: int = 8, kvcache: str = "inplace"):
        check_same_tokenizer(draft, target)
        self.model, self.max_draft, self.kvcache = draft, max_draft, kvcache
        self.session = None
        self.name = f"model {draft.path}"

    def propose(self, tokens: list, k: int) -> tuple[list, Optional[list]]:
        if k < 1:
            return [], None
        s = self._follow(tokens)
        if s is None:
            return [], None
        k = min(k, s.max_seq_len - len(tokens))
        out = []
        logits = self._logits
        for i in range(k):
            d = int(np.argmax(logits))
            out.append(d)
            if i + 1 < k:
                logits = s.feed([d])
        self._logits = None     # the session now holds proposals: resync next time
        return out, None

    def _follow(self, tokens: list):
        """The draft session holding exactly `tokens`, and its next logits."""
        if self.session is None:
            self.session = self.model.session(self.kvcache, self.model.config.max_seq_len)
        s = self.session
        if len(tokens) > s.max_seq_len:
            return None
        same = 0
        for a, b in zip(s.tokens, tokens):
            if a != b:
                break
            same += 1
        if same == len(tokens):   # nothing new to feed: step back one to get logits
            same -= 1
        rewind(s, same)
        self._logits = s.feed(tokens[same:])
        return s


def check_same_tokenizer(draft, target) -> None:
    """Refuse, in one line, a draft model whose tokens mean something else."""
    a, b = draft.tokenizer, target.tokenizer
    va, vb = draft.config.vocab_size, target.config.vocab_size
    same = va == vb and (a is None) == (b is None)
    if same and a is not None:
        same = a.vocab_size == b.vocab_size and all(
            a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size))
    if not same:
        raise LlamanpError(f"the draft model {draft.path} has another tokenizer than the model "
                           f"(vocabulary {va} vs {vb} or different tokens); --draft needs a "
                           "model with the same tokenizer")


def make_drafter(spec: str, model, ngram: int = 3, max_draft: int = 8):
    """'lookup' or the path of a draft .lmw model."""
    if spec == "lookup":
        return PromptLookup(ngram, max_draft)
    from .model import load
    return DraftModel(load(spec), model, max_draft)


def rewind(session, n: int) -> None:
    """Forget every token of `session` from position n on (tokens and cache)."""
    if n < len(session.tokens):
        session.cache.truncate(n)
        del session.tokens[n:]


class SpeculativeGeneration(Generation):
    """Generation with proposals checked in batches; see the module doc.
    Same arguments as Generation plus `drafter`; no `choose` hook."""

    def __init__(self, *args, drafter, **kw):
        if kw.get("choose") is not None:
            raise LlamanpError("speculative decoding cannot take a choose hook "
                               "(--you-pick / --sampler-history); drop --draft")
        if kw.get("fill1"):
            raise LlamanpError("speculative decoding cannot run with --fill1; drop one of them")
        super().__init__(*args, **kw)
        require(self.session.cache, "speculative decoding", truncates=True)
        self.drafter = drafter
        self.k = drafter.max_draft    # proposals asked for, adapted as they fare
        old = self.stats
        self.stats = SpeculativeStats(prompt_tokens=old.prompt_tokens, draft=drafter.name)

    def _loop(self):
        s, st = self.session, self.stats
        if self.max_new_tokens == 0:
            st.stop_reason = "length"
            return
        t0 = self._t0 = time.perf_counter()
        logits = s.feed(self.prompt_ids)
        st.prefill_seconds = time.perf_counter() - t0
        st.prompt_computed = st.computed_tokens = s.computed
        forced = None      # a token already drawn (after a rejection), else draw from logits
        while True:
            if len(s.tokens) >= s.max_seq_len:
                st.stop_reason = "context"
                return
            step = self.sampler.step(logits, s.tokens)
            token = step.token if forced is None else forced
            self.sampler.accept(step, token)
            if (yield from self._emit(token, logits, self._t0)):
                return
            t1 = time.perf_counter()
            logits, forced = yield from self._speculate(token)
            st.decode_seconds += time.perf_counter() - t1
            st.computed_tokens = s.computed
            if logits is None:
                return

    def _speculate(self, token: int):
        """Feed `token` and the proposals after it in one pass, check them,
        yield the accepted ones; returns (logits of the next position, None)
        when all were accepted, (logits, forced token) after a rejection, or
        (None, None) when generation ended."""
        s, st = self.session, self.stats
        left = s.max_seq_len - len(s.tokens) - 1     # positions after `token`, plus one
        if self.max_new_tokens is not None:
            left = min(left, self.max_new_tokens - st.generated_tokens)
        drafts, qs = self.drafter.propose(s.tokens + [token], min(self.k,
                                                                   left - 1))
        drafts = drafts[:max(left - 1, 0)]
        base = len(s.tokens)
        rows = s.feed([token] + drafts, all_logits=True)
        if not drafts:
            return rows[-1], None
        st.proposed += len(drafts)
        st.verify_passes += 1
        for i, d in enumerate(drafts):
            step = self.sampler.step(rows[i], s.tokens[:base + 1 + i])
            q = None if qs is None else qs[i]
            if self._accepts(step.probs, q, d):
                st.accepted += 1
                self.sampler.accept(step, d)
                if (yield from self._emit(d, rows[i], self._t0)):
                    return None, None
                continue
            rewind(s, base + 1 + i)
            self._adapt(i, len(drafts))
            return rows[i], self._residual(step, q, d)
        self._adapt(len(drafts), len(drafts))
        return rows[len(drafts)], None

    def _adapt(self, accepted: int, proposed: int) -> None:
        """Ask for twice as many proposals after all were accepted, half as
        many (at least one) after none was: checking a proposal costs a row
        of every product, which a proposer that is often wrong wastes."""
        if accepted == proposed:
            self.k = min(self.drafter.max_draft, 2 * self.k)
        elif accepted == 0:
            self.k = max(1, self.k // 2)

    def _accepts(self, p: np.ndarray, q: Optional[np.ndarray], d: int) -> bool:
        """The acceptance test: with probability min(1, p(d) / q(d))."""
        ratio = p[d] if q is None else p[d] / q[d]
        if ratio >= 1:
            return True
        if self.sampler.temperature == 0:   # greedy: p is one-hot, the ratio 0 or 1
            return False
        return self.sampler.rng.random() < ratio

    def _residual(self, step: SamplingStep, q: Optional[np.ndarray], d: int) -> int:
        """The token after a rejection of d: a draw from norm(max(0, p - q))."""
        if q is None:
            q = np.zeros_like(step.probs)
            q[d] = 1.0
        rest = np.maximum(step.probs - q, 0.0)
        if self.sampler.temperature == 0 or rest.sum() <= 0:
            return step.token if self.sampler.temperature == 0 else int(np.argmax(step.probs))
        return self.sampler.draw(rest / rest.sum())

