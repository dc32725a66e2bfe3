"""Files named by the user: regular files only (stdin `-` aside), read with a bound.

A FIFO nobody writes to, /dev/zero and a directory, given wherever a file is
expected, must each end in one `error:` line, promptly, and never in a hang or
an unbounded read. Also the small numeric bounds of the command line
(--beams, a temperature so small it overflows).
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from conftest import run_cli
from tinymodel import write_text_model

from llamanp import fileio
from llamanp.errors import LlamanpError
from llamanp.sampling import Sampler

TIMEOUT = 60   # a hang shows as a timeout, far above the second these take


@pytest.fixture(scope="module")
def specials(tmp_path_factory):
    d = tmp_path_factory.mktemp("special")
    fifo = d / "fifo"
    os.mkfifo(fifo)
    return {"fifo": fifo, "zero": "/dev/zero", "dir": d}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, sp_model):
    return write_text_model(tmp_path_factory.mktemp("m") / "text.lmw", sp_model)


@pytest.mark.parametrize("kind, words", [("fifo", "FIFO"), ("zero", "device"),
                                         ("dir", "directory")])
def test_open_regular_refuses_special_files(specials, kind, words):
    with pytest.raises(fileio.FileInputError) as e:
        fileio.read_bytes(specials[kind], "prompt file", 1000)
    assert words in e.value.reason and "\n" not in str(e.value)


def test_reads_are_bounded(tmp_path, monkeypatch):
    f = tmp_path / "big.txt"
    f.write_bytes(b"x" * 1001)
    with pytest.raises(LlamanpError, match="larger than 1000 bytes"):
        fileio.read_bytes(f, "prompt file", 1000)
    assert fileio.read_bytes(f, "prompt file", 1001) == b"x" * 1001
    # stdin is the one non-regular input, bounded the same way
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"y" * 50)))
    with pytest.raises(LlamanpError, match="larger than 10 bytes"):
        fileio.read_bytes("-", "prompt file", 10)


def test_output_never_blocks(specials, tmp_path):
    with pytest.raises(LlamanpError, match="a FIFO that nothing reads"):
        fileio.open_output(specials["fifo"], "statistics file")
    with pytest.raises(LlamanpError, match="cannot write statistics file"):
        fileio.open_output(specials["dir"], "statistics file")
    fileio.write_text("/dev/null", "statistics file", "{}")
    out = tmp_path / "s.json"
    out.write_text("old, longer contents")
    fileio.write_text(out, "statistics file", "{}")
    assert out.read_text() == "{}"


def _one_line(rc, out, err, *words):
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


# (writing statistics to a character device such as /dev/null is allowed)
@pytest.mark.parametrize("flag,kind", [
    (flag, kind) for flag in ["-f", "-t", "--perplexity", "-w", "--stats-json"]
    for kind in ["fifo", "zero", "dir"] if (flag, kind) != ("--stats-json", "zero")])
def test_cli_refuses_special_files(text_model, specials, tmp_path, flag, kind):
    path = specials[kind]
    argv = {"-f": ["-w", text_model, "-f", path, "-n", "2"],
            "-t": ["-w", text_model, "-t", path, "-i", "the cat", "-n", "2"],
            "--perplexity": ["-w", text_model, "--perplexity", path],
            "-w": ["-w", path, "-i", "the cat", "-n", "2"],
            "--stats-json": ["-w", text_model, "-i", "the cat", "-n", "2",
                             "--stats-json", path]}[flag]
    rc, out, err = run_cli("llama-np.py", *argv, timeout=TIMEOUT)
    if flag == "--stats-json" and kind == "fifo":
        # known only when it is opened, after the run (which printed its summary)
        err = err.strip().splitlines()[-1]
    _one_line(rc, out, err, str(path))


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir"])
def test_chat_load_of_a_special_file_keeps_the_chat(text_model, specials, kind):
    """/load refuses the file with one line, and the console carries on."""
    script = f"/load {specials[kind]}\nhello\n"
    rc, out, err = run_cli("llama-np.py", "-w", text_model, "--chat", "-n", "3", "--temp", "0",
                           input=script, timeout=TIMEOUT)
    assert rc == 0, err
    assert f"error: cannot load {specials[kind]}" in out + err
    assert "Traceback" not in err


def test_beams_are_bounded(text_model):
    rc, out, err = run_cli("llama-np.py", "-w", text_model, "-i", "the", "--beams", "1000000",
                           timeout=TIMEOUT)
    _one_line(rc, out, err, "beams", "64")


@pytest.mark.parametrize("mirostat", [0, 1, 2])
def test_a_vanishing_temperature_is_greedy(mirostat):
    """1e-320 (subnormal) overflows logits / T; its limit is the argmax."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # what would warn
        for temp in (1e-320, 5e-324, 1e-300):
            s = Sampler(temp, 0, 1.0, seed=1, mirostat=mirostat)
            probs = s.probabilities(logits)
            assert probs[np.argmax(logits)] == 1.0 and probs.sum() == 1.0
            assert s(logits) == int(np.argmax(logits))


def test_a_vanishing_temperature_generates_greedily(text_model):
    greedy = run_cli("llama-np.py", "-w", text_model, "-i", "the cat", "-n", "6", "--temp", "0",
                     timeout=TIMEOUT)
    tiny = run_cli("llama-np.py", "-w", text_model, "-i", "the cat", "-n", "6",
                   "--temp", "1e-320", "--seed", "4", timeout=TIMEOUT)
    assert greedy[0] == tiny[0] == 0
    assert tiny[1] == greedy[1] and len(tiny[1]) > len("the cat")
    assert "Warning" not in tiny[2]
