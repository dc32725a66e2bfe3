"""Tiny random .lmw models for the sampling and beam-search tests (helpers only).

They are written straight with llamanp.lmw.write: these tests are about what
happens *after* the logits, so no reference implementation is needed, only
models that are small, fast and not degenerate (greedy decoding should wander
over the vocabulary instead of repeating one token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from llamanp import lmw
from llamanp.config import Config


def tiny_config(vocab: int, max_seq_len: int = 64) -> Config:
    return Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                  vocab_size=vocab, norm_eps=1e-5, max_seq_len=max_seq_len)


def write_tiny(path, vocab: int, tokenizer=None, seed: int = 0, max_seq_len: int = 64,
               quiet_ids: Optional[list] = None, logit_std: float = 1.0,
               config: Optional[Config] = None) -> Path:
    """A random untied model; `quiet_ids` get all-zero output rows (logit 0 whatever
    the input), so that e.g. byte pieces are rarely picked and text stays readable.
    `config` replaces tiny_config's shape."""
    cfg = config or tiny_config(vocab, max_seq_len)
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        def make():
            if name.endswith("norm.weight"):
                return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            if name == "tok_embeddings.weight":
                return 0.5 * rng.standard_normal(shape, dtype=np.float32)
            if name == "output.weight":
                w = logit_std / np.sqrt(cfg.dim) * rng.standard_normal(shape, dtype=np.float32)
                w[list(quiet_ids or [])] = 0.0
                return w
            std = shape[-1] ** -0.5 * (3 if name.endswith(("wo.weight", "w2.weight")) else 1)
            return std * rng.standard_normal(shape, dtype=np.float32)
        return make

    tensors = [lmw.TensorSource(n, s, weight(n, s)) for n, s in lmw.expected_shapes(cfg).items()]
    lmw.write(path, cfg, tensors, tokenizer, {"source_format": "test", "converter": "tinymodel"})
    return Path(path)


def write_text_model(path, sp_model, seed: int = 0, max_seq_len: int = 64,
                     config: Optional[Config] = None) -> Path:
    """A model over the test SentencePiece tokenizer (vocab 300) that prefers the
    ~40 text pieces: byte and control pieces get logit 0, the rest logits of std 3.
    `config` (its vocab_size 300) replaces tiny_config's shape."""
    import sentencepiece as spm

    from llamanp.tokenizer import read_tokenizer_file

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    quiet = [i for i in range(sp.get_piece_size()) if sp.is_byte(i) or sp.is_control(i)]
    return write_tiny(path, sp.get_piece_size(), read_tokenizer_file(sp_model), seed=seed,
                      quiet_ids=quiet, logit_std=3.0, max_seq_len=max_seq_len, config=config)
