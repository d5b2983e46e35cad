"""One exception type for everything a user can fix.

Its message is a single line that says what is wrong and what to do; the CLI prints it as
`error: <message>` and exits 1 without a traceback. Anything else is a bug and keeps its traceback.
"""


class MoestreamError(Exception):
    """A user-facing error: bad input, a bad checkpoint, a budget that does not fit."""
