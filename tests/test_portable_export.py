"""An export loads with plain transformers, in a process where pargo_dist cannot be imported.

The reference is `pargo-dist generate`'s path in this process (our classes, PromptBuilder,
ImagePreprocessor): the remote-code model must give the same logits (1e-5) and the same greedy
caption. The run is re-exported with `data.image.crops: 2x2`, so the processor's crops and
placeholder expansion travel with the export too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

REMOTE = r"""
import json, sys
sys.modules["pargo_dist"] = None  # any `import pargo_dist...` now fails
try:
    import pargo_dist  # noqa: F401
    raise SystemExit("pargo_dist is importable: the test would prove nothing")
except ImportError:
    pass
import runpy
# This machine's torchvision (CUDA build beside a CPU torch) needs the shim pargo_dist applies on
# import; a user's machine has a matching pair. Run the shim from its file, the package stays out.
runpy.run_path(sys.argv[3])["patch_torchvision"]()
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path, image = sys.argv[1], sys.argv[2]
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
inputs = processor(images=Image.open(image))
with torch.no_grad():
    logits = model(**inputs).logits[0]
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)  # to the end of the caption
print(json.dumps({"module": type(model).__module__, "processor": type(processor).__module__,
                  "input_ids": inputs["input_ids"][0].tolist(), "crops": inputs["image_crops"].tolist(),
                  "logits": logits.tolist(), "caption": processor.batch_decode(out, skip_special_tokens=True)[0]}))
"""


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    """The reference run's last checkpoint, its recipe switched to 2x2 crops, exported."""
    from pargo_dist.checkpoint.manager import resolve_checkpoint
    from pargo_dist.export.hf import export

    tmp = tmp_path_factory.mktemp("portable")
    step = tmp / "step"
    shutil.copytree(resolve_checkpoint(reference(3, "finetune")), step)
    recipe = yaml.safe_load((step / "config.yaml").read_text())
    recipe["data"]["image"] = {**recipe["data"].get("image", {}), "crops": "2x2"}
    (step / "config.yaml").write_text(yaml.safe_dump(recipe))
    return export(step, tmp / "export")


def test_plain_transformers_loads_the_export_and_captions_like_pargo_dist(exported, tmp_path):
    from pargo_dist.build import image_processor
    from pargo_dist.data.prompt import PromptBuilder
    from pargo_dist.evaluation.generate import caption_image, held_out_image, load_exported

    model, tokenizer, cfg = load_exported(exported)
    image, _ = held_out_image(cfg, 3)
    image.save(tmp_path / "image.png")  # lossless: both sides read the same pixels
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"}
    import pargo_dist.compat

    proc = subprocess.run([sys.executable, "-c", REMOTE, str(exported), str(tmp_path / "image.png"),
                           pargo_dist.compat.__file__],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.") and remote["processor"].startswith("transformers_modules.")
    assert remote["crops"] == [5]  # 2x2 tiles + the thumbnail, from the export's processor_config.json

    pixels = image_processor(cfg).views(image)
    prompt = PromptBuilder(tokenizer, {5: model.num_image_tokens(5)}, max_len=10**6).generation_prompt(
        cfg.data.train.caption_prompt, crops=5)
    assert remote["input_ids"] == prompt
    with torch.no_grad():
        want = model(input_ids=torch.tensor([prompt]), pixel_values=pixels, image_crops=[5]).logits[0]
    torch.testing.assert_close(torch.tensor(remote["logits"]), want, rtol=1e-5, atol=1e-5)
    assert len(remote["caption"].split()) >= 3  # a caption, not an empty string on both sides
    assert remote["caption"] == caption_image(model, tokenizer, cfg, image, max_new_tokens=64)  # (it stops at EOS)


def test_the_export_ships_every_module_it_imports_and_names_them_in_auto_map(exported):
    config = json.loads((exported / "config.json").read_text())
    processor = json.loads((exported / "processor_config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_pargo.ParGoForConditionalGeneration"
    assert processor["auto_map"] == {"AutoProcessor": "processing_pargo.ParGoProcessor"}
    for file in exported.glob("*.py"):
        source = file.read_text()
        assert "from pargo_dist" not in source and "import pargo_dist" not in source, file.name


def test_a_shipped_module_that_imports_an_unshipped_one_stops_the_export():
    from pargo_dist.export.portable import relative_source

    with pytest.raises(RuntimeError, match=r"build.py imports pargo_dist.config, which the export does not ship"):
        relative_source("pargo_dist.build")
