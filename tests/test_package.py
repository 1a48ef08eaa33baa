"""The installed package: imports on a CPU machine, the console script, its errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_import_pargo_dist_makes_torchvision_streaming_and_transformers_importable():
    bare = run_py("import torchvision")
    patched = run_py(
        "import pargo_dist, pargo_dist.compat as c, torchvision, streaming\n"
        "from transformers import CLIPVisionModel, SiglipVisionModel\n"
        "import torchvision.transforms.functional as TF\n"
        "print('patched' if c.torchvision_patched else 'native')"
    )
    assert patched.returncode == 0, patched.stderr
    # The shim changes nothing where torchvision works, and is needed exactly where it fails.
    expected = "native" if bare.returncode == 0 else "patched"
    assert patched.stdout.strip().splitlines()[-1] == expected
    if bare.returncode:
        assert "torchvision::nms does not exist" in bare.stderr


def test_cli_model_describes_the_paper_setting():
    out = subprocess.run([sys.executable, "-m", "pargo_dist.cli", "model", "--preset", "paper"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "24x24 patches of width 1024 -> 304 visual tokens of width 4096" in out.stdout
    assert "projector             21,326,848  align, finetune, full" in out.stdout


def test_cli_bad_preset_is_one_clear_line():
    out = subprocess.run([sys.executable, "-m", "pargo_dist.cli", "model", "--preset", "huge"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "unknown model preset 'huge'; valid presets: ['paper', 'tiny']" in out.stderr
    assert "Traceback" not in out.stderr
