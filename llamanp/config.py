"""Model hyper-parameters.

One dataclass describes every Llama-family model llamanp runs. It is stored as
JSON in the `.lmw` header (see docs/lmw-format.md) and validated on load.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Optional

from .errors import LlamanpError, brief


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" frequency scaling of RoPE (the only kind supported)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    type: str = "llama3"


@dataclass(frozen=True)
class Config:
    dim: int                      # width of the residual stream
    n_layers: int
    n_heads: int                  # query heads
    n_kv_heads: int               # key/value heads (GQA when < n_heads)
    head_dim: int                 # usually dim // n_heads, but not always
    hidden_dim: int               # width of the SwiGLU feed-forward layer
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    tied_embeddings: bool = False  # output matrix is the token embedding

    # -- derived sizes -------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise LlamanpError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlamanpError(f"model config has unknown field(s) {unknown}; "
                               "the file may come from a newer llamanp")
        missing = [f.name for f in fields(cls)
                   if f.name not in d and f.default is MISSING]
        if missing:
            raise LlamanpError(f"model config lacks field(s) {missing}")
        d = dict(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            if not isinstance(rs, dict):
                raise LlamanpError("config.rope_scaling must be null or an object")
            if rs.get("type", "llama3") != "llama3":
                raise LlamanpError(f"unsupported rope_scaling type {rs.get('type')!r}; "
                                   "only 'llama3' is supported")
            try:
                d["rope_scaling"] = RopeScaling(**rs)
            except TypeError as e:
                raise LlamanpError(f"bad rope_scaling: {e}") from None
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise LlamanpError(f"bad model config: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise LlamanpError if the numbers cannot describe a working model.

        Every number must also lie within :data:`BOUNDS`, checked before
        anything (a table of expected tensors, a cache) is sized by it.
        """
        def need(cond, msg):
            if not cond:
                raise LlamanpError(f"invalid model config: {msg}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {brief(v)}")
            need(v <= BOUNDS[name][1], f"{name} is {v}, over the {BOUNDS[name][1]} "
                 "of any model llamanp runs; the file is damaged or not a model")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            lo, hi = BOUNDS[name]
            # comparisons, not float(): an int too large for a float must not raise
            need(is_number(v) and lo <= v <= hi,
                 f"{name} must be a number from {lo:g} to {hi:g}, got {brief(v)}")
        need(isinstance(self.tied_embeddings, bool), "tied_embeddings must be true or false")
        rs = self.rope_scaling
        if rs is not None:
            lo, hi = BOUNDS["rope_scaling factors"]
            need(all(is_number(v) and lo <= v <= hi
                     for v in (rs.factor, rs.low_freq_factor, rs.high_freq_factor)),
                 f"rope_scaling factors must be numbers from {lo:g} to {hi:g}")
            need(rs.high_freq_factor > rs.low_freq_factor,
                 "rope_scaling.high_freq_factor must exceed low_freq_factor")
            need(isinstance(rs.original_max_position_embeddings, int)
                 and not isinstance(rs.original_max_position_embeddings, bool)
                 and 0 < rs.original_max_position_embeddings <= BOUNDS["max_seq_len"][1],
                 "rope_scaling.original_max_position_embeddings must be a positive integer "
                 f"up to {BOUNDS['max_seq_len'][1]}")


def is_number(v) -> bool:
    """An int or float (not a bool); NaN fails every range check it meets."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The plausible range of every number of a config: (lowest, highest). Each is far
# beyond the real models (in brackets) yet small enough that nothing sized by it
# can exhaust memory before the tensors themselves are checked against it.
BOUNDS = {
    "dim": (1, 1 << 16),              # (Llama 3.1 405B: 16384)
    "n_layers": (1, 1024),            # (405B: 126)
    "n_heads": (1, 1024),             # (405B: 128)
    "n_kv_heads": (1, 1024),          # (405B: 8)
    "head_dim": (1, 1024),            # (64 to 256)
    "hidden_dim": (1, 1 << 18),       # (405B: 53248)
    "vocab_size": (1, 1 << 22),       # (Gemma: 262144)
    "max_seq_len": (1, 1 << 20),      # (Llama 3.1: 131072; Gradient's Llama 3: 1048576)
    "norm_eps": (1e-12, 0.1),         # (1e-5, 1e-6; BERT's LayerNorm: 1e-12)
    "rope_theta": (1.0, 1e12),        # (10000, 500000; Gradient's 1M context: 3.6e9)
    "rope_scaling factors": (1e-3, 1e3),   # (Llama 3.1: 8, 1, 4)
}
