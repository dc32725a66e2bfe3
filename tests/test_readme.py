"""The README's code blocks, run as written.

Every ```python and ```sh block of README.md runs in a scratch directory where
`model.lmw` is the model under test (SmolLM2, then a tiny random model with the
suite's SentencePiece tokenizer) and `llama-np.py`, `convert.py` and `bench/`
are the repository's, with `python` being this interpreter: that is the only
substitution. A block may be left out only by a `<!-- readme-test: not run
(why) -->` line right above it, and the reasons are checked here too, so that
none goes unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TOK_CASE

BLOCK = re.compile(r"(?:<!-- readme-test: not run \((?P<why>[^)]+)\) -->\n)?"
                   r"```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
NOT_RUN = {"sh scripts/demo.sh", "sh scripts/test.sh",
           "python bench/bench.py -w model.lmw --plot kv.png"}


def readme_blocks() -> list[tuple[str, str, str]]:
    """(lang, code, why-not-run or "") of every fenced block, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m["lang"], m["code"], m["why"] or "") for m in BLOCK.finditer(text)]


def runnable() -> list[tuple[str, str]]:
    return [(lang, code) for lang, code, why in readme_blocks()
            if lang in ("python", "sh") and not why]


def test_only_the_known_blocks_are_not_run():
    left_out = {code.strip(): why for lang, code, why in readme_blocks() if why}
    assert set(left_out) == NOT_RUN
    assert len(runnable()) >= 5


@pytest.fixture(params=["smollm2", "tiny"])
def scratch(request, tmp_path):
    """The scratch directory the blocks run in, for each model."""
    model = (request.getfixturevalue("smollm2_lmw") if request.param == "smollm2"
             else request.getfixturevalue("store").lmw(TOK_CASE))
    request.getfixturevalue("smollm2_lmw")          # `-w smollm2` runs in both
    (tmp_path / "model.lmw").symlink_to(model)
    for name in ("llama-np.py", "convert.py", "bench"):
        (tmp_path / name).symlink_to(REPO / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return tmp_path


def run_block(lang: str, code: str, where: Path, n: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{where / '.bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")
    if lang == "python":
        script = where / f"block{n}.py"
        script.write_text(code, encoding="utf-8")
        cmd = [sys.executable, script.name]
    else:
        cmd = ["sh", "-e", "-c", code]
    return subprocess.run(cmd, cwd=str(where), env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600,
                          stdin=subprocess.DEVNULL)


def test_readme_blocks_run_as_written(scratch):
    for n, (lang, code) in enumerate(runnable()):
        p = run_block(lang, code, scratch, n)
        said = f"README block:\n{code}\n--- stdout ---\n{p.stdout[-2000:]}\n--- stderr ---\n" \
               f"{p.stderr[-2000:]}"
        assert p.returncode == 0, said
        assert "Traceback" not in p.stderr and "error:" not in p.stderr, said
        if "print(" in code or lang == "sh":
            assert p.stdout.strip(), said             # what it prints is there
