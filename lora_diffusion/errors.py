"""The one exception type that means "the user asked for something we cannot do".

The CLI and the app catch it and show its message as a single readable line;
anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, an unknown column, a folder that is not a model."""
