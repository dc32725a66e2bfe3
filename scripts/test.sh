#!/bin/sh
# Install llamanp with its test references (torch 2.13.0 CPU, transformers,
# gguf, ...) into ./.venv and run the test suite. Extra arguments go to pytest.
#
#   sh scripts/test.sh [-k PATTERN ...]
set -eu
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest -q "$@"
