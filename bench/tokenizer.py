#!/usr/bin/env python3
"""Tokenizer speed: llamanp's tokenizers against the libraries that define them.

    python bench/tokenizer.py [--runs 5] [--sizes 1000,10000,100000] [--text FILE]
           [--llama2 FILE] [--llama3 FILE] [--gguf FILE] [--only NAME,NAME]

The tokenizers, each where its file is found (a missing one is named, not
measured):

- llama2: Llama 2's SentencePiece tokenizer.model (--llama2), through llamanp
  (which encodes with sentencepiece) and through sentencepiece itself;
- tokenizer.bin: the same model exported as llama2.c's tokenizer.bin, encoded
  by llamanp's own run.c merging (pure Python), against sentencepiece on the
  model it came from;
- llama3: Llama 3's tiktoken tokenizer.model (--llama3), through llamanp and
  through tiktoken with the same ranks and split pattern;
- smollm2: SmolLM2's byte-level BPE, read from its GGUF's metadata (--gguf;
  default: the file `python -m llamanp.fetch smollm2 --gguf` caches) into
  tiktoken ranks by llamanp, against Hugging Face `tokenizers` given the same
  vocabulary, merges and SmolLM2's pre-tokenizer (when it is installed).

Two tables: loading (reading the file into a tokenizer; for smollm2 the
conversion of the GGUF's vocabulary and merges, the metadata read beforehand),
and encoding the first N characters of --text (default the Jargon File in
tests/data, repeated if shorter) for each of --sizes. llamanp and the
reference run in turn, the order alternating, --runs times after one untimed
run of each; every time is the median of the runs [min-max], tok/s the
median of the runs' tokens per second, a ratio the median of the per-run
ratios (llamanp's time ÷ the reference's: above 1 is slower). "same
ids" compares the two encodings of each text (tokenizer.bin against
sentencepiece may differ where run.c's algorithm does, e.g. on "▁" in text).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llamanp.cliutil import run_main  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402
from llamanp.fetch import KNOWN, cache_dir  # noqa: E402
from llamanp.tokenizer import Tokenizer, load_tokenizer, read_tokenizer_file  # noqa: E402

DATA = REPO.parent / "shared" / "data"        # where the tests find the Llama tokenizers
TEXT = REPO / "tests" / "data" / "jargon-file-4.4.7-hack.txt"
NAMES = ("llama2", "tokenizer.bin", "llama3", "smollm2")


@dataclass
class Case:
    """One tokenizer: how llamanp loads it, and the reference beside it."""
    name: str
    ours: str                                   # what llamanp encodes with
    load: Callable[[], Tokenizer]
    ref: str = ""                               # the reference, "" if there is none
    ref_load: Optional[Callable[[], Callable[[str], list]]] = None   # () -> its encode


# --- the tokenizers ---------------------------------------------------------------------

def sentencepiece_encoder(path: Path) -> Callable[[], Callable[[str], list]]:
    def load():
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=str(path)).encode
    return load


def llama2c_bin(model: Path) -> bytes:
    """llama2.c's export of a SentencePiece model: BOS and EOS as "\\n<s>\\n" and
    "\\n</s>\\n", U+2581 as a space; a uint32 longest length, then per piece a
    float32 score, a uint32 length and the bytes."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    names = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}
    pieces = [names.get(i, sp.id_to_piece(i)).replace("\u2581", " ").encode("utf-8")
              for i in range(sp.vocab_size())]
    return struct.pack("<I", max(map(len, pieces))) + b"".join(
        struct.pack("<fI", sp.get_score(i), len(p)) + p for i, p in enumerate(pieces))


def tiktoken_encoder(path: Path) -> Callable[[], Callable[[str], list]]:
    extra = read_tokenizer_file(path).extra

    def load():
        import tiktoken
        ranks = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        # the same specials too: with none, tiktoken looks for them at every
        # character (an empty pattern matches everywhere), about twice as slow
        enc = tiktoken.Encoding(name="reference", pat_str=extra["pattern"],
                                mergeable_ranks=ranks, special_tokens=extra["special_tokens"])
        return lambda text: enc.encode(text, disallowed_special=())
    return load


def gguf_case(path: Path) -> Case:
    """SmolLM2's GGUF vocabulary: llamanp's conversion, and `tokenizers` (if installed)."""
    import gguf

    from llamanp.convert.gguf import tokenizer_metadata
    from llamanp.convert.tokenizers import tokenizer_from_gguf
    meta = tokenizer_metadata(gguf.GGUFReader(str(path)), path.name)
    case = Case("smollm2", "tiktoken ranks from the GGUF",
                lambda: Tokenizer.from_data(tokenizer_from_gguf(meta)))
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return case

    def load():
        from tokenizers import Tokenizer as HF
        from tokenizers import models, pre_tokenizers
        tokens = meta["tokenizer.ggml.tokens"]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                         merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]])
        hf = HF(bpe)
        # SmolLM2's tokenizer.json: every digit alone, then GPT-2's byte-level split
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        return lambda text: hf.encode(text, add_special_tokens=False).ids
    case.ref, case.ref_load = "tokenizers (same vocabulary and merges)", load
    return case


def cases(args, tmp: Path) -> tuple[list[Case], list[str]]:
    """The tokenizers whose files are here, and a note for each one that is not."""
    found, notes = [], []
    wanted = set(args.only.split(",")) if args.only else set(NAMES)
    unknown = wanted - set(NAMES)
    if unknown:
        raise LlamanpError(f"--only: unknown {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(NAMES)}")

    def missing(name, path):
        notes.append(f"{name}: {path} not found, not measured")

    llama2 = Path(args.llama2)
    if wanted & {"llama2", "tokenizer.bin"} and not llama2.is_file():
        missing("llama2 and tokenizer.bin", llama2)
    else:
        if "llama2" in wanted:
            found.append(Case("llama2", "sentencepiece", lambda: load_tokenizer(llama2),
                              "sentencepiece", sentencepiece_encoder(llama2)))
        if "tokenizer.bin" in wanted:
            exported = tmp / "tokenizer.bin"
            exported.write_bytes(llama2c_bin(llama2))
            found.append(Case("tokenizer.bin", "run.c's merges, in Python",
                              lambda: load_tokenizer(exported),
                              "sentencepiece (the source model)", sentencepiece_encoder(llama2)))
    llama3 = Path(args.llama3)
    if "llama3" in wanted:
        if llama3.is_file():
            found.append(Case("llama3", "tiktoken", lambda: load_tokenizer(llama3),
                              "tiktoken (same ranks, pattern, specials)", tiktoken_encoder(llama3)))
        else:
            missing("llama3", llama3)
    gguf_path = Path(args.gguf)
    if "smollm2" in wanted:
        if gguf_path.is_file():
            found.append(gguf_case(gguf_path))
            if found[-1].ref_load is None:
                notes.append("smollm2: `tokenizers` is not installed, no reference")
        else:
            missing("smollm2", gguf_path)
    return found, notes


# --- measuring ----------------------------------------------------------------------------

def seconds_of(fn, arg=None) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn() if arg is None else fn(arg)
    return time.perf_counter() - t0, out


def side_by_side(ours, ref, arg, runs: int) -> dict:
    """Run ours and ref (None: ours alone) in turn, alternating which goes first,
    after one untimed run of each; their times and the per-run ratios."""
    out = {"ours": [], "ref": [], "ratio": []}
    got = {"ours": seconds_of(ours, arg)[1], "ref": seconds_of(ref, arg)[1] if ref else None}
    for run in range(runs):
        order = (("ours", ours), ("ref", ref)) if run % 2 == 0 else (("ref", ref), ("ours", ours))
        for key, fn in order:
            if fn is not None:
                out[key].append(seconds_of(fn, arg)[0])
        if ref is not None:
            out["ratio"].append(out["ours"][-1] / out["ref"][-1])
    out["got"] = got
    return out


def spread(xs: list, fmt: str = ".3g", scale: float = 1.0) -> str:
    """median [min-max] of xs times scale."""
    if not xs:
        return "–"
    xs = [x * scale for x in xs]
    med = format(statistics.median(xs), fmt)
    return med if len(xs) == 1 else f"{med} [{min(xs):{fmt}}–{max(xs):{fmt}}]"


def median(xs: list, fmt: str) -> str:
    return format(statistics.median(xs), fmt) if xs else "–"


def load_table(found: list[Case], runs: int) -> tuple[str, dict, dict]:
    """Times each load; returns the table, llamanp's tokenizers and the references' encoders."""
    lines = ["| tokenizer | llamanp | load ms | reference | load ms | llamanp ÷ reference |",
             "|---|---|---:|---|---:|---:|"]
    toks, refs = {}, {}
    for c in found:
        m = side_by_side(c.load, c.ref_load, None, runs)
        toks[c.name], refs[c.name] = m["got"]["ours"], m["got"]["ref"]
        lines.append(f"| {c.name} | {c.ours} | {spread(m['ours'], scale=1e3)} | "
                     f"{c.ref or '–'} | {spread(m['ref'], scale=1e3)} | "
                     f"{spread(m['ratio'], '.2f')} |")
    return "\n".join(lines), toks, refs


def encode_table(found: list[Case], toks: dict, refs: dict, text: str, sizes: list,
                 runs: int) -> str:
    lines = ["| tokenizer | chars | tokens | llamanp ms | llamanp tok/s | reference ms | "
             "reference tok/s | llamanp ÷ reference | same ids |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in found:
        for size in sizes:
            piece = text[:size]
            m = side_by_side(toks[c.name].encode, refs[c.name], piece, runs)
            ids, ref_ids = m["got"]["ours"], m["got"]["ref"]
            rate = [len(ids) / t for t in m["ours"]]
            ref_rate = [len(ref_ids) / t for t in m["ref"]] if ref_ids is not None else []
            same = "–" if ref_ids is None else "yes" if list(ids) == list(ref_ids) else "NO"
            lines.append(f"| {c.name} | {size:,} | {len(ids):,} | "
                         f"{spread(m['ours'], scale=1e3)} | {median(rate, ',.0f')} | "
                         f"{spread(m['ref'], scale=1e3)} | {median(ref_rate, ',.0f')} | "
                         f"{spread(m['ratio'], '.2f')} | {same} |")
    return "\n".join(lines)


# --- the program --------------------------------------------------------------------------

def main(argv=None) -> int:
    smollm2 = cache_dir() / "models" / Path(KNOWN["smollm2"].member).name
    p = argparse.ArgumentParser(prog="python bench/tokenizer.py", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--sizes", default="1000,10000,100000",
                   help="characters of the text to encode, comma-separated")
    p.add_argument("--text", default=str(TEXT), help="a UTF-8 text file (default the Jargon File)")
    p.add_argument("--llama2", default=str(DATA / "llama2-tokenizer.model"), metavar="FILE")
    p.add_argument("--llama3", default=str(DATA / "llama3-tokenizer.model"), metavar="FILE")
    p.add_argument("--gguf", default=str(smollm2), metavar="FILE",
                   help="a GGUF with SmolLM2's byte-level BPE vocabulary")
    p.add_argument("--only", metavar="NAME,...", help=f"some of {', '.join(NAMES)}")
    args = p.parse_args(argv)
    if args.runs < 1:
        raise LlamanpError(f"--runs must be >= 1, got {args.runs}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise LlamanpError(f"--sizes must be comma-separated integers, got {args.sizes!r}") \
            from None
    if not sizes or min(sizes) < 1:
        raise LlamanpError("--sizes needs at least one size >= 1")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlamanpError(f"cannot read {args.text}: {e}") from None
    if not text:
        raise LlamanpError(f"{args.text} is empty")
    text = text * (max(sizes) // len(text) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        found, notes = cases(args, Path(tmp))
        loads, toks, refs = load_table(found, args.runs)
        encodes = encode_table(found, toks, refs, text, sizes, args.runs)
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    print("\n".join([
        f"# Tokenizers: {Path(args.text).name}, {args.runs} runs each "
        f"(median [min–max]), load average {load} on {os.cpu_count()} CPUs", "",
        *[f"- {n}" for n in notes], *([""] if notes else []),
        "## Loading", "", loads, "", "## Encoding", "", encodes]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
