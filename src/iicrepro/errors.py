"""Errors meant for the user: each message names the problem and the fix."""


class UserError(RuntimeError):
    """Bad input or environment; the CLI prints it without a traceback and exits 1."""
