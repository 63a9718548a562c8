"""User-facing errors: the CLI prints their message as one red line and exits non-zero."""


class MavsrError(Exception):
    """A problem with the user's input or environment (not a bug in mavsr)."""

    exit_code = 2
