"""An .lmw file as a conversion source: the same model stored again, for
instance with its weights in another --dtype (convert.py model.lmw
model-q8.lmw --dtype q8_0).

The file is validated as when it is run; its fused wqkv and w13 are split
back into the canonical wq, wk, wv and w1, w3 (convert fuses them again), and
compressed weights are widened to the float32 values they stand for, one
tensor at a time as the writer asks for it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import lmw
from ..verify import require_intact
from .checkpoint import Checkpoint, SourceTensor


def _rows(t, start: int, stop: int) -> Callable[[], np.ndarray]:
    """Rows start:stop of a stored tensor (an array or a quant.Packed), as float32."""
    def load() -> np.ndarray:
        part = t[start:stop] if isinstance(t, np.ndarray) else t.rows(start, stop)
        return np.ascontiguousarray(np.asarray(part), dtype=np.float32)
    return load


def read_lmw(path) -> Checkpoint:
    f = lmw.read(path)
    # every byte is read to convert anyway: check the CRC-32s first (version 3),
    # so that a damaged tensor is refused instead of copied
    require_intact(f)
    cfg, stored = f.config, f.tensors
    tensors = {}
    for name, t in stored.items():
        if name.endswith("attention.wqkv.weight"):
            p = name[: -len("wqkv.weight")]
            bounds = np.cumsum([0, cfg.q_dim, cfg.kv_dim, cfg.kv_dim])
            for part, a, b in zip(("wq", "wk", "wv"), bounds[:-1], bounds[1:]):
                tensors[f"{p}{part}.weight"] = SourceTensor((int(b - a), cfg.dim),
                                                            _rows(t, int(a), int(b)))
        elif name.endswith("feed_forward.w13.weight"):
            p = name[: -len("w13.weight")]
            h = cfg.hidden_dim
            tensors[p + "w1.weight"] = SourceTensor((h, cfg.dim), _rows(t, 0, h))
            tensors[p + "w3.weight"] = SourceTensor((h, cfg.dim), _rows(t, h, 2 * h))
        else:
            tensors[name] = SourceTensor(tuple(t.shape), _rows(t, 0, t.shape[0]))
    metadata = {k: v for k, v in f.metadata.items() if k not in ("source_format", "converter")}
    metadata["restored_from"] = f.metadata.get("source_format", "an .lmw file")
    return Checkpoint(cfg, tensors, f.tokenizer, "llamanp .lmw file", metadata)
