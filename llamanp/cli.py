"""llama-np: text completion from the command line.

    python llama-np.py -w model.lmw -i "Once upon a time" -n 64 --temp 0
"""

from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path
from typing import Optional

from .cliutil import ArgumentParser, run_main
from .errors import LlamanpError
from .generate import Generation, GenerationStats
from .kvcache import STRATEGIES
from .model import Model, load
from .sampling import Sampler, check_sampling
from .tokenizer import load_tokenizer


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="llama-np.py",
                       description="Generate text with a Llama-family model (.lmw) in NumPy.")
    p.add_argument("-w", "--weights", required=True, metavar="MODEL.lmw",
                   help="model file written by convert.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--prompt", help="the prompt text")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("-t", "--tokenizer", metavar="PATH",
                   help="tokenizer file (SentencePiece .model or tiktoken); "
                        "overrides the one embedded in the model")
    p.add_argument("-n", "--n-tokens", type=int, default=256, metavar="N",
                   help="generate at most N tokens (default 256)")
    p.add_argument("--seqlength", type=int, metavar="L",
                   help="context length for this run (default: the model's max_seq_len)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=float, default=0.8,
                   help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--topk", type=int, default=40, help="keep the K most likely tokens; 0 = off "
                   "(default 40)")
    g.add_argument("--topp", type=float, default=0.95,
                   help="nucleus sampling: keep the most likely tokens up to this mass; "
                        "1 = off (default 0.95)")
    g.add_argument("--seed", type=int, help="random seed (default: random; printed in stats)")
    r = p.add_argument_group("how to run it (all give the same numbers)")
    r.add_argument("--kvcache", choices=STRATEGIES, default=None,
                   help="KV cache: none (recompute everything), inplace (preallocated, "
                        "the default) or concat (grown by concatenation)")
    r.add_argument("--nokvcache", action="store_true", help="same as --kvcache none")
    r.add_argument("--useinplacekvcache", action="store_true",
                   help="same as --kvcache inplace")
    r.add_argument("--fill1", action="store_true",
                   help="prefill the prompt one token at a time instead of one batch")
    p.add_argument("--stats-json", metavar="FILE", help="write run statistics as JSON to FILE")
    return p


def kvcache_choice(args) -> str:
    """Map the seed-compatible flags onto --kvcache, refusing contradictions."""
    implied = [name for flag, name in ((args.nokvcache, "none"),
                                       (args.useinplacekvcache, "inplace")) if flag]
    choices = set(implied + ([args.kvcache] if args.kvcache else []))
    if len(choices) > 1:
        raise LlamanpError(f"conflicting KV-cache options ({', '.join(sorted(choices))}); "
                           "give just one")
    return choices.pop() if choices else "inplace"


def read_prompt(args) -> str:
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LlamanpError(f"prompt file {args.file} is not valid UTF-8 text "
                               f"(byte {e.object[e.start]:#04x} at offset {e.start})") from None
        except OSError as e:
            raise LlamanpError(f"cannot read prompt file {args.file}: {e.strerror}") from None
    else:
        text = args.prompt
    if text == "":
        raise LlamanpError("the prompt is empty; give some text with -i or -f")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
        raise LlamanpError("the prompt is not valid UTF-8 text") from None
    return text


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def open_model(args) -> Model:
    model = load(args.weights, tokenizer=load_tokenizer(args.tokenizer)
                 if args.tokenizer else None)
    if model.tokenizer is None:
        raise LlamanpError(f"{args.weights} has no embedded tokenizer; pass -t TOKENIZER "
                           "(a SentencePiece .model or a tiktoken file)")
    return model


def summary(stats: GenerationStats, kvcache: str, fill1: bool, seed: int) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "prompt_tokens_computed": stats.prompt_computed,
        "generated_tokens": stats.generated_tokens,
        "computed_tokens": stats.computed_tokens,
        "prefill_seconds": round(stats.prefill_seconds, 6),
        "decode_seconds": round(stats.decode_seconds, 6),
        "prefill_tokens_per_second": round(stats.prefill_tps, 3),
        "decode_tokens_per_second": round(stats.decode_tps, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "stop_reason": stats.stop_reason,
        "kvcache": kvcache,
        "fill1": fill1,
        "seed": seed,
    }


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    kvcache = kvcache_choice(args)
    check_sampling(args.temp, args.topk, args.topp)
    if args.n_tokens < 0:
        raise LlamanpError(f"-n must be >= 0, got {args.n_tokens}")
    prompt = read_prompt(args)
    model = open_model(args)
    if args.seqlength is not None and not 0 < args.seqlength <= model.config.max_seq_len:
        raise LlamanpError(f"--seqlength {args.seqlength} is outside 1..{model.config.max_seq_len}"
                           " (the model's max_seq_len)")

    tok = model.tokenizer
    ids = tok.encode(prompt, bos=tok.bos_id is not None)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    sampler = Sampler(args.temp, args.topk, args.topp, seed)
    gen = Generation(model, ids, args.n_tokens, sampler, kvcache=kvcache, fill1=args.fill1,
                     max_seq_len=args.seqlength)

    out = sys.stdout
    out.write(prompt)
    out.flush()
    stream = tok.stream(at_start=False)
    for token in gen:
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")
    out.flush()

    stats = summary(gen.stats, kvcache, args.fill1, seed)
    print(f"[prompt {stats['prompt_tokens']} tokens ({stats['prompt_tokens_computed']} computed)"
          f" | generated {stats['generated_tokens']}"
          f" | prefill {stats['prefill_tokens_per_second']:.1f} tok/s"
          f" | decode {stats['decode_tokens_per_second']:.1f} tok/s"
          f" | peak RSS {stats['peak_rss_mb']:.0f} MB | kvcache {kvcache}"
          f"{' fill1' if args.fill1 else ''} | seed {seed}]", file=sys.stderr)
    if args.stats_json:
        try:
            Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n")
        except OSError as e:
            raise LlamanpError(f"cannot write {args.stats_json}: {e.strerror}") from None
    return 0


def run(argv: Optional[list] = None) -> int:
    return run_main(main, argv)
