"""compat-llama-np.py: the short standalone engine must print what llama-np.py prints.

Tiny random models are written with llamanp.lmw.write, with a SentencePiece
tokenizer trained here (and Meta's Llama 3 tiktoken file when ../shared/data
has it). For each case both programs run as subprocesses from the repository
root, and their stdout must be the same bytes (`llama-np.py --temp 0`: greedy).
The file's own promises are checked too: under 250 lines of code, and imports
of numpy, sentencepiece, tiktoken and the standard library only.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from llamanp import lmw
from llamanp.config import Config, RopeScaling
from llamanp.tokenizer import load_tokenizer, read_tokenizer_file

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "compat-llama-np.py"
LLAMA3_TOKENIZER = REPO.parent / "shared" / "data" / "llama3-tokenizer.model"
TIMEOUT = 120

# Special-token text in a prompt is plain text; the last prompt needs byte-fallback pieces.
PROMPTS = ["Once upon a time", "the cat saw a big dog", " leading space,\nnewline <|eot_id|></s>",
           "café 日本 😀 naïve"]


# -- running the two programs ------------------------------------------------

def run(script, *args):
    """(exit status, stdout bytes, stderr text) of `python SCRIPT ARGS` in the repo root."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, timeout=TIMEOUT)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def run_both(args_list):
    """Run llama-np.py --temp 0 and compat-llama-np.py on each argument list, in parallel."""
    jobs = [(REPO / "llama-np.py", [*a, "--temp", "0"]) for a in args_list]
    jobs += [(COMPAT, list(a)) for a in args_list]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: run(job[0], *job[1]), jobs))
    return results[:len(args_list)], results[len(args_list):]


def assert_same_output(args_list):
    ref, new = run_both(args_list)
    for args, (rc_r, out_r, err_r), (rc_c, out_c, err_c) in zip(args_list, ref, new):
        assert rc_r == 0, f"llama-np.py {args} failed (exit {rc_r}):\n{err_r[-2000:]}"
        assert rc_c == 0, f"compat-llama-np.py {args} failed (exit {rc_c}):\n{err_c[-2000:]}"
        assert out_c == out_r, \
            f"stdout differs for {args}:\n llama-np: {out_r!r}\n   compat: {out_c!r}"
    return [out for _, out, _ in ref]


def stream_text(tokenizer, ids) -> str:
    """A continuation's text as llama-np prints it (not at the start of a text)."""
    stream = tokenizer.stream(at_start=False)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def continuation(out: bytes, prompt: str) -> str:
    text = out.decode("utf-8")
    assert text.startswith(prompt) and text.endswith("\n"), text
    return text[len(prompt):-1]


# -- tiny models ------------------------------------------------------------------

def write_model(path, cfg: Config, tokenizer=None, seed=0):
    """Random float32 weights, scaled so that greedy decoding wanders over the vocabulary
    (with small block outputs, a tied model just repeats the last token)."""
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        if name.endswith("norm.weight"):
            return lambda: 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        std = 0.5 if name in ("tok_embeddings.weight", "output.weight") else shape[-1] ** -0.5
        std *= 3 if name.endswith(("wo.weight", "w2.weight")) else 1
        return lambda: std * rng.standard_normal(shape, dtype=np.float32)

    tensors = [lmw.TensorSource(n, s, weight(n, s)) for n, s in lmw.expected_shapes(cfg).items()]
    lmw.write(path, cfg, tensors, tokenizer, {"source_format": "test", "converter": "test_compat"})
    return path


WORDS = ("once upon a time there was little girl named lily she liked to play with her toy "
         "in the park one day saw big red ball and happy cat dog ran home").split()


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    """A ~300-piece Llama-style BPE SentencePiece model (byte fallback: unk 0, bos 1, eos 2)."""
    d = tmp_path_factory.mktemp("compat-sp")
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice(".,!?")
              for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(d / "sp"), model_type="bpe",
        vocab_size=300, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return d / "sp.model"


@pytest.fixture(scope="module")
def sp_models(sp_file, tmp_path_factory):
    """Three models sharing one SentencePiece tokenizer, each exercising something else."""
    d = tmp_path_factory.mktemp("compat-models")
    tok = read_tokenizer_file(sp_file)
    gqa = Config(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, hidden_dim=96,
                 vocab_size=300, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=40,
                 rope_scaling=RopeScaling(original_max_position_embeddings=16))
    mha_tied = Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=10, hidden_dim=80,
                      vocab_size=300, norm_eps=1e-2, max_seq_len=512, tied_embeddings=True)
    return {"gqa": write_model(d / "gqa.lmw", gqa, tok, seed=1),
            "mha_tied": write_model(d / "mha_tied.lmw", mha_tied, tok, seed=2),
            "bare": write_model(d / "bare.lmw", mha_tied, None, seed=2)}


def load_compat():
    """compat-llama-np.py as a module (its name has dashes, so not by import)."""
    spec = importlib.util.spec_from_file_location("compat_llama_np", COMPAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the file itself --------------------------------------------------------------

def test_under_250_lines_of_code():
    code = [line for line in COMPAT.read_text().splitlines()
            if not re.fullmatch(r"\s*(#.*)?", line)]
    assert len(code) < 250, f"compat-llama-np.py has {len(code)} lines of code"


def test_imports_only_numpy_tokenizers_and_stdlib():
    allowed = {"numpy", "sentencepiece", "tiktoken"} | set(sys.stdlib_module_names)
    imported = set()
    tree = ast.parse(COMPAT.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert "numpy" in imported and imported <= allowed, sorted(imported - allowed)
    calls = {getattr(n.func, "id", getattr(n.func, "attr", None))
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"__import__", "import_module", "exec", "eval"}, "imports in disguise"


# -- same output as llama-np.py ---------------------------------------------------

def test_same_text_as_llama_np(sp_models):
    """Prompts with and without byte-fallback pieces; -n 0, small, and the 256 default,
    which on the 40-position model ends at the context."""
    gqa, tied = sp_models["gqa"], sp_models["mha_tied"]
    cases = [["-w", gqa, "-i", p, "-n", n] for p, n in zip(PROMPTS, ["5", "17", "1", "0"])]
    cases += [["-w", gqa, "-i", PROMPTS[0]],
              ["-w", tied, "-i", PROMPTS[1], "-n", "60"],
              ["-w", tied, "-i", PROMPTS[3], "-n", "30"]]
    texts = [continuation(out, args[3]) for out, args in zip(assert_same_output(cases), cases)]
    assert texts[0] and texts[3] == "", texts
    assert len(set(texts[4])) > 5 and len(set(texts[5])) > 5, texts  # not one token repeated

    import llamanp  # the default -n 256 case really stops at the end of the 40-position context
    model = llamanp.load(str(gqa))
    ids = model.tokenizer.encode(PROMPTS[0], bos=True)
    # prompt + generated tokens never exceed the context, as transformers' max_length
    assert len(list(llamanp.generate(model, ids, 256))) == 40 - len(ids)


def test_stop_token_ends_generation(sp_file, sp_models, tmp_path):
    """Make a token that greedy decoding reaches a stop id: both stop before it."""
    import llamanp
    model = llamanp.load(str(sp_models["mha_tied"]))
    ids = model.tokenizer.encode(PROMPTS[0], bos=True)
    greedy = list(llamanp.generate(model, ids, 12, stop_ids=()))
    stop = next(t for t in greedy[3:] if t not in greedy[:3])
    tok = dataclasses.replace(read_tokenizer_file(sp_file), stop_ids=[2, stop])
    path = write_model(tmp_path / "stop.lmw", model.config, tok, seed=2)  # the same weights
    (out,) = assert_same_output([["-w", path, "-i", PROMPTS[0], "-n", "12"]])
    assert continuation(out, PROMPTS[0]) == stream_text(model.tokenizer,
                                                         greedy[:greedy.index(stop)])


def test_tokenizer_file_option(sp_file, sp_models):
    """-t: a model without a tokenizer, and one whose embedded tokenizer is overridden."""
    assert_same_output([["-w", sp_models["bare"], "-t", sp_file, "-i", PROMPTS[2], "-n", "20"],
                        ["-w", sp_models["gqa"], "-t", sp_file, "-i", PROMPTS[1], "-n", "8"]])


def test_decode_matches_llama_np_stream(sp_file):
    """The continuation text rule, on random id runs rich in byte pieces and specials:
    compat's decode equals llamanp's StreamDecoder(at_start=False), and every prefix's
    text minus trailing U+FFFD (what compat prints early) is a prefix of the final text."""
    compat, ref = load_compat(), load_tokenizer(sp_file)
    tok = compat.sentencepiece_tokenizer(sp_file.read_bytes(), "test", (1, [2]))
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    # unk, bos, eos, "▁", and the byte pieces of whole and split characters
    interesting = [0, 1, 2, sp.piece_to_id("▁")] + [
        sp.piece_to_id(f"<0x{b:02X}>") for b in "é€😀".encode() + b"\x00\xff"]
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.randrange(300) if rng.random() < 0.4 else rng.choice(interesting)
               for _ in range(rng.randint(1, 12))]
        want = stream_text(ref, ids)
        got = tok.decode(ids)
        assert got == want, (ids, got, want)
        for k in range(len(ids)):
            assert want.startswith(tok.decode(ids[:k]).rstrip("\ufffd")), (ids, k)


# -- Llama 3's tiktoken tokenizer -------------------------------------------------

@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    if not LLAMA3_TOKENIZER.exists():
        pytest.skip(f"{LLAMA3_TOKENIZER} is absent (Meta's Llama 3 tokenizer.model)")
    tok = read_tokenizer_file(LLAMA3_TOKENIZER)
    cfg = Config(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32,
                 vocab_size=128256, rope_theta=500000.0, max_seq_len=64, tied_embeddings=True)
    return write_model(tmp_path_factory.mktemp("compat-l3") / "l3.lmw", cfg, tok, seed=3)


def test_tiktoken_same_text_as_llama_np(llama3_model):
    assert_same_output([["-w", llama3_model, "-i", PROMPTS[2], "-n", "24"],
                        ["-w", llama3_model, "-i", PROMPTS[3], "-n", "24"],
                        ["-w", llama3_model, "-t", LLAMA3_TOKENIZER, "-i", PROMPTS[2], "-n", "16"]])


def test_llama3_specials_match_llamanp():
    from llamanp.tokenizer import LLAMA3_PATTERN, llama3_special_tokens
    compat = load_compat()
    assert compat.LLAMA3_PATTERN == LLAMA3_PATTERN
    assert {n: 128000 + i for i, n in enumerate(compat.LLAMA3_SPECIALS)} == \
        llama3_special_tokens(128000)


# -- errors: one line, exit 1, no traceback ----------------------------------------

def test_errors_are_one_line(sp_models, tmp_path):
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(b"GGUF" + bytes(100))
    truncated = tmp_path / "truncated.lmw"
    truncated.write_bytes(sp_models["gqa"].read_bytes()[:-1])
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 not a tokenizer")
    cases = [(["-w", tmp_path / "missing.lmw", "-i", "x"], "missing"),
             (["-w", bad, "-i", "x"], "magic"),
             (["-w", truncated, "-i", "x"], "truncated"),
             (["-w", sp_models["bare"], "-i", "x"], "tokenizer"),
             (["-w", sp_models["bare"], "-t", garbage, "-i", "x"], "garbage.model"),
             (["-w", sp_models["gqa"], "-i", "x", "-n", "-1"], "-n"),
             (["-w", sp_models["gqa"], "-i", "not UTF-8: \udcff"], "UTF-8")]  # argv byte 0xff
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: run(COMPAT, *c[0]), cases))
    for (args, word), (rc, out, err) in zip(cases, results):
        assert rc == 1 and out == b"", (args, rc, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and word in err, (args, err)
