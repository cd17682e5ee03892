"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SslkdError(Exception):
    """A problem with the user's input (config, files, shapes): reported in one line, no traceback."""
