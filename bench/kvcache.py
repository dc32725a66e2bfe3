#!/usr/bin/env python3
"""What the KV-cache strategies cost: decode speed against context, bytes held,
eviction's bookkeeping, and an A/B of the exact strategies against another tree.

    python bench/kvcache.py -w MODEL.lmw [--specs "SPEC;SPEC;..."] [--contexts 0,4096,8192]
                            [--runs 5] [--steps 8] [--threads N]
    python bench/kvcache.py -w MODEL.lmw --ab OTHER_TREE [--runs 5]

Decode: the context (at most the model's max_seq_len less the steps) is
filled by storing random keys and values through the
cache's own update/advance (in chunks of 512, as prefill would: what a cache
costs to read does not depend on what its numbers are), then --steps single
tokens are fed through the model and timed. "bookkeeping" is the share of
those steps spent in the cache's advance() and observe() (where eviction
happens). Every figure is the median of --runs runs, [min-max]; the
configurations are measured round-robin, in alternating order, so that the
drift of a shared machine touches them alike; ratios are medians of per-run
ratios.

--ab OTHER_TREE runs the exact strategies (decode at contexts 0 and 2048,
prefill of 512 tokens) alternately in fresh processes importing llamanp from
this tree and from OTHER_TREE (e.g. a `git worktree` of the commit before),
and prints this ÷ other per run.
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

TREE = Path(os.environ.get("KVBENCH_TREE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(TREE))

import numpy as np  # noqa: E402

import llamanp  # noqa: E402
from llamanp import threads  # noqa: E402
from llamanp.cliutil import ArgumentParser, run_main  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402

DEFAULT_SPECS = "inplace;inplace:dtype=q8_0;inplace:dtype=q4_0;sinks:size=512;h2o:size=512"
CHUNK = 512


def fill(session, n: int, rng) -> None:
    """Store n positions of random keys and values, as prefill chunks would."""
    cfg = session.model.config
    cache = session.cache
    for lo in range(0, n, CHUNK):
        T = min(CHUNK, n - lo)
        for layer in range(cfg.n_layers):
            k, v = rng.standard_normal((2, T, cfg.n_kv_heads, cfg.head_dim), np.float32)
            cache.update(layer, k, v)
        cache.advance(T)
        session.tokens.extend(int(t) for t in rng.integers(0, cfg.vocab_size, T))


def timed(cache, names) -> list:
    """Wrap the cache's methods `names` to add their seconds to a one-item list."""
    spent = [0.0]
    for name in names:
        method = getattr(cache, name, None)
        if method is None:
            continue

        def wrapper(*a, _m=method, **kw):
            t0 = time.perf_counter()
            try:
                return _m(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
        setattr(cache, name, wrapper)
    return spent


def decode(model, spec: str, ctx: int, steps: int, rng) -> dict:
    """Decode steps after a context of ctx positions (the model's last
    positions when ctx + steps would pass its max_seq_len)."""
    limit = model.config.max_seq_len
    s = model.session(spec, max_seq_len=min(limit, ctx + steps + 1))
    fill(s, min(ctx, limit - steps - 1), rng)
    spent = timed(s.cache, ("advance", "observe"))
    tokens = rng.integers(0, model.config.vocab_size, steps)
    t0 = time.perf_counter()
    for t in tokens:
        s.feed([int(t)])
    seconds = time.perf_counter() - t0
    return {"tok_s": steps / seconds, "bookkeeping": spent[0] / seconds,
            "mb": s.cache.nbytes / 1e6 if hasattr(s.cache, "nbytes") else float("nan")}


def prefill(model, spec: str, n: int, rng) -> dict:
    s = model.session(spec, max_seq_len=n)
    ids = [int(t) for t in rng.integers(0, model.config.vocab_size, n)]
    t0 = time.perf_counter()
    s.feed(ids)
    return {"tok_s": n / (time.perf_counter() - t0)}


def measure(model, jobs, runs: int, steps: int) -> dict:
    """jobs: (kind, spec, size); returns {job: [result per run]}."""
    rng = np.random.default_rng(0)
    out = {job: [] for job in jobs}
    for run in range(runs):
        for job in (jobs if run % 2 == 0 else jobs[::-1]):
            kind, spec, size = job
            r = decode(model, spec, size, steps, rng) if kind == "decode" else \
                prefill(model, spec, size, rng)
            out[job].append(r)
            print(f"  run {run + 1}: {kind} {spec} {size}: {r['tok_s']:.1f} tok/s",
                  file=sys.stderr)
    return out


def med(values) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}–{max(values):.3g}]"


def ratio(a: list, b: list) -> str:
    return med([x / y for x, y in zip(a, b)])


def table(rows: list, header: list) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def strategies_table(results: dict, contexts: list, specs: list) -> str:
    rows = []
    for spec in specs:
        for ctx in contexts:
            r = results[("decode", spec, ctx)]
            tok = [x["tok_s"] for x in r]
            base = [x["tok_s"] for x in results[("decode", specs[0], ctx)]]
            flat = [x["tok_s"] for x in results[("decode", spec, contexts[0])]]
            rows.append([spec, ctx, med(tok), ratio(tok, base), ratio(tok, flat),
                         f"{100 * statistics.median(x['bookkeeping'] for x in r):.2f}%",
                         f"{statistics.median(x['mb'] for x in r):.1f}"])
    return table(rows, ["kvcache", "context", "decode tok/s", f"÷ {specs[0]} at context",
                        f"÷ itself at {contexts[0]}", "bookkeeping", "MB held (nbytes)"])


def run_ab(args) -> int:
    """This tree against another, alternately, in fresh processes."""
    trees = {"this": str(TREE), "other": str(Path(args.ab).resolve())}
    got = {name: [] for name in trees}
    for run in range(args.runs):
        for name in (list(trees) if run % 2 == 0 else list(trees)[::-1]):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = dict(os.environ, KVBENCH_TREE=trees[name])
                cmd = [sys.executable, __file__, "-w", args.weights, "--runs", "1",
                       "--steps", str(args.steps), "--exact-only", "--json", f.name]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
                got[name].append(json.load(open(f.name)))
            print(f"  run {run + 1}: {name} done", file=sys.stderr)
    rows = []
    for key in got["this"][0]:
        this = [r[key] for r in got["this"]]
        other = [r[key] for r in got["other"]]
        rows.append([key, med(this), med(other), ratio(this, other)])
    print(f"A/B, {args.runs} alternating runs each, tok/s median [min–max]; "
          f"this = {trees['this']}, other = {trees['other']}\n")
    print(table(rows, ["measure", "this tok/s", "other tok/s", "this ÷ other (per run)"]))
    return 0


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--weights", required=True)
    p.add_argument("--specs", default=DEFAULT_SPECS, help="';'-separated kvcache specs")
    p.add_argument("--contexts", default="0,4096,8192")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int)
    p.add_argument("--ab", metavar="OTHER_TREE")
    p.add_argument("--exact-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads and not threads.set_threads(args.threads, reexec=True):
        raise LlamanpError(f"could not set the threads to {args.threads}")
    if args.ab:
        return run_ab(args)
    model = llamanp.load(args.weights)
    if args.exact_only:   # one run of the A/B, in this process's tree
        jobs = [("decode", kv, ctx) for kv in ("inplace", "concat") for ctx in (0, 2048)]
        jobs += [("prefill", "inplace", 512)]
        res = measure(model, jobs, 1, args.steps)
        out = {f"{k} {s} {n}": r[0]["tok_s"] for (k, s, n), r in res.items()}
        Path(args.json).write_text(json.dumps(out))
        return 0
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    contexts = [int(c) for c in args.contexts.split(",")]
    jobs = [("decode", spec, ctx) for spec in specs for ctx in contexts]
    res = measure(model, jobs, args.runs, args.steps)
    print(f"{Path(args.weights).name}: decode, {args.steps} steps after a context of C "
          f"positions, {args.runs} runs, median [min–max]\n")
    print(strategies_table(res, contexts, specs))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
