"""pargo_dist: distributed training of ParGo multimodal LLMs.

Importing the package applies the environment shims in `pargo_dist.compat` once, so that
every `import pargo_dist...` works on a CPU-only machine (see compat.py for why).
"""

from pargo_dist.compat import patch_torchvision as _patch_torchvision

_patch_torchvision()

__version__ = "0.1.0"
