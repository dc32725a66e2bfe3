"""Key/value caches: the strategies a sequence's past can be kept with.

One narrow interface (base.KVCache) and one small class per strategy, grouped
by family: exact (none, inplace, concat), quantized (dtype= storage, kivi),
eviction (window, sinks, h2o, snapkv, tova, knorm, random). A spec string
"NAME:key=value,..." picks one everywhere (see docs/kv-cache.md).
"""

from . import exact, paged  # noqa: F401  (register none, inplace, concat; paged)
from .base import STRATEGIES, KVCache, Param, check_spec, make_cache, parse_spec, register, require
from .exact import DTYPES, ConcatCache, InplaceCache, NoCache

__all__ = ["STRATEGIES", "KVCache", "Param", "check_spec", "make_cache", "parse_spec",
           "register", "require", "DTYPES", "ConcatCache", "InplaceCache",
           "NoCache"]
