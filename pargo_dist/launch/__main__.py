"""`python -m pargo_dist.launch`: the node launcher (pargo_dist/launch/node.py)."""

import sys

from pargo_dist.launch.node import main

sys.exit(main())
