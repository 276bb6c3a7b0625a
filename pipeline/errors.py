"""The one exception type users see: a one-line message naming the problem and the fix (CLI exit code 2)."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched cache). Printed as one line, no traceback."""


class RunFailed(Exception):
    """A stage failed part-way (a worker crashed past `train.max_failures`). Printed as one line, exit code 1; what
    was finished is kept and a rerun of the same command resumes."""
