"""What the user can fix, told apart from what they cannot.

A `UserError` is a bad recipe, a bad input file (a shard that does not decompress: `DamagedShard`),
a refused conversion, an output that already exists: the command line prints its message as one
line and exits 2, because a traceback would only bury the sentence that says what to change. Every
other exception is a bug or a fault (an OOM, a lost node): it keeps its traceback and exits 1, on
the rank where it happened, at once (see `pargo_dist.train.trainer.train`).

UserError subclasses ValueError so that callers and tests that catch ValueError keep working.
"""


class UserError(ValueError):
    """Something the user can fix; the message says what to change."""


class DamagedShard(UserError):
    """A shard file that cannot be decompressed (truncated or overwritten after it was written: a
    bad upload or copy). Not skipped like a damaged record: a whole shard is thousands of samples
    lost without a word, and the file can be made again. The message names the stream and the file."""


class TryAgainLater(Exception):
    """A condition outside the job that a later attempt may find gone: the object store holding
    the run's checkpoints is unreachable when the run must know what it holds (which checkpoint
    to resume from). Neither a user error nor a bug: the run says why in one line and exits 75, so
    that SLURM requeues it (pargo_dist.launch.slurm.REQUEUE_EXIT)."""


class Diverged(UserError):
    """Training that keeps diverging after the rollbacks a recipe allows (train.max_rollbacks), or
    with no checkpoint to roll back to: more restarts would only repeat it. The message names the
    samples of the bad steps and what to change (the learning rate, those samples)."""
