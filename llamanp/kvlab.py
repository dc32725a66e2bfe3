"""The KV-cache lab: what each cache strategy costs and what it loses, side by side.

    python -m llamanp.kvlab -w MODEL.lmw --text FILE [--strategies "SPEC;SPEC;..."]
                            [--budget N] [--tokens N] [--chunk C] [--out DIR]

One model, one text, every strategy (default: all that llamanp.kvcache knows,
the evicting ones at a budget of --budget positions per layer; `none` is left
out: it keeps no cache, so its numbers are inplace's at a quadratic cost).

quality   The first --tokens tokens of the text are fed teacher-forced, in
          forward calls of C = --chunk tokens (default 32), through a fresh
          session per strategy and, in lockstep, through an independent
          reference session with the full in-place cache. At every position:
          the NLL of the next token (perplexity), the KL divergence
          KL(full || strategy) of the two next-token distributions and whether
          their argmaxes agree (llama.cpp's `llama-perplexity --kl-divergence`
          figures), all in float64. Eviction happens after each forward call,
          so inside a chunk a query also sees up to C - 1 positions of its own
          chunk beyond the budget; --chunk 1 is plain token-by-token decoding
          (exact to the rule, and about 4x slower).
passkey   A five-digit number hidden at 10%, 50% and 90% of --passkey-tokens
          tokens of filler (longer than the budget), then "What is the pass
          key? The pass key is": the log-probability of the right digits under
          teacher forcing, and whether greedy decoding retrieves them (greedy
          decoding follows the teacher-forced path exactly as long as every
          argmax is the right token, so the one pass answers both).
bytes     `cache.nbytes` of each quality session's cache after the whole text
          (the arrays it has allocated, capacity included, measured from
          the arrays) and per position it holds in a layer.
cost      In a fresh process per strategy:
          the passkey prompts (prefill tok/s = their tokens over their
          ordinary prefill time, micro-batches of 512); then decode tok/s at
          contexts 512, 2048, 4096, 8192 (capped at the model's context): the
          cache is filled cheaply with random keys and values through its own
          update path in calls of 512 (no model run: decode speed depends on
          how many positions a cache holds and how, not on their values),
          then --steps single-token steps are timed after one warm-up step;
          the median step counts. Peak RSS: that process's own high-water
          mark over all of it (Linux's VmHWM, read inside it; the model's
          mapped weights and the largest decode context included).
sharing   With `paged` among the strategies: 8 prompts sharing a 512-token
          prefix generated as one batch, bytes held by the paged pool against
          8 in-place caches sized exactly to the sequences, outputs compared;
          and beam search with 4 beams, the paged pool's blocks against what
          copying every beam's cache would hold.

It prints a table and writes DIR/kvlab.csv, DIR/kept_positions.json and, with
matplotlib, DIR/quality_vs_bytes.png, DIR/decode_vs_context.png and
DIR/kept_positions.png. Timings on a shared machine are noisy: they are single
runs (medians of --steps steps), for orientation, not ratios to quote.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cliutil import ArgumentParser, run_main
from .errors import LlamanpError

#: the strategies compared by default, {budget} filled in; one spec per line of
#: the table (llamanp.kvcache's spec strings)
DEFAULT_SPECS = (
    "inplace", "concat", "paged",
    "inplace:dtype=f16", "inplace:dtype=bf16", "inplace:dtype=q8_0", "inplace:dtype=q4_0",
    "kivi:bits=4", "kivi:bits=2",
    "window:size={budget}", "sinks:size={budget}", "sinks:size={budget},shift=1",
    "sinks:size={budget},dtype=q8_0", "h2o:size={budget}", "snapkv:size={budget}",
    "tova:size={budget}", "knorm:size={budget}", "random:size={budget}",
)
CONTEXTS = (512, 2048, 4096, 8192)
DEPTHS = (0.1, 0.5, 0.9)

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")


# --- the measures -------------------------------------------------------------------

def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log softmax of each row, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class Quality:
    """Running sums over the scored positions of one strategy."""
    nll: float = 0.0
    kl: list = field(default_factory=list)     # per chunk: KL of each position
    agree: int = 0
    n: int = 0
    logit_diff: float = 0.0     # max |logits - full's| / max |full's logits|, over chunks

    def add(self, logp: np.ndarray, targets: np.ndarray, ref_logp: np.ndarray,
            ref_p: np.ndarray, ref_top: np.ndarray, diff: float = 0.0) -> None:
        rows = np.arange(len(targets))
        self.logit_diff = max(self.logit_diff, diff)
        self.nll -= float(logp[rows, targets].sum())
        self.kl.append((ref_p * (ref_logp - logp)).sum(axis=-1))
        self.agree += int((logp.argmax(axis=-1) == ref_top).sum())
        self.n += len(targets)

    def summary(self) -> dict:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        mean = self.nll / self.n
        return {"ppl": math.exp(mean) if mean < 700 else math.inf,
                "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                "kl_max": float(kl.max()), "top1": self.agree / self.n, "scored": self.n,
                "logit_diff": self.logit_diff}


def quality(model, ids: np.ndarray, specs: list, chunk: int, layer: int,
            progress=None) -> tuple[dict, dict, dict]:
    """Feed ids teacher-forced through the full in-place cache and through each
    spec's cache, chunk tokens per forward call, all in lockstep.

    Returns ({spec: quality summary}, the full cache's summary,
    {spec: positions its cache holds at the end in `layer`})."""
    n = len(ids)            # the last token is only predicted, never fed
    ref = model.session("inplace", max_seq_len=n - 1)
    sessions = {spec: model.session(spec, max_seq_len=n - 1) for spec in specs}
    full, per = Quality(), {spec: Quality() for spec in specs}
    t0 = time.perf_counter()
    for start in range(0, n - 1, chunk):        # the last token predicts nothing
        piece = ids[start:min(start + chunk, n - 1)]
        targets = ids[start + 1:start + 1 + len(piece)]
        ref_logits = ref.feed(piece, all_logits=True)
        scale = float(np.abs(ref_logits).max())
        ref_logp = log_softmax64(ref_logits)
        ref_p, ref_top = np.exp(ref_logp), ref_logp.argmax(axis=-1)
        full.add(ref_logp, targets, ref_logp, ref_p, ref_top)
        for spec, s in sessions.items():
            logits = s.feed(piece, all_logits=True)
            diff = float(np.abs(logits - ref_logits).max()) / scale
            per[spec].add(log_softmax64(logits), targets, ref_logp, ref_p, ref_top, diff)
        if progress is not None:
            progress(start + len(piece), n - 1, time.perf_counter() - t0)
    kept = {spec: [int(p) for p in s.cache.positions(layer)] for spec, s in sessions.items()}
    summary = {spec: q.summary() for spec, q in per.items()}
    for spec, s in sessions.items():        # the bytes each holds after the whole text
        nbytes, held = int(s.cache.nbytes), held_positions(s.cache)
        summary[spec].update(nbytes=nbytes, held=held,
                             bytes_per_position=nbytes / held if held else 0.0)
    return summary, full.summary(), kept


def passkey_prompt(tok, n_filler: int, depth: float, key: str) -> tuple[list, list]:
    """(prompt ids, answer ids): the pass key hidden at `depth` of about
    n_filler tokens of filler, then the question."""
    per = len(tok.encode(FILLER))
    reps = max(1, round(n_filler / per))
    at = round(depth * reps)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = ("A pass key is hidden in the text below. Find it and remember it. "
            + FILLER * at + needle + FILLER * (reps - at)
            + "What is the pass key? The pass key is")
    bos = tok.bos_id is not None
    prompt = tok.encode(text, bos=bos)
    whole = tok.encode(text + " " + key, bos=bos)
    if whole[:len(prompt)] != prompt:          # the answer merged into the question
        return prompt, tok.encode(" " + key)
    return prompt, whole[len(prompt):]


def passkey(model, spec: str, cases: list) -> list[dict]:
    """Teacher-force each case's answer after its prompt (its prefill timed)."""
    out = []
    for depth, prompt, answer in cases:
        s = model.session(spec, max_seq_len=len(prompt) + len(answer))
        t0 = time.perf_counter()
        logits = s.feed(prompt)
        seconds = time.perf_counter() - t0
        logprob, greedy = 0.0, True
        for i, a in enumerate(answer):
            lp = log_softmax64(logits)
            logprob += float(lp[a])
            greedy &= int(lp.argmax()) == a
            if i + 1 < len(answer):
                logits = s.feed([a])
        out.append({"depth": depth, "tokens": len(prompt), "logprob": logprob,
                    "retrieved": greedy, "prefill_seconds": seconds})
    return out


def fill_cache(session, n: int, rng) -> None:
    """Put n positions of random keys and values into the session's cache, in
    forward calls of 512 as a prefill would, without running the model."""
    cfg, cache = session.model.config, session.cache
    block = rng.standard_normal((512, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    for start in range(0, n, 512):
        t = min(512, n - start)
        for layer in range(cfg.n_layers):
            cache.update(layer, block[:t], block[:t])
        cache.advance(t)
    session.tokens.extend([0] * n)


def decode_speed(model, spec: str, context: int, steps: int, token: int, seed: int) -> float:
    """tok/s of single-token steps after `context` positions (median step)."""
    s = model.session(spec)
    fill_cache(s, context, np.random.default_rng(seed))
    s.feed([token])                               # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        s.feed([token])
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times))


def peak_rss_mb() -> float:
    """This process's own peak resident set so far, MiB.

    Linux's VmHWM (/proc/self/status) is the high-water mark of this program
    image alone. ru_maxrss is not: at exec the kernel keeps the larger of the
    old image's peak and the new one's, and Python starts a child with vfork,
    whose old image is the parent's, so every cost process reported the lab's
    own peak (over 2 GB after a SmolLM2 quality pass) instead of its own.
    ru_maxrss (KiB on Linux, bytes on macOS) is the fallback where there is
    no /proc; there it may include the launching process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024        # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def held_positions(cache) -> float:
    """Positions held per layer, averaged over the layers."""
    layers = cache.config.n_layers
    return sum(len(cache.positions(i)) for i in range(layers)) / layers


def cost(model, spec: str, cases: list, contexts: list, steps: int, token: int,
         seed: int) -> dict:
    """What the probe process measures: the passkey prompts (their prefill
    timed), decode speeds, and the peak RSS of it all."""
    loaded = peak_rss_mb()
    keys = passkey(model, spec, cases)
    decode = {c: decode_speed(model, spec, c, steps, token, seed) for c in contexts}
    seconds = sum(p["prefill_seconds"] for p in keys)
    return {"passkey": keys, "decode": decode,
            "prefill_tps": sum(p["tokens"] for p in keys) / seconds if keys else None,
            "rss_loaded_mb": loaded, "rss_peak_mb": peak_rss_mb()}


# --- sharing: paged against copies --------------------------------------------------

def sharing(model, ids: list, prefix: int = 512, n: int = 8, suffix: int = 32,
            new: int = 8, beams: int = 4) -> dict:
    """The paged cache's prefix sharing, measured on a batch and on beam search."""
    from .batch import generate_batch
    from .beam import beam_search

    text = [ids[i % len(ids)] for i in range(prefix + n * suffix)]  # the text, repeated if short
    prompts = [text[:prefix] + text[prefix + i * suffix:prefix + (i + 1) * suffix]
               for i in range(n)]
    seq = prefix + suffix + new
    out = {}
    for spec in ("inplace", "paged"):
        r = generate_batch(model, prompts, new, kvcache=spec, stop_ids=(), max_seq_len=seq)
        out[spec] = {"outputs": [list(x) for x in r], "kv_bytes": r.stats.kv_bytes}
    batch = {"prompts": n, "prefix": prefix, "suffix": suffix, "new": new,
             "paged_bytes": out["paged"]["kv_bytes"], "inplace_bytes": out["inplace"]["kv_bytes"],
             "same_outputs": out["paged"]["outputs"] == out["inplace"]["outputs"]}
    batch["ratio"] = batch["paged_bytes"] / batch["inplace_bytes"]
    prompt = text[:min(256, prefix)]
    res = {spec: beam_search(model, prompt, beams, new, stop_ids=(), kvcache=spec,
                             max_seq_len=len(prompt) + new) for spec in ("inplace", "paged")}
    beam = {"beams": beams, "prompt": len(prompt), "new": new,
            "same_beams": [b.ids for b in res["paged"]] == [b.ids for b in res["inplace"]],
            **{f"{spec}_{k}": v for spec in res for k, v in asdict(res[spec].stats).items()}}
    return {"batch": batch, "beam": beam}


# --- the report ---------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def rows_of(results: dict, full: dict) -> list[dict]:
    """One flat dict per strategy (the CSV's rows)."""
    rows = []
    for spec, r in results.items():
        row = {"strategy": spec, **{k: r.get(k) for k in
                                    ("nbytes", "bytes_per_position", "held", "logit_diff",
                                     "kl_mean", "kl_p99", "kl_max", "top1", "ppl", "prefill_tps",
                                     "rss_loaded_mb", "rss_peak_mb", "error")}}
        if r.get("ppl") is not None:
            row["ppl_change"] = r["ppl"] / full["ppl"] - 1
        for p in r.get("passkey", []):
            tag = f"passkey_{round(100 * p['depth'])}"
            row[f"{tag}_logprob"], row[f"{tag}_retrieved"] = p["logprob"], p["retrieved"]
        for c, tps in r.get("decode", {}).items():
            row[f"decode_tps_{c}"] = tps
        rows.append(row)
    return rows


def fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict], contexts: list) -> str:
    """The markdown table printed at the end."""
    head = (["strategy", "bytes held", "B/position", "logits Δ", "KL mean", "KL p99", "top-1",
             "ppl", "Δppl", "passkey 10/50/90%"] + [f"decode@{c}" for c in contexts]
            + ["prefill tok/s", "peak RSS MiB"])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    failed = []
    for r in rows:
        if r.get("error"):               # the cost process failed: its cells stay empty
            failed.append(f"- the cost process of {r['strategy']} failed: {r['error']}")
        keys = [k for k in r if k.startswith("passkey_") and k.endswith("_retrieved")]
        pk = " ".join(("✓" if r[k] else "✗") + f"{r[k[:-10] + '_logprob']:.1f}" for k in keys)
        cells = [r["strategy"], human_bytes(r["nbytes"]) if r.get("nbytes") is not None else "–",
                 fmt(r.get("bytes_per_position"), ",.0f"), fmt(r.get("logit_diff"), ".1e"),
                 fmt(r.get("kl_mean"), ".2e"),
                 fmt(r.get("kl_p99"), ".2e"), fmt(r.get("top1"), ".4f"), fmt(r.get("ppl"), ".3f"),
                 fmt(r.get("ppl_change"), "+.2%"), pk or "–"]
        cells += [fmt(r.get(f"decode_tps_{c}"), ".1f") for c in contexts]
        cells += [fmt(r.get("prefill_tps"), ".0f"), fmt(r.get("rss_peak_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + failed if failed else []))


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plots(rows: list[dict], full: dict, kept: dict, n_tokens: int, contexts: list,
          layer: int, out: Path, title: str) -> list[Path]:
    """Draw the three figures; returns their paths (none without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in rows if r.get("nbytes") and r.get("kl_mean") is not None]
    markers = "osD^v<>ph*XP"
    # one colour and marker per strategy, the same in both figures
    style = {r["strategy"]: dict(color=plt.cm.tab20(i % 20), marker=markers[i % len(markers)])
             for i, r in enumerate(ok)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], "kl_mean", "mean KL(full ‖ strategy), nats (log)"),
                           (axes[1], "ppl", "perplexity (log)")):
        for r in ok:
            y = r[key] if key == "ppl" else max(r[key], 1e-9)   # exact ones sit on the floor
            ax.scatter(r["nbytes"], y, s=40, label=r["strategy"], **style[r["strategy"]])
        if key == "ppl":
            ax.axhline(full["ppl"], color="black", linestyle=":", linewidth=1)
            ax.annotate(f"full cache {full['ppl']:.3f}", (0.01, full["ppl"]), fontsize=8,
                        xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("bytes held at the end (cache.nbytes, log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{title}: quality against memory (KL 1e-9 = exact)", fontsize=10)
    fig.tight_layout()
    made.append(out / "quality_vs_bytes.png")
    fig.savefig(made[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for r in ok:
        pts = [(c, r.get(f"decode_tps_{c}")) for c in contexts]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.plot(*zip(*pts), "-", markersize=4, label=r["strategy"], **style[r["strategy"]])
    ax.set_xlabel("context (positions before the decoded token)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{title}: decode speed against context (single runs, noisy)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    made.append(out / "decode_vs_context.png")
    fig.savefig(made[-1], dpi=90)
    plt.close(fig)

    evicting = {s: p for s, p in kept.items() if len(p) < n_tokens - 1}
    if evicting:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(evicting) + 1.5))
        for i, (spec, pos) in enumerate(evicting.items()):
            ax.scatter(pos, [i] * len(pos), s=2, marker="|")
        ax.set_yticks(range(len(evicting)), list(evicting))
        ax.set_xlim(0, n_tokens)
        ax.set_xlabel("position in the text")
        ax.set_title(f"{title}: positions kept at the end, layer {layer}", fontsize=10)
        fig.tight_layout()
        made.append(out / "kept_positions.png")
        fig.savefig(made[-1], dpi=90)
        plt.close(fig)
    return made


# --- the program --------------------------------------------------------------------

def add_lab_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--weights", required=True, metavar="MODEL.lmw")
    p.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--strategies", metavar="SPEC;SPEC;...",
                   help="kv-cache specs separated by ';' (default: all, at --budget)")
    p.add_argument("--budget", type=int, default=256,
                   help="positions per layer the evicting strategies keep (default 256)")
    p.add_argument("--tokens", type=int, default=4000,
                   help="use the text's first N tokens (default 4000)")
    p.add_argument("--chunk", type=int, default=32,
                   help="tokens per forward call in the quality pass (default 32; 1 = decoding)")
    p.add_argument("--passkey-tokens", type=int, default=None,
                   help="filler tokens around the pass key (default max(4 x budget, 1024), "
                        "at most the model's context)")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                   help="decode contexts, comma-separated (default 512,2048,4096,8192)")
    p.add_argument("--steps", type=int, default=4, help="timed decode steps per context")
    p.add_argument("--layer", type=int, default=None,
                   help="the layer whose kept positions are plotted (default the middle one)")
    p.add_argument("--no-cost", action="store_true",
                   help="quality only: no probe processes (no speed, RSS, passkey)")
    p.add_argument("--no-sharing", action="store_true", help="skip the paged sharing test")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="kvlab-out", metavar="DIR",
                   help="where the CSV, JSON and plots go (default ./kvlab-out)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)


def check_args(args, model) -> None:
    cfg = model.config
    if args.budget < 1:
        raise LlamanpError(f"--budget must be >= 1, got {args.budget}")
    if args.tokens < 2:
        raise LlamanpError(f"--tokens must be >= 2, got {args.tokens}")
    if not 1 <= args.chunk <= 512:
        raise LlamanpError(f"--chunk must be in 1..512, got {args.chunk}")
    if args.steps < 1:
        raise LlamanpError(f"--steps must be >= 1, got {args.steps}")
    if args.layer is None:
        args.layer = cfg.n_layers // 2
    if not 0 <= args.layer < cfg.n_layers:
        raise LlamanpError(f"--layer must be in 0..{cfg.n_layers - 1}, got {args.layer}")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        raise LlamanpError(f"--contexts must be comma-separated integers, "
                           f"got {args.contexts!r}") from None
    if not contexts or min(contexts) < 1:
        raise LlamanpError("--contexts needs at least one context >= 1")
    # the decode steps (and the warm-up) must fit after the context
    room = cfg.max_seq_len - args.steps - 1
    args.context_list = sorted({min(c, room) for c in contexts})
    if args.passkey_tokens is None:
        args.passkey_tokens = max(4 * args.budget, 1024)
    if args.passkey_tokens < 1:
        raise LlamanpError(f"--passkey-tokens must be >= 1, got {args.passkey_tokens}")


def strategy_specs(args, config) -> list[str]:
    """The specs to compare, each checked by building its cache once."""
    from .kvcache import make_cache

    if args.strategies is None:
        specs = []
        for template in DEFAULT_SPECS:
            spec = template.format(budget=args.budget)
            try:
                make_cache(spec, config, 1)
                specs.append(spec)
            except LlamanpError as e:        # not on this version, or not at this budget
                args.notes.append(f"left out {spec}: {e}")
        return specs
    specs = [s.strip() for s in args.strategies.split(";") if s.strip()]
    if not specs:
        raise LlamanpError("--strategies names no strategy")
    for spec in specs:
        if spec.split(":")[0] == "none":
            raise LlamanpError("the strategy 'none' keeps no cache: its numbers are "
                               "inplace's, at a quadratic cost; leave it out of the lab")
        make_cache(spec, config, 1)      # a bad spec fails here, with its own message
    if len(set(specs)) != len(specs):
        raise LlamanpError("--strategies names a spec twice")
    return specs


LEGEND = (
    "bytes held: cache.nbytes after the whole text (allocated arrays, measured); B/position: "
    "per position held in a layer. logits Δ: max |logits - full cache's| / max |full's| "
    "(exact strategies: float rounding only). KL: KL(full || strategy) of the next-token "
    "distributions, nats, mean and 99th percentile over the positions; top-1: how often the "
    "argmaxes agree; ppl, Δppl: the strategy's perplexity and its change. Quality is fed "
    "teacher-forced {chunk} tokens per forward call; eviction after each call, budget {budget}. "
    "passkey: ✓/✗ greedy retrieval and the answer's log-probability at 10/50/90% depth. "
    "decode@C: tok/s of single steps after C positions (cache filled with random keys and "
    "values, median of the steps); prefill: the passkey prompts' ordinary prefill; peak RSS: "
    "the own high-water mark (VmHWM) of a fresh process per strategy running the passkey and "
    "decode tests (the model's mapped weights and the largest decode context included).")


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def text_ids(model, path: str, n: int, notes: list) -> list:
    from .perplexity import read_text
    tok = model.tokenizer
    if tok is None:
        raise LlamanpError("the model has no tokenizer; the lab needs one for the text "
                           "and the passkey test")
    ids = tok.encode(read_text(path), bos=True)[:n]
    limit = model.config.max_seq_len + 1       # all but the last token go through the cache
    if len(ids) > limit:
        notes.append(f"the text is cut to {limit} tokens: the model's context is "
                     f"{model.config.max_seq_len}")
        ids = ids[:limit]
    if len(ids) < 2:
        raise LlamanpError(f"{path} is {len(ids)} token long; the lab needs at least 2")
    return ids


def passkey_cases(model, args) -> list:
    """(depth, prompt, answer) at each depth; the filler is shortened to fit
    the model's context, and there are no cases if even the shortest does not."""
    key = str(np.random.default_rng(args.seed).integers(10000, 100000))
    filler = args.passkey_tokens
    while filler >= 1:
        cases = [(d, *passkey_prompt(model.tokenizer, filler, d, key)) for d in DEPTHS]
        if max(len(p) + len(a) for _, p, a in cases) <= model.config.max_seq_len:
            return cases
        filler = filler * 3 // 4 if filler > 8 else filler - 1
    return []


def run_probe(args) -> list:
    """Run one spec's cost measurements in a fresh process; returns its JSON."""
    cmd = [sys.executable, "-m", "llamanp.kvlab", "--probe", args.probe_spec,
           "-w", args.weights, "--text", args.text, "--tokens", str(args.tokens),
           "--budget", str(args.budget), "--passkey-tokens", str(args.passkey_tokens),
           "--contexts", ",".join(map(str, args.context_list)), "--steps", str(args.steps),
           "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        return {"error": lines[-1].removeprefix("error: ")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m llamanp.kvlab",
                       description="Compare KV-cache strategies on one model and one text.")
    add_lab_arguments(p)
    args = p.parse_args(argv)
    if args.threads is not None:
        from .threads import set_threads
        set_threads(args.threads)
    from .model import load
    model = load(args.weights)
    check_args(args, model)
    if args.probe is not None:          # the cost process of one spec
        ids = text_ids(model, args.text, args.tokens, [])
        r = cost(model, args.probe, passkey_cases(model, args), args.context_list,
                 args.steps, ids[-1], args.seed)
        print(json.dumps(r))
        return 0

    args.notes = []        # said once every argument is known to be good
    specs = strategy_specs(args, model.config)
    ids = text_ids(model, args.text, args.tokens, args.notes)
    cases = passkey_cases(model, args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlamanpError(f"cannot create {out}: {e.strerror}") from None
    for note in args.notes:
        say(note)
    t_start, load_start = time.perf_counter(), load_average()
    say(f"{len(ids)} tokens, {len(specs)} strategies, budget {args.budget}, "
        f"chunk {args.chunk}")

    def progress(done, total, seconds):
        if done == total or done % (16 * args.chunk) < args.chunk:
            say(f"  quality: {done}/{total} positions, {seconds:.0f} s")
    phases = {}
    per, full, kept = quality(model, np.asarray(ids), specs, args.chunk, args.layer, progress)
    phases["quality"] = time.perf_counter() - t_start
    results = {spec: dict(per[spec]) for spec in specs}
    if not args.no_cost:
        t_cost = time.perf_counter()
        for spec in specs:
            t0 = time.perf_counter()
            args.probe_spec = spec
            results[spec].update(run_probe(args))
            say(f"  cost: {spec} ({time.perf_counter() - t0:.0f} s)")
        phases["cost"] = time.perf_counter() - t_cost
    share = None
    if "paged" in specs and not args.no_sharing:
        say("  sharing: paged against copies")
        t0 = time.perf_counter()
        share = sharing(model, ids)
        phases["sharing"] = time.perf_counter() - t0
    rows = rows_of(results, full)
    name = Path(args.weights).stem
    report = [f"# KV-cache lab: {name}, {Path(args.text).name}, {len(ids)} tokens",
              "", "command: python -m llamanp.kvlab " + " ".join(
                  a if a and all(c.isalnum() or c in "-_.,=:/" for c in a) else repr(a)
                  for a in (sys.argv[1:] if argv is None else argv)), "",
              f"full cache: perplexity {full['ppl']:.4f} over {full['scored']} positions; "
              f"quality fed in chunks of {args.chunk}; budget {args.budget}; " + (
                  f"passkey prompts of {min(len(c[1]) for c in cases)}-"
                  f"{max(len(c[1]) for c in cases)} tokens"
                  if cases else "no passkey test: the model's context is too short for it")
              + f"; kept positions of layer {args.layer}",
              "", table(rows, args.context_list)]
    if share is not None:
        b, m = share["batch"], share["beam"]
        report += ["", f"paged sharing: {b['prompts']} prompts sharing a {b['prefix']}-token "
                   f"prefix (+{b['suffix']} own, {b['new']} generated): paged pool "
                   f"{human_bytes(b['paged_bytes'])} vs {b['prompts']} in-place caches "
                   f"{human_bytes(b['inplace_bytes'])} = {b['ratio']:.3f}x, same outputs: "
                   f"{b['same_outputs']}",
                   f"beam search, {m['beams']} beams on a {m['prompt']}-token prompt: peak bytes "
                   f"paged {human_bytes(m['paged_peak_kv_bytes'])} vs in-place copies "
                   f"{human_bytes(m['inplace_peak_kv_bytes'])}, same beams: {m['same_beams']}"]
    report += ["", LEGEND.format(budget=args.budget, chunk=args.chunk),
               f"Wall time {time.perf_counter() - t_start:.0f} s ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
               + f"); load average at start / end "
               f"{load_start} / {load_average()} on {os.cpu_count()} CPUs (a shared machine "
               "slows every timing; they are single runs)."]
    text = "\n".join(report)
    print(text)
    write_csv(rows, out / "kvlab.csv")
    (out / "kvlab.md").write_text(text + "\n")
    (out / "kept_positions.json").write_text(json.dumps(
        {"layer": args.layer, "tokens": len(ids), "kept": kept}))
    if share is not None:
        (out / "sharing.json").write_text(json.dumps(share, indent=1))
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            say("matplotlib is not installed: no plots (pip install matplotlib)")
        else:
            for path in plots(rows, full, kept, len(ids), args.context_list, args.layer, out,
                              name):
                say(f"wrote {path}")
    say(f"wrote {out / 'kvlab.csv'} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def run() -> int:
    return run_main(main)


if __name__ == "__main__":
    sys.exit(run())
