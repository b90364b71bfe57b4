"""Errors the CLI turns into one readable line and an exit code (DESIGN.md section 9)."""


class BaraggError(Exception):
    """A runtime failure the user should read about: exit code 1."""

    exit_code = 1


class InvalidInput(BaraggError):
    """Bad usage or bad input data: exit code 2, nothing written."""

    exit_code = 2
