"""Errors users see: one line naming the problem and the fix (`UserError`, exit code 2; `RunFailed`, exit code 1),
and `error_line`, the one-line form of a worker's failure."""

import re


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched cache). Printed as one line, no traceback."""


class RunFailed(Exception):
    """A stage failed part-way (a worker crashed past `train.checkpoint.max_failures`). Printed as one line, exit
    code 1; what was finished is kept and a rerun of the same command resumes."""


def error_line(exc: BaseException) -> str:
    """One line for a failure in a Ray worker: the innermost error a Ray actor or task raised."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): \S", ln)]
    line = lines[-1] if lines else f"{type(cause).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
    return line[:400]
