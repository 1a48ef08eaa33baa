"""What the user can fix, told apart from what they cannot.

A `UserError` is a bad recipe, a bad input file, a refused conversion, an output that already
exists: the command line prints its message as one line and exits 2, because a traceback would
only bury the sentence that says what to change. Every other exception is a bug or a fault
(a damaged shard, an OOM, a lost node): it keeps its traceback and exits 1, on the rank where
it happened, at once (see `pargo_dist.train.train`).

UserError subclasses ValueError so that callers and tests that catch ValueError keep working.
"""


class UserError(ValueError):
    """Something the user can fix; the message says what to change."""
