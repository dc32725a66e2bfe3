#!/usr/bin/env python3
"""Measure llamanp on one model, next to the machine's own limits.

    python bench/bench.py -w MODEL.lmw [--runs N] [--quick] [--csv OUT.csv] [--plot OUT.png]
                          [--compare transformers] [--compare llama-cpp] [--threads N]
                          [--dtype-file MODEL-bf16.lmw ...]

What it measures, all in one process and one run:

  prefill   tok/s for prompts of 16, 128, 512, 1024 tokens, fed as one batch
            and one token at a time (fill1), KV cache in place;
  decode    tok/s of single-token steps after a context of about 0, 512, 1024
            and 2048 tokens, for each KV-cache strategy (`none` only up to 512:
            it recomputes the whole context at every step);
  load      llamanp.load (mmap + validation), and the peak RSS of generating
            (resource.getrusage, in a fresh process);
  dtypes    with --dtype-file (repeatable: the same model stored as f16, bf16 or
            q8_0), per file: decode tok/s at the shortest context, batched
            prefill tok/s at 128 tokens, load time and peak RSS, each against
            the main file's (per-run ratios);
  machine   streaming-read bandwidth, gemv bandwidth and sgemm GFLOP/s, so that
            every figure can be given as a fraction of its roofline:
              decode (and fill1) roofline = read bandwidth / weight bytes per token,
              batched prefill roofline    = sgemm FLOP/s / FLOPs per token.

With --compare transformers the same prompts and decode steps run through
transformers' LlamaForCausalLM in float32 (loaded from the GGUF the model was
converted from, or --hf-gguf / --hf-dir), and every row gets the ratio
llamanp / transformers; --compare llama-cpp does the same through llama-cpp-python
on an F32 GGUF (bench/lmw_to_gguf.py writes one).

--csv writes one row per figure: engine (llamanp | llamanp-DTYPE for a
--dtype-file | transformers | llama-cpp | machine), section (prefill | decode | machine |
load | memory), mode (batched | fill1 | a KV-cache strategy | the measure),
size (prompt tokens, context tokens, or the test's size), unit, runs, median,
min, max and, for llamanp's prefill and decode rows, roofline,
fraction_of_roofline and vs_transformers / vs_llama_cpp (median, min, max of
the per-run ratios), and samples: the per-run values in run order, ';'-separated.

Every figure is the median of --runs runs with [min-max]. The configurations
are measured round-robin, the whole set once per run (in alternating
direction), so drift on a shared machine touches them all alike; ratios are
the medians of the per-run ratios. Token ids are random: speed does not depend
on what they say.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import llamanp  # noqa: E402
from llamanp import threads  # noqa: E402
from llamanp.cliutil import ArgumentParser, run_main  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402

STRATEGIES = ("inplace", "concat", "none")
FULL = dict(prompt_lens=(16, 128, 512, 1024), fill1_max=1024,
            contexts=(0, 512, 1024, 2048, 4096, 8192),
            steps=16, runs=5, machine_mb=1024, sgemm_n=2048, probe=(512, 64))
QUICK = dict(prompt_lens=(16, 128, 512), fill1_max=128, contexts=(0, 512),
             steps=8, runs=3, machine_mb=256, sgemm_n=1024, probe=(128, 16))
ENGINES = ("llamanp", "transformers", "llama-cpp")
MACHINE_REPS = 3    # a machine measure's figure for one run is its best of this many tries
CSV_COLUMNS = ("engine", "section", "mode", "size", "unit", "runs", "median", "min", "max",
               "roofline", "fraction_of_roofline",
               "vs_transformers", "vs_transformers_min", "vs_transformers_max",
               "vs_llama_cpp", "vs_llama_cpp_min", "vs_llama_cpp_max", "samples")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- measurements -----------------------------------------------------------------

@dataclass
class Task:
    """One configuration: `once()` runs it once and returns its figure."""
    engine: str      # llamanp | transformers | llama-cpp | machine
    section: str     # prefill | decode | machine | load
    mode: str        # batched | fill1 | a kv strategy | a machine measure
    size: int        # prompt tokens, context tokens, MB, ...
    unit: str
    once: Callable[[], float]
    warmup: bool = True      # run once, untimed, before the measured runs
    between: bool = False    # a bandwidth reading, taken between the other tasks (below)
    samples: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.engine, self.section, self.mode, self.size)



def prefill_tasks(engine: str, lengths, fill1_max: int, prefill, rng, vocab: int) -> list:
    """The prefill measurements of one engine: each prompt length fed as one
    batch, and (up to fill1_max) one token at a time; `prefill(ids, fill1)`
    returns the function that times one run."""
    tasks = []
    for n in lengths:
        ids = rng.integers(0, vocab, n).tolist()
        tasks.append(Task(engine, "prefill", "batched", n, "tok/s", prefill(ids, False)))
        if n <= fill1_max:
            tasks.append(Task(engine, "prefill", "fill1", n, "tok/s", prefill(ids, True),
                              warmup=n <= 128))
    return tasks

def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def runtime(t: "Task") -> str:
    """Whose worker threads a task runs on: the machine measures share
    numpy's BLAS with llamanp, so no pause between them. A storage-dtype
    variant (llamanp-bf16, ...) decodes on llamanp's own widening threads,
    with the BLAS held to one thread, and the BLAS threads that any batched
    product before it leaves spinning (about 0.1 s) slow its first steps:
    its decode counts as a runtime of its own."""
    if t.engine.startswith("llamanp-"):
        return f"{t.engine} {t.section}"
    return "llamanp" if t.engine in ("llamanp", "machine") else t.engine


def bandwidth_bound(t: Task) -> bool:
    """Reads every weight for each token: a decode step or a one-at-a-time prefill."""
    return t.engine != "machine" and (t.section == "decode" or t.mode == "fill1")


def with_readings(order: list[Task], between: list[Task]) -> list[Task]:
    """`order` with a bandwidth reading before each bandwidth-bound task (the
    `between` tasks in turn), and each `between` task at least once."""
    out, k = [], 0
    for t in order:
        if between and bandwidth_bound(t):
            out.append(between[k % len(between)])
            k += 1
        out.append(t)
    return out + between[k:]


def run_round_robin(tasks: list[Task], runs: int, settle: float, warmup: bool) -> None:
    """Every task once per run, alternating the direction of the sweep,
    after one untimed warm-up pass (set-up, first-touch pages, caches; the
    long one-at-a-time prefills warm themselves up). A short pause whenever
    the engine changes lets the other engine's idle worker threads (OpenBLAS
    and OpenMP spin a while after each call) park.

    The bandwidth readings (`between` tasks) are taken right before the
    bandwidth-bound tasks instead, so that they see the machine as those
    runs do (on a shared machine, the other jobs come and go); a run's figure
    of each is the best of its readings in that run."""
    t_start = time.perf_counter()
    between = [t for t in tasks if t.between]
    sweep = [t for t in tasks if not t.between]
    rounds = ([("warm-up", [t for t in sweep if t.warmup])] if warmup else []) + \
        [(f"run {r + 1}/{runs}", sweep if r % 2 == 0 else sweep[::-1]) for r in range(runs)]
    for name, order in rounds:
        t0 = time.perf_counter()
        last_engine = None
        readings: dict[int, list] = {id(t): [] for t in between}
        for t in with_readings(order, between):
            if last_engine is not None and runtime(t) != last_engine and settle > 0:
                time.sleep(settle)
            last_engine = runtime(t)
            value = float(t.once())
            if t.between:
                readings[id(t)].append(value)
            elif name != "warm-up":
                t.samples.append(value)
        if name != "warm-up":
            for t in between:
                t.samples.append(max(readings[id(t)]))
        say(f"  {name} done in {time.perf_counter() - t0:.1f} s "
            f"({time.perf_counter() - t_start:.0f} s so far)")


class Lazy:
    """A value built on first use (untimed set-up of a configuration)."""

    def __init__(self, make):
        self.make, self.value, self.done = make, None, False

    def get(self):
        if not self.done:
            self.value, self.done = self.make(), True
        return self.value


# -- llamanp ------------------------------------------------------------------------

def llamanp_prefill(model):
    """`prefill(ids, fill1)` for prefill_tasks: a fresh in-place session per run."""
    def prefill(ids, fill1):
        def once():
            s = model.session("inplace", max_seq_len=len(ids))
            return len(ids) / timed(lambda: s.feed(ids, fill1=fill1))
        return once
    return prefill


def llamanp_decode(model, kv: str, ctx: int, steps: int, rng) -> Callable[[], float]:
    """tok/s of `steps` single-token steps after a context of ctx tokens."""
    vocab = model.config.vocab_size
    prefix = rng.integers(0, vocab, max(ctx, 1)).tolist()
    new = rng.integers(0, vocab, steps).tolist()

    def make_base():
        s = model.session(kv, max_seq_len=len(prefix) + steps)
        s.feed(prefix)          # Session.feed prefills long prompts in micro-batches
        return s
    base = Lazy(make_base)

    def once():
        s = base.get().fork()   # the same context every run; copying is untimed
        return steps / timed(lambda: [s.feed([t]) for t in new])
    return once


def llamanp_load(path: str) -> Callable[[], float]:
    return lambda: timed(lambda: llamanp.load(path)) * 1000


def llamanp_tasks(model, path: str, plan, rng) -> list[Task]:
    vocab = model.config.vocab_size
    tasks = prefill_tasks("llamanp", plan.prompt_lens, plan.fill1_max, llamanp_prefill(model),
                          rng, vocab)
    for ctx in plan.contexts:
        for kv in STRATEGIES:
            if (kv == "none" and ctx > plan.none_max) or (kv == "concat"
                                                           and ctx > plan.concat_max):
                continue
            steps = plan.steps if kv != "none" else plan.none_steps
            tasks.append(Task("llamanp", "decode", kv, ctx, "tok/s",
                              llamanp_decode(model, kv, ctx, steps, rng)))
    tasks.append(Task("llamanp", "load", "llamanp.load", 0, "ms", llamanp_load(path)))
    return tasks


# -- the same model in other storage dtypes -------------------------------------------

SAME_MODEL = ("n_layers", "dim", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")


def storage_dtype(model) -> str:
    """What a file's matrices are stored as, the largest share first ("q8_0+f16"
    where rows not a multiple of 32 fell back to f16); the norms (1-D, f32 in
    every file) do not count."""
    share: dict = {}
    for name, dtype in model.file.dtypes.items():
        t = model.file.tensors[name]
        if len(t.shape) >= 2:
            share[dtype] = share.get(dtype, 0) + int(np.prod(t.shape))
    return "+".join(sorted(share, key=share.get, reverse=True))


def dtype_engine(dtype: str) -> str:
    """The engine column of a storage-dtype row: llamanp on another file."""
    return f"llamanp-{dtype}"


def load_dtype_files(parser, main, files: list) -> list[tuple[str, str, object]]:
    """[(dtype, path, model)] of the --dtype-file files, refused with one usage
    line (exit 2) unless each is the main model in a dtype not seen yet."""
    seen = {storage_dtype(main): main.file.path}
    out = []
    for path in files:
        if not Path(path).is_file():
            parser.error(f"--dtype-file {path}: no such file")
        try:
            m = llamanp.load(path)
        except LlamanpError as e:
            parser.error(f"--dtype-file {path}: {e}")
        diff = [f"{k} {getattr(m.config, k)} vs {getattr(main.config, k)}"
                for k in SAME_MODEL if getattr(m.config, k) != getattr(main.config, k)]
        if diff:
            parser.error(f"--dtype-file {path} is not the model of -w {main.file.path} in "
                         f"another dtype ({', '.join(diff)})")
        dtype = storage_dtype(m)
        if dtype in seen:
            parser.error(f"--dtype-file {path} is stored as {dtype}, as {seen[dtype]} already "
                         "is; give each dtype once")
        seen[dtype] = path
        out.append((dtype, path, m))
    return out


def dtype_sizes(plan) -> tuple[int, int]:
    """(decode context, batched prompt tokens) the storage dtypes are compared at:
    the shortest context, and 128 tokens or the nearest measured length above
    (else the longest), so that the f32 row is the main file's own figure."""
    longer = [n for n in plan.prompt_lens if n >= 128]
    return min(plan.contexts), min(longer) if longer else max(plan.prompt_lens)


def dtype_tasks(dtype: str, path: str, model, plan, rng) -> list[Task]:
    """Decode, batched prefill and load of one more file; the main file's
    rows are its ordinary llamanp tasks at the same sizes."""
    engine, (ctx, n) = dtype_engine(dtype), dtype_sizes(plan)
    ids = rng.integers(0, model.config.vocab_size, n).tolist()
    return [Task(engine, "prefill", "batched", n, "tok/s", llamanp_prefill(model)(ids, False)),
            Task(engine, "decode", "inplace", ctx, "tok/s",
                 llamanp_decode(model, "inplace", ctx, plan.steps, rng)),
            Task(engine, "load", "llamanp.load", 0, "ms", llamanp_load(path))]


# -- the machine's own limits ------------------------------------------------------

def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every layer tensor, the final
    norm, the output matrix (the embedding matrix, once, when tied) and one
    row of the embedding table."""
    cfg, total = model.config, 0
    for name, arr in model.file.tensors.items():
        if name == "tok_embeddings.weight":
            total += arr.nbytes if cfg.tied_embeddings else arr.nbytes // cfg.vocab_size
        else:
            total += arr.nbytes
    return total


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of the four matrix products of one layer."""
    return [(cfg.dim, cfg.q_dim + 2 * cfg.kv_dim), (cfg.q_dim, cfg.dim),
            (cfg.dim, 2 * cfg.hidden_dim), (cfg.hidden_dim, cfg.dim)]


def matrix_parameters(cfg) -> tuple[int, int]:
    """(parameters multiplied per token in the layers, in the output matrix)."""
    per_layer = sum(i * o for i, o in layer_shapes(cfg))
    return cfg.n_layers * per_layer, cfg.vocab_size * cfg.dim


def prefill_flops_per_token(cfg, n: int) -> float:
    """Useful FLOPs per prompt token of a batched prefill of n tokens: 2 per
    layer weight, causal attention (q·k and p·v over (n+1)/2 positions on
    average), and the output matrix once for the whole prompt."""
    layers, output = matrix_parameters(cfg)
    attention = cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * (n + 1) / 2
    return 2 * layers + attention + 2 * output / n


def decode_flops_per_token(cfg, ctx: int) -> float:
    """FLOPs of one decode step at position ctx: every weight once, the output
    matrix included, and attention over ctx + 1 positions."""
    layers, output = matrix_parameters(cfg)
    return 2 * (layers + output) + cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * (ctx + 1)


def machine_tasks(cfg, plan) -> list[Task]:
    n_floats = plan.machine_mb * (1 << 20) // 4
    buf = Lazy(lambda: np.full(n_floats, 1.0, np.float32))      # pages touched here
    side = int(math.isqrt(n_floats))
    sgemm_t = min(512, max(plan.prompt_lens))
    rng = np.random.default_rng(1)

    def stream_sum():
        a = buf.get()
        return a.nbytes / timed(lambda: np.add.reduce(a)) / 1e9

    def stream_dot():
        a = buf.get()
        half = len(a) // 2
        x, y = a[:half], a[half:2 * half]
        return 2 * x.nbytes / timed(lambda: np.dot(x, y)) / 1e9

    def gemv():
        w = buf.get()[:side * side].reshape(side, side)     # [out, in]
        x = np.ones((1, side), np.float32)
        return w.nbytes / timed(lambda: x @ w.T) / 1e9        # as the model multiplies

    shapes = Lazy(lambda: [(rng.standard_normal((sgemm_t, i), np.float32),
                            rng.standard_normal((o, i), np.float32)) for i, o in layer_shapes(cfg)])

    def sgemm_model():
        pairs = shapes.get()
        flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[0] for x, w in pairs)
        return flops / timed(lambda: [x @ w.T for x, w in pairs]) / 1e9

    n = plan.sgemm_n
    square = Lazy(lambda: (rng.standard_normal((n, n), np.float32),
                           rng.standard_normal((n, n), np.float32)))

    def sgemm_square():
        a, b = square.get()
        return 2 * n ** 3 / timed(lambda: a @ b) / 1e9

    def warm(fn):
        """Each run: the best of MACHINE_REPS tries (the first call warms up)."""
        state = {"warm": False}

        def once():
            if not state["warm"]:
                fn()
                state["warm"] = True
            return max(fn() for _ in range(MACHINE_REPS))
        return once

    return [
        Task("machine", "machine", "read: np.sum, 1 thread", plan.machine_mb, "GB/s",
             warm(stream_sum), between=True),
        Task("machine", "machine", "read: BLAS sdot", plan.machine_mb, "GB/s", warm(stream_dot),
             between=True),
        Task("machine", "machine", f"gemv: x @ W.T, W [{side}, {side}]", plan.machine_mb,
             "GB/s", warm(gemv), between=True),
        Task("machine", "machine", f"sgemm: one layer's products, {sgemm_t} tokens", sgemm_t,
             "GFLOP/s", warm(sgemm_model)),
        Task("machine", "machine", f"sgemm: {n} x {n} x {n}", n, "GFLOP/s", warm(sgemm_square)),
    ]


# -- transformers --------------------------------------------------------------------

def find_source_gguf(lmw_path: Path, metadata: dict) -> Optional[Path]:
    from lmw_to_gguf import find_source_gguf as find
    return find(lmw_path, metadata)


def load_transformers(args, model):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.hf_dir:
        where = f"the Hugging Face directory {args.hf_dir}"
        hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    else:
        gguf = Path(args.hf_gguf) if args.hf_gguf else \
            find_source_gguf(Path(args.weights), model.file.metadata)
        if gguf is None:
            raise LlamanpError(
                "--compare transformers: no source GGUF found next to the model (its metadata "
                "names none that is there); give --hf-gguf FILE or --hf-dir DIR")
        where = f"{gguf} (dequantized to float32 by transformers)"
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    return hf.eval(), where


def transformers_tasks(hf, plan, rng_seed: int, vocab: int) -> list[Task]:
    import torch
    rng = np.random.default_rng(rng_seed)     # the same ids as llamanp's tasks
    tasks = []

    @torch.inference_mode()
    def forward(ids, cache=None):
        out = hf(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
        return out.past_key_values

    def prefill(ids, fill1):
        def once():
            if not fill1:
                return len(ids) / timed(lambda: forward(ids))

            def run():
                cache = None
                for t in ids:
                    cache = forward([t], cache)
            return len(ids) / timed(run)
        return once

    tasks += prefill_tasks("transformers", plan.prompt_lens,
                           min(plan.fill1_max, plan.hf_fill1_max), prefill, rng, vocab)

    def decode(ctx):
        prefix = rng.integers(0, vocab, max(ctx, 1)).tolist()
        new = rng.integers(0, vocab, plan.steps).tolist()
        base = Lazy(lambda: forward(prefix))

        def once():
            cache = copy.deepcopy(base.get())

            def run():
                c = cache
                for t in new:
                    c = forward([t], c)
            return len(new) / timed(run)
        return once

    for ctx in plan.contexts:
        if ctx <= plan.hf_context_max:
            tasks.append(Task("transformers", "decode", "DynamicCache", ctx, "tok/s",
                              decode(ctx)))
    return tasks


def transformers_check(hf, model, vocab: int) -> float:
    """max |logits difference| of llamanp and transformers on 16 random tokens."""
    import torch
    ids = np.random.default_rng(7).integers(0, vocab, 16).tolist()
    with torch.inference_mode():
        want = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return float(np.abs(model.logits(ids) - want).max())


# -- llama.cpp ------------------------------------------------------------------------

def load_llama_cpp(path: Path, n_ctx: int, n_batch: int, n_threads: int):
    from llama_cpp import Llama
    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
              n_threads_batch=n_threads, logits_all=False, verbose=False)
    try:
        return Llama(n_ubatch=n_batch, **kw)
    except TypeError:    # an older llama-cpp-python without n_ubatch
        return Llama(**kw)


def llama_cpp_tasks(llm, plan, rng_seed: int, vocab: int) -> list[Task]:
    rng = np.random.default_rng(rng_seed)
    tasks = []

    def prefill(ids, fill1):
        def once():
            llm.reset()
            if not fill1:
                return len(ids) / timed(lambda: llm.eval(ids))
            return len(ids) / timed(lambda: [llm.eval([t]) for t in ids])
        return once

    tasks += prefill_tasks("llama-cpp", plan.prompt_lens, plan.fill1_max, prefill, rng, vocab)

    def decode(ctx):
        prefix = rng.integers(0, vocab, max(ctx, 1)).tolist()
        new = rng.integers(0, vocab, plan.steps).tolist()

        def once():
            # one context per Llama object: rebuild this one's (untimed); eval
            # drops whatever the cache holds past n_tokens first
            llm.reset()
            llm.eval(prefix)
            return len(new) / timed(lambda: [llm.eval([t]) for t in new])
        return once

    for ctx in plan.contexts:
        tasks.append(Task("llama-cpp", "decode", "llama.cpp", ctx, "tok/s", decode(ctx)))
    return tasks


def llama_cpp_check(path: Path, model, vocab: int, n_threads: int) -> Optional[float]:
    """max |logits difference| over 16 random tokens, from a small context of
    its own: only logits_all=True keeps every row's logits in llm.scores (the
    benchmark's context keeps it off, so that prefill skips the output matrix
    for all but the last token, as llamanp's does)."""
    from llama_cpp import Llama
    ids = np.random.default_rng(7).integers(0, vocab, 16).tolist()
    try:
        llm = Llama(model_path=str(path), n_ctx=len(ids), n_threads=n_threads,
                    logits_all=True, verbose=False)
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)], np.float32)
        del llm
    except Exception:   # noqa: BLE001 - only a sanity figure; versions differ
        return None
    want = model.logits(ids)
    return float(np.abs(want - got).max()) if got.shape == want.shape else None


# --- peak RSS, in a fresh process ----------------------------------------------------

def maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024   # bytes vs KiB


def vm_hwm_mb() -> Optional[float]:
    """Linux's peak RSS of this process image (VmHWM), which, unlike
    ru_maxrss, does not carry over the parent's peak through fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_probe(args) -> int:
    """(the child) load, generate, print peak RSS figures as JSON."""
    prompt, gen = args.probe_prompt, args.probe_gen
    before = maxrss_mb()
    m = llamanp.load(args.weights)
    loaded = maxrss_mb()
    ids = np.random.default_rng(3).integers(0, m.config.vocab_size, prompt).tolist()
    t0 = time.perf_counter()
    out = list(llamanp.generate(m, ids, gen, kvcache=args.rss_probe, stop_ids=(),
                                max_seq_len=prompt + gen))
    print(json.dumps({"start_mb": before, "loaded_mb": loaded, "peak_mb": maxrss_mb(),
                      "vm_hwm_mb": vm_hwm_mb(), "tokens": len(out),
                      "seconds": time.perf_counter() - t0}))
    return 0


def measure_rss(weights: str, kv: str, prompt: int, gen: int) -> Optional[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "-w", weights, "--rss-probe", kv,
           "--probe-prompt", str(prompt), "--probe-gen", str(gen)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        say(f"peak RSS probe ({kv}) failed: {done.stderr.strip()[-300:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------

def stats(samples) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def fmt(x: Optional[float], digits: int = 3) -> str:
    """A number with `digits` significant digits (no exponent), or a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{decimals}f}"


def fmt_range(samples, digits: int = 3) -> str:
    med, lo, hi = stats(samples)
    return f"{fmt(med, digits)} [{fmt(lo, digits)}–{fmt(hi, digits)}]"


def paired_ratio(a: list, b: list) -> Optional[tuple[float, float, float]]:
    """Median [min, max] of run-by-run ratios a[i] / b[i] (the same round)."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    return stats([x / y for x, y in zip(a[:n], b[:n]) if y > 0])


def fmt_ratio(r) -> str:
    if r is None:
        return "–"
    return f"{r[0]:.2f}× [{r[1]:.2f}–{r[2]:.2f}]"


def md_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i >= right_from else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return [line(header), sep] + [line(r) for r in rows]


@dataclass
class Report:
    model: object
    path: str
    plan: object
    tasks: dict                 # key -> Task
    engines: list               # engines compared besides llamanp
    notes: list
    header: list
    rss: dict                   # kv -> probe result
    dtypes: list = field(default_factory=list)     # [(dtype, path)], the main file first
    dtype_rss: dict = field(default_factory=dict)  # dtype -> probe result (kvcache inplace)
    limits: dict = field(default_factory=dict)

    def dtype_row_engine(self, i: int) -> str:
        """Row i of the storage-dtype table is measured by this engine: the main
        file's own llamanp tasks for row 0, the --dtype-file's for the others."""
        return "llamanp" if i == 0 else dtype_engine(self.dtypes[i][0])

    def dtype_task(self, i: int, section, mode, size) -> Optional[Task]:
        return self.get(self.dtype_row_engine(i), section, mode, size)

    def get(self, engine, section, mode, size) -> Optional[Task]:
        return self.tasks.get((engine, section, mode, size))

    def other(self, engine, section, mode, size) -> Optional[Task]:
        if section == "prefill":
            return self.get(engine, section, mode, size)
        return self.get(engine, section,
                        {"transformers": "DynamicCache", "llama-cpp": "llama.cpp"}[engine], size)


def pass_shape(cfg, section: str, mode: str, size: int) -> tuple[int, float]:
    """(tokens per pass over the weights, FLOPs per token) of a llamanp row."""
    if section == "prefill" and mode == "batched":
        return size, prefill_flops_per_token(cfg, size)
    # one token per pass: a decode step (fill1: at positions up to size)
    return 1, decode_flops_per_token(cfg, size if section == "decode" else size // 2)


def reached(rep: Report) -> tuple[tuple[float, str], tuple[float, str]]:
    """The best bandwidth and FLOP rate (GB/s, GFLOP/s, each with the row
    that reached it) that llamanp's own runs of the model show this machine
    delivers: every pass reads every weight at least once and does at least
    the FLOPs counted, so these are lower bounds of the machine's limits."""
    cfg, wb = rep.model.config, weight_bytes_per_token(rep.model)
    best_bw, best_flops = (0.0, ""), (0.0, "")
    for (engine, section, mode, size), t in rep.tasks.items():
        if engine != "llamanp" or section not in ("prefill", "decode") or not t.samples:
            continue
        tokens, flops = pass_shape(cfg, section, mode, size)
        fastest = max(t.samples)
        what = (f"llamanp's decode after {size} tokens, kvcache {mode}" if section == "decode"
                else f"llamanp's {size}-token prefill, "
                     f"{'batched' if mode == 'batched' else 'one at a time'}")
        best_bw = max(best_bw, (fastest / tokens * wb / 1e9, what))
        best_flops = max(best_flops, (fastest * flops / 1e9, what))
    return best_bw, best_flops


def compute_limits(rep: Report) -> None:
    """The bandwidth and FLOP rate behind every roofline: the best the machine
    measures gave, or what llamanp itself reached when that is more (then the
    measures saw a busier machine than those runs did). A figure of llamanp's
    can therefore never pass its roofline."""
    m = [t for k, t in rep.tasks.items() if k[0] == "machine"]
    best = {t.mode: max(t.samples) for t in m}
    # the decode roofline is the streaming-read bandwidth (the gemv figure is
    # shown beside it: how close BLAS's own matrix-vector product gets)
    bw_mode, bw = max(((k, v) for k, v in best.items() if k.startswith("read")),
                      key=lambda kv: kv[1])
    flops_mode, flops = max(((k, v) for k, v in best.items() if k.startswith("sgemm")),
                            key=lambda kv: kv[1])
    (bw_seen, bw_row), (flops_seen, flops_row) = reached(rep)
    wb = weight_bytes_per_token(rep.model)
    rep.limits = dict(bandwidth_measured=bw, sgemm_measured=flops,
                      bandwidth_gbs=max(bw, bw_seen),
                      bandwidth_from=f'"{bw_mode}"' if bw >= bw_seen else bw_row,
                      sgemm_gflops=max(flops, flops_seen),
                      sgemm_from=f'"{flops_mode}"' if flops >= flops_seen else flops_row,
                      weight_bytes=wb, decode_roofline=max(bw, bw_seen) * 1e9 / wb,
                      gemv_gbs=next(v for k, v in best.items() if k.startswith("gemv")))


def roofline(rep: Report, section: str, mode: str, size: int) -> float:
    """The tok/s that neither compute nor memory traffic would allow to be
    beaten: T tokens per read of the weights take at least
    max(T × FLOPs per token / sgemm rate, weight bytes / bandwidth)."""
    L = rep.limits
    tokens, flops = pass_shape(rep.model.config, section, mode, size)
    seconds = max(tokens * flops / (L["sgemm_gflops"] * 1e9),
                  L["weight_bytes"] / (L["bandwidth_gbs"] * 1e9))
    return tokens / seconds


def limit_source(L: dict, name: str, unit: str, measure: str) -> str:
    """Where a roofline's rate comes from, for the report."""
    source = L[f"{name}_from"]
    if source.startswith('"'):
        return f"the best {measure}, {source}"
    return (f"reached by {source}, more than the best {measure} measured, "
            f"{fmt(L[f'{name}_measured'])} {unit}: a busy machine slowed the measure")


def render(rep: Report) -> str:
    cfg, L = rep.model.config, rep.limits
    out = list(rep.header)
    runs = rep.plan.runs

    out += ["", "## Machine limits (measured in this run; the best is the roofline)", ""]
    rows = []
    for t in (t for k, t in rep.tasks.items() if k[0] == "machine"):
        med, lo, hi = stats(t.samples)
        rows.append([t.mode, t.unit, fmt(med), fmt(hi), f"[{fmt(lo)}–{fmt(hi)}]"])
    out += md_table(["measure", "unit", "median", "best", "[min–max]"], rows, right_from=2)
    out += ["", f"The GB/s measures are taken in turn right before each decode measurement "
            f"and each one-at-a-time prefill, so that they see the machine as those runs do; a "
            f"run's figure is the best of its readings, each the best of {MACHINE_REPS} tries. "
            f"The GFLOP/s measures run once per run, best of {MACHINE_REPS} tries.", "",
            f"- decode roofline: {fmt(L['bandwidth_gbs'])} GB/s "
            f"({limit_source(L, 'bandwidth', 'GB/s', 'streaming read')}) ÷ "
            f"{L['weight_bytes'] / 1e6:,.1f} MB of weights read per "
            f"token (the output matrix included) = **{fmt(L['decode_roofline'])} tok/s**",
            f"- prefill roofline: {fmt(L['sgemm_gflops'])} GFLOP/s "
            f"({limit_source(L, 'sgemm', 'GFLOP/s', 'sgemm')}) ÷ FLOPs "
            f"per token (2 × {matrix_parameters(cfg)[0] / 1e6:.1f} M layer weights + causal "
            f"attention + the output matrix once per prompt)",
            "- every roofline is T / max(T × FLOPs per token ÷ sgemm rate, weight bytes ÷ "
            "bandwidth) for T tokens per pass over the weights: the batched prefill is "
            "compute-bound, decode and one-at-a-time prefill bandwidth-bound. The rates are "
            "the best measured or the best llamanp's own runs reached, whichever is more, so "
            "no figure of llamanp's can pass its roofline"]

    def compare_cells(t: Task, section, mode, size):
        cells = []
        for e in rep.engines:
            o = rep.other(e, section, mode, size)
            cells += [fmt_range(o.samples) if o else "–",
                      fmt_ratio(paired_ratio(t.samples, o.samples)) if o else "–"]
        return cells

    extra_header = []
    for e in rep.engines:
        extra_header += [f"{e} tok/s", f"llamanp / {e}"]

    out += ["", f"## Prefill (a prompt of N tokens, KV cache in place), tok/s, median of {runs} "
            "[min–max]", ""]
    rows = []
    for n in rep.plan.prompt_lens:
        for mode in ("batched", "fill1"):
            t = rep.get("llamanp", "prefill", mode, n)
            if t is None:
                continue
            roof = roofline(rep, "prefill", mode, n)
            rows.append([str(n), "batched" if mode == "batched" else "one at a time",
                         fmt_range(t.samples), fmt(roof),
                         f"{100 * statistics.median(t.samples) / roof:.0f}%"]
                        + compare_cells(t, "prefill", mode, n))
    out += md_table(["tokens", "mode", "llamanp tok/s", "roofline", "of roofline"]
                    + extra_header, rows, right_from=2)
    out += ["", "Batched prefill is held against the compute roofline, one token at a time "
            "against the bandwidth roofline (every step reads every weight)."]

    out += ["", f"## Decode ({rep.plan.steps} single-token steps after a context of C tokens; "
            f"{rep.plan.none_steps} for `none`), tok/s, median of {runs} [min–max]", ""]
    rows = []
    for ctx in rep.plan.contexts:
        for kv in STRATEGIES:
            t = rep.get("llamanp", "decode", kv, ctx)
            if t is None:
                continue
            roof = roofline(rep, "decode", kv, ctx)
            ours = rep.get("llamanp", "decode", "inplace", ctx)
            speedup = "1" if kv == "inplace" else \
                fmt_ratio(paired_ratio(ours.samples, t.samples)) if ours else "–"
            rows.append([str(ctx), kv, fmt_range(t.samples),
                         f"{100 * statistics.median(t.samples) / roof:.0f}%", speedup]
                        + compare_cells(t, "decode", kv, ctx))
    out += md_table(["context", "kvcache", "llamanp tok/s", "of roofline", "inplace ÷ this"]
                    + extra_header,
                    rows, right_from=2)
    kv_bytes = 2 * cfg.n_layers * cfg.kv_dim * 4
    out += ["", "`inplace ÷ this`: how much faster the in-place cache is, per run, side by side.",
            "", f"Roofline {fmt(L['decode_roofline'])} tok/s (weights only). The KV cache adds "
            f"{kv_bytes / 1024:.0f} KiB per position of context to every step "
            f"({kv_bytes * max(rep.plan.contexts) / 1e6:.0f} MB at {max(rep.plan.contexts)}); "
            "`concat` also copies it once per step."]
    out += context_cost_lines(rep, kv_bytes)

    out += ["", "## Load and memory", ""]
    rows = []
    t = rep.get("llamanp", "load", "llamanp.load", 0)
    if t is not None:
        rows.append(["llamanp.load (mmap + validation)", fmt_range(t.samples) + " ms"])
    for kv, r in rep.rss.items():
        if r:
            hwm = f" (VmHWM {r['vm_hwm_mb']:,.0f} MB)" if r.get("vm_hwm_mb") else ""
            rows.append([f"peak RSS, {r['tokens']} tokens after a {rep.plan.probe[0]}-token "
                         f"prompt, kvcache {kv} (fresh process)", f"{r['peak_mb']:,.0f} MB{hwm}"])
            rows.append(["  … peak before generating (Python, numpy, llamanp.load)",
                         f"{r['loaded_mb']:,.0f} MB"])
    weights_mb = sum(a.nbytes for a in rep.model.file.tensors.values()) / (1 << 20)
    out += md_table(["what", "value"], rows)
    out += ["", f"The weights are {weights_mb:,.0f} MiB of the memory-mapped file; they count in "
            "RSS once read (file-backed pages, shared with the page cache)."]
    if len(rep.dtypes) > 1:
        out += render_dtypes(rep)
    if rep.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"


def context_cost_lines(rep: Report, kv_bytes: int) -> list[str]:
    """Decode with the in-place cache at each context against the shortest:
    the ratio (per run, side by side) and what the context adds per token
    (attention over the cache: reading it and the two products)."""
    ctxs = sorted(c for c in rep.plan.contexts if rep.get("llamanp", "decode", "inplace", c))
    if len(ctxs) < 2:
        return []
    base = rep.get("llamanp", "decode", "inplace", ctxs[0])
    base_ms = 1000 / statistics.median(base.samples)
    rows = []
    for c in ctxs[1:]:
        t = rep.get("llamanp", "decode", "inplace", c)
        ms = 1000 / statistics.median(t.samples)
        rows.append([str(c), fmt(statistics.median(t.samples)),
                     fmt_ratio(paired_ratio(t.samples, base.samples)),
                     f"{ms - base_ms:.2f}", f"{kv_bytes * c / 1e6:.0f}"])
    return ["", f"### What the context costs (in-place cache, against context {ctxs[0]})", ""] + \
        md_table(["context", "tok/s", f"÷ context {ctxs[0]}", "added ms per token",
                  "cache MB read per token"], rows) + \
        ["", "`added ms per token`: the median time per token minus context "
         f"{ctxs[0]}'s, i.e. attention over the cache (both products and the softmax) "
         "and reading it."]


def render_dtypes(rep: Report) -> list[str]:
    """The same model stored in other dtypes, row by row against the main file."""
    ctx, n = dtype_sizes(rep.plan)
    base, runs = rep.dtypes[0][0], rep.plan.runs
    rows = []
    for i, (dtype, path) in enumerate(rep.dtypes):
        load = rep.dtype_task(i, "load", "llamanp.load", 0)
        r = rep.dtype_rss.get(dtype)
        row = [dtype, f"{os.path.getsize(path) / (1 << 20):,.1f}",
               fmt_range(load.samples) if load else "–", f"{r['peak_mb']:,.0f}" if r else "–"]
        for section, mode, size in (("decode", "inplace", ctx), ("prefill", "batched", n)):
            t, ref = rep.dtype_task(i, section, mode, size), rep.dtype_task(0, section, mode, size)
            row += [fmt_range(t.samples),
                    "1" if i == 0 else fmt_ratio(paired_ratio(t.samples, ref.samples))]
        rows.append(row)
    out = ["", f"## Storage dtypes (the same model; median of {runs} [min–max])", ""]
    out += md_table(["dtype", "file MB", "load ms", "peak RSS MB", "decode tok/s",
                     f"decode vs {base}", "prefill tok/s", f"prefill vs {base}"], rows)
    prompt, gen = rep.plan.probe
    out += ["", f"Decode: {rep.plan.steps} single-token steps after a context of {ctx} tokens, "
            f"kvcache inplace; prefill: a {n}-token prompt as one batch. `vs {base}`: this row "
            f"÷ the {base} row, run by run. Compute is float32 in every row: compressed weights "
            "are widened as they are used (a layer at a time into reused buffers, or, for one "
            "token, piece by piece by every thread, llamanp/parallel.py): a smaller file saves "
            "memory and bytes read, and adds the widening to every pass over the weights.",
            "", (f"Peak RSS: {gen} tokens after a {prompt}-token prompt, kvcache inplace, in a "
                 "fresh process; MB are 2^20 bytes. " if any(rep.dtype_rss.values()) else
                 "Peak RSS not measured (--no-rss). ")
            + "Files: " + ", ".join(f"{d} `{Path(f).name}`" for d, f in rep.dtypes) + "."]
    return out


def write_csv(rep: Report, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for (engine, section, mode, size), t in rep.tasks.items():
            med, lo, hi = stats(t.samples)
            roof = frac = ""
            ratios = {}
            if engine == "llamanp" and section in ("prefill", "decode"):
                r = roofline(rep, section, mode, size)
                roof, frac = f"{r:.6g}", f"{med / r:.4f}"
                for e in ENGINES[1:]:
                    o = rep.other(e, section, mode, size) if e in rep.engines else None
                    ratios[e] = paired_ratio(t.samples, o.samples) if o else None
            cells = [engine, section, mode, size, t.unit, len(t.samples), f"{med:.6g}",
                     f"{lo:.6g}", f"{hi:.6g}", roof, frac]
            for e in ENGINES[1:]:
                r = ratios.get(e)
                cells += [f"{r[0]:.4f}", f"{r[1]:.4f}", f"{r[2]:.4f}"] if r else ["", "", ""]
            w.writerow(cells + [";".join(f"{x:.6g}" for x in t.samples)])

        def single(engine, mode, size, value):   # a figure measured once: no spread
            w.writerow([engine, "memory", mode, size, "MB", 1, f"{value:.1f}", f"{value:.1f}",
                        f"{value:.1f}"] + [""] * 8 + [f"{value:.1f}"])
        for kv, r in rep.rss.items():
            if r:
                single("llamanp", f"peak RSS {kv}", rep.plan.probe[0], r["peak_mb"])
        for i, (dtype, f) in enumerate(rep.dtypes):
            engine = rep.dtype_row_engine(i)
            single(engine, "file size", 0, os.path.getsize(f) / (1 << 20))
            r = rep.dtype_rss.get(dtype)
            if i > 0 and r:    # the main file's is the peak RSS inplace row above
                single(engine, "peak RSS inplace", rep.plan.probe[0], r["peak_mb"])


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis from lo to hi: 1, 2 and 5 times every power of ten
    in it, so every decade is marked; finer steps when that gives fewer than
    four (a range inside one decade), and if even those do, the next fine
    steps outside the range too (the axis then widens to show them)."""
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
    for steps in ((1, 2, 5), (1, 2, 3, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9),
                  (1, 1.2, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9)):
        every = [m * 10.0 ** k for k in decades for m in steps]
        ticks = [t for t in every if lo <= t <= hi]
        if len(ticks) >= 4:
            return ticks
    below = [t for t in every if t < lo]
    above = [t for t in every if t > hi]
    while len(ticks) < 4:
        ticks = [below.pop()] + ticks + [above.pop(0)]
    return ticks


def tick_label(v: float) -> str:
    """A tick's number as written: plain digits (1000, not 1e+03), a decimal
    only below 20."""
    return f"{v:.0f}" if v >= 20 else f"{v:.3g}"


def plot(rep: Report, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    fig, note = draw(rep, title)
    # "tight" keeps the legends and the note below the plots in the picture
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)


def draw(rep: Report, title: str):
    """The figure, and the note box on it (None without one)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain_log_axis(ax):
        # after everything is drawn, so that the limits are final
        ax.set_yticks(log_ticks(*ax.get_ylim()))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())

    colours = {"inplace": "tab:blue", "concat": "tab:orange", "none": "tab:red",
               "batched": "tab:blue", "fill1": "tab:green",
               "transformers": "tab:gray", "llama-cpp": "tab:purple"}
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(11, 5.6))

    def series(ax, tasks, xs, label, colour, style="-o"):
        pts = [(x, stats(t.samples)) for x, t in zip(xs, tasks) if t is not None]
        if not pts:
            return
        x = [p[0] for p in pts]
        med = np.array([p[1][0] for p in pts])
        lo = med - np.array([p[1][1] for p in pts])
        hi = np.array([p[1][2] for p in pts]) - med
        ax.errorbar(x, med, yerr=[lo, hi], fmt=style, color=colour, label=label,
                    capsize=3, markersize=4, linewidth=1.5)

    ctxs = list(rep.plan.contexts)
    for kv in STRATEGIES:
        series(ax_d, [rep.get("llamanp", "decode", kv, c) for c in ctxs], ctxs,
               f"llamanp, kvcache {kv}", colours[kv])
    for e in rep.engines:
        mode = {"transformers": "DynamicCache", "llama-cpp": "llama.cpp"}[e]
        series(ax_d, [rep.get(e, "decode", mode, c) for c in ctxs], ctxs, f"{e} ({mode})",
               colours[e], "--s")
    # what the in-place cache buys, in words: per-run ratios at each context
    lines = []
    for c in ctxs:
        ours = rep.get("llamanp", "decode", "inplace", c)
        parts = []
        for kv in ("concat", "none"):
            other = rep.get("llamanp", "decode", kv, c)
            if ours is not None and other is not None:
                parts.append(f"{paired_ratio(ours.samples, other.samples)[0]:.2f}× {kv}")
        if parts:
            lines.append(f"at {c}: " + ", ".join(parts))
    ax_d.axhline(rep.limits["decode_roofline"], color="black", linestyle=":", linewidth=1,
                 label="bandwidth roofline")
    ax_d.set_yscale("log")
    plain_log_axis(ax_d)
    ax_d.set_xticks(ctxs)
    ax_d.set_xlabel("context (tokens before the decoded one)")
    ax_d.set_ylabel("decode tok/s (log)")
    ax_d.set_title("Decode: what the KV cache buys")
    ax_d.grid(True, which="both", alpha=0.3)
    legend = ax_d.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    note = None
    if lines:   # under the legend, outside the plot, where it covers no line
        note = ax_d.annotate("tok/s of inplace ÷ other\n" + "\n".join(lines),
                             xy=(0.5, 0), xycoords=legend, xytext=(0, -6),
                             textcoords="offset points", ha="center", va="top", fontsize=8,
                             bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.8"))

    lens = list(rep.plan.prompt_lens)
    for mode in ("batched", "fill1"):
        series(ax_p, [rep.get("llamanp", "prefill", mode, n) for n in lens], lens,
               f"llamanp, {'batched' if mode == 'batched' else 'one at a time'}", colours[mode])
        for e in rep.engines:
            series(ax_p, [rep.get(e, "prefill", mode, n) for n in lens], lens,
                   f"{e}, {'batched' if mode == 'batched' else 'one at a time'}",
                   colours[e], "--s" if mode == "batched" else ":^")
    ax_p.plot(lens, [roofline(rep, "prefill", "batched", n) for n in lens], color="black",
              linestyle="--", linewidth=1, label="compute roofline")
    ax_p.axhline(rep.limits["decode_roofline"], color="black", linestyle=":", linewidth=1,
                 label="bandwidth roofline")
    ax_p.set_xscale("log", base=2)
    ax_p.set_yscale("log")
    plain_log_axis(ax_p)
    ax_p.set_xticks(lens)
    ax_p.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_p.xaxis.set_minor_formatter(NullFormatter())
    ax_p.set_xlabel("prompt tokens")
    ax_p.set_ylabel("prefill tok/s (log)")
    ax_p.set_title("Prefill: one batch vs one token at a time")
    ax_p.grid(True, which="both", alpha=0.3)
    ax_p.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, note


# --- the program ---------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_cpp_isa(llama_cpp) -> str:
    """The vector instruction sets this llama.cpp was compiled for, from its
    system info ("AVX2 = 1 | AVX512 = 1 | ...")."""
    try:
        info = llama_cpp.llama_print_system_info()
        info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    except (AttributeError, TypeError, OSError):   # an old or odd build
        return "unknown instruction sets"
    on = [part.split("=")[0].strip() for part in info.replace("CPU :", "").split("|")
          if part.strip().endswith("= 1") and part.split("=")[0].strip().startswith("AVX")]
    return ", ".join(on) if on else "no AVX"


def blas_kernels_line() -> Optional[str]:
    """A header line naming OpenBLAS's kernels here, and, when the environment
    chose them (OPENBLAS_CORETYPE), the ones OpenBLAS picks for this CPU by
    itself: asked of a fresh Python without that variable, since OpenBLAS
    reads it once, when it loads."""
    here = threads.blas_kernels()
    if here is None:
        return None
    pinned = os.environ.get("OPENBLAS_CORETYPE", "")
    if not pinned:
        return f"- BLAS kernels: OpenBLAS {here}, its own choice for this CPU"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    code = "import numpy; from llamanp.threads import blas_kernels; print(blas_kernels())"
    try:
        own = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        own = "unknown"
    line = f"- BLAS kernels: OpenBLAS {here}, set by OPENBLAS_CORETYPE={pinned} in the environment"
    if own != here:
        line += (f"; without it OpenBLAS picks {own} on this CPU (its sgemm rate, and so "
                 "the batched prefill, differ accordingly)")
    return line


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LlamanpError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise LlamanpError(f"{what} must be integers >= 0, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="bench/bench.py",
                       description="Prefill and decode speed of llamanp per KV-cache strategy, "
                                   "next to the machine's roofline (and transformers, llama.cpp).")
    p.add_argument("-w", "--weights", required=True, help="the model, .lmw")
    p.add_argument("--runs", type=int, help="runs per figure (default 5; --quick 3)")
    p.add_argument("--quick", action="store_true",
                   help="fewer lengths and runs (prompts 16,128,512, one-at-a-time up to 128; "
                        "contexts 0,512; 256 MB machine arrays)")
    p.add_argument("--csv", help="write every figure to this CSV file")
    p.add_argument("--plot", help="draw decode and prefill tok/s to this PNG (needs matplotlib)")
    p.add_argument("--compare", action="append", default=[],
                   choices=["transformers", "llama-cpp"],
                   help="also run the same workload through this engine (repeatable)")
    p.add_argument("--threads", type=int,
                   help="BLAS threads for numpy (and torch / llama.cpp threads); "
                        "default: as the libraries start")
    p.add_argument("--prompt-lens", help="prefill prompt lengths, e.g. 16,128,512,1024")
    p.add_argument("--fill1-max", type=int,
                   help="longest prompt also fed one token at a time (default 1024; --quick 128)")
    p.add_argument("--contexts", help="decode context positions, e.g. 0,512,1024,2048")
    p.add_argument("--steps", type=int, help="decode steps per measurement (default 16)")
    p.add_argument("--none-max", type=int, default=512,
                   help="longest context for kvcache none, which recomputes it every step "
                        "(default 512)")
    p.add_argument("--concat-max", type=int, default=2048,
                   help="longest context for kvcache concat, which copies the cache every "
                        "step (default 2048); longer ones run the in-place cache only")
    p.add_argument("--machine-mb", type=int,
                   help="size of the bandwidth-test array in MiB (default 1024; --quick 256)")
    p.add_argument("--settle", type=float, default=0.1,
                   help="seconds to pause when the engine changes (default 0.1)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up pass before the measured runs")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes")
    p.add_argument("--dtype-file", action="append", default=[], metavar="FILE.lmw",
                   help="the same model stored in another dtype (convert.py --dtype): also "
                        "measure its decode, prefill, load and peak RSS against -w "
                        "(repeatable)")
    hf = p.add_argument_group("--compare transformers")
    hf.add_argument("--hf-gguf", help="the GGUF for transformers to load (default: the one "
                                      "the model was converted from, if it lies beside it)")
    hf.add_argument("--hf-dir", help="a Hugging Face model directory for transformers instead")
    hf.add_argument("--hf-fill1-max", type=int, default=128,
                    help="longest prompt transformers also feeds one token at a time (default 128)")
    hf.add_argument("--hf-context-max", type=int,
                    help="longest decode context for transformers (default 2048; --quick 0)")
    lc = p.add_argument_group("--compare llama-cpp")
    lc.add_argument("--llama-gguf", help="an F32 GGUF of the same model for llama.cpp "
                                         "(default: MODEL.f32.gguf beside the .lmw)")
    # the peak-RSS child process
    p.add_argument("--rss-probe", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--probe-prompt", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--probe-gen", type=int, default=16, help=argparse.SUPPRESS)
    return p


@dataclass
class Plan:
    prompt_lens: tuple
    fill1_max: int
    contexts: tuple
    steps: int
    none_steps: int
    none_max: int
    runs: int
    machine_mb: int
    sgemm_n: int
    probe: tuple
    hf_fill1_max: int
    hf_context_max: int
    concat_max: int = 2048


def make_plan(args, limit: int, notes: list) -> Plan:
    d = QUICK if args.quick else FULL
    lens = parse_ints(args.prompt_lens, "--prompt-lens") if args.prompt_lens else d["prompt_lens"]
    ctxs = parse_ints(args.contexts, "--contexts") if args.contexts else d["contexts"]
    steps = args.steps or d["steps"]
    if args.runs is not None and args.runs < 1:
        raise LlamanpError(f"--runs must be >= 1, got {args.runs}")
    if steps < 1:
        raise LlamanpError(f"--steps must be >= 1, got {steps}")
    keep = tuple(n for n in lens if 0 < n <= limit)
    if keep != lens:
        notes.append(f"prompt lengths {[n for n in lens if n not in keep]} skipped: beyond the "
                     f"model's max_seq_len {limit}")
    # a context up to the model's limit decodes its last `steps` positions
    keep_c = tuple(sorted({min(c, limit - steps) for c in ctxs
                           if c <= limit and limit - steps >= 0}))
    moved = [c for c in ctxs if c <= limit and c + steps > limit]
    if moved:
        notes.append(f"decode context {moved[0]} measured at {limit - steps}: its "
                     f"{steps} steps are the model's last positions (max_seq_len {limit})")
    if any(c > limit for c in ctxs):
        notes.append(f"decode contexts {[c for c in ctxs if c > limit]} skipped: beyond the "
                     f"model's max_seq_len {limit}")
    if not keep or not keep_c:
        raise LlamanpError(f"nothing to measure within the model's max_seq_len {limit}; "
                           "give smaller --prompt-lens / --contexts / --steps")
    prompt, gen = d["probe"]
    prompt = max(1, min(prompt, limit - gen))
    gen = min(gen, limit - prompt)
    return Plan(prompt_lens=keep, fill1_max=args.fill1_max if args.fill1_max is not None
                else d["fill1_max"], contexts=keep_c, steps=steps,
                none_steps=max(2, steps // 4), none_max=args.none_max,
                concat_max=args.concat_max,
                runs=args.runs or d["runs"], machine_mb=args.machine_mb or d["machine_mb"],
                sgemm_n=d["sgemm_n"], probe=(prompt, gen),
                hf_fill1_max=args.hf_fill1_max,
                hf_context_max=args.hf_context_max if args.hf_context_max is not None
                else (0 if args.quick else 2048))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise LlamanpError(f"--threads must be >= 1, got {args.threads}")
        if not threads.set_threads(args.threads, reexec=True):
            raise LlamanpError(f"could not set the BLAS threads to {args.threads} "
                               "(no threadpoolctl, no known BLAS symbol)")
    if args.rss_probe:
        return rss_probe(args)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = llamanp.load(args.weights)
    first_load_ms = (time.perf_counter() - t0) * 1000
    cfg = model.config
    notes: list = []
    plan = make_plan(args, cfg.max_seq_len, notes)
    others = load_dtype_files(parser, model, args.dtype_file)   # mmapped: the RSS stays small
    n_threads = threads.get_threads()
    blas = threads.blas_library()
    layers_p, output_p = matrix_parameters(cfg)
    n_params = sum(a.size for a in model.file.tensors.values())
    load_avg0 = os.getloadavg() if hasattr(os, "getloadavg") else None

    command = " ".join(["python bench/bench.py"] + [
        a if a and all(c.isalnum() or c in "-_./=,:" for c in a) else repr(a)
        for a in (sys.argv[1:] if argv is None else argv)])
    header = [f"# llamanp benchmark: {Path(args.weights).name}", "",
              f"- command: `{command}`",
              f"- model: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads "
              f"({cfg.n_kv_heads} kv) × {cfg.head_dim}, hidden {cfg.hidden_dim}, vocab "
              f"{cfg.vocab_size}, {'tied' if cfg.tied_embeddings else 'untied'} embeddings; "
              f"{n_params / 1e6:,.1f} M parameters, stored {storage_dtype(model)}, "
              "computed in float32",
              f"- machine: {cpu_name()}, {os.cpu_count()} CPUs; "
              f"Python {platform.python_version()}, "
              f"numpy {np.__version__}, BLAS {Path(blas).name if blas else 'unknown'} with "
              f"{n_threads if n_threads else '?'} thread{'' if n_threads == 1 else 's'}"
              + (f", set by --threads through {threads.method()}" if args.threads else ""),
              f"- every figure: median of {plan.runs} run{'s' if plan.runs > 1 else ''} "
              "[min–max], all configurations "
              "interleaved round-robin; ratios: median [min–max] of the per-run ratios"]
    kernels = blas_kernels_line()
    if kernels:
        header.insert(-1, kernels)

    rss = {}
    if not args.no_rss:   # first, while this process is small: a child's ru_maxrss
        say("peak RSS probes ...")   # starts from its parent's at the fork
        for kv in ("inplace", "concat") if not args.quick else ("inplace",):
            rss[kv] = measure_rss(args.weights, kv, *plan.probe)
    dtype_rss = {storage_dtype(model): rss.get("inplace")}
    for dtype, path, _ in others if not args.no_rss else ():
        dtype_rss[dtype] = measure_rss(path, "inplace", *plan.probe)

    rng_seed = 0
    tasks = machine_tasks(cfg, plan)
    tasks += llamanp_tasks(model, args.weights, plan, np.random.default_rng(rng_seed))
    for dtype, path, m in others:
        tasks += dtype_tasks(dtype, path, m, plan, np.random.default_rng(rng_seed))
    engines = []
    for engine in dict.fromkeys(args.compare):
        if engine == "transformers":
            if importlib.util.find_spec("transformers") is None or \
                    importlib.util.find_spec("torch") is None:
                say("--compare transformers: transformers / torch are not installed "
                    "(pip install torch transformers accelerate gguf); skipped")
                notes.append("transformers was asked for but is not installed: skipped")
                continue
            os.environ.setdefault("TQDM_DISABLE", "1")   # transformers' GGUF progress bars
            import torch
            torch.set_num_threads(args.threads or n_threads or os.cpu_count() or 1)
            say("loading the transformers model ...")
            hf, where = load_transformers(args, model)
            diff = transformers_check(hf, model, cfg.vocab_size)
            import transformers
            header.append(f"- transformers {transformers.__version__} / torch "
                          f"{torch.__version__}, LlamaForCausalLM float32 "
                          f"({hf.config._attn_implementation} attention, "
                          f"{torch.get_num_threads()} torch threads, "
                          f"{torch.backends.cpu.get_cpu_capability()} kernels), from {where}; "
                          f"max |logits diff| vs llamanp on 16 tokens: {diff:.2g}")
            tasks += transformers_tasks(hf, plan, rng_seed, cfg.vocab_size)
            engines.append("transformers")
        elif engine == "llama-cpp":
            try:
                import llama_cpp
            except ImportError as e:   # absent, or installed without its dependencies
                say(f"--compare llama-cpp: llama_cpp cannot be imported ({e}); skipped. To "
                    "compare, `pip install llama-cpp-python` (it compiles llama.cpp: minutes), "
                    f"then `python bench/lmw_to_gguf.py {args.weights} "
                    f"{Path(args.weights).with_suffix('.f32.gguf')}` and run again")
                notes.append(f"llama.cpp was asked for but llama_cpp cannot be imported ({e}): "
                             "skipped (pip install llama-cpp-python)")
                continue
            gguf = Path(args.llama_gguf) if args.llama_gguf else \
                Path(args.weights).with_suffix(".f32.gguf")
            if not gguf.exists():
                say(f"--compare llama-cpp: no F32 GGUF at {gguf}; make one with `python "
                    f"bench/lmw_to_gguf.py {args.weights} {gguf}` (or give --llama-gguf); skipped")
                notes.append(f"llama.cpp skipped: no F32 GGUF ({gguf})")
                continue
            say("loading the model in llama.cpp ...")
            n_ctx = max(max(plan.prompt_lens), max(plan.contexts) + plan.steps + 1)
            lc_threads = args.threads or n_threads or os.cpu_count() or 1
            diff = llama_cpp_check(gguf, model, cfg.vocab_size, lc_threads)
            llm = load_llama_cpp(gguf, n_ctx, max(plan.prompt_lens), lc_threads)
            check = "" if diff is None else \
                f"; max |logits diff| vs llamanp on 16 tokens: {diff:.2g}"
            header.append(f"- llama-cpp-python {getattr(llama_cpp, '__version__', '?')} on "
                          f"{gguf.name}{check}; built for {llama_cpp_isa(llama_cpp)}")
            tasks += llama_cpp_tasks(llm, plan, rng_seed, cfg.vocab_size)
            engines.append("llama-cpp")

    say(f"{len(tasks)} configurations × {plan.runs} runs, round-robin ...")
    run_round_robin(tasks, plan.runs, args.settle, not args.no_warmup)
    if load_avg0 is not None:
        la = os.getloadavg()
        header.append(f"- load average at start / end: {load_avg0[0]:.2f} / {la[0]:.2f} "
                      f"(a busy machine lowers every figure; the ratios are side by side)")
    notes.append(f"first llamanp.load in this process: {first_load_ms:.1f} ms")

    rep = Report(model, args.weights, plan, {t.key: t for t in tasks}, engines, notes,
                 header, rss, [(storage_dtype(model), args.weights)]
                 + [(d, f) for d, f, _ in others], dtype_rss)
    compute_limits(rep)
    text = render(rep)
    print(text, end="")
    if args.csv:
        write_csv(rep, args.csv)
        say(f"wrote {args.csv}")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("\nmatplotlib is not installed (pip install 'llamanp[bench]'): "
                  "no plot drawn.")
        else:
            plot(rep, args.plot, f"llamanp on {Path(args.weights).name} — {cpu_name()}, "
                                 f"{os.cpu_count()} CPUs, {n_threads or '?'} BLAS "
                                 f"thread{'' if n_threads == 1 else 's'}, median of {plan.runs} "
                                 f"run{'' if plan.runs == 1 else 's'} (bars: min–max)")
            say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
