#!/usr/bin/env python3
"""Write a randomly initialised model of a real shape, and measure running it.

    python bench/make_random_model.py --shape llama3-8b --dtype q8_0 OUT.lmw [--generate 4]
    python bench/make_random_model.py --measure OUT.lmw [-n 4]

The first form writes OUT.lmw: the tensors of the shape's config, filled with
seeded uniform noise of a sensible scale, stored as --dtype. Each tensor is
produced only when the writer reaches it and dropped after it is written, so
writing needs memory for one tensor (the largest: Llama-3-8B's embedding,
2 GB in float32), not for the model. With --generate N it then measures, as
--measure does, in a fresh process.

The second form loads OUT.lmw, generates N tokens greedily after a fixed
prompt of token ids (no tokenizer needed) and prints one JSON line: file size,
the float32 buffers compressed weights are widened into, the peak resident
set size (resource.getrusage: the process's high-water mark, file pages it
has touched included) and timings. The expectation for a compressed file is
peak RSS ~ file size + one layer's float32 weights + interpreter and
activations; for f32 it is ~ file size + activations.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llamanp import lmw, quant  # noqa: E402
from llamanp.config import Config  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402

SHAPES = {
    # Meta-Llama-3-8B: GQA 32/8, head 128, vocab 128256, untied, theta 5e5
    "llama3-8b": Config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                        hidden_dim=14336, vocab_size=128256, norm_eps=1e-5,
                        rope_theta=500000.0, max_seq_len=8192, tied_embeddings=False),
    # SmolLM2-135M: GQA 9/3, head 64, tied
    "smollm2": Config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                      hidden_dim=1536, vocab_size=49152, norm_eps=1e-5,
                      rope_theta=100000.0, max_seq_len=8192, tied_embeddings=True),
    # a few MB, for quick checks
    "tiny": Config(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                   hidden_dim=320, vocab_size=512, norm_eps=1e-5, max_seq_len=256),
}

PROMPT_LEN = 8


def random_tensors(cfg: Config, seed: int) -> list[lmw.TensorSource]:
    """Lazy producers of every tensor: tensor k draws from its own generator
    seeded (seed, k), so the result does not depend on the order of calls."""
    def producer(k: int, name: str, shape: tuple):
        def make() -> np.ndarray:
            rng = np.random.default_rng([seed, k])
            if len(shape) == 1:                  # norm weights: about 1
                return (1.0 + 0.1 * (rng.random(shape, dtype=np.float32) - 0.5)).astype(
                    np.float32)
            if name == "tok_embeddings.weight" and not cfg.tied_embeddings:
                std = 1.0
            else:   # keeps each product's outputs at about the scale of its inputs
                std = shape[-1] ** -0.5
            x = rng.random(shape, dtype=np.float32)   # uniform [0, 1): fast, in place
            x -= np.float32(0.5)
            x *= np.float32(std * 12 ** 0.5)          # uniform with that std
            return x
        return make
    return [lmw.TensorSource(name, shape, producer(k, name, shape))
            for k, (name, shape) in enumerate(lmw.expected_shapes(cfg).items())]


def write_model(out: Path, shape: str, dtype: str, seed: int = 0, force: bool = False) -> None:
    cfg = SHAPES[shape]
    meta = {"source_format": "random", "converter": "bench/make_random_model.py",
            "shape": shape, "seed": seed}
    lmw.write(out, cfg, random_tensors(cfg, seed), None, meta, force=force, dtype=dtype)


def layer_fp32_bytes(cfg: Config) -> int:
    """float32 bytes of one layer's four weight matrices."""
    shapes = lmw.expected_shapes(cfg)
    return sum(4 * int(np.prod(s)) for n, s in shapes.items()
               if n.startswith("layers.0.") and len(s) == 2)


def measure(path: Path, n_tokens: int) -> dict:
    """Load `path`, generate `n_tokens` greedily after PROMPT_LEN fixed ids; report."""
    import llamanp
    t0 = time.perf_counter()
    model = llamanp.load(path)
    t_load = time.perf_counter() - t0
    cfg = model.config
    prompt = [(7 * i + 1) % cfg.vocab_size for i in range(PROMPT_LEN)]
    gen = llamanp.generate(model, prompt, n_tokens, temperature=0.0, stop_ids=(),
                           max_seq_len=min(cfg.max_seq_len, PROMPT_LEN + n_tokens))
    t0 = time.perf_counter()
    times, ids = [], []
    for tok in gen:
        times.append(time.perf_counter() - t0)
        ids.append(int(tok))
    dtypes = sorted(set(model.file.dtypes.values()))
    return {
        "file": str(path), "version": model.file.version, "dtypes": dtypes,
        "file_bytes": os.path.getsize(path),
        "widen_buffer_bytes": model.buffer_bytes,
        "layer_fp32_bytes": layer_fp32_bytes(cfg),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_s": round(t_load, 3),
        "prefill_s": round(times[0], 3) if times else None,
        "decode_s_per_token": (round((times[-1] - times[0]) / (len(times) - 1), 3)
                               if len(times) > 1 else None),
        "tokens": ids,
    }


def _human(report: dict) -> str:
    mb = 1 << 20
    return (f"{Path(report['file']).name}: {'/'.join(report['dtypes'])}, file "
            f"{report['file_bytes'] / mb:.0f} MB, layer fp32 {report['layer_fp32_bytes'] / mb:.0f}"
            f" MB, peak RSS {report['peak_rss_bytes'] / mb:.0f} MB; load {report['load_s']} s, "
            f"prefill {report['prefill_s']} s, decode {report['decode_s_per_token']} s/token")


def main(argv=None) -> int:
    from llamanp.cliutil import ArgumentParser, run_main
    p = ArgumentParser(prog="make_random_model.py",
                       description="Write a random model of a real shape (lazily, seeded), "
                                   "and/or measure generating from it (peak RSS, timings).")
    p.add_argument("out", metavar="OUT.lmw")
    p.add_argument("--shape", choices=sorted(SHAPES), help="the model shape to write")
    p.add_argument("--dtype", choices=quant.DTYPES, default="bf16",
                   help="storage type (default bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="after writing, generate N tokens in a fresh process and report")
    p.add_argument("--measure", action="store_true",
                   help="do not write: load OUT, generate -n tokens, print a JSON report")
    p.add_argument("-n", type=int, default=4, help="tokens to generate with --measure")

    def run(argv):
        args = p.parse_args(argv)
        out = Path(args.out)
        if args.measure:
            report = measure(out, args.n)
            print(json.dumps(report))
            print(_human(report), file=sys.stderr)
            return 0
        if args.shape is None:
            raise LlamanpError("give --shape to write a model, or --measure to run one")
        t0 = time.perf_counter()
        write_model(out, args.shape, args.dtype, args.seed, args.force)
        size_mb = os.path.getsize(out) / (1 << 20)
        print(f"wrote {out} ({args.shape}, {args.dtype}, {size_mb:.1f} MB, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if args.generate:
            done = subprocess.run([sys.executable, __file__, str(out), "--measure",
                                   "-n", str(args.generate)])
            return done.returncode
        return 0
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
