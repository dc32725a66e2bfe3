"""The one exception type users see.

Everything that goes wrong because of *input* (a bad file, a bad flag value, a
prompt that does not fit) raises :class:`LlamanpError` with a message that says
what is wrong and what to do. The command-line front ends catch it and print it
as a single line; anything else escaping is a bug in llamanp.
"""


class LlamanpError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""
