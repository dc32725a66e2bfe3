"""Choosing the next token from the logits.

The usual pipeline, in the usual order: temperature, then top-k, then top-p
(nucleus), then a draw from what is left. Temperature 0 means greedy (argmax).
The random generator is seeded, so a run with a fixed seed is reproducible.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import LlamanpError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Refuse values that have no meaning, with a line that says why."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise LlamanpError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise LlamanpError(f"top-k must be an integer >= 0 (0 = off), got {top_k}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise LlamanpError(f"top-p must be in (0, 1] (1 = off), got {top_p}")


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        probs = self.probabilities(logits)
        # inverse-CDF draw over the surviving tokens
        ids = np.flatnonzero(probs)
        cdf = np.cumsum(probs[ids])
        r = self.rng.random() * cdf[-1]
        return int(ids[min(np.searchsorted(cdf, r, side="right"), len(ids) - 1)])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution the draw is made from (zeros for filtered tokens)."""
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < len(z):
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            n_keep = int(np.searchsorted(cum, self.top_p)) + 1
            keep = np.zeros_like(p, dtype=bool)
            keep[order[:n_keep]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return p
