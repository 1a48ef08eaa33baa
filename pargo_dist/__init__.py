"""pargo_dist: distributed training of ParGo multimodal LLMs.

Importing the package arranges for the environment shim in `pargo_dist.compat` to run the
first time anything imports torchvision (transformers and mosaicml-streaming do), so every
`import pargo_dist...` works on a CPU-only machine (see compat.py for why). It runs then and
not here because it imports torch: a launcher or `pargo-dist submit` that never needs torch
should not spend seconds importing it.
"""

from pargo_dist.compat import patch_torchvision_on_import as _patch_torchvision_on_import

_patch_torchvision_on_import()

__version__ = "0.1.0"
