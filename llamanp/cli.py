"""llama-np: text completion from the command line.

    python llama-np.py -w model.lmw -i "Once upon a time" -n 64 --temp 0
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__, fileio, speedup
from .beam import Beam, beam_score, beam_search, check_beam_args
from .cliutil import ArgumentParser, prog_name, refuse_flags, run_main
from .console import add_chat_arguments, run_chat_from_args
from .errors import LlamanpError
from .generate import STOP_REASONS, Generation, GenerationStats, TokenLogprobs, check_stop_strings
from .inspect.cli import add_inspect_arguments, check_inspect_args, inspecting, run_inspect
from .kvcache import STRATEGIES, check_spec
from .model import Model, load
from .sampling import Sampler, SamplingStep, check_sampling, softmax
from .tokenizer import Tokenizer, load_tokenizer
from .verify import add_verify_arguments, verify

DEFAULT_N_TOKENS = 256   # -n, when completing text and per chat answer
MAX_STDIN_PROMPT = 16 << 20   # bytes of prompt read from stdin at most
YOU_PICK_CHOICES = 10     # candidates shown by --you-pick
HISTORY_CANDIDATES = 10   # candidates recorded per step by --sampler-history


def build_parser(prog: Optional[str] = None) -> ArgumentParser:
    """The command line; llama.cpp's spellings of the common flags are aliases."""
    p = ArgumentParser(prog=prog or prog_name("llama-np.py"),
                       description="Generate text with a Llama-family model in NumPy. -w takes "
                                   "an .lmw file, any checkpoint convert.py reads (converted "
                                   "once into the model cache) or a known model's name.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-w", "--weights", "-m", "--model", dest="weights", required=True,
                   metavar="MODEL",
                   help="an .lmw file; a checkpoint (GGUF, Hugging Face or Meta directory, "
                        "llama2.c .pt/.bin), converted into the model cache on first use; "
                        "or a known model's name (smollm2)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-i", "-p", "--prompt", dest="prompt", help="the prompt text")
    src.add_argument("-f", "--file", metavar="FILE",
                     help="read the prompt from FILE (- = stdin; piped input with neither "
                          "-i nor -f is read as the prompt too)")
    p.add_argument("-t", "--tokenizer", metavar="PATH",
                   help="tokenizer file (SentencePiece .model, tiktoken, llama2.c tokenizer.bin); "
                        "overrides the one embedded in the model")
    p.add_argument("-n", "--n-tokens", "--n-predict", dest="n_tokens", type=int, default=None,
                   metavar="N", help=f"generate at most N tokens, in a chat per answer "
                                     f"(default {DEFAULT_N_TOKENS}); -1 = until the end of "
                                     "text or of the context")
    p.add_argument("--seqlength", "-c", "--ctx-size", dest="seqlength", type=int, metavar="L",
                   help="context length for this run (default: the model's max_seq_len)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=float, default=0.8,
                   help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--topk", "--top-k", dest="topk", type=int, default=40,
                   help="keep the K most likely tokens; 0 = off (default 40)")
    g.add_argument("--topp", "--top-p", dest="topp", type=float, default=0.95,
                   help="nucleus sampling: keep the most likely tokens up to this mass; "
                        "1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="keep tokens at least P times as likely as the best one; 0 = off "
                        "(default 0)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R",
                   help="divide (multiply, if negative) the logits of recent tokens by R; "
                        "1 = off (default 1)")
    g.add_argument("--repeat-last-n", type=int, default=64, metavar="N",
                   help="penalties look at the last N tokens of prompt + output; "
                        "-1 = all, 0 = none (default 64)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="subtract F times its count from a recent token's logit (default 0)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="subtract P from the logit of any recent token (default 0)")
    g.add_argument("--mirostat", type=int, default=0, metavar="{0,1,2}",
                   help="Mirostat version, instead of top-k/top-p/min-p; 0 = off (default 0)")
    g.add_argument("--mirostat-tau", type=float, default=5.0, metavar="TAU",
                   help="Mirostat's target surprise in bits (default 5)")
    g.add_argument("--mirostat-eta", type=float, default=0.1, metavar="ETA",
                   help="Mirostat's learning rate (default 0.1)")
    g.add_argument("--seed", type=int, help="random seed (default, or -1: random; the summary "
                                            "prints the seed used)")
    st = p.add_argument_group("stopping")
    st.add_argument("--stop", action="append", default=[], metavar="STR",
                    help="stop when the output contains STR (not printed); repeatable")
    st.add_argument("--max-time", type=float, metavar="SEC",
                    help="stop after SEC seconds (checked after each token)")
    b = p.add_argument_group("beam search (deterministic; the sampling options do not apply)")
    b.add_argument("--beams", type=int, metavar="K",
                   help="print the most likely continuation found with K beams")
    b.add_argument("--length-penalty", type=float, default=1.0, metavar="LP",
                   help="rank beams by logprob / length^LP; > 0 favours longer ones (default 1)")
    look = p.add_argument_group("looking inside")
    look.add_argument("--you-pick", action="store_true",
                      help="choose each token yourself from the top candidates (read from "
                           "stdin: Enter = the sampler's pick, a number, q = stop)")
    look.add_argument("--sampler-history", metavar="FILE",
                      help="write the top candidates and the choice of every step to FILE "
                           "(JSON lines)")
    look.add_argument("--logprobs", type=int, default=0, metavar="N",
                      help="report each token's log-probability and the N most likely "
                           "alternatives (stderr, --stats-json and --json)")
    r = p.add_argument_group("how to run it (all give the same numbers)")
    r.add_argument("--kvcache", default=None, metavar="SPEC",
                   help="KV cache strategy, NAME or NAME:key=value,...: "
                        f"{', '.join(STRATEGIES)} (default inplace; see docs/kv-cache.md)")
    r.add_argument("--nokvcache", action="store_true", help="same as --kvcache none")
    r.add_argument("--useinplacekvcache", action="store_true",
                   help="same as --kvcache inplace")
    r.add_argument("--fill1", action="store_true",
                   help="prefill the prompt one token at a time instead of one batch")
    r.add_argument("--threads", type=int, metavar="N",
                   help="threads for the matrix products (NumPy's BLAS; default: its own "
                        "choice, usually one per core)")
    r.add_argument("--batch", action="store_true",
                   help="with -f: one prompt per line, all generated together in one batch "
                        "(one forward pass per step for all of them)")
    pp = p.add_argument_group("perplexity (instead of generating)")
    pp.add_argument("--perplexity", metavar="FILE",
                    help="report the model's perplexity over the text in FILE")
    pp.add_argument("--ctx", type=int, metavar="N",
                    help="window length in tokens (default: the context, at most 512)")
    pp.add_argument("--stride", type=int, metavar="S", help="move the window by S tokens; "
                    "each window scores only the tokens new to it (default ctx/2)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object on stdout instead of the text: the prompt, "
                          "the generated text and ids, the stop reason, the statistics "
                          "(and the logprobs with --logprobs N)")
    out.add_argument("--color", nargs="?", const="auto", default="never",
                     choices=("auto", "always", "never"),
                     help="show the generated text in colour, apart from the prompt: "
                          "--color on a terminal only, --color=always everywhere")
    out.add_argument("--no-display-prompt", action="store_true",
                     help="print only the generated text, not the prompt before it")
    p.add_argument("--stats-json", metavar="FILE", help="write run statistics as JSON to FILE "
                   "(with --chat: one JSON line per turn)")
    add_chat_arguments(p)
    speedup.add_speed_arguments(p)
    add_verify_arguments(p)
    add_inspect_arguments(p)
    return p


def kvcache_choice(args) -> str:
    """Map the seed-compatible flags onto --kvcache, refusing contradictions."""
    implied = [name for flag, name in ((args.nokvcache, "none"),
                                       (args.useinplacekvcache, "inplace")) if flag]
    choices = set(implied + ([args.kvcache] if args.kvcache else []))
    for spec in choices:
        check_spec(spec)
    if len(choices) > 1:
        raise LlamanpError(f"conflicting KV-cache options ({', '.join(sorted(choices))}); "
                           "give just one")
    return choices.pop() if choices else "inplace"


def read_prompt(args) -> str:
    """The prompt: -i TEXT, -f FILE, -f - (stdin), or piped stdin when neither is given."""
    if args.file == "-" or (args.file is None and args.prompt is None):
        text = read_stdin_prompt()
        if text == "" and args.file is None:
            raise LlamanpError("no prompt: stdin was empty; give one with -i TEXT or -f FILE, "
                               "or talk with --chat")
    elif args.file is not None:
        text = fileio.read_text(args.file, "prompt file")
    else:
        text = args.prompt
    if text == "":
        raise LlamanpError("the prompt is empty; give some text with -i or -f")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
        raise LlamanpError("the prompt is not valid UTF-8 text") from None
    return text


def prompt_on_stdin(args) -> bool:
    """Whether the prompt is to come from stdin: -f -, or neither -i nor -f with
    something piped in (a terminal is never read as a prompt)."""
    if args.file == "-":
        return True
    return args.file is None and args.prompt is None and not sys.stdin.isatty()


def read_stdin_prompt() -> str:
    """All of stdin as text, refusing more than MAX_STDIN_PROMPT bytes."""
    data = sys.stdin.buffer.read(MAX_STDIN_PROMPT + 1)
    if len(data) > MAX_STDIN_PROMPT:
        raise LlamanpError(f"the prompt on stdin is larger than {MAX_STDIN_PROMPT >> 20} MiB; "
                           "no context holds that much")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamanpError(f"the prompt on stdin is not valid UTF-8 text (byte "
                           f"{data[e.start]:#04x} at offset {e.start})") from None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def open_model(args) -> Model:
    from .modelcache import resolve
    model = load(resolve(args.weights), tokenizer=load_tokenizer(args.tokenizer)
                 if args.tokenizer else None, **speedup.load_options(args))
    speedup.widened_note(model)
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


def check_args(args) -> None:
    """Refuse bad values before the model is even opened."""
    speedup.check_speed_args(args)
    fileio.check_output(args.stats_json, "statistics file")
    fileio.check_output(args.sampler_history, "sampler history")
    tok = args.tokenizer
    if tok is not None and tok.isdigit() and not Path(tok).exists():
        raise LlamanpError(f"-t is the tokenizer file here, and there is no file {tok}; "
                           f"did you mean --threads {tok}?")
    if args.seed is not None and args.seed < -1:
        raise LlamanpError(f"--seed must be >= 0, or -1 for a random one; got {args.seed}")
    check_sampling(args.temp, args.topk, args.topp, args.min_p, args.repeat_penalty,
                   args.frequency_penalty, args.presence_penalty, args.repeat_last_n,
                   args.mirostat, args.mirostat_tau, args.mirostat_eta)
    if args.n_tokens is not None and args.n_tokens != -1 and args.n_tokens < (
            1 if args.chat else 0):
        raise LlamanpError(f"-n must be >= {1 if args.chat else 0}, or -1 for no limit; got "
                           f"{args.n_tokens}")
    check_stop_strings(args.stop)
    if args.max_time is not None and not (math.isfinite(args.max_time) and args.max_time > 0):
        raise LlamanpError(f"--max-time must be a number of seconds > 0, got {args.max_time}")
    if args.logprobs < 0:
        raise LlamanpError(f"--logprobs must be >= 0 (0 = off), got {args.logprobs}")
    if args.beams is not None:
        check_beam_args(args.beams, DEFAULT_N_TOKENS if args.n_tokens in (None, -1)
                        else args.n_tokens, args.length_penalty)
        sampled_only = [flag for flag, on in (
            ("--you-pick", args.you_pick), ("--sampler-history", args.sampler_history),
            ("--logprobs", args.logprobs), ("--mirostat", args.mirostat),
            ("--max-time", args.max_time is not None), ("--fill1", args.fill1)) if on]
        if sampled_only:
            raise LlamanpError(f"--beams cannot be combined with {sampled_only[0]} "
                               "(beam search does not sample); drop one of them")


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verify:
        return verify(args.weights)
    kvcache = kvcache_choice(args)
    check_args(args)
    check_inspect_args(args)
    apply_threads(args.threads)
    if args.seed is None or args.seed == -1:
        args.seed = random.randrange(2**31)
    if args.perplexity is not None or args.ctx is not None or args.stride is not None:
        return run_perplexity(args, args.kvcache and kvcache)
    if args.chat:
        refuse_with_chat(args)
        message = read_prompt(args) if args.prompt is not None or args.file else None
        model = open_model(args)
        check_seqlength(args, model)
        n = DEFAULT_N_TOKENS if args.n_tokens is None else args.n_tokens
        return run_chat_from_args(model, args, lambda: make_sampler(args),
                                  kvcache=kvcache, max_new_tokens=None if n == -1 else n,
                                  message=message)
    if not prompt_on_stdin(args) and args.prompt is None and args.file is None:
        raise LlamanpError("give a prompt with -i TEXT, -f FILE or on stdin, or talk with "
                           "--chat")
    refuse_with_json(args)
    if args.you_pick and prompt_on_stdin(args):
        raise LlamanpError("--you-pick reads your choices from stdin; give the prompt with "
                           "-i TEXT or -f FILE")
    if args.n_tokens is None:
        args.n_tokens = DEFAULT_N_TOKENS
    if args.batch:
        return run_batch(args, kvcache)
    prompt = read_prompt(args)
    model = open_model(args)
    check_seqlength(args, model)

    ids = model.tokenizer.encode(prompt, bos=True)   # BOS where the model has one
    if inspecting(args):
        return run_inspect(args, model, ids)
    if args.beams is not None:
        stats = run_beams(args, model, prompt, ids, kvcache)
    else:
        stats = run_sampling(args, model, prompt, ids, kvcache)
    write_stats(args, stats)
    return 130 if stats["stop_reason"] == "interrupted" else 0


def context_length(args, model: Model) -> int:
    return args.seqlength if args.seqlength is not None else model.config.max_seq_len


def refuse_with_json(args) -> None:
    """--json prints one completion's object: not for modes that print something else."""
    if args.json:
        refuse_flags(args, ("batch", "you_pick"), "--json cannot be combined with {flag}")


def write_stats(args, stats: dict) -> None:
    if args.stats_json:
        fileio.write_text(args.stats_json, "statistics file", json.dumps(stats, indent=2) + "\n")


def apply_threads(n: Optional[int]) -> None:
    if n is None:
        return
    if n < 1:
        raise LlamanpError(f"--threads must be >= 1, got {n}")
    from .threads import set_threads
    if not set_threads(n):
        print(f"note: could not set the BLAS thread count to {n}; using its default",
              file=sys.stderr)


def check_seqlength(args, model: Model) -> None:
    if args.seqlength is not None and not 0 < args.seqlength <= model.config.max_seq_len:
        raise LlamanpError(f"--seqlength {args.seqlength} is outside 1..{model.config.max_seq_len}"
                           " (the model's max_seq_len)")


def refuse_with_chat(args) -> None:
    """Flags that make no sense in an interactive conversation."""
    refuse_flags(args, ("beams", "you_pick", "logprobs", "max_time", "sampler_history", "stop",
                        "fill1", "json", "no_display_prompt"), "{flag} cannot be used with --chat")


# -- perplexity ----------------------------------------------------------------------

def run_perplexity(args, kvcache: Optional[str] = None) -> int:
    """--perplexity FILE: score the text with a sliding window (llamanp/perplexity.py)."""
    from .perplexity import perplexity, read_text, report_stats, report_text, window_args
    if args.perplexity is None:
        raise LlamanpError("--ctx and --stride only apply to --perplexity FILE")
    refuse_flags(args, ("prompt", "file", "chat", "batch", "beams", "json"),
                 "--perplexity cannot be combined with {flag}")
    text = read_text(args.perplexity)
    model = open_model(args)
    check_seqlength(args, model)
    limit, where = ((args.seqlength, "--seqlength") if args.seqlength is not None
                    else (model.config.max_seq_len, "the model's max_seq_len"))
    ctx, stride = window_args(args.ctx, args.stride, limit, where)
    ids = model.tokenizer.encode(text, bos=True)
    result = perplexity(model, ids, ctx, stride, kvcache)
    sys.stdout.write(report_text(result, len(ids), ctx, stride))
    write_stats(args, {**report_stats(result, args.perplexity, len(ids), ctx, stride),
                       "peak_rss_mb": round(peak_rss_mb(), 1)})
    return 0


# -- batched prompts -----------------------------------------------------------------

def run_batch(args, kvcache: str) -> int:
    """-f FILE --batch: every non-empty line is a prompt; all run in one batch."""
    if args.file is None:
        raise LlamanpError("--batch reads one prompt per line from -f FILE")
    refuse_flags(args, ("beams", "you_pick", "logprobs", "max_time", "sampler_history", "stop",
                        "fill1", "mirostat"), "{flag} cannot be used with --batch")
    prompts = [line for line in read_prompt(args).splitlines() if line.strip()]
    if not prompts:
        raise LlamanpError(f"{args.file} has no prompts (one per line)")
    model = open_model(args)
    check_seqlength(args, model)
    tok = model.tokenizer
    seed = args.seed
    n = context_length(args, model) if args.n_tokens == -1 else args.n_tokens
    from .batch import generate_batch
    results = generate_batch(
        model, [tok.encode(p, bos=True) for p in prompts], n,
        kvcache=kvcache, max_seq_len=args.seqlength, seed=seed, temperature=args.temp,
        top_k=args.topk, top_p=args.topp, min_p=args.min_p,
        repetition_penalty=args.repeat_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, repeat_last_n=args.repeat_last_n)
    for i, (prompt, ids) in enumerate(zip(prompts, results)):
        stream = tok.stream(at_start=False)
        text = "".join(stream.push(t) for t in ids) + stream.flush()
        sys.stdout.write(("\n" if i else "") + prompt + text + "\n")
    sys.stdout.flush()
    st = results.stats
    stats = {"prompts": st.prompts, "prompt_tokens": st.prompt_tokens,
             "generated_tokens": st.generated_tokens, "steps": st.steps,
             "prefill_seconds": round(st.prefill_seconds, 6),
             "decode_seconds": round(st.decode_seconds, 6),
             "prefill_tokens_per_second": round(st.prefill_tps, 3),
             "decode_tokens_per_second": round(st.decode_tps, 3),
             "peak_rss_mb": round(peak_rss_mb(), 1), "kvcache": kvcache, "seed": seed}
    print(f"[batch of {st.prompts} prompts | prompt {st.prompt_tokens} tokens | generated "
          f"{st.generated_tokens} in {st.steps} steps | prefill {st.prefill_tps:.1f} tok/s"
          f" | decode {st.decode_tps:.1f} tok/s (all sequences) | peak RSS "
          f"{stats['peak_rss_mb']:.0f} MB | seed {seed}]", file=sys.stderr)
    write_stats(args, stats)
    return 0


# -- sampling ------------------------------------------------------------------------

def make_sampler(args) -> Sampler:
    return Sampler(args.temp, args.topk, args.topp, args.seed, min_p=args.min_p,
                   repetition_penalty=args.repeat_penalty,
                   frequency_penalty=args.frequency_penalty,
                   presence_penalty=args.presence_penalty, repeat_last_n=args.repeat_last_n,
                   mirostat=args.mirostat, mirostat_tau=args.mirostat_tau,
                   mirostat_eta=args.mirostat_eta)


def run_sampling(args, model: Model, prompt: str, ids: list, kvcache: str) -> dict:
    """Sample, streaming the text to stdout; returns the statistics. Ctrl-C ends
    generation where it is (stop reason "interrupted"), the rest goes on."""
    tok = model.tokenizer
    sampler = make_sampler(args)
    chooser = Chooser(tok, prompt, YouPick(tok, sys.stdin, sys.stderr)
                      if args.you_pick else None)
    gen = speedup.generation_for(args, model)(
        model, ids, None if args.n_tokens == -1 else args.n_tokens, sampler,
        kvcache=kvcache, fill1=args.fill1, max_seq_len=args.seqlength,
        stop=args.stop, max_time=args.max_time, logprobs=args.logprobs,
        choose=chooser if (args.you_pick or args.sampler_history) else None)
    chooser.generation = gen
    # opened last, so that a refused run leaves no file behind
    history = chooser.history = open_history(args.sampler_history)

    out = TextOut(sys.stdout, args)
    out.prompt(prompt)
    shown = 0   # gen.text is final as it grows: print what is new
    try:
        for _ in gen:
            new, shown = gen.text[shown:], len(gen.text)   # counted as shown before it
            out.generated(new)                             # is, so Ctrl-C cannot repeat it
    except KeyboardInterrupt:
        gen.interrupt()
    except LlamanpError:
        out.end()                # the error line goes under the text, not after it
        raise
    finally:
        if history is not None:
            history.close()
    out.generated(gen.text[shown:])
    out.end()

    stats = summary(gen.stats, kvcache, args.fill1, args.seed)
    if gen.stats.stop_string is not None:
        stats["stop_string"] = gen.stats.stop_string
    if args.logprobs:
        print_logprobs(tok, gen.logprobs, sys.stderr)
        stats["logprobs"] = [logprobs_json(tok, lp) for lp in gen.logprobs]
    print(f"[{stopped(stats['stop_reason'])} | prompt {stats['prompt_tokens']} tokens "
          f"({stats['prompt_tokens_computed']} computed) | generated {stats['generated_tokens']}"
          f" | prefill {stats['prefill_tokens_per_second']:.1f} tok/s"
          f" | decode {stats['decode_tokens_per_second']:.1f} tok/s"
          f" | peak RSS {stats['peak_rss_mb']:.0f} MB | kvcache {kvcache}"
          f"{' fill1' if args.fill1 else ''} | seed {args.seed}]", file=sys.stderr)
    stats.update(speedup.summary_fields(model, gen, sys.stderr))
    if args.json:
        print_json(prompt, ids, gen.text, gen.ids, stats)
    return stats


def stopped(reason: str) -> str:
    """The summary's first words: why generation ended."""
    return f"stopped: {STOP_REASONS.get(reason, reason)}"


def print_json(prompt: str, prompt_ids: list, text: str, ids: list, stats: dict) -> None:
    """--json: the run as one JSON object on stdout."""
    doc = {"prompt": prompt, "prompt_ids": list(prompt_ids), "text": text, "ids": list(ids),
           "stop_reason": stats["stop_reason"],
           "stats": {k: v for k, v in stats.items() if k not in ("logprobs", "hypotheses")}}
    for extra in ("logprobs", "hypotheses"):
        if extra in stats:
            doc[extra] = stats[extra]
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class TextOut:
    """Where a completion is shown: the prompt (unless --no-display-prompt), then
    the generated text as it grows, in colour with --color; nothing with --json."""

    COLOR, RESET = "\x1b[32m", "\x1b[0m"   # generated text in green

    def __init__(self, stream, args):
        self.stream = stream
        self.quiet = args.json
        self.show_prompt = not args.no_display_prompt
        self.color = args.color == "always" or (args.color == "auto" and stream.isatty())
        self.colored = False        # inside the generated text's colour

    def prompt(self, text: str) -> None:
        if self.show_prompt:
            self._write(text)

    def generated(self, text: str) -> None:
        if text and self.color and not self.colored:
            text, self.colored = self.COLOR + text, True
        self._write(text)

    def end(self) -> None:
        self._write((self.RESET if self.colored else "") + "\n")

    def _write(self, text: str) -> None:
        if text and not self.quiet:
            self.stream.write(text)
            self.stream.flush()


def token_text(tok: Tokenizer, id: int) -> str:
    """The text one token stands for; a piece of a character shows as U+FFFD."""
    return tok.token_bytes(id).decode("utf-8", errors="replace")


def open_history(path: Optional[str]):
    if path is None:
        return None
    return fileio.open_output(path, "sampler history")


class Chooser:
    """The Generation's choose hook: asks --you-pick (if on), records --sampler-history
    (an open file, if any). `generation` is the Generation it serves."""

    def __init__(self, tok: Tokenizer, prompt: str, you_pick: Optional["YouPick"]):
        self.tok, self.prompt, self.you_pick = tok, prompt, you_pick
        self.generation: Optional[Generation] = None
        self.history = None
        self.steps = 0

    def __call__(self, step: SamplingStep) -> Optional[int]:
        self.steps += 1
        token = step.token
        if self.you_pick is not None:
            gen = self.generation
            token = self.you_pick.ask(step, self.steps, self.prompt + gen.text, gen.stop_ids)
        if self.history is not None:
            self.record(step, token)
        return token

    def record(self, step: SamplingStep, token: Optional[int]) -> None:
        model_p = softmax(step.logits.astype(np.float64))
        entry = {
            "step": self.steps,
            "candidates": [{"id": i, "text": token_text(self.tok, i), "p": float(model_p[i]),
                            "p_sampler": float(step.probs[i])}
                           for i in step.top(HISTORY_CANDIDATES)],
            "sampler_pick": step.token,
            "chosen": token,
            "chosen_text": None if token is None else token_text(self.tok, token),
            "chosen_by": "sampler" if token == step.token else "user",
        }
        self.history.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.history.flush()


class YouPick:
    """--you-pick: show the top candidates, numbered, and read the user's choice.

    Enter takes the sampler's pick, a number takes that candidate, q stops.
    When the input ends (e.g. a pipe runs dry) the sampler picks the rest.
    """

    def __init__(self, tok: Tokenizer, inp, err, n: int = YOU_PICK_CHOICES):
        self.tok, self.inp, self.err, self.n = tok, inp, err, n
        self.input_ended = False

    def ask(self, step: SamplingStep, number: int, text: str, stop_ids) -> Optional[int]:
        if self.input_ended:
            return step.token
        top = step.top(self.n)
        self.show(step, number, text, top, stop_ids)
        while True:
            line = self.inp.readline()
            if line == "":
                self.input_ended = True
                self.err.write("\n(end of input: the sampler picks the rest)\n")
                return step.token
            answer = line.strip().lower()
            if answer == "":
                return step.token
            if answer in ("q", "quit"):
                return None
            if answer.isdigit() and 1 <= int(answer) <= len(top):
                return top[int(answer) - 1]
            self.err.write(f"type 1..{len(top)}, Enter for the sampler's pick, or q to stop: ")
            self.err.flush()

    def show(self, step: SamplingStep, number: int, text: str, top: list, stop_ids) -> None:
        model_p = softmax(step.logits.astype(np.float64))
        tail = text[-60:].replace("\n", "\\n")
        lines = ["", f"step {number}: ...{tail}",
                 f"      {'token':<18} {'model':>7} {'sampler':>8}"]
        rows = [(f"{k:>3}.", i) for k, i in enumerate(top, 1)]
        if step.token not in top:
            rows.append(("  *.", step.token))
        for label, i in rows:
            shown = repr(token_text(self.tok, i)) + (" (end)" if i in stop_ids else "")
            mark = "  <- sampler's pick" if i == step.token else ""
            lines.append(f"  {label} {shown:<18} {model_p[i]:>7.2%} {step.probs[i]:>8.2%}{mark}")
        lines.append("choice [Enter = sampler's pick, 1-{}, q = stop]: ".format(len(top)))
        self.err.write("\n".join(lines))
        self.err.flush()


def logprobs_json(tok: Tokenizer, lp: TokenLogprobs) -> dict:
    return {"id": lp.token, "text": token_text(tok, lp.token), "logprob": lp.logprob,
            "top": [{"id": i, "text": token_text(tok, i), "logprob": v} for i, v in lp.top]}


def print_logprobs(tok: Tokenizer, logprobs: list, err) -> None:
    """One line per generated token: its log-probability, then the alternatives."""
    err.write("logprobs (the model's, before penalties and temperature):\n")
    for n, lp in enumerate(logprobs, 1):
        alternatives = "  ".join(f"{token_text(tok, i)!r} {v:.3f}" for i, v in lp.top)
        err.write(f"{n:>4} {token_text(tok, lp.token)!r:<16} {lp.logprob:>8.3f}  | "
                  f"{alternatives}\n")


# -- beam search ---------------------------------------------------------------------

def run_beams(args, model: Model, prompt: str, ids: list, kvcache: str) -> dict:
    """Print the best beam's text; list every beam on stderr; returns the statistics."""
    tok = model.tokenizer
    stop_ids = frozenset(tok.stop_ids)
    t0 = time.perf_counter()
    n = context_length(args, model) if args.n_tokens == -1 else args.n_tokens
    found = beam_search(model, ids, args.beams, n, args.length_penalty,
                        stop_ids=stop_ids, kvcache=kvcache, max_seq_len=args.seqlength)
    seconds = time.perf_counter() - t0
    texts = [beam_text(tok, b, stop_ids, args.stop) for b in found]
    out = TextOut(sys.stdout, args)
    out.prompt(prompt)
    out.generated(texts[0])
    out.end()
    for k, (b, text) in enumerate(zip(found, texts), 1):
        score = beam_score(b.logprob, len(b.ids), args.length_penalty)
        print(f"beam {k}: logprob {b.logprob:.3f} score {score:.3f} | {text!r}",
              file=sys.stderr)
    best = found[0]
    if args.stop and texts[0] != beam_text(tok, best, stop_ids, []):
        ended = "stop"                          # cut at a stop string
    elif best.ids and best.ids[-1] in stop_ids:
        ended = "eos"
    else:
        ended = ("context" if len(ids) + len(best.ids) >= context_length(args, model)
                 else "length")
    print(f"[{stopped(ended)} | prompt {len(ids)} tokens | {args.beams} beams | generated "
          f"{len(beam_tokens(best, stop_ids))} | {seconds:.2f} s | peak RSS "
          f"{peak_rss_mb():.0f} MB | kvcache {kvcache}]", file=sys.stderr)
    stats = {"prompt_tokens": len(ids), "generated_tokens": len(beam_tokens(best, stop_ids)),
             "seconds": round(seconds, 6), "peak_rss_mb": round(peak_rss_mb(), 1),
             "stop_reason": ended, "kvcache": kvcache, "beams": args.beams,
             "length_penalty": args.length_penalty,
             "hypotheses": [{"ids": b.ids, "text": t, "logprob": b.logprob,
                             "score": beam_score(b.logprob, len(b.ids), args.length_penalty)}
                            for b, t in zip(found, texts)]}
    if args.json:
        print_json(prompt, ids, texts[0], beam_tokens(best, stop_ids), stats)
    return stats


def beam_tokens(beam: Beam, stop_ids) -> list:
    """A beam's ids without its final stop id."""
    return beam.ids[:-1] if beam.ids and beam.ids[-1] in stop_ids else beam.ids


def beam_text(tok: Tokenizer, beam: Beam, stop_ids, stops: list) -> str:
    """The text a beam continues the prompt with, cut before the first stop string."""
    stream = tok.stream(at_start=False)
    text = "".join(stream.push(i) for i in beam_tokens(beam, stop_ids)) + stream.flush()
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


def run(argv: Optional[list] = None) -> int:
    return run_main(main, argv)
