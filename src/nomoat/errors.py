"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NomoatError(Exception):
    """A user-facing problem: bad input, a missing file, an unsupported model.

    The message must name the file, line or field at fault; the CLI prints it
    as a single line without a traceback.
    """
