"""The one exception type that means "the user asked for something we cannot do".

The CLI and the app catch it and show its message as a single readable line;
anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an unknown column, a folder that is not a model."""


def cut(value, limit: int = 40) -> str:
    """A user's value as a message repeats it: at most `limit` characters, never more of the data than needed."""
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quoted(value, limit: int = 40) -> str:
    """`cut`, quoted, and on one line (repr escapes newlines and control characters)."""
    return repr(cut(value, limit))
