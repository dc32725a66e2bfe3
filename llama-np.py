#!/usr/bin/env python3
"""Generate text with a Llama-family model in NumPy. See --help and README.md."""

import sys

from llamanp.cli import run

if __name__ == "__main__":
    sys.exit(run())
