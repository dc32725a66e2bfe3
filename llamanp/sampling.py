"""Choosing the next token from the logits.

The pipeline, in llama.cpp's order:

1. penalties on the tokens seen in the last `repeat_last_n` of the history
   (prompt + generated): repetition (CTRL: divide a positive logit by the
   penalty, multiply a negative one), frequency (subtract count * f) and
   presence (subtract p once);
2. temperature: divide by T. T = 0 means greedy: argmax of the penalised
   logits, nothing below applies;
3. truncation, one of
   - top-k, then top-p (nucleus), then min-p (keep p >= min_p * p_max), or
   - Mirostat v1 or v2, which choose their own truncation so that the
     surprise (-log2 p) of the chosen tokens averages tau;
4. a draw from what is left, with a seeded numpy Generator (reproducible).

A Sampler is called as ``sampler(logits, history)``. Callers that want to see
or override the choice (``--you-pick``) split that into :meth:`Sampler.step`,
which returns the distribution and the sampler's pick, and
:meth:`Sampler.accept`, which commits the token actually used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional, Sequence

import numpy as np

from .errors import LlamanpError

MIROSTAT_M = 100   # Mirostat v1 estimates the Zipf exponent from the top m probabilities


# -- temperature ---------------------------------------------------------------------

def scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature, the softmax's input.

    A tiny temperature (1e-320, say) overflows the division to infinities,
    and softmax(inf - inf) is NaN. Shifted so that the largest is 0 first, the
    logits divide into 0 for the top and -inf for the far ones, the same
    softmax and its correct limit: greedy as temperature -> 0. The shift is
    made only then, so ordinary temperatures keep their exact numbers.
    """
    with np.errstate(over="ignore"):
        z = logits / temperature
        if not np.isfinite(z).all() and np.isfinite(logits).all():
            z = (logits - logits.max()) / temperature
    return z


# -- validation ----------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def check_sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, repetition_penalty: float = 1.0,
                   frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   repeat_last_n: int = 64, mirostat: int = 0, mirostat_tau: float = 5.0,
                   mirostat_eta: float = 0.1) -> None:
    """Refuse values that have no meaning, with a line that says why."""
    if not (_is_number(temperature) and temperature >= 0):
        raise LlamanpError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if not (_is_int(top_k) and top_k >= 0):
        raise LlamanpError(f"top-k must be an integer >= 0 (0 = off), got {top_k}")
    if not (_is_number(top_p) and 0 < top_p <= 1):
        raise LlamanpError(f"top-p must be in (0, 1] (1 = off), got {top_p}")
    if not (_is_number(min_p) and 0 <= min_p <= 1):
        raise LlamanpError(f"min-p must be in [0, 1] (0 = off), got {min_p}")
    if not (_is_number(repetition_penalty) and repetition_penalty > 0):
        raise LlamanpError(f"repetition penalty must be a number > 0 (1 = off), "
                           f"got {repetition_penalty}")
    for name, value in (("frequency", frequency_penalty), ("presence", presence_penalty)):
        if not _is_number(value):
            raise LlamanpError(f"{name} penalty must be a finite number (0 = off), got {value}")
    if not (_is_int(repeat_last_n) and repeat_last_n >= -1):
        raise LlamanpError(f"repeat-last-n must be an integer >= -1 (-1 = the whole history, "
                           f"0 = no penalties), got {repeat_last_n}")
    if not (_is_int(mirostat) and mirostat in (0, 1, 2)):
        raise LlamanpError(f"mirostat must be 0 (off), 1 or 2 (the version), got {mirostat}")
    for name, value in (("tau", mirostat_tau), ("eta", mirostat_eta)):
        if not (_is_number(value) and value > 0):
            raise LlamanpError(f"mirostat {name} must be a number > 0, got {value}")


# -- the steps of the pipeline, one function each --------------------------------------

def apply_penalties(logits: np.ndarray, window: Sequence[int], repetition: float = 1.0,
                    frequency: float = 0.0, presence: float = 0.0) -> np.ndarray:
    """Penalised copy (float64) of `logits` for the tokens that occur in `window`.

    Each token seen c > 0 times: l -> l / r if l > 0 else l * r (both push it
    down for r > 1), then l -> l - c * frequency - presence.
    """
    z = np.array(logits, dtype=np.float64)
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    if ids.size == 0:
        return z
    if ids[0] < 0 or ids[-1] >= len(z):
        raise LlamanpError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} in the history is "
                           f"outside the vocabulary (0..{len(z) - 1})")
    seen = z[ids]
    seen = np.where(seen > 0, seen / repetition, seen * repetition)
    z[ids] = seen - counts * frequency - presence
    return z


def softmax(z: np.ndarray) -> np.ndarray:
    """exp(z) normalised; -inf entries get probability 0."""
    e = np.exp(z - np.max(z))
    return e / e.sum()


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log of softmax(z), computed without exp overflow (float64)."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - np.max(z)
    return shifted - math.log(np.exp(shifted).sum())


def descending(z: np.ndarray, k: int = 0) -> np.ndarray:
    """Token ids by decreasing z (ties: lower id first); only the first k if k > 0."""
    if 0 < k < len(z):
        ids = np.argpartition(-z, k - 1)[:k]      # the k largest, unordered: O(vocab)
        return ids[np.lexsort((ids, -z[ids]))]
    return np.argsort(-z, kind="stable")


def top_p_count(p_sorted: np.ndarray, top_p: float) -> int:
    """How many of the (descending) probabilities form the smallest prefix whose
    mass reaches top_p; at least one."""
    if top_p >= 1.0:
        return len(p_sorted)
    cum = np.cumsum(p_sorted) / p_sorted.sum()
    return min(int(np.searchsorted(cum, top_p)) + 1, len(p_sorted))


def min_p_count(p_sorted: np.ndarray, min_p: float) -> int:
    """How many of the (descending) probabilities are >= min_p * the largest."""
    return max(int(np.count_nonzero(p_sorted >= min_p * p_sorted[0])), 1)


def mirostat_v1_k(logp_sorted: np.ndarray, mu: float, n_vocab: int,
                  m: int = MIROSTAT_M) -> int:
    """Mirostat v1's k: how many top tokens to keep for a target surprise mu.

    The top m probabilities are assumed Zipfian, p_i ~ i^-s. The exponent is
    fitted by least squares through the origin on successive ratios:
    s_hat = sum t_i b_i / sum t_i^2 with t_i = ln((i+1)/i), b_i = ln(p_i/p_{i+1}).
    Then k = (eps 2^mu / (1 - N^-eps))^(1/s_hat) with eps = s_hat - 1.
    """
    # only tokens that can be drawn: a tiny temperature leaves zeros (log -inf)
    n = int(np.isfinite(logp_sorted[:m]).sum())
    i = np.arange(1, n, dtype=np.float64)                    # ranks 1..n-1
    t = np.log((i + 1) / i)
    b = logp_sorted[:n - 1] - logp_sorted[1:n]
    s_hat = float(t @ b / (t @ t)) if n > 1 else 0.0
    if s_hat <= 1e-12:                                       # flat: no truncation
        return n_vocab
    eps = s_hat - 1
    # eps / (1 - N^-eps), which tends to 1 / ln N as eps -> 0
    log_n = math.log(n_vocab)
    ratio = 1 / log_n if abs(eps) < 1e-12 else eps / -math.expm1(-eps * log_n)
    log_k = (math.log(ratio) + mu * math.log(2)) / s_hat
    if log_k >= math.log(n_vocab):
        return n_vocab
    return max(int(math.exp(log_k)), 1)


def one_hot(size: int, index: int) -> np.ndarray:
    p = np.zeros(size)
    p[index] = 1.0
    return p


# -- the sampler --------------------------------------------------------------------

@dataclass
class SamplingStep:
    """What the sampler saw and decided at one position."""
    logits: np.ndarray        # the model's logits, as given
    adjusted: np.ndarray      # after penalties (float64): the ranking every filter uses
    probs: np.ndarray         # the distribution drawn from; 0 = filtered out
    token: int                # the sampler's pick

    def top(self, n: int) -> list[int]:
        """The n best tokens by the adjusted logits, best first."""
        return [int(i) for i in descending(self.adjusted, n)]


class Sampler:
    """Penalties, temperature, truncation and a seeded draw; see the module doc.

    The first four arguments keep their historical order
    (``Sampler(temperature, top_k, top_p, seed)``); the rest are keywords.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, *, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, repeat_last_n: int = 64, mirostat: int = 0,
                 mirostat_tau: float = 5.0, mirostat_eta: float = 0.1):
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty,
                       frequency_penalty, presence_penalty, repeat_last_n, mirostat,
                       mirostat_tau, mirostat_eta)
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.repeat_last_n = repeat_last_n
        self.mirostat, self.tau, self.eta = mirostat, mirostat_tau, mirostat_eta
        self.mu = 2.0 * mirostat_tau      # Mirostat's running surprise bound, as in the paper
        self.rng = np.random.default_rng(seed)

    # -- the usual entry point --------------------------------------------------------
    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token after `history` (prompt + generated ids so far)."""
        step = self.step(logits, history)
        self.accept(step, step.token)
        return step.token

    # -- the same, in two halves ------------------------------------------------------
    def step(self, logits: np.ndarray, history: Sequence[int] = ()) -> SamplingStep:
        """The distribution and the sampler's pick; state is unchanged until accept()."""
        adjusted, probs = self.distribution(logits, history)
        return SamplingStep(logits, adjusted, probs, self.draw(probs))

    def accept(self, step: SamplingStep, token: int) -> None:
        """Commit `token` as the one used: Mirostat moves mu towards the target
        surprise, mu -= eta * (surprise - tau). A token the sampler had ruled
        out (chosen by hand) teaches it nothing and leaves mu alone."""
        p = step.probs[token]
        if self.mirostat and self.temperature > 0 and p > 0:
            self.mu -= self.eta * (-math.log2(p) - self.tau)

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()):
        """(penalised logits, probabilities to draw from); no randomness used."""
        adjusted = apply_penalties(logits, self.penalty_window(history), self.repetition_penalty,
                                   self.frequency_penalty, self.presence_penalty)
        if self.temperature == 0:
            return adjusted, one_hot(len(adjusted), int(np.argmax(adjusted)))
        z = scaled(adjusted, self.temperature)
        if self.mirostat == 1:
            return adjusted, self.mirostat_v1(z)
        if self.mirostat == 2:
            return adjusted, self.mirostat_v2(z)
        return adjusted, self.truncated(z)

    def probabilities(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The distribution the draw is made from (zeros for filtered tokens)."""
        return self.distribution(logits, history)[1]

    def draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw over the surviving tokens.

        Exactly one uniform number per call, even when one token is left, so
        that the n-th token of a seeded run always uses the n-th number.
        """
        ids = np.flatnonzero(probs)
        cdf = np.cumsum(probs[ids])
        r = self.rng.random() * cdf[-1]
        return int(ids[min(np.searchsorted(cdf, r, side="right"), len(ids) - 1)])

    # -- the pieces --------------------------------------------------------------------
    def penalty_window(self, history: Sequence[int]) -> Sequence[int]:
        """The last repeat_last_n tokens of the history (-1: all of it, 0: none)."""
        if self.repeat_last_n == 0 or not self._penalises():
            return ()
        return history if self.repeat_last_n < 0 else history[-self.repeat_last_n:]

    def _penalises(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    def truncated(self, z: np.ndarray) -> np.ndarray:
        """softmax(z) cut by top-k, then top-p, then min-p, renormalised.

        All three keep a prefix of the tokens sorted by z, so the cut is one
        length; top-p measures mass after top-k, min-p compares with the top.
        """
        order = descending(z, self.top_k)
        p_sorted = softmax(z[order])          # renormalised over the top-k already
        n = top_p_count(p_sorted, self.top_p)
        n = min(n, min_p_count(p_sorted[:n], self.min_p)) if self.min_p > 0 else n
        return self._keep(len(z), order[:n], p_sorted[:n])

    def mirostat_v2(self, z: np.ndarray) -> np.ndarray:
        """Keep the tokens whose surprise -log2 p is at most mu (at least the best one)."""
        logp = log_softmax(z)
        keep = np.flatnonzero(-logp / math.log(2) <= self.mu)
        if keep.size == 0:
            keep = np.array([int(np.argmax(z))])
        return self._keep(len(z), keep, np.exp(logp[keep]))

    def mirostat_v1(self, z: np.ndarray) -> np.ndarray:
        """Keep the top k tokens, k from the Zipf fit of the top m (mirostat_v1_k)."""
        logp = log_softmax(z)
        top_m = descending(logp, MIROSTAT_M)
        k = mirostat_v1_k(logp[top_m], self.mu, len(z))
        keep = top_m[:k] if k <= len(top_m) else descending(logp, k)
        return self._keep(len(z), keep, np.exp(logp[keep]))

    @staticmethod
    def _keep(size: int, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A full-vocabulary distribution: `weights` renormalised on `ids`, 0 elsewhere."""
        p = np.zeros(size)
        p[ids] = weights / weights.sum()
        return p
