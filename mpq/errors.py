"""The one exception type the CLI turns into a one-line message and exit code 1."""


class MpqError(Exception):
    """A user-facing error: bad input, an unsupported model, a budget that cannot be met.

    The message must be a single line that says what is wrong and, where possible, where
    (file, node, field). The CLI prints it on stderr and exits with code 1.
    """
