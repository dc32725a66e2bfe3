"""Key/value caches: the strategies a sequence's past can be kept with.

One narrow interface (base.KVCache) and one small class per strategy, grouped
by family: exact (none, inplace, concat), paged (exact, blocks shared between
sequences), quantized (dtype= storage, kivi),
eviction (window, sinks, h2o, snapkv, tova, knorm, random). A spec string
"NAME:key=value,..." picks one everywhere (see docs/kv-cache.md).
"""

from . import exact, paged  # noqa: F401  (imported first: they head the list)
from .base import STRATEGIES, KVCache, Param, check_spec, make_cache, parse_spec, register, require
from .eviction import H2O, TOVA, KNorm, Random, Sinks, SnapKV, Window
from .exact import ConcatCache, InplaceCache, NoCache
from .quantized import DTYPES

__all__ = ["STRATEGIES", "KVCache", "Param", "check_spec", "make_cache", "parse_spec",
           "register", "require", "DTYPES", "ConcatCache", "InplaceCache",
           "NoCache", "H2O", "KNorm", "Random", "Sinks", "SnapKV", "TOVA", "Window"]
