"""The logit lens: what each layer's residual stream would predict if the
model stopped there (the final norm and the output matrix applied to it).

Rows are the embedding ("embed") and the residual stream after each layer;
the last row is the model's own prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import rmsnorm
from .hooks import run_with_cache


@dataclass
class Lens:
    layers: list            # row labels: "embed", "0", "1", ...
    ids: list               # the input tokens
    top_ids: np.ndarray     # [rows, positions, k] the k most likely next tokens, best first
    top_probs: np.ndarray   # [rows, positions, k] their probabilities
    final_ids: np.ndarray   # [positions] the model's own (last row's) top token
    final_probs: np.ndarray  # [rows, positions] each row's probability of final_ids


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest entries of each row, largest first."""
    k = min(k, probs.shape[-1])
    part = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(probs, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def logit_lens(model, ids, k: int = 5) -> Lens:
    """The lens over every position of `ids`: one forward pass, then the
    final norm and output matrix on the embedding and each layer's output."""
    cfg = model.config
    streams = ["embed"] + [f"blocks.{i}.resid_post" for i in range(cfg.n_layers)]
    _, acts = run_with_cache(model, ids, streams)
    probs = [softmax(model.output_logits(rmsnorm(acts[name], model.norm, cfg.norm_eps)))
             for name in streams]                                   # [positions, vocab] each
    final_ids = probs[-1].argmax(axis=-1)
    top = np.stack([top_k(p, k) for p in probs])
    top_probs = np.stack([np.take_along_axis(p, t, axis=-1) for p, t in zip(probs, top)])
    final_probs = np.stack([p[np.arange(len(final_ids)), final_ids] for p in probs])
    return Lens(["embed"] + [str(i) for i in range(cfg.n_layers)], list(ids), top,
                top_probs, final_ids, final_probs)


def token_text(tok, id: int) -> str:
    """The text a token stands for (a piece of a character shows as U+FFFD);
    #id without a tokenizer."""
    if tok is None:
        return f"#{id}"
    return tok.token_bytes(int(id)).decode("utf-8", errors="replace")


def token_label(tok, id: int) -> str:
    """A token's text for a picture's labels: quotes off, newlines and other
    control characters escaped as Python writes them."""
    return repr(token_text(tok, id))[1:-1].replace("$", r"\$")   # no mathtext


def lens_text(lens: Lens, tok) -> str:
    """Per row, the top tokens at the last position with their probabilities."""
    last = len(lens.ids) - 1
    k = lens.top_ids.shape[-1]
    lines = [f"logit lens at the last position ({token_text(tok, lens.ids[last])!r}): "
             f"the top {k} next tokens after each layer"]
    width = max(len(name) for name in lens.layers)
    for row, name in enumerate(lens.layers):
        cells = "  ".join(f"{token_text(tok, i)!r} {p:.3f}" for i, p in
                          zip(lens.top_ids[row, last], lens.top_probs[row, last]))
        lines.append(f"{name:>{width}}  {cells}")
    return "\n".join(lines) + "\n"
