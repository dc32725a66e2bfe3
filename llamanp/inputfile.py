"""Reading files that llamanp did not write: regular files only, JSON bounded.

A checkpoint, a config.json or a saved conversation may come from anywhere,
and a name may point at something that is not a file at all. Two rules keep
every reader's promise (one clear error line, never a hang, never unbounded
memory):

* **Regular files only.** A FIFO would block the first read forever and
  /dev/zero never ends, so a path is opened with O_NONBLOCK (which makes
  opening a FIFO return at once) and refused unless ``fstat`` says it is a
  regular file, before a byte is read.
* **JSON is parsed within bounds** checked before (size) or without
  (nesting, digits) recursion: Python's parser recurses once per nested
  bracket and converts integers in time quadratic in their length, so a
  small file could otherwise raise RecursionError or burn CPU. Real files
  nest fewer than 20 levels and hold integers of at most 20 digits.

Every problem is a :class:`JsonFileError` (a LlamanpError) whose text names
the file; ``problem`` holds the same words without the name, for callers
that phrase the message themselves.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Optional, Union

import numpy as np

from .errors import LlamanpError

__all__ = ["JsonFileError", "MAX_JSON_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS",
           "open_regular", "require_regular", "read_bytes", "loads", "load"]

MAX_JSON_BYTES = 64 << 20   # tokenizer.json of the largest vocabularies is ~35 MB
MAX_DEPTH = 100             # arrays/objects within each other; real files: under 20
MAX_INT_DIGITS = 100        # a uint64 has 20 digits; nothing a model file says needs more


class JsonFileError(LlamanpError):
    """A file could not be read as bounded JSON: ``where: problem``."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


# --- regular files only ---------------------------------------------------------------

def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path, mode: int) -> LlamanpError:
    return JsonFileError(os.fspath(path), f"it is {_kind(mode)}, not a regular file")


def require_regular(path) -> None:
    """Raise LlamanpError unless `path` names a regular file (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise JsonFileError(os.fspath(path), e.strerror or "cannot be read") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def open_regular(path):
    """A binary file object for `path`, refused before any read unless it is a
    regular file (opening a FIFO this way never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise JsonFileError(os.fspath(path), e.strerror or "cannot be opened") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    with open_regular(path) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise JsonFileError(os.fspath(path), e.strerror or "cannot be read") from None
    if len(data) > limit:
        raise JsonFileError(os.fspath(path), f"it is larger than {_size(limit)}, "
                                             f"more than any {what} llamanp reads")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


# --- bounded JSON ------------------------------------------------------------------------

# A JSON string (escapes included): removed before brackets are counted.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_CHUNK = 1 << 20


def _depth(text: str) -> int:
    """How deeply brackets nest outside strings (an upper bound for invalid JSON)."""
    marks = _NOT_BRACKETS.sub("", _STRING.sub("", text)).encode("ascii")
    depth = deepest = 0
    for start in range(0, len(marks), _CHUNK):     # a running sum, in bounded pieces
        chunk = np.frombuffer(marks, np.uint8, min(_CHUNK, len(marks) - start), start)
        opens = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int64)
        running = depth + np.cumsum(2 * opens - 1)
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooManyDigits(len(digits.lstrip("-")))
    return int(digits)


class _TooManyDigits(Exception):
    pass


def loads(data: Union[bytes, str], where: str, object_pairs_hook=None) -> object:
    """Parse JSON text (bytes are decoded as UTF-8) within the bounds above."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonFileError(where, "it is not UTF-8 text") from None
    if _depth(data) > MAX_DEPTH:
        raise JsonFileError(where, f"its JSON nests arrays or objects more than {MAX_DEPTH} "
                                   "levels deep, more than any real file does")
    try:
        return json.loads(data, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
    except _TooManyDigits as e:
        raise JsonFileError(where, f"its JSON holds an integer of {e.args[0]} digits, more "
                                   f"than the {MAX_INT_DIGITS} any real file needs") from None
    except json.JSONDecodeError as e:
        raise JsonFileError(where, f"not valid JSON (line {e.lineno}, column {e.colno})") \
            from None
    except (RecursionError, ValueError) as e:    # belt and braces: the bounds should catch these
        raise JsonFileError(where, f"not valid JSON ({type(e).__name__})") from None


def load(path, where: Optional[str] = None, limit: int = MAX_JSON_BYTES,
         object_pairs_hook=None) -> object:
    """Parse the JSON file `path` (a regular file of at most `limit` bytes).

    `where` is how error messages name the file (default: the path).
    """
    where = os.fspath(path) if where is None else where
    try:
        data = read_bytes(path, limit, "JSON file")
    except JsonFileError as e:
        raise JsonFileError(where, e.problem) from None
    return loads(data, where, object_pairs_hook)
