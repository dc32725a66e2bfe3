"""The interface every KV-cache strategy implements, and its spec strings.

A strategy is one small KVCache subclass. The model talks to it at four points
of a forward call over T new tokens:

    keys, values = cache.update(layer, k, v)   # per layer: store, then read
    cache.observe(layer, weights, sums, ...)   # per layer, only if wants_weights
    cache.advance(T)                           # once, after every layer ran

`update` takes the T new keys and values as the projections give them,
[T, n_kv_heads, head_dim], and returns what attention reads: keys and values
[n_kv_heads, head_dim, n_held], the T new ones LAST, so that the causal mask
only has to cover the block's own last T keys. The others (the positions the
cache still holds) may come in any order: attention does not care. They are
float32 arrays, or, for caches that store fewer bits, readers that widen a
block of positions at a time (see quantized.Stored). Attention is told how
many keys came before the block (n_held - T); RoPE uses the true positions.

Eviction happens in `advance`, after the forward call: a prefill chunk always
sees all of its own positions, and the budget holds again before the next
call. So a prompt fed in one call and the same prompt fed one token at a time
(--fill1) differ only by that rule.

A spec string picks a strategy and its options, e.g. "inplace",
"sinks:size=512,sinks=4", "h2o:size=256,recent=64,dtype=q8_0". Each class
declares the keys it takes in `params`; make_cache parses, checks (one clear
error line listing what is allowed) and builds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import LlamanpError

#: name -> strategy class, filled by @register (iterating gives the names)
STRATEGIES: dict[str, type] = {}


def register(cls):
    """Make a KVCache subclass selectable by its `name` in spec strings."""
    STRATEGIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Param:
    """One key a strategy's spec accepts: an integer >= `low`, or one of
    `choices`, with a default and a few words of help."""
    default: object
    help: str = ""
    choices: tuple = ()
    low: int = 1

    def parse(self, text: str):
        if self.choices:
            if text in self.choices:
                return text
        elif text.isdigit() and int(text) >= self.low:
            return int(text)
        raise ValueError

    def allowed(self) -> str:
        return "|".join(self.choices) if self.choices else f"an integer >= {self.low}"

    def describe(self, key: str) -> str:
        what = "|".join(self.choices) if self.choices else "N"
        extra = f"{self.help}, " if self.help else ""
        default = "none" if self.default is None else self.default
        return f"{key}={what} ({extra}default {default})"


class KVCache:
    """What the model needs from a KV cache (see the module docstring).

    Subclasses set the class attributes below, implement `update`, and
    override the rest where they hold state.
    """

    #: the spec name
    name = ""
    #: the spec keys it takes: key -> Param
    params: dict = {}
    #: True if the model must re-run the whole sequence each step (no cache)
    recompute = False
    #: True if attention sees exactly the full float32 cache (same numbers)
    exact = True
    #: True if truncate(n) can forget the newest positions for any n
    #: (chat's history edits, /reset, --context-policy drop-oldest and the
    #: recovery after Ctrl-C need it)
    truncates = True
    #: True if observe() wants each layer's attention weights (H2O, SnapKV, TOVA)
    wants_weights = False

    def __init__(self, config: Config, max_seq_len: int, **options):
        self.config = config
        self.max_seq_len = max_seq_len
        self.options = options
        self.length = 0          # positions seen (fed through the model)
        self.spec = spec_string(self.name, options, self.params)

    # the model's side --------------------------------------------------------------
    def update(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Store k, v ([T, n_kv, head_dim]) of positions length..length+T-1 in
        `layer`; return what attention reads, keys and values
        [n_kv, head_dim, n_held] with these T last."""
        raise NotImplementedError

    def observe(self, layer: int, weights: np.ndarray, sums: np.ndarray,
                first: int, total: int) -> None:
        """Attention's weights in `layer` for queries first..first+n-1 of the
        `total` new ones (called only when wants_weights): weights
        [n_kv, n * group, seen] are unnormalised (divide by sums [n_kv, n * group]),
        rows ordered (query, head of the group), columns the keys update
        returned (the first `seen` of them). Read, never keep or write them."""

    def advance(self, n: int) -> None:
        """Called once all layers have been updated with n new positions:
        this is where a strategy evicts."""
        self.length += n

    # reports -------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this cache has allocated (capacity included)."""
        return 0

    def positions(self, layer: int) -> np.ndarray:
        """The original positions held for `layer` (for plots), ascending."""
        return np.arange(self.length)

    # the sequence's side ----------------------------------------------------------
    def reset(self) -> None:
        """Forget everything."""
        self.length = 0

    def truncate(self, n: int) -> None:
        """Forget every position from n on (refused, unless n is 0 or at least
        length, by a strategy that does not truncate)."""
        if n >= self.length:
            return
        if self.truncates:
            self.length = n
        elif n == 0:
            self.reset()
        else:
            self.refuse_truncate(n)

    def copy(self) -> "KVCache":
        """An independent cache holding the same positions (forking a sequence)."""
        return copy.copy(self)   # right for a cache that holds no arrays

    def refuse_truncate(self, n: int) -> None:
        """The error of a strategy that cannot forget its newest positions."""
        raise LlamanpError(
            f"kvcache {self.spec} cannot go back to position {n} of {self.length}: it keeps "
            "only some positions, so the ones before would not be what they were; chat "
            "history edits, --context-policy drop-oldest and speculative decoding need a "
            "cache that can (none, inplace, concat, or inplace:dtype=...)")

    @property
    def strategy(self) -> str:
        """The spec string (the name an older API used)."""
        return self.spec

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}: {self.length} positions seen>"


def spec_string(name: str, options: dict, params: dict) -> str:
    """The canonical spec: the name and the options that differ from the defaults."""
    set_ = [f"{k}={v}" for k, v in options.items() if k in params and v != params[k].default]
    return name + (":" + ",".join(set_) if set_ else "")


def parse_spec(spec: str) -> tuple[str, dict]:
    """"NAME" or "NAME:key=value,key=value" -> (name, {key: value text})."""
    if not isinstance(spec, str) or not spec.strip():
        raise LlamanpError(f"kvcache spec must be a name such as inplace, got {spec!r}; "
                           f"choose one of {', '.join(STRATEGIES)}")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in rest.split(",") if rest else []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise LlamanpError(f"kvcache {spec!r}: {item!r} is not key=value "
                               "(write NAME:key=value,key=value)")
        if key in options:
            raise LlamanpError(f"kvcache {spec!r}: {key} is given twice")
        options[key] = value
    return name.strip(), options


def check_spec(spec: str) -> tuple[type, dict]:
    """The strategy class and its options (defaults filled in) of `spec`, or
    one clear error about what is wrong with it."""
    name, raw = parse_spec(spec)
    cls = STRATEGIES.get(name)
    if cls is None:
        raise LlamanpError(f"unknown kvcache strategy {name!r}; choose one of "
                           f"{', '.join(STRATEGIES)} (NAME or NAME:key=value,...)")
    takes = (f"{name} takes " + ", ".join(p.describe(k) for k, p in cls.params.items())
             if cls.params else f"{name} takes no options")
    options = {k: p.default for k, p in cls.params.items()}
    for key, text in raw.items():
        if key not in cls.params:
            raise LlamanpError(f"kvcache {name}: unknown key {key!r}; {takes}")
        try:
            options[key] = cls.params[key].parse(text)
        except ValueError:
            raise LlamanpError(f"kvcache {name}: {key}={text} is not allowed; {key} is "
                               f"{cls.params[key].allowed()}") from None
    problem = cls.check(options) if hasattr(cls, "check") else None
    if problem:
        raise LlamanpError(f"kvcache {spec.strip()}: {problem}")
    return cls, options


def make_cache(spec: str, config: Config, max_seq_len: int) -> KVCache:
    """The cache `spec` names, for a model with `config`, holding at most
    max_seq_len positions of one sequence."""
    cls, options = check_spec(spec)
    build = getattr(cls, "build", None)
    return build(config, max_seq_len, **options) if build else cls(config, max_seq_len, **options)


def require(cache: KVCache, feature: str, *, exact: bool = False,
            truncates: bool = False, cached: bool = False) -> None:
    """Refuse, in one line, a cache that `feature` cannot work with."""
    if cached and cache.recompute:
        raise LlamanpError(f"{feature} needs a KV cache; use --kvcache inplace (or any "
                           f"strategy but none)")
    if exact and not cache.exact:
        raise LlamanpError(f"{feature} needs an exact KV cache (none, inplace, concat); "
                           f"{cache.spec} is lossy")
    if truncates and not cache.truncates:
        raise LlamanpError(f"{feature} needs a KV cache that can forget its newest positions "
                           f"(none, inplace, concat, inplace:dtype=...); {cache.spec} keeps "
                           "only some positions")


def describe_strategies() -> str:
    """One line per strategy: its spec keys (for --help and docs)."""
    lines = []
    for name, cls in STRATEGIES.items():
        keys = ", ".join(p.describe(k) for k, p in cls.params.items())
        lines.append(f"{name}" + (f" ({keys})" if keys else ""))
    return "; ".join(lines)


def reserve(shape, dtype=np.float32) -> np.ndarray:
    """An array whose memory is committed only as it is written.

    An anonymous memory mapping gets its pages on first write, 4 KiB at a
    time. (np.empty would do the same, but numpy asks for transparent huge
    pages on large arrays, and then the first position written in each
    layer's and head's stretch of the cache commits a whole 2 MiB page.)
    """
    import mmap
    dtype = np.dtype(dtype)
    count = math.prod(shape)   # Python ints: a huge context cannot wrap around
    try:
        buf = mmap.mmap(-1, max(count, 1) * dtype.itemsize)
    except (OSError, OverflowError, ValueError):
        raise LlamanpError(f"cannot reserve {count * dtype.itemsize / 2**30:.3g} GiB for the "
                           "KV cache; pass a smaller --seqlength") from None
    return np.frombuffer(buf, dtype, count).reshape(shape)


__all__ = ["KVCache", "Param", "STRATEGIES", "register", "parse_spec", "check_spec",
           "make_cache", "require", "reserve", "describe_strategies"]
