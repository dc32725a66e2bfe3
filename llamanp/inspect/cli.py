"""llama-np.py's flags for looking inside (instead of generating):

    llama-np.py -w M -i PROMPT --lens [--lens-top K] [--lens-png FILE]
    llama-np.py -w M -i PROMPT --attention-png FILE [--layer L]
"""

from __future__ import annotations

import sys

from ..cliutil import refuse_flags
from ..fileio import check_output
from ..errors import LlamanpError
from .draw import draw_attention, draw_lens, require_matplotlib
from .hooks import run_with_cache
from .lens import lens_text, logit_lens, token_label

DEFAULT_LENS_TOP = 5


def add_inspect_arguments(parser) -> None:
    g = parser.add_argument_group("looking inside the forward pass (run the prompt once "
                                  "instead of generating)")
    g.add_argument("--lens", action="store_true",
                   help="logit lens: print, after each layer, the most likely next tokens at "
                        "the prompt's last position (the final norm and output matrix "
                        "applied to that layer's residual stream)")
    g.add_argument("--lens-top", type=int, metavar="K",
                   help=f"with --lens: tokens shown per layer (default {DEFAULT_LENS_TOP})")
    g.add_argument("--lens-png", metavar="FILE",
                   help="with --lens: draw layers x positions, coloured by the probability of "
                        "the final prediction, to FILE (needs matplotlib)")
    g.add_argument("--attention-png", metavar="FILE",
                   help="draw one layer's attention patterns, one panel per head, to FILE "
                        "(needs matplotlib)")
    g.add_argument("--layer", type=int, metavar="L",
                   help="the layer --attention-png draws (default 0; negative counts from the "
                        "last, -1 = the last)")


def inspecting(args) -> bool:
    return bool(args.lens or args.attention_png is not None)


def check_inspect_args(args) -> None:
    """Refuse inconsistent flags, and missing matplotlib, before the model is opened."""
    if not args.lens:
        for flag, value in (("--lens-top", args.lens_top), ("--lens-png", args.lens_png)):
            if value is not None:
                raise LlamanpError(f"{flag} only applies with --lens")
    if args.layer is not None and args.attention_png is None:
        raise LlamanpError("--layer only applies with --attention-png")
    if args.lens_top is not None and args.lens_top < 1:
        raise LlamanpError(f"--lens-top must be >= 1, got {args.lens_top}")
    if not inspecting(args):
        return
    used = "--lens" if args.lens else "--attention-png"
    refuse_flags(args, ("chat", "batch", "beams", "perplexity"),
                 used + " runs the prompt once instead of generating; it cannot be combined "
                 "with {flag}")
    for flag, path in (("--lens-png", args.lens_png), ("--attention-png", args.attention_png)):
        if path is not None:
            check_output(path, flag)
            require_matplotlib(flag)


def run_inspect(args, model, ids) -> int:
    """Print the logit lens and/or draw the pictures for the prompt `ids`."""
    tok = model.tokenizer
    if args.lens:
        lens = logit_lens(model, ids, args.lens_top or DEFAULT_LENS_TOP)
        sys.stdout.write(lens_text(lens, tok))
        sys.stdout.flush()
        if args.lens_png is not None:
            draw_lens(lens, tok, args.lens_png)
            print(f"wrote the logit lens picture to {args.lens_png}", file=sys.stderr)
    if args.attention_png is not None:
        n = model.config.n_layers
        layer = 0 if args.layer is None else args.layer
        if not -n <= layer < n:
            raise LlamanpError(f"--layer {layer} is outside the model's layers "
                               f"(0..{n - 1}, or -{n}..-1 from the end)")
        layer %= n
        _, acts = run_with_cache(model, ids, [f"blocks.{layer}.pattern"])
        draw_attention(acts[f"blocks.{layer}.pattern"], [token_label(tok, i) for i in ids],
                       layer, args.attention_png)
        print(f"wrote layer {layer}'s attention patterns to {args.attention_png}",
              file=sys.stderr)
    return 0
