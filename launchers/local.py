#!/usr/bin/env python
"""Start a run's ranks on this machine (torchrun underneath); see pargo_dist/launch.py.

    python launchers/local.py --nproc 2 -- recipes/tiny-cpu.yaml train.steps=50
"""

import sys

from pargo_dist.launch import main

if __name__ == "__main__":
    sys.exit(main())
