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


def test_a_launcher_reads_the_recipe_without_importing_torch():
    """`pargo-dist train --nproc N` parses and checks the recipe, then only starts ranks: it must not
    spend seconds importing torch, transformers or streaming first (each rank imports them itself)."""
    out = run_py(
        "import sys\n"
        "from pargo_dist.cli import build_parser\n"
        "from pargo_dist.config import load_config\n"
        "build_parser('train').parse_args(['train', '--nproc', '2'])\n"
        "cfg = load_config(None, ['model.projector.num_partial=16', 'model.lora.r=0'])\n"
        "heavy = ('torch', 'transformers', 'streaming', 'deepspeed', 'torchvision')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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


def test_synth_cli_writes_splits_that_the_loader_reads_back(tmp_path):
    import torch

    from pargo_dist.data.dataset import DataConfig, build_loader
    from pargo_dist.data.image import ImagePreprocessor
    from pargo_dist.data.synthetic import SyntheticConfig, held_out, synthetic_scene
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.models.mllm import IGNORE_INDEX

    cmd = [sys.executable, "-m", "pargo_dist.cli", "synth", "--out", str(tmp_path / "synth"),
           "--num-samples", "16", "--held-out", "8", "--image-size", "64", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[train] wrote 16 records" in out.stdout and "[val] wrote 8 records" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds an MDS dataset" in again.stderr

    tok = synthetic_tokenizer()
    for split, cfg in (("train", SyntheticConfig(num_samples=16, image_size=64)),
                       ("val", held_out(SyntheticConfig(num_samples=16, image_size=64), 8))):
        loader = build_loader(DataConfig(local=str(tmp_path / "synth" / split), shuffle=False, max_len=128),
                              tokenizer=tok, image_processor=ImagePreprocessor(size=64, resize_to=64),
                              num_image_tokens=36, batch_size=4)
        batch = next(iter(loader))
        assert batch["pixel_values"].shape == (4, 3, 64, 64)
        assert (batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1).tolist() == [36] * 4
        for row in range(4):
            index = int(batch["sample_ids"][row].split(":")[1])
            answer = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
            assert tok.decode(answer) == synthetic_scene(index, cfg)["caption"] + tok.eos_token
        assert torch.isfinite(batch["pixel_values"]).all()
