"""Eviction: keep at most `size` positions per layer, chosen by a rule.

Every strategy here holds its positions in the slots of a Store (held.py),
so each also takes dtype= (f32, f16, bf16, q8_0, q4_0): bytes per position
are the storage's (see quantized.py) plus 8 for the position index and, for
the scored ones, 4 for the score. `size` is the budget: the total number of
positions kept per layer, sinks, heavy hitters and recent window all counted
in it. Eviction happens after each forward call (advance), so a prefill chunk
always sees all of its own positions and the budget holds again before the
next call; a prompt fed in one call and fed one token at a time (--fill1)
differ by exactly that rule. Decisions are per layer (scores are summed over
the layer's heads), not per head.
"""

from __future__ import annotations

import copy

import numpy as np

from .base import Param, register
from .held import HeldCache
from .quantized import DTYPES

BUDGET = {"size": Param(256, "positions kept per layer"),
          "dtype": Param("f32", "storage", DTYPES)}


class Evicting(HeldCache):
    """A HeldCache with a budget: drop()/drop_all() say which slots go."""

    params = BUDGET
    exact = False
    truncates = False

    def __init__(self, config, max_seq_len, **options):
        self.size = options["size"]
        super().__init__(config, max_seq_len, **options)

    def oldest(self, n: int, keep_first: int = 0) -> np.ndarray:
        """The slots of the n oldest positions, the first keep_first positions
        excepted (every layer holds the same positions)."""
        p = self.pos[0, :self.held]
        return np.flatnonzero((p >= keep_first) & (p < keep_first + self.evicted_so_far + n))

    @property
    def evicted_so_far(self) -> int:
        return self.length - self.held


@register
class Window(Evicting):
    """The last `size` positions: a sliding window (Longformer / Mistral's
    sliding-window attention, as a cache; Beltagy et al. 2020). Loses the
    first tokens, which attention leans on heavily (see sinks)."""

    name = "window"

    def drop_all(self, n):
        return self.oldest(n)


@register
class Sinks(Evicting):
    """The first `sinks` positions plus the most recent ones (StreamingLLM:
    Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks"): the first tokens soak up attention whatever they say, and
    keeping them keeps the softmax's mass where the model expects it.

    shift=1 gives the kept keys their positions inside the cache, as the
    paper does: the sinks at 0..sinks-1, the window right after them, the
    query next. Relative distances are all RoPE sees, and the window's are
    already right (it is contiguous and ends just before the query), so only
    the sinks move: after d positions were evicted each sink key is rotated
    on by d positions, from a copy kept of the original (float32 storage only).
    """

    name = "sinks"
    params = dict(BUDGET, sinks=Param(4, "first positions kept"),
                  shift=Param("0", "1 = positions inside the cache", ("0", "1")))

    @staticmethod
    def check(o):
        if o["size"] <= o["sinks"]:
            return (f"the budget size={o['size']} must be larger than sinks={o['sinks']} "
                    "(it counts the sinks and the recent window)")
        if o["shift"] == "1" and o["dtype"] != "f32":
            return (f"shift=1 re-rotates the sink keys after every eviction and cannot do "
                    f"that in dtype={o['dtype']} storage; use dtype=f32 or shift=0")
        return None

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.sinks, self.shift = options["sinks"], options["shift"] == "1"
        self.sink_keys = None   # the sinks' keys as first stored (shift=1)
        if self.shift:
            from ..model import rope_frequencies  # (model imports this package)
            self.freqs = rope_frequencies(config.head_dim, config.rope_theta,
                                          config.rope_scaling)

    def drop_all(self, n):
        return self.oldest(n, keep_first=self.sinks)

    def evicted(self, n):
        if self.shift:
            self.rotate_sinks(self.evicted_so_far)

    def rotate_sinks(self, d: int) -> None:
        """Rotate the sink keys (slots 0..sinks-1) to their original
        positions + d: each interleaved pair (a, b) of head_dim turns by
        d x its frequency, as model.apply_rope does."""
        keys = self.store.planes["k"][..., :self.sinks]         # [L, n_kv, hd, sinks]
        if self.sink_keys is None:
            self.sink_keys = keys.copy()
        angle = d * self.freqs
        cos = np.cos(angle).astype(np.float32)[:, None]
        sin = np.sin(angle).astype(np.float32)[:, None]
        a, b = self.sink_keys[:, :, 0::2], self.sink_keys[:, :, 1::2]
        keys[:, :, 0::2] = a * cos - b * sin
        keys[:, :, 1::2] = a * sin + b * cos

    def reset(self):
        super().reset()
        self.sink_keys = None


class Scored(Evicting):
    """Drops, in each layer, the lowest-scored slots (all layers at once);
    `score` [n_layers, capacity] moves with the slots."""

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.score = np.zeros((config.n_layers, self.store.capacity), np.float32)

    def slot_names(self):
        return super().slot_names() + ["score"]

    def protected(self):
        """A [n_layers, held] mask of slots never dropped, or None."""
        return None

    def choose(self, n):
        s = self.score[:, :self.held].copy()
        keep = self.protected()
        if keep is not None:
            s[keep] = np.inf
        return np.argpartition(s, n - 1, axis=1)[:, :n]

    def reset(self):
        super().reset()
        self.score[:] = 0


def attention_received(weights, sums) -> np.ndarray:
    """The attention each key received, [seen], summed over the rows
    (queries x heads) of weights [n_kv, rows, seen] normalised by sums."""
    return np.matmul((1 / sums)[:, None, :], weights).sum(axis=(0, 1))


@register
class H2O(Scored):
    """Heavy hitters plus a recent window (Zhang et al. 2023, "H2O: Heavy-Hitter
    Oracle for Efficient Generative Inference of Large Language Models"): each
    position's attention, accumulated over every query so far, marks the few
    that matter; the last `recent` positions are always kept, the other
    size - recent slots go to the heaviest hitters."""

    name = "h2o"
    params = dict(BUDGET, recent=Param(None, "recent window kept, default size/2", low=0))
    wants_weights = True

    @staticmethod
    def check(o):
        if o["recent"] is not None and o["recent"] > o["size"]:
            return f"recent={o['recent']} must be at most size={o['size']} (it counts in it)"
        return None

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.recent = options["recent"] if options["recent"] is not None else self.size // 2

    def observe(self, layer, weights, sums, first, total):
        self.score[layer, :weights.shape[-1]] += attention_received(weights, sums)

    def protected(self):
        return self.pos[:, :self.held] >= self.length - self.recent


@register
class TOVA(Scored):
    """Token Omission Via Attention (Oren et al. 2024, "Transformers are
    Multi-State RNNs"): drop the positions the newest query attends to least
    (averaged over the layer's heads); no window, no history."""

    name = "tova"
    wants_weights = True

    def observe(self, layer, weights, sums, first, total):
        group = self.config.n_heads // self.config.n_kv_heads
        if first + weights.shape[1] // group == total:     # the block of the last query
            last = weights[:, -group:] / sums[:, -group:, None]
            self.score[layer, :weights.shape[-1]] = last.mean(axis=(0, 1))


@register
class KNorm(Scored):
    """Keep the keys of lowest L2 norm (Devoto et al. 2024, "A Simple and
    Effective L2 Norm-Based Strategy for KV Cache Compression"): a low-norm
    key draws high attention, so its norm predicts its importance without
    looking at any attention weight."""

    name = "knorm"

    def stored(self, layer, lo, k):
        self.score[layer, lo:lo + len(k)] = -np.linalg.norm(k, axis=2).mean(axis=1)


@register
class Random(Evicting):
    """Drop random positions (seeded): the baseline every rule must beat."""

    name = "random"
    params = dict(BUDGET, seed=Param(0, "random seed", low=0))

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.rng = np.random.default_rng(options["seed"])

    def choose(self, n):
        draw = self.rng.random((self.config.n_layers, self.held))
        return np.argpartition(draw, n - 1, axis=1)[:, :n]

    def copy(self):
        twin = super().copy()
        twin.rng = copy.deepcopy(self.rng)
        return twin


@register
class SnapKV(Scored):
    """Compress the prompt once, by what its end looks at (Li et al. 2024,
    "SnapKV: LLM Knows What You are Looking for Before Generation"): the last
    `window` queries of a prompt vote for the positions they attend to; the
    votes are pooled over `kernel` neighbours (a max pool, so a kept position
    brings its context) and the top size - window positions are kept with the
    window itself. Decoding appends without evicting, as in the paper, so
    `size` bounds what the prompt keeps.

    When: after each forward call of more than one token (a prompt, or a
    prompt chunk: Session feeds prompts in chunks of 512) that leaves more than
    `size` positions; single-token calls (decoding, --fill1) never evict.
    """

    name = "snapkv"
    params = dict(BUDGET, window=Param(32, "voting queries"),
                  kernel=Param(7, "pooling width, odd"))
    wants_weights = True

    @staticmethod
    def check(o):
        if o["kernel"] % 2 == 0:
            return f"kernel={o['kernel']} must be odd (a window centred on each position)"
        if o["window"] >= o["size"]:
            return f"the budget size={o['size']} must be larger than window={o['window']}"
        return None

    def __init__(self, config, max_seq_len, **options):
        super().__init__(config, max_seq_len, **options)
        self.window, self.kernel = options["window"], options["kernel"]
        self.window_now = self.window   # the voting queries of the last call

    def observe(self, layer, weights, sums, first, total):
        group = self.config.n_heads // self.config.n_kv_heads
        voters = max(0, total - self.window - first) * group   # rows before the window
        if voters < weights.shape[1]:
            self.score[layer, :weights.shape[-1]] += attention_received(
                weights[:, voters:], sums[:, voters:])

    def advance(self, n):
        self.length += n
        self.held += n
        if n > 1 and self.held > self.size:
            self.window_now = min(self.window, n)
            self.evict(self.held - self.size)
        self.score[:, :self.held] = 0

    def choose(self, n):
        return np.stack([self.drop(layer, n) for layer in range(self.config.n_layers)])

    def drop(self, layer, n):
        p = self.pos[layer, :self.held]
        order = np.argsort(p)
        votes = self.score[layer, order]
        r = self.kernel // 2
        padded = np.pad(votes, r, constant_values=-np.inf)
        pooled = np.lib.stride_tricks.sliding_window_view(padded, self.kernel).max(axis=1)
        pooled[len(p) - self.window_now:] = np.inf          # the window itself stays
        return order[np.argpartition(pooled, n - 1)[:n]]
