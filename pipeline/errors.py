"""The one exception type users see: a one-line message naming the problem and the fix (CLI exit code 2)."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched cache). Printed as one line, no traceback."""
