"""Opening the files a user names: regular files only, read with a size bound.

A path on the command line (or after /load in a chat) can name anything: a
FIFO that nobody writes to (opening it blocks forever), /dev/zero (reading it
never ends), a directory. Where llamanp expects a file it opens it without
blocking, looks at what it got, and refuses anything but a regular file with
one line (llamanp.inputfile does that part, for the checkpoint readers too);
it reads at most a limit that fits the kind of input. Standard input, named
`-`, is the one exception: it is read too, with the same bound. Outputs are
opened without blocking as well.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sys

from . import inputfile
from .errors import LlamanpError

STDIN = "-"


class FileInputError(LlamanpError):
    """A named input that cannot be read; `reason` says why, without the path,
    for callers that phrase their own line."""

    def __init__(self, what: str, path, reason: str):
        super().__init__(f"cannot read {what} {path}: {reason}")
        self.reason = reason


#: a prompt, a perplexity text, a saved conversation: text a person handles
TEXT_LIMIT = 256 << 20
#: a tokenizer file (Llama 3's tiktoken ranks are 2.2 MB, SentencePiece's < 1 MB)
TOKENIZER_LIMIT = 64 << 20


def open_regular(path, what: str):
    """`path` opened for reading in binary mode, if it is a regular file (see
    llamanp.inputfile: opening a FIFO this way never blocks). `what` names the
    file in errors ("prompt file", "tokenizer file", ...)."""
    try:
        return inputfile.open_regular(path)
    except inputfile.JsonFileError as e:
        raise FileInputError(what, path, e.problem) from None


def read_bytes(path, what: str, limit: int) -> bytes:
    """The contents of a regular file (or of stdin for `-`), at most `limit` bytes."""
    if str(path) == STDIN:
        try:
            data = sys.stdin.buffer.read(limit + 1)
        except OSError as e:
            raise FileInputError(what, "(standard input)", e.strerror) from None
        if len(data) > limit:
            raise FileInputError(what, "(standard input)", f"it is larger than {limit} bytes")
        return data
    try:
        return inputfile.read_bytes(path, limit, what)
    except inputfile.JsonFileError as e:
        raise FileInputError(what, path, e.problem) from None


def read_text(path, what: str, limit: int = TEXT_LIMIT) -> str:
    """A UTF-8 text file (or stdin for `-`), at most `limit` bytes."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamanpError(f"{what} {path} is not valid UTF-8 text "
                           f"(byte {data[e.start]:#04x} at offset {e.start})") from None


def open_output(path, what: str) -> io.TextIOWrapper:
    """`path` opened for writing UTF-8 text, without ever blocking.

    A regular file is created or truncated. A FIFO is accepted only when
    something reads it (otherwise opening it would wait forever); a character
    device such as /dev/null or /dev/stderr is fine; a directory is refused.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        why = e.strerror
        if e.errno == errno.ENXIO:
            why = "it is a FIFO that nothing reads"
        raise LlamanpError(f"cannot write {what} {path}: {why}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.ftruncate(fd, 0)
        elif not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise LlamanpError(f"cannot write {what} {path}: it is neither a regular file, "
                               "a pipe nor a terminal or device")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w", encoding="utf-8")
    except OSError as e:
        os.close(fd)
        raise LlamanpError(f"cannot write {what} {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise


def check_output(path, what: str) -> None:
    """Refuse, before any work is done, an output path that cannot be written:
    a directory, or one in a directory that does not exist. (A FIFO is
    checked when it is opened: opening it now would end its reader's input.)"""
    if path is None:
        return
    if os.path.isdir(path):
        raise LlamanpError(f"cannot write {what} {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise LlamanpError(f"cannot write {what} {path}: the directory {parent} does not exist")


def write_text(path, what: str, text: str) -> None:
    """Write `text` to `path` (see open_output for what `path` may be)."""
    f = open_output(path, what)
    try:
        with f:
            f.write(text)
    except OSError as e:
        raise LlamanpError(f"cannot write {what} {path}: {e.strerror}") from None


def sha256(path) -> str:
    """The SHA-256 of the file at `path`, hex, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
