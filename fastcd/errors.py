"""The one exception type for bad input: the CLI prints its message as a one-line error."""


class FastcdError(Exception):
    """A user-facing error: the message names what is wrong and, where it can, what would be right."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT: `finally` blocks run, and the
    CLI reports it in one line (exit status 143). Not an Exception, so no `except Exception` swallows it."""
