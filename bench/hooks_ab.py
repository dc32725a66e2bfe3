#!/usr/bin/env python3
"""A/B: what the hook points cost when no hook is registered.

    python bench/hooks_ab.py -w MODEL.lmw --base REV [--head REV] [--rounds N]
                             [--prompt P] [--steps S] [--tries K] [--threads N]

Loads llamanp as of commit REV (`--base`, e.g. the commit before the hooks
landed) and as of `--head` (default: this working tree) side by side in one
process, as two packages, each with the model open, and measures them in
alternation: each round runs batched prefill of P random tokens and S
single-token decode steps after it (KV cache in place) on both, in
alternating order, so drift on a shared machine touches both alike; a side's
figure in a round is the best of K tries (the one least disturbed by other
processes). The table gives each side's median tok/s over the rounds and the
median (min-max) of the per-round ratios head / base.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def import_as(tree: Path, alias: str):
    """The llamanp package under `tree`, imported under the name `alias` (its
    imports are relative, so two versions can live in one process)."""
    init = tree / "llamanp" / "__init__.py"
    spec = importlib.util.spec_from_file_location(alias, init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def measure(model, ids: list, steps: list) -> tuple[float, float]:
    """(prefill tok/s of ids in one batch, decode tok/s of steps after it)."""
    s = model.session(max_seq_len=len(ids) + len(steps))
    t0 = time.perf_counter()
    s.feed(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for t in steps:
        s.feed([t])
    return prefill, len(steps) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--weights", required=True)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--head", help="the commit measured (default: this working tree)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (default 128)")
    p.add_argument("--steps", type=int, default=16, help="decode steps (default 16)")
    p.add_argument("--tries", type=int, default=3, help="tries per side and round; the best "
                   "counts (default 3)")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS threads (OPENBLAS_NUM_THREADS; default: BLAS's own choice). On "
                        "a busy shared machine 1 thread is the least noisy")
    args = p.parse_args()
    if args.threads:   # before numpy is imported
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="hooks-ab-") as tmp:
        trees = {"base": export(args.base, Path(tmp) / "base"),
                 "head": export(args.head, Path(tmp) / "head") if args.head else REPO}
        models = {side: import_as(tree, f"llamanp_{side}").load(args.weights)
                  for side, tree in trees.items()}
        rng = np.random.default_rng(0)
        vocab = models["base"].config.vocab_size
        ids = rng.integers(0, vocab, size=args.prompt).tolist()
        steps = rng.integers(0, vocab, size=args.steps).tolist()
        for m in models.values():
            measure(m, ids[:16], steps[:4])                      # warm up
        runs = {"base": [], "head": []}
        for r in range(args.rounds):
            for side in (("base", "head") if r % 2 == 0 else ("head", "base")):
                tries = [measure(models[side], ids, steps) for _ in range(args.tries)]
                runs[side].append((max(t[0] for t in tries), max(t[1] for t in tries)))
    threads = f"{args.threads} BLAS thread(s)" if args.threads else "BLAS's default threads"
    print(f"base {args.base}, head {args.head or 'working tree'}, {Path(args.weights).name}, "
          f"{args.rounds} rounds in one process (alternating order, best of {args.tries} "
          f"tries each), {threads}\n")
    print("| measure | base tok/s | head tok/s | head / base (median, min-max) |")
    print("|---|---|---|---|")
    for col, label in ((0, f"prefill {args.prompt} tokens"), (1, f"decode, {args.steps} steps")):
        b = [x[col] for x in runs["base"]]
        h = [x[col] for x in runs["head"]]
        ratios = [y / x for x, y in zip(b, h)]
        print(f"| {label} | {statistics.median(b):.2f} | {statistics.median(h):.2f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
