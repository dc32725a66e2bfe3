"""convert.py: checkpoint -> .lmw, from the command line."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

from ..cliutil import ArgumentParser, prog_name, run_main
from ..quant import DTYPES


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=prog_name("convert.py"),
        description="Convert a checkpoint into one .lmw file (format detected from SRC): "
                    "llama2.c training checkpoints (.pt) and exports (.bin, v0 and v1); "
                    "Meta consolidated.*.pth + params.json (one or several shards); "
                    "Hugging Face directories (config.json + safetensors or "
                    "pytorch_model.bin); GGUF files; an .lmw file (stored again, e.g. "
                    "in another --dtype).")
    p.add_argument("src", metavar="SRC", help="checkpoint file or directory")
    p.add_argument("out", metavar="OUT.lmw", help="file to write")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer to embed (SentencePiece .model, Llama 3 tiktoken file "
                        "or llama2.c tokenizer.bin)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="how to store the weights (default f32): f16, bf16 (2 bytes each) "
                        "or q8_0 (8-bit blocks, ~1.06 bytes each); norms stay f32 and "
                        "computation is float32 whatever is stored")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or infinity instead of refusing them "
                        "(they are corrupt data in any checkpoint meant to run)")
    return p


class Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.tty and done < total:
            return  # in a log, only the final line is useful
        width = 30
        filled = width * done // max(total, 1)
        line = (f"\rconverting [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"{name[:40]:<40}")
        self.stream.write(line if self.tty else line.lstrip("\r").rstrip() + "\n")
        if self.tty and done == total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: Optional[list] = None) -> int:
    from . import convert
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    ckpt = convert(args.src, args.out, tokenizer=args.tokenizer, force=args.force,
                   progress=Progress(), dtype=args.dtype,
                   allow_nonfinite=args.allow_nonfinite)
    c = ckpt.config
    tok = ckpt.tokenizer.kind if ckpt.tokenizer is not None else "none"
    print(f"wrote {args.out}: {ckpt.source}, {c.n_layers} layers, dim {c.dim}, "
          f"heads {c.n_heads}/{c.n_kv_heads}, vocab {c.vocab_size}, {args.dtype}, "
          f"tokenizer {tok} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if ckpt.tokenizer is None:
        print("note: no tokenizer embedded; pass --tokenizer PATH here, or -t PATH when "
              "running, to work with text", file=sys.stderr)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that the writer removes its temporary
    file on the way out as it does for Ctrl-C (not an Exception: nothing may swallow it)."""


def _terminate(signum, frame):
    raise _Terminated()


def run(argv: Optional[list] = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return run_main(main, argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_main(main, argv)
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
