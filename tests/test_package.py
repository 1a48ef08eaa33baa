"""The installed package: imports on a CPU machine, the console script, its errors."""

from __future__ import annotations

import importlib.util
import os
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
        "from pargo_dist.cli import command_parser\n"
        "from pargo_dist.config import load_config\n"
        "command_parser('train').parse_intermixed_args(['--nproc', '2'])\n"
        "cfg = load_config(None, ['model.projector.num_partial=16', 'model.lora.r=0'])\n"
        "heavy = ('torch', 'transformers', 'streaming', 'deepspeed', 'torchvision')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_model_describes_the_paper_setting(capsys):
    from pargo_dist import cli

    assert cli.main(["model", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "24x24 patches of width 1024 -> 304 visual tokens of width 4096" in out
    assert "projector             21,326,848  align, finetune, full" in out


def test_cli_bad_preset_is_one_clear_line(capsys):
    from pargo_dist import cli

    assert cli.main(["model", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'huge'; valid presets: ['paper', 'tiny']" in err
    assert "Traceback" not in err


def test_synth_cli_writes_splits_that_the_loader_reads_back(tmp_path, capsys):
    import torch

    from pargo_dist.data.dataset import DataConfig, build_loader
    from pargo_dist.data.image import ImagePreprocessor
    from pargo_dist.data.synthetic import SyntheticConfig, held_out, synthetic_scene
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.constants import IGNORE_INDEX

    from pargo_dist import cli

    cmd = ["synth", "--out", str(tmp_path / "synth"), "--num-samples", "16", "--held-out", "8", "--image-size", "64",
           "--no-progress"]
    assert cli.main(cmd) == 0
    out = capsys.readouterr().out
    assert "[train] wrote 16 records" in out and "[val] wrote 8 records" in out
    assert cli.main(cmd) == 2 and "already holds an MDS dataset" in capsys.readouterr().err

    tok = synthetic_tokenizer()
    for split, cfg in (("train", SyntheticConfig(num_samples=16, image_size=64)),
                       ("val", held_out(SyntheticConfig(num_samples=16, image_size=64), 8))):
        loader = build_loader(DataConfig(local=str(tmp_path / "synth" / split), shuffle=False, max_len=128),
                              tokenizer=tok, image_processor=ImagePreprocessor(size=64, resize_to=64),
                              num_image_tokens=36, batch_size=4)
        batch = next(iter(loader))
        assert batch.pixel_values.shape == (4, 3, 64, 64)
        assert (batch.input_ids == tok.convert_tokens_to_ids("<image>")).sum(1).tolist() == [36] * 4
        for row in range(4):
            index = int(batch.sample_ids[row].split(":")[1])
            answer = batch.input_ids[row][batch.labels[row] != IGNORE_INDEX]
            assert tok.decode(answer) == synthetic_scene(index, cfg)["caption"] + tok.eos_token
        assert torch.isfinite(batch.pixel_values).all()


def test_a_wheel_ships_the_recipes_so_a_plain_pip_install_has_the_default(tmp_path):
    """`pip install .` (not editable) must find the embedded default recipe: the recipes ship as
    package data (pargo_dist/recipes). The wheel is unpacked and imported from there alone."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(root)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    # setuptools' deprecation warnings about our metadata (a license table instead of an SPDX
    # string, license classifiers, ...) would reach every user who pip installs the package
    assert "DeprecationWarning" not in built.stdout + built.stderr, (built.stdout + built.stderr)[-3000:]
    wheel = next((tmp_path / "dist").glob("pargo_dist-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    shipped = {f"pargo_dist/recipes/{p.name}" for p in (root / "recipes").glob("*.yaml")}
    assert "pargo_dist/recipes/tiny-cpu.yaml" in shipped and shipped <= names
    modules = {str(p.relative_to(root)) for p in (root / "pargo_dist").rglob("*.py")}
    assert modules - names == set(), f"the wheel lacks {sorted(modules - names)}: list their packages in pyproject.toml"
    out = subprocess.run([sys.executable, "-c", "import pargo_dist\nfrom pargo_dist.config import DEFAULT_RECIPE, "
                          "load_config\nprint(pargo_dist.__file__, DEFAULT_RECIPE, load_config(None).run.dir)"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    module, recipe, run_dir = out.stdout.split()
    site = str(tmp_path / "site")
    assert module.startswith(site) and recipe == f"{site}/pargo_dist/recipes/tiny-cpu.yaml" and run_dir == "runs/tiny-cpu"


def test_the_product_carries_no_test_hooks():
    """Faults, delays and the suite's fork server are injected from tests/support (inject/sitecustomize.py):
    no product module reads a test variable or knows the fork server, so nothing a user's shell
    leaks in can change how production ranks start or save."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "pargo_dist"
    found = [f"{p.relative_to(package.parent)}: {word}" for p in package.rglob("*.py")
             for word in ("PARGO_TEST", "forkserver", "FORKSERVER", "_DELAY_S") if word in p.read_text()]
    assert not found, found
