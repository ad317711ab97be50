"""The one exception type for what a user got wrong: a setting, a path, a file, the data.

Raise :class:`UserError` with a message that says what was wrong and what to do; the command line
(:func:`gpt.cli.main`) prints it as one line and exits 1. Any other exception is a bug, and shows its
traceback. It is a ValueError, so a Python caller catching ValueError (as this package's errors always
were) catches it still.
"""


class UserError(ValueError):
    """A user's mistake: a bad setting, a missing or corrupt file, data that cannot be used."""
