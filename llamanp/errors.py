"""The one exception type users see.

Everything that goes wrong because of *input* (a bad file, a bad flag value, a
prompt that does not fit) raises :class:`LlamanpError` with a message that says
what is wrong and what to do. The command-line front ends catch it and print it
as a single line; anything else escaping is a bug in llamanp.
"""

import itertools
import reprlib


class LlamanpError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""


class _BriefRepr(reprlib.Repr):
    """reprlib, cut *before* formatting: huge ints, byte strings and unknown
    objects are described, never repr()'d in full."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, limit, limit
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6
        self.maxdeque = self.maxarray = 6

    def repr_int(self, x, level):
        if x.bit_length() > 64:
            return f"<a {x.bit_length()}-bit integer>"
        return repr(x)

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring // 2]) + ("..." if len(x) > self.maxstring // 2 else "")

    def repr_bytearray(self, x, level):
        return f"bytearray({self.repr_bytes(bytes(x[:self.maxstring // 2]), level)})"

    def repr_dict(self, x, level):       # reprlib sorts the keys first: not of a huge dict
        if not x or level <= 0:
            return "{}" if not x else "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items) + (", ...}" if len(x) > self.maxdict else "}")

    def repr_set(self, x, level):
        if not x or level <= 0:
            return "set()" if not x else "{...}"
        items = [self.repr1(v, level - 1) for v in itertools.islice(x, self.maxset)]
        return "{" + ", ".join(items) + (", ...}" if len(x) > self.maxset else "}")

    repr_frozenset = repr_set

    def repr_instance(self, x, level):
        if isinstance(x, (int, float, bool, type(None))):
            return repr(x) if not isinstance(x, int) else self.repr_int(x, level)
        return f"<{type(x).__name__}>"


def brief(value, limit: int = 60) -> str:
    """repr(value) for an error message, at most about `limit` characters, computed
    without ever formatting the whole of a large or deeply nested value."""
    return _BriefRepr(limit).repr(value)
