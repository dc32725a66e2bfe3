#!/usr/bin/env python3
"""A/B: what the hook points cost when no hook is registered.

    python bench/hooks_ab.py -w MODEL.lmw --base REV [--head REV] [--rounds N]
                             [--prompt P] [--steps S]

Runs llamanp as of commit REV (`--base`, e.g. the commit before the hooks
landed) and as of `--head` (default: this working tree) on the same model,
in alternating fresh processes: each round runs both, in alternating order,
so drift on a shared machine touches them alike. Each process measures
batched prefill of P random tokens and decode tok/s over S single-token steps
after it (KV cache in place), the median of 3 tries each. The table gives
each side's median over the rounds and the median (min-max) of the per-round
ratios head / base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export(rev: str, dest: Path) -> Path:
    """llamanp/ as of commit `rev`, extracted under dest."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "llamanp"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def child(tree: str, weights: str, prompt: int, steps: int, tries: int = 3) -> dict:
    """Measure in this process, with llamanp imported from `tree`."""
    sys.path.insert(0, tree)
    import numpy as np

    import llamanp
    assert Path(llamanp.__file__).resolve().is_relative_to(Path(tree).resolve())
    m = llamanp.load(weights)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, size=prompt).tolist()
    m.session(max_seq_len=prompt + steps + 1).feed(ids[:16])      # warm up
    prefill, decode = [], []
    for _ in range(tries):
        s = m.session(max_seq_len=prompt + steps + 1)
        t0 = time.perf_counter()
        s.feed(ids)
        prefill.append(prompt / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for t in rng.integers(0, m.config.vocab_size, size=steps).tolist():
            s.feed([t])
        decode.append(steps / (time.perf_counter() - t0))
    return {"prefill": statistics.median(prefill), "decode": statistics.median(decode)}


def run_side(tree: Path, args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run([sys.executable, __file__, "--child", str(tree), "-w", args.weights,
                          "--prompt", str(args.prompt), "--steps", str(args.steps)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--weights", required=True)
    p.add_argument("--base", help="the commit to compare against")
    p.add_argument("--head", help="the commit measured (default: this working tree)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (default 128)")
    p.add_argument("--steps", type=int, default=32, help="decode steps (default 32)")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS threads of both sides (OPENBLAS_NUM_THREADS; default: BLAS's own "
                        "choice). On a busy shared machine 1 thread is the least noisy")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.weights, args.prompt, args.steps)))
        return 0
    if not args.base:
        p.error("--base REV is required")
    with tempfile.TemporaryDirectory(prefix="hooks-ab-") as tmp:
        base = export(args.base, Path(tmp) / "base")
        head = export(args.head, Path(tmp) / "head") if args.head else REPO
        sides = {"base": [], "head": []}
        for r in range(args.rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")
            for side in order:
                sides[side].append(run_side(base if side == "base" else head, args))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{s} prefill {sides[s][-1]['prefill']:.1f} decode {sides[s][-1]['decode']:.2f}"
                for s in ("base", "head")), file=sys.stderr)
    threads = f"{args.threads} BLAS thread(s)" if args.threads else "BLAS's default threads"
    print(f"\nbase {args.base}, head {args.head or 'working tree'}, {args.rounds} rounds "
          f"(alternating order), {Path(args.weights).name}, {threads}\n")
    print("| measure | base tok/s | head tok/s | head / base (median, min-max) |")
    print("|---|---|---|---|")
    for key, label in (("prefill", f"prefill {args.prompt} tokens"),
                       ("decode", f"decode, {args.steps} steps")):
        b = [x[key] for x in sides["base"]]
        h = [x[key] for x in sides["head"]]
        ratios = [y / x for x, y in zip(b, h)]
        print(f"| {label} | {statistics.median(b):.2f} | {statistics.median(h):.2f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
