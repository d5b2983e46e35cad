"""One exception type for everything a user can fix.

Its message is a single line that says what is wrong and what to do; the CLI prints it as
`error: <message>` and exits 1 without a traceback. Anything else is a bug and keeps its traceback.
"""


class MoestreamError(Exception):
    """A user-facing error: bad input, a bad checkpoint, a budget that does not fit."""


class ContextFull(MoestreamError):
    """The prompt does not fit the context: each command words the way out its own way (the chat
    has /clear, a script shortens its prompt), so the numbers travel with the error."""

    def __init__(self, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"the prompt is {tokens} tokens and the context holds {limit}: "
                         "start a new conversation or raise -c")
