"""What every source-format reader hands to the writer.

A reader (llama2.c, Meta, ...) turns a checkpoint on disk into a
:class:`Checkpoint`: a validated :class:`~llamanp.config.Config`, the tensors
under their *canonical* names and layout, and the tokenizer if the source
carries one. Tensors are loaded lazily, one at a time, so that converting a
model never needs more memory than its largest tensor (plus the mmap).

Canonical layout (the one `.lmw` files use, see docs/lmw-format.md):
  * Meta's naming and Meta's q/k layout: RoPE rotates *interleaved pairs*
    (components 2i and 2i+1 of each head), as in Meta's and llama2.c's
    model.py. Hugging Face checkpoints use the "rotate half" layout and their
    reader permutes the rows of wq/wk back.
  * Linear weights are [out_features, in_features], like torch.nn.Linear.
  * float32, C-contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..config import Config
from ..errors import LlamanpError


def layer_tensor_names(i: int) -> list[str]:
    """Canonical names of the tensors of transformer block i."""
    p = f"layers.{i}."
    return [p + "attention_norm.weight",
            p + "attention.wq.weight", p + "attention.wk.weight",
            p + "attention.wv.weight", p + "attention.wo.weight",
            p + "ffn_norm.weight",
            p + "feed_forward.w1.weight", p + "feed_forward.w2.weight",
            p + "feed_forward.w3.weight"]


def canonical_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must provide, with its shape."""
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        w = layer_tensor_names(i)
        shapes[w[0]] = (cfg.dim,)
        shapes[w[1]] = (cfg.q_dim, cfg.dim)
        shapes[w[2]] = (cfg.kv_dim, cfg.dim)
        shapes[w[3]] = (cfg.kv_dim, cfg.dim)
        shapes[w[4]] = (cfg.dim, cfg.q_dim)
        shapes[w[5]] = (cfg.dim,)
        shapes[w[6]] = (cfg.hidden_dim, cfg.dim)
        shapes[w[7]] = (cfg.dim, cfg.hidden_dim)
        shapes[w[8]] = (cfg.hidden_dim, cfg.dim)
    shapes["norm.weight"] = (cfg.dim,)
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


@dataclass
class SourceTensor:
    """A tensor not yet read: its shape, and how to read it as float32."""
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass
class Checkpoint:
    config: Config
    tensors: dict[str, SourceTensor]          # canonical names, see canonical_shapes
    tokenizer: Optional[object] = None        # llamanp.tokenizer.TokenizerData or None
    source: str = ""                          # e.g. "llama2.c checkpoint (.pt)"
    metadata: dict = field(default_factory=dict)  # JSON-able notes kept in the header


def check_canonical_tensors(tensors: dict, cfg: Config, where: str) -> None:
    """Every canonical tensor present, nothing else, each of the right shape."""
    present = layers_present(tensors)
    if cfg.n_layers > present:      # said first and plainly: the usual sign of a bad config
        raise LlamanpError(f"{where}: the hyper-parameters say {cfg.n_layers} layers but the "
                           f"weights hold {present}; the config does not belong to them")
    want = canonical_shapes(cfg)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise LlamanpError(f"{where} lacks tensor(s) {few_names(missing)}; "
                           "the checkpoint is incomplete or not a Llama model")
    unexpected = sorted(set(tensors) - set(want))
    if unexpected:
        raise LlamanpError(f"{where} has unexpected tensor(s) {few_names(unexpected)}; "
                           "llamanp reads plain Llama models only")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise LlamanpError(f"{where}: {name} has shape {list(tensors[name].shape)} but "
                               f"the model's hyper-parameters need {list(shape)}")


def layers_present(tensors) -> int:
    """1 + the highest N among canonical names "layers.N.*" (0 when there are none)."""
    numbers = [int(n) for n in (name.split(".", 2)[1] for name in tensors
                                if name.startswith("layers.") and name.count(".") >= 2)
               if n.isdigit()]
    return max(numbers, default=-1) + 1


def require_float_tensors(tensors: dict, where: str) -> None:
    """Weights must be floating point; an integer tensor means a foreign checkpoint."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point:
            raise LlamanpError(f"{where}: {name} holds {tensor.dtype} values, not "
                               "floating-point weights; the checkpoint is not a Llama model")


def few_names(names: list[str], limit: int = 4) -> str:
    """Name a handful of items in an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
