"""`python -m llamanp ...` is `python llama-np.py ...`."""

import sys

from .cli import run

sys.exit(run())
