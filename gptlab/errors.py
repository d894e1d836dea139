"""The one exception type a user sees as a single line instead of a traceback."""


class GptlabError(Exception):
    """A user error: bad input, a missing or inconsistent file, an impossible setting.

    The CLI prints its message on one line and exits non-zero; library callers can catch it.
    """
