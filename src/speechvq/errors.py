"""Errors that the CLI reports as one line (exit code 2) instead of a traceback."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad user input: a file, a config value, a command-line argument.

    The message names the file (and line, where there is one) and the problem.
    """
