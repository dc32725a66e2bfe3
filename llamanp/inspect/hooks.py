"""Named hook points on the forward pass, and the calls that use them.

Every intermediate value of Model.forward_batch has a stable name (the table
is in docs/inspect.md):

    embed
    blocks.{i}.resid_pre   attn_in   q  k  v   scores  pattern  z   attn_out
              resid_mid    mlp_in    gate  up  act  mlp_out  resid_post
    final_norm
    logits

A hook is a pair (name or predicate, fn). The forward pass calls
fn(value, name) with the array at that point; fn may return a replacement
of the same shape (or change the array in place), and the rest of the pass
uses it. The arrays are the forward pass's own (often reused buffers): a hook
that keeps one must copy it, as run_with_cache does.
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from typing import Callable, Iterable, Union

import numpy as np

from ..config import Config
from ..errors import LlamanpError

#: the hook points of each layer, in the order the forward pass reaches them
BLOCK_POINTS = ("resid_pre", "attn_in", "q", "k", "v", "scores", "pattern", "z", "attn_out",
                "resid_mid", "mlp_in", "gate", "up", "act", "mlp_out", "resid_post")

#: the points inside attention: hooking one of them runs that layer's
#: attention in the plain form below (reference_attention) instead of the
#: fused base-2 one, which never holds these arrays whole
ATTENTION_POINTS = ("scores", "pattern", "z")

Hook = tuple[Union[str, Callable[[str], bool]], Callable]


class HookError(LlamanpError):
    """A hook that cannot be registered or that failed, naming its hook point."""


def hook_names(config: Config) -> list[str]:
    """Every hook point of a model, in the order one forward pass reaches them."""
    return (["embed"]
            + [f"blocks.{i}.{p}" for i in range(config.n_layers) for p in BLOCK_POINTS]
            + ["final_norm", "logits"])


def check_name(name, names) -> str:
    """`name` if it is one of `names`; otherwise a HookError suggesting the
    nearest valid name."""
    if not isinstance(name, str):
        raise HookError(f"a hook point is named by a string or chosen by a predicate "
                        f"(a function of the name), not {type(name).__name__}")
    if name in names:
        return name
    layer, _, point = name.removeprefix("blocks.").partition(".")
    if name.startswith("blocks.") and layer.isdigit() and point in BLOCK_POINTS:
        n = sum(1 for n in names if n.endswith(".resid_pre"))
        raise HookError(f"unknown hook point {name!r}: the model has {n} layers "
                        f"(blocks.0 .. blocks.{n - 1})")
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else \
        " (see llamanp.inspect.hook_names(model.config))"
    raise HookError(f"unknown hook point {name!r}{hint}")


class HookSet:
    """Hooks resolved against one model's hook points: name -> [fn, ...].

    The forward pass tests `if hooks:` at each point, so an empty or absent
    set costs one truth test per point.
    """

    def __init__(self, config: Config, hooks: Iterable[Hook]):
        self.config = config
        names = hook_names(config)
        self.fns: dict[str, list] = defaultdict(list)
        for pair in hooks:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise HookError(f"each hook is a pair (name or predicate, fn), got {pair!r}")
            key, fn = pair
            if not callable(fn):
                raise HookError(f"the hook for {key!r} is not callable (got "
                                f"{type(fn).__name__}); give fn(value, name)")
            if callable(key):
                chosen = [n for n in names if key(n)]
                if not chosen:
                    raise HookError(f"the hook predicate {getattr(key, '__name__', key)!r} "
                                    "matches no hook point")
            else:
                chosen = [check_name(key, names)]
            for name in chosen:
                self.fns[name].append(fn)
        self.fns = dict(self.fns)
        self._inside = {i for i in range(config.n_layers)
                        if any(f"blocks.{i}.{p}" in self.fns for p in ATTENTION_POINTS)}

    @classmethod
    def of(cls, config: Config, hooks) -> "HookSet":
        """`hooks` as a HookSet (it may be one already, for this model's shape)."""
        if isinstance(hooks, HookSet):
            return hooks
        if isinstance(hooks, tuple) and len(hooks) == 2 and callable(hooks[1]):
            hooks = [hooks]      # a single (name, fn) pair
        return cls(config, hooks)

    def __bool__(self) -> bool:
        return bool(self.fns)

    def __call__(self, name: str, value: np.ndarray) -> None:
        """Call the hooks of point `name` on `value`; a replacement one returns
        is written into `value`, so the forward pass goes on with it."""
        for fn in self.fns.get(name, ()):
            try:
                out = fn(value, name)
            except Exception as e:
                raise HookError(f"the hook on {name} raised {type(e).__name__}: {e}") from e
            if out is not None and out is not value:
                value[...] = self._replacement(name, value, out)

    def block(self, layer: int, **values: np.ndarray) -> None:
        """Call the hooks of layer `layer`'s points: block(i, q=q, k=k, ...)."""
        for point, value in values.items():
            self(f"blocks.{layer}.{point}", value)

    @staticmethod
    def _replacement(name: str, value: np.ndarray, out) -> np.ndarray:
        try:
            out = np.asarray(out, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise HookError(f"the hook on {name} returned something that is not an array "
                            f"of numbers ({type(out).__name__}): {e}") from None
        if out.shape != value.shape:
            raise HookError(f"the hook on {name} returned shape {out.shape}, but {name} "
                            f"has shape {value.shape}; return an array of the same shape "
                            "(or None to keep the value)")
        return out

    # -- attention, shown ------------------------------------------------------------
    def inside_attention(self, layer: int) -> bool:
        """Whether a hook looks inside layer `layer`'s attention."""
        return layer in self._inside

    def attention(self, layer: int):
        """An attention function for layer `layer` (model.attention's signature)
        that calls the hooks on its scores, pattern and z."""
        def attend(q, keys, values, start, work=None, observe=None):
            return reference_attention(q, keys, values, lambda point, value:
                                       self(f"blocks.{layer}.{point}", value), observe)
        return attend


def as_array(held) -> np.ndarray:
    """Keys or values as a cache hands them to attention: a float32 array, or
    a reader of narrow storage (llamanp.kvcache.quantized), widened whole."""
    return held if isinstance(held, np.ndarray) else held.widen()


def softmax32(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32, each row shifted by its maximum
    (so -inf scores get weight 0)."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def reference_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                        hook: Callable[[str, np.ndarray], None], observe=None) -> np.ndarray:
    """Causal attention written out plainly, calling hook(point, value) on
    its insides: scores [heads, T, seen], pattern [heads, T, seen], z [T, heads, hd].

    q: [T, heads, hd], the block's queries; keys/values: [n_kv, hd, seen],
    everything the cache holds, in position order, the block's own T keys
    last. Query head h reads kv head h // group (as repeat_kv does). Scores
    are scaled and the future masked with -inf before a float32 softmax, as
    transformers' eager attention does. A KV cache that reads the weights
    gets them through `observe`, as model.attention shows them.
    """
    T, n_heads, hd = q.shape
    keys, values = as_array(keys), as_array(values)
    n_kv, _, seen = keys.shape
    group = n_heads // n_kv
    k = np.repeat(keys, group, axis=0)                       # [heads, hd, seen]
    v = np.repeat(values, group, axis=0)
    scores = np.matmul(q.transpose(1, 0, 2), k) * np.float32(1 / math.sqrt(hd))
    # the block's query t is the (seen - T + t)-th key: later keys are its future
    future = np.arange(seen)[None, :] > np.arange(seen - T, seen)[:, None]
    scores[:, future] = -np.inf
    hook("scores", scores)
    pattern = softmax32(scores)
    hook("pattern", pattern)
    if observe is not None:    # rows ordered (query, head of the group), sums of 1
        weights = pattern.reshape(n_kv, group, T, seen).transpose(0, 2, 1, 3)
        observe(weights.reshape(n_kv, T * group, seen), np.ones((n_kv, T * group), np.float32), 0)
    z = np.ascontiguousarray(np.matmul(pattern, v.transpose(0, 2, 1)).transpose(1, 0, 2))
    hook("z", z)
    return z.reshape(T, n_heads * hd)


# --- running with hooks -------------------------------------------------------------

def run_with_hooks(model, ids, hooks) -> np.ndarray:
    """The logits of every position of `ids` ([len(ids), vocab]), from one
    forward pass over them all (no cache) with `hooks` in place."""
    ids = list(ids)
    session = model.session("none", max_seq_len=max(len(ids), 1), hooks=hooks)
    return session.feed(ids, all_logits=True)


class Recorder:
    """A hook that keeps a copy of every value it is called with:
    `.values[name]` is the list of them, one per forward pass, in order."""

    def __init__(self):
        self.values: dict[str, list] = defaultdict(list)

    def __call__(self, value: np.ndarray, name: str) -> None:
        self.values[name].append(value.copy())


class Activations(dict):
    """{hook point: array}; a missing name suggests the nearest recorded one."""

    def __missing__(self, name):
        near = difflib.get_close_matches(str(name), list(self), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"{name!r} was not recorded{hint}")


def run_with_cache(model, ids, names=None, hooks=()) -> tuple[np.ndarray, Activations]:
    """(logits [len(ids), vocab], {name: copy of its value}) from one forward
    pass. `names`: None for every hook point, a list of names, or a predicate.
    `hooks` run first, so the values recorded are the ones the pass went on with."""
    if names is None:
        wanted = [(lambda name: True, None)]
    elif callable(names):
        wanted = [(names, None)]
    elif isinstance(names, str):
        wanted = [(names, None)]
    else:
        wanted = [(n, None) for n in names]
    rec = Recorder()
    logits = run_with_hooks(model, ids, [*hooks, *((key, rec) for key, _ in wanted)])
    return logits, Activations((name, vals[0]) for name, vals in rec.values.items())


def read_cache(session) -> list[tuple[np.ndarray, np.ndarray]]:
    """The keys and values a session's KV cache holds, per layer: a list of
    (keys, values), each a float32 copy shaped [positions, n_kv_heads, head_dim]
    (as the hook points k and v are), in the order the cache hands them to
    attention: position order for the exact strategies (and paged); a strategy
    that evicts holds fewer, see its positions(layer). The "none" strategy
    holds nothing (positions = 0)."""
    cfg = session.model.config
    empty = np.zeros((0, cfg.n_kv_heads, cfg.head_dim), np.float32)
    out = []
    for layer in range(cfg.n_layers):
        # adding no positions returns what is held, and changes nothing
        keys, values = (as_array(a) for a in session.cache.update(layer, empty, empty))
        out.append((np.array(keys.transpose(2, 0, 1)), np.array(values.transpose(2, 0, 1))))
    return out
