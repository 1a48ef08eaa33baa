"""`python -m pargo_dist.slurm after-step`: the command SLURM job scripts run after each job step.

The code is pargo_dist/launch/slurm.py. This entry point keeps the name that slurm/train.sbatch
(and every job script `pargo-dist submit` has written, queued or requeued jobs included) calls.
"""

import sys

from pargo_dist.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
