"""The one exception type for bad input: the CLI prints its message as a one-line error."""


class FastcdError(Exception):
    """A user-facing error: the message names what is wrong and, where it can, what would be right."""
