#!/usr/bin/env python3
"""Compare the cost of the KV-cache strategies and prefill modes on one model.

    python bench/bench.py -w model.lmw [--runs 5] [--prompt-lens 16,128] [--contexts 0,128,512]

Prints a table: prefill tok/s (batched and one token at a time) per prompt
length, and decode tok/s per KV-cache strategy at several context positions.
Every figure is the median of --runs runs, measured side by side in one process
(min-max in brackets), so ratios between rows are meaningful even on a noisy
machine. Token ids are random: speed does not depend on what they say.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamanp  # noqa: E402
from llamanp.cliutil import run_main  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefill_rate(model, ids, kvcache: str, fill1: bool) -> float:
    s = model.session(kvcache, max_seq_len=len(ids))
    return len(ids) / timed(lambda: s.feed(ids, fill1=fill1))


def decode_rate(model, context: int, kvcache: str, steps: int, rng) -> float:
    """tok/s of `steps` single-token steps after a context of `context` tokens."""
    vocab = model.config.vocab_size
    s = model.session(kvcache, max_seq_len=context + steps + 1)
    s.feed(rng.integers(0, vocab, context + 1).tolist())
    new = rng.integers(0, vocab, steps).tolist()
    return steps / timed(lambda: [s.feed([t]) for t in new])


def summarise(samples) -> str:
    return f"{statistics.median(samples):9.1f}  [{min(samples):.1f}-{max(samples):.1f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-w", "--weights", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-lens", default="16,128,512")
    p.add_argument("--contexts", default="0,128,512,1024")
    p.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--none-max", type=int, default=256,
                   help="skip the no-cache strategy beyond this context (it is O(n^2))")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = llamanp.load(args.weights)
    load_s = time.perf_counter() - t0
    cfg, rng = model.config, np.random.default_rng(0)
    limit = cfg.max_seq_len
    print(f"{args.weights}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}; "
          f"opened in {load_s * 1000:.0f} ms; median of {args.runs} runs [min-max]")

    print(f"\n{'prefill':<28}{'tok/s':>9}")
    for n in (int(x) for x in args.prompt_lens.split(",")):
        if n > limit:
            continue
        ids = rng.integers(0, cfg.vocab_size, n).tolist()
        for fill1 in (False, True):
            rates = [prefill_rate(model, ids, "inplace", fill1) for _ in range(args.runs)]
            print(f"  {n:>5} tokens, {'one at a time' if fill1 else 'batched':<14}"
                  f"{summarise(rates)}")

    print(f"\n{'decode':<28}{'tok/s':>9}")
    for ctx in (int(x) for x in args.contexts.split(",")):
        if ctx + args.steps + 1 > limit:
            continue
        for kv in llamanp.kvcache.STRATEGIES:
            if kv == "none" and ctx > args.none_max:
                continue
            rates = [decode_rate(model, ctx, kv, args.steps, rng) for _ in range(args.runs)]
            print(f"  at {ctx:>5}, kvcache {kv:<9}    {summarise(rates)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
