"""The one exception type for user mistakes.

A `UserError` carries a one-line message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero; everything else (a bug) keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a config, a path, a flag. The message says what to change."""
