"""A fuzzer over every input format: seeded mutations, the error contract kept.

tests/fuzzing.py mutates tiny but complete inputs — llama2.c .bin and .pt,
a Meta directory, Hugging Face directories (safetensors and
pytorch_model.bin), GGUF, .lmw, a SentencePiece tokenizer, a saved chat —
with byte flips, truncations, header and JSON field changes, zip structure
changes and pickle opcode changes, and runs each through the entry point the
command line runs (convert(), lmw.read + verify, read_tokenizer_file,
read_conversation), in worker processes whose address space is capped
(RLIMIT_AS) and whose every case has an alarm. Each case must be refused with
one line and no file left behind, or give the unmutated input's result, or —
only where the change may be meaningful and the format has no way to know —
a valid .lmw with finite weights. No pickle may run code (a canary file).

A few of the inputs are then run through the real command lines, which must
answer exactly as the in-process run did: the same single `error:` line and
exit status 1, or success with the same output.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import refmodels as R
from conftest import REPO, TESTS, TOK_CASE

SEED = 20261205
MEMORY_LIMIT = 3 << 30     # address space of a worker: far above what a case needs
CASES = {                  # per format; about 60 s in all on the CI machine
    "llama2c_bin": 250, "llama2c_pt": 250, "meta": 250, "hf_safetensors": 250,
    "hf_bin": 250, "gguf": 250, "lmw": 250, "tokenizer": 150, "chat": 200,
}
SPEC = "gqa4_2"            # dim 64, 2 layers, GQA 4:2: every format can hold it, ~200 KiB


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, store):
    """Every format's unmutated input, and what the fuzzer may mutate in it."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    ref = store.reference(SPEC)
    model, spec = ref.model, ref.spec
    sp = store.tokenizer()
    f = {}
    f["llama2c_bin"] = {"source": R.write_llama2c_bin(root / "model.bin", model, spec),
                        "targets": ["model.bin"]}
    f["llama2c_pt"] = {"source": R.write_llama2c_pt(root / "ckpt.pt", model, spec),
                       "targets": ["ckpt.pt"]}
    meta = R.write_meta(root / "meta", model, spec)
    f["meta"] = {"source": meta, "targets": ["consolidated.00.pth", "params.json"]}
    hf = R.write_hf(root / "hf", model)
    f["hf_safetensors"] = {"source": hf, "targets": ["model.safetensors", "config.json"]}
    hfb = R.write_hf(root / "hfbin", model, pytorch_bin=True)
    f["hf_bin"] = {"source": hfb, "targets": ["pytorch_model.bin", "config.json"]}
    from test_gguf import CASES as GGUF_CASES
    from test_gguf import write_case
    gguf_case = next(c for c in GGUF_CASES if c.id.startswith("q8_0"))
    write_case(gguf_case, root / "model.gguf")
    f["gguf"] = {"source": root / "model.gguf", "targets": ["model.gguf"]}
    f["lmw"] = {"source": store.lmw(TOK_CASE), "targets": [store.lmw(TOK_CASE).name]}
    f["tokenizer"] = {"source": sp, "targets": [sp.name]}
    chat = root / "chat.json"
    chat.write_text(json.dumps({"format": "llamanp-chat", "version": 1, "template": "chatml",
                                "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "the cat"},
                                             {"role": "assistant", "content": "saw a dog",
                                              "tokens": [5, 6, 7]}]}))
    f["chat"] = {"source": chat, "targets": ["chat.json"], "tokenizer": str(sp)}
    for fmt, spec_ in f.items():
        spec_["source"] = str(spec_["source"])
        spec_["cases"] = CASES[fmt]
    return f


def _worker(job: dict, path: Path) -> subprocess.Popen:
    path.write_text(json.dumps(job))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]),
               LLAMANP_FUZZ_CANARY=job["canary"])
    return subprocess.Popen([sys.executable, str(TESTS / "fuzzing.py"), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_limit_memory)


@pytest.fixture(scope="module")
def fuzzed(seeds, tmp_path_factory):
    """Run every format's cases in two workers (the machine's two cores)."""
    root = tmp_path_factory.mktemp("fuzz")
    canary = root / "canary"
    halves = [["llama2c_pt", "meta", "hf_bin", "tokenizer"],
              ["llama2c_bin", "hf_safetensors", "gguf", "lmw", "chat"]]
    procs = []
    for i, names in enumerate(halves):
        job = {"seed": SEED, "work": str(root / f"work{i}"), "keep": str(root / "keep"),
               "canary": str(canary), "formats": {n: seeds[n] for n in names}}
        procs.append(_worker(job, root / f"job{i}.json"))
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=600)   # a case stuck in C code
        assert p.returncode == 0, f"fuzz worker died (exit {p.returncode}):\n{err[-3000:]}"
        summaries.append(json.loads(out))
    assert not canary.exists(), "a pickle ran code"
    merged = {"counts": {}, "failures": [], "kept": [], "seconds": {}}
    for s in summaries:
        for key, value in s.items():
            if isinstance(value, list):
                merged[key].extend(value)
            else:
                merged[key].update(value)
    for job in root.glob("work*"):
        left = [p for p in job.rglob("*") if p.is_file() and "base-" not in str(p)]
        assert not left, f"files left in the fuzzer's work directory: {left[:5]}"
    return merged


def test_every_format_keeps_the_contract(fuzzed):
    counts = fuzzed["counts"]
    assert set(counts) == set(CASES)
    for fmt, n in CASES.items():
        assert sum(counts[fmt].values()) == n, (fmt, counts[fmt])
        # the mutations reach the readers: most inputs are refused, and some are not
        assert counts[fmt].get("refused", 0) >= n // 4, (fmt, counts[fmt])
    failures = fuzzed["failures"]
    shown = "\n".join(json.dumps(f) for f in failures[:15])
    assert not failures, (f"{len(failures)} of {sum(CASES.values())} cases broke the "
                          f"contract; reproduce one with `python tests/fuzzing.py --one "
                          f"FORMAT INDEX SEED JOB`:\n{shown}")


CLI = {"llama2c_bin": "convert", "llama2c_pt": "convert", "meta": "convert",
       "hf_safetensors": "convert", "hf_bin": "convert", "gguf": "convert", "lmw": "verify"}


def test_command_lines_answer_as_the_entry_points_do(fuzzed, tmp_path):
    """The kept inputs through convert.py / python -m llamanp.verify: the same
    one line (exit 1), or success (exit 0) with nothing else on stderr's error side."""
    ran = 0
    for k in fuzzed["kept"]:
        if k["format"] not in CLI:
            continue
        out = tmp_path / f"{k['format']}-{k['index']}" / "model.lmw"
        out.parent.mkdir()
        if CLI[k["format"]] == "convert":
            cmd = [str(REPO / "convert.py"), k["path"], str(out)]
        else:
            cmd = ["-m", "llamanp.verify", k["path"]]
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120,
                           cwd=REPO, preexec_fn=_limit_memory)
        ran += 1
        if k["outcome"] == "refused":
            assert p.returncode == 1, (k, p.stderr[-2000:])
            message = k["message"].replace(k["case_path"], k["path"])
            assert p.stderr.strip().splitlines() == [f"error: {message}"], (k, p.stderr)
            assert list(out.parent.iterdir()) == []
        else:
            assert p.returncode == 0, (k, p.stderr[-2000:])
            assert "Traceback" not in p.stderr and "error:" not in p.stderr
    assert ran >= 2 * len(CLI)
