"""Beam search: the most likely continuations, found by keeping K live prefixes.

At every step each live beam is extended by every token; the extensions are
walked best first by total log-probability. One that ends in a stop id is a
finished hypothesis; the others become the next live beams, until there are
K of them. A beam still live after `max_new_tokens` (or at a full context)
finishes there.

Finished hypotheses are ranked, as transformers ranks them, by

    score = logprob / length ** length_penalty

(length counts the continuation's tokens, its stop token included):
length_penalty > 0 favours longer sequences, < 0 shorter ones, 0 ranks by
plain log-probability. With K = 1 and no stop token this is greedy decoding.

Early stopping is exact: the search ends once K hypotheses are finished and no
live beam can still beat the K-th. A continuation's log-probability can only
fall, so a live beam with logprob S at length L can at best score
S / max_len ** lp (lp > 0, the longest it can get) or S / (L + 1) ** lp
(lp <= 0, the shortest). The result is the same as without early stopping;
only the work differs. (transformers' early_stopping=True stops at the first
K finished, which can miss better ones.)

Every beam has its own Session; when one prefix is kept with several next
tokens its cache is forked (copied), the prefixes dropped are freed. With the
`paged` cache a fork copies only the block table: the beams share the
prompt's blocks, and a block is copied only when a beam writes into a shared
one. The result's `.stats.peak_kv_bytes` says what the live beams held at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

import numpy as np

from .errors import LlamanpError
from .kvcache.paged import held_nbytes
from .model import Model, Session
from .sampling import descending, log_softmax

#: the most beams a search may keep: each is a forked KV cache and a row of
#: every matrix product, so a million of them only runs out of memory
MAX_BEAMS = 64


class Beam(NamedTuple):
    """A finished hypothesis: `ids` continue the prompt (ending with the stop id
    if it stopped at one); `logprob` = sum of log p(ids[i] | prompt, ids[:i])."""
    ids: list
    logprob: float


@dataclass
class BeamStats:
    steps: int = 0               # tokens appended to the live beams
    peak_kv_bytes: int = 0       # the most the live beams' caches held (shared blocks once)


class BeamResult(list):
    """The best Beams, best first, plus `.stats` (a BeamStats)."""
    stats: BeamStats


def beam_score(logprob: float, length: int, length_penalty: float) -> float:
    """The ranking score: log-probability per length ** length_penalty."""
    return logprob / max(length, 1) ** length_penalty


@dataclass
class _Live:
    ids: list
    logprob: float
    session: Session
    logits: np.ndarray       # the model's next-token logits after ids


class _Finished:
    """The best K finished hypotheses so far, by score (ties: first found first)."""

    def __init__(self, k: int, length_penalty: float):
        self.k, self.length_penalty = k, length_penalty
        self.entries: list[tuple[float, int, Beam]] = []
        self._count = 0

    def add(self, beam: Beam) -> None:
        score = beam_score(beam.logprob, len(beam.ids), self.length_penalty)
        self._count += 1
        self.entries.append((score, self._count, beam))
        self.entries.sort(key=lambda e: (-e[0], e[1]))
        del self.entries[self.k:]

    def full(self) -> bool:
        return len(self.entries) >= self.k

    def worst_score(self) -> float:
        return self.entries[-1][0]

    def beams(self) -> list[Beam]:
        return [b for _, _, b in self.entries]


def best_reachable_score(logprob: float, length: int, max_length: int,
                         length_penalty: float) -> float:
    """An upper bound on the score of any finished continuation of a live beam
    (logprob at `length` tokens, at most `max_length` in the end)."""
    shortest, longest = min(length + 1, max_length), max_length
    return logprob / (longest if length_penalty > 0 else shortest) ** length_penalty


def check_beam_args(beams, max_new_tokens, length_penalty) -> None:
    if not (isinstance(beams, int) and not isinstance(beams, bool) and 1 <= beams <= MAX_BEAMS):
        raise LlamanpError(f"the number of beams must be an integer from 1 to {MAX_BEAMS}, "
                           f"got {beams}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise LlamanpError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    if not (isinstance(length_penalty, (int, float)) and math.isfinite(length_penalty)):
        raise LlamanpError(f"length penalty must be a finite number (0 = rank by "
                           f"log-probability), got {length_penalty}")


def beam_search(model: Model, ids, beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, early_stopping: bool = True,
                stop_ids: Optional[Iterable[int]] = None, kvcache: str = "inplace",
                max_seq_len: Optional[int] = None) -> BeamResult:
    """The `beams` best continuations of `ids`, best first, as Beam(ids, logprob).

    `stop_ids` default to the tokenizer's end-of-sequence ids (() = none).
    """
    check_beam_args(beams, max_new_tokens, length_penalty)
    prompt = [int(i) for i in ids]
    if not prompt:
        raise LlamanpError("the prompt is empty; give at least one token")
    session = model.session(kvcache, max_seq_len)
    room = session.max_seq_len - len(prompt)
    if room < 0:
        raise LlamanpError(f"the prompt is {len(prompt)} tokens but the context is "
                           f"{session.max_seq_len}; shorten the prompt or raise the "
                           "sequence length")
    if stop_ids is None:
        stop_ids = model.tokenizer.stop_ids if model.tokenizer is not None else ()
    stop = frozenset(int(i) for i in stop_ids)
    max_length = min(max_new_tokens, room)
    stats = BeamStats()
    if max_length == 0:
        result = BeamResult([Beam([], 0.0)])
        result.stats = stats
        return result

    finished = _Finished(beams, length_penalty)
    live = [_Live([], 0.0, session, session.feed(prompt))]
    stats.peak_kv_bytes = session.cache.nbytes
    for length in range(1, max_length + 1):
        chosen = extend(live, beams, stop, finished)
        if length == max_length or not chosen:
            for parent, token, logprob in chosen:   # out of room: finished as they are
                finished.add(Beam(live[parent].ids + [token], logprob))
            break
        if early_stopping and finished.full() and best_reachable_score(
                chosen[0][2], length, max_length, length_penalty) <= finished.worst_score():
            break
        live = advance(live, chosen)
        stats.steps += 1
        stats.peak_kv_bytes = max(stats.peak_kv_bytes,
                                  held_nbytes([b.session.cache for b in live]))
    result = BeamResult(finished.beams())
    result.stats = stats
    return result


def extend(live: list[_Live], k: int, stop: frozenset, finished: _Finished):
    """Walk the one-token extensions of the live beams best first: stopped ones
    go to `finished`; returns the best k others as (parent index, token, logprob)."""
    total = np.stack([b.logprob + log_softmax(b.logits) for b in live])   # [beams, vocab]
    vocab = total.shape[1]
    # at most k live ones are wanted, and each beam has at most len(stop) stop tokens
    flat = descending(total.ravel(), k + len(live) * len(stop))
    chosen = []
    for f in flat:
        parent, token = divmod(int(f), vocab)
        logprob = float(total[parent, token])
        if token in stop:
            finished.add(Beam(live[parent].ids + [token], logprob))
            continue
        chosen.append((parent, token, logprob))
        if len(chosen) == k:
            break
    return chosen


def advance(live: list[_Live], chosen) -> list[_Live]:
    """Feed each chosen token to (a fork of) its parent's session.

    The first child of a parent takes over its session; further children get
    forks, made before anything is fed so that they start from the parent.
    """
    sessions: dict[int, list[Session]] = {}
    for parent, _, _ in chosen:
        if parent in sessions:
            sessions[parent].append(live[parent].session.fork())
        else:
            sessions[parent] = [live[parent].session]
    nxt = []
    for parent, token, logprob in chosen:
        s = sessions[parent].pop()
        nxt.append(_Live(live[parent].ids + [token], logprob, s, s.feed([token])))
    return nxt
