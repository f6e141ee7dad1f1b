"""The one exception type for mistakes a user can make.

The CLI prints a `FANformerError` as a single line (no traceback) and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class FANformerError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
