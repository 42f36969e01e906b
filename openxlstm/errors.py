"""Errors caused by the user's input (paths, data, flags): the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input: a missing or corrupt checkpoint, empty data, a mismatched vocabulary, an impossible flag."""


__all__ = ["UserError"]
