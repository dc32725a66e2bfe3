"""What every command-line front end shares: one-line errors, no tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from .errors import LlamanpError


def prog_name(script: str) -> str:
    """The program's name as the user typed it: the console script's (llama-np),
    the script's (llama-np.py), `python -m PACKAGE`; else `script`."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    if name == "__main__.py":
        return f"python -m {os.path.basename(os.path.dirname(argv0))}"
    return name if name and name != "-c" else script


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_main(main: Callable[[Optional[list]], int], argv: Optional[list] = None) -> int:
    """Run a CLI entry point, turning expected failures into one line + exit code."""
    try:
        return main(argv) or 0
    except LlamanpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except MemoryError:
        print("error: out of memory; try a smaller model or a shorter --seqlength",
              file=sys.stderr)
        return 1


def refuse_flags(args, names, message: str) -> None:
    """Refuse the first of the options `names` that was given, with `message`
    (which names it as {flag}): options that mean nothing in the chosen mode."""
    for name in names:
        if getattr(args, name, None) not in (None, False, [], ()):   # 0 == False: unset too
            flag = {"prompt": "-i", "file": "-f"}.get(name, "--" + name.replace("_", "-"))
            raise LlamanpError(message.format(flag=flag))
