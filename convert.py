#!/usr/bin/env python3
"""Convert a checkpoint (llama2.c .pt/.bin, Meta consolidated.*.pth) to .lmw. See --help."""

import sys

from llamanp.convert.cli import run

if __name__ == "__main__":
    sys.exit(run())
