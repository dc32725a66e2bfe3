"""The command line's speed options; llamanp.cli calls add_speed_arguments.

    --widen-at-load        f16 / bf16 / q8_0 weights widened to float32 once, at load:
                           float32 speed for float32 memory
    --draft lookup         speculative decoding, proposals from prompt lookup
    --draft MODEL.lmw      ... from a smaller model with the same tokenizer
    --draft-ngram N        prompt lookup matches the last N tokens (default 3)
    --draft-max K          at most K proposed tokens per step (default 8)

(`--threads N`, which also sizes llamanp.parallel's pool, is the CLI's own.)
"""

from __future__ import annotations

import os
import sys

from .cliutil import refuse_flags
from .errors import LlamanpError

DEFAULT_NGRAM = 3
DEFAULT_DRAFT_MAX = 8


def add_speed_arguments(parser) -> None:
    g = parser.add_argument_group("speed (same output, other costs)")
    g.add_argument("--widen-at-load", action="store_true",
                   help="widen f16/bf16/q8_0 weights to float32 once, when loading: float32 "
                        "speed for the memory of float32 weights (the summary says how much)")
    g.add_argument("--draft", metavar="lookup|MODEL.lmw",
                   help="speculative decoding: 'lookup' proposes the continuation of the latest "
                        "earlier occurrence of the last n-gram (prompt lookup), a .lmw file is "
                        "a smaller model with the same tokenizer; the model checks all proposals "
                        "in one pass (same greedy output; same distribution when sampling)")
    g.add_argument("--draft-ngram", type=int, default=DEFAULT_NGRAM, metavar="N",
                   help=f"--draft lookup: match the last N tokens (default {DEFAULT_NGRAM})")
    g.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX, metavar="K",
                   help=f"--draft: propose at most K tokens per step (default {DEFAULT_DRAFT_MAX})")


def check_speed_args(args) -> None:
    """Refuse values and combinations that have no meaning, before loading."""
    if args.draft_ngram < 1:
        raise LlamanpError(f"--draft-ngram must be >= 1, got {args.draft_ngram}")
    if args.draft_max < 1:
        raise LlamanpError(f"--draft-max must be >= 1, got {args.draft_max}")
    if args.draft is None:
        return
    if args.draft == "":
        raise LlamanpError("--draft needs 'lookup' or a model file (.lmw)")
    refuse_flags(args, ("beams", "batch", "chat", "you_pick", "sampler_history", "fill1",
                        "perplexity"), "--draft cannot be combined with {flag}; drop one of them")


def load_options(args) -> dict:
    """Keyword arguments for llamanp.load from the speed options."""
    return {"widen": bool(getattr(args, "widen_at_load", False))}


def widened_note(model, out=sys.stderr) -> None:
    """Say what --widen-at-load cost, when it did anything."""
    if model.widened_bytes:
        print(f"[widened at load: {model.widened_bytes / 1e6:.0f} MB of float32 weights "
              f"(the file is {os.path.getsize(model.path) / 1e6:.0f} MB)]", file=out)


def summary_fields(model, gen, out=None) -> dict:
    """The speed options' entries for the run summary (--stats-json); with
    `out`, a line about the proposals is printed there too."""
    fields = {}
    if model.widened_bytes:
        fields["widened_at_load_mb"] = round(model.widened_bytes / 1e6, 1)
    st = gen.stats
    if hasattr(st, "proposed"):
        fields.update(draft=st.draft, proposed=st.proposed, accepted=st.accepted,
                      acceptance_rate=round(st.acceptance_rate, 4),
                      verify_passes=st.verify_passes)
        if out is not None:
            print(f"[draft {st.draft}: proposed {st.proposed}, accepted {st.accepted} "
                  f"({100 * st.acceptance_rate:.0f}%) in {st.verify_passes} checking passes]",
                  file=out)
    return fields


def generation_for(args, model):
    """The Generation class to run, with --draft's proposer bound in (or the
    plain one); called as Generation is."""
    from .generate import Generation
    if getattr(args, "draft", None) is None:
        return Generation
    from .speculative import SpeculativeGeneration, make_drafter
    drafter = make_drafter(args.draft, model, ngram=args.draft_ngram, max_draft=args.draft_max)

    def make(*a, **kw):
        return SpeculativeGeneration(*a, drafter=drafter, **kw)
    return make
