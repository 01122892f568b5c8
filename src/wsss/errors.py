"""One exception type for every problem the user can fix.

The CLI catches :class:`UserError`, prints its message as one line and exits non-zero,
without a traceback. The message must name the file or key at fault and the fix.
"""


class UserError(Exception):
    """A problem with the user's input (data, params, arguments), not a bug."""

    exit_code = 2
