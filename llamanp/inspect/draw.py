"""Pictures of what the model does: the logit lens grid and attention maps.

matplotlib is optional (the bench extra); without it `require_matplotlib`
refuses with one clear message. A picture is written to a temporary file
beside the target and renamed into place, so a failed run leaves no partial
file.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LlamanpError
from .lens import Lens, token_label


def require_matplotlib(what: str):
    """matplotlib.pyplot (drawing to files, no display), or an error that says
    `what` needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlamanpError(f"{what} draws with matplotlib, which is not installed "
                           "(pip install matplotlib, or pip install 'llamanp[bench]')") from None
    return plt


def save(fig, path) -> Path:
    """Write `fig` as a PNG to `path`, whole or not at all."""
    plt = require_matplotlib("saving a picture")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def draw_lens(lens: Lens, tok, path) -> Path:
    """The usual logit lens picture: layers (rows, the last on top) by
    positions (columns, labelled with the input tokens), each cell coloured by
    that layer's probability of the model's final prediction at that position
    and labelled with the layer's own top token."""
    plt = require_matplotlib("the logit lens picture")
    rows, cols = lens.final_probs.shape
    fig, ax = plt.subplots(figsize=(2 + 0.9 * cols, 1 + 0.32 * rows))
    image = ax.imshow(lens.final_probs, origin="lower", aspect="auto", cmap="Blues",
                      vmin=0.0, vmax=1.0)
    for r in range(rows):
        for c in range(cols):
            p = lens.final_probs[r, c]
            ax.text(c, r, token_label(tok, lens.top_ids[r, c, 0])[:10], ha="center",
                    va="center", fontsize=7, color="white" if p > 0.6 else "black")
    ax.set_xticks(range(cols), [token_label(tok, i) for i in lens.ids], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(rows), lens.layers, fontsize=7)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(cols), [token_label(tok, i) for i in lens.final_ids], rotation=60,
                   ha="left", fontsize=8)
    top.set_xlabel("final prediction")
    fig.colorbar(image, ax=ax, label="probability of the final prediction", fraction=0.03)
    return save(fig, path)


def draw_attention(pattern: np.ndarray, labels: list, layer: int, path) -> Path:
    """One panel per head of pattern [heads, T, T]: query positions (rows)
    against key positions (columns), both labelled with the tokens."""
    plt = require_matplotlib("the attention picture")
    heads, T, _ = pattern.shape
    across = math.ceil(math.sqrt(heads))
    down = math.ceil(heads / across)
    side = max(2.5, 0.22 * T)
    fig, axes = plt.subplots(down, across, figsize=(side * across + 1, side * down + 0.5),
                             squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(pattern[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(T), labels, fontsize=6)
    fig.supxlabel("key position")
    fig.supylabel("query position")
    fig.tight_layout()
    return save(fig, path)
