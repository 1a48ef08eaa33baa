#!/usr/bin/env python
"""Start a run's ranks on this node; see pargo_dist/launch/node.py (signals forwarded, exit 75 = requeue).

    python launchers/launch.py --nproc 2 -- recipes/tiny-cpu.yaml train.steps=50
    srun --ntasks-per-node=1 python launchers/launch.py --slurm --nproc 8 -- recipes/x.yaml   # in sbatch

The sbatch template runs this file rather than `python -m pargo_dist.launch` because it holds
SIGTERM / SIGUSR1 on its first line: importing pargo_dist takes seconds (torch), and a
preemption notice that arrived then would otherwise kill the launcher instead of saving.
"""

import signal
import sys

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})

from pargo_dist.launch.node import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
