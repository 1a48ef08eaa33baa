"""Making a universal checkpoint loadable by every ZeRO stage.

DeepSpeed's ds_to_universal writes what the *saving* stage's loader reads; pargo_dist resumes a
checkpoint on any layout, so the files are rewritten to the forms of both loaders. Separate from
the conversion (deepspeed/universal.py): this depends on the file layout of the pinned DeepSpeed
(0.19.8), that on its converter's command line.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_loadable_by_every_stage(zero_dir: Path, source: Path) -> None:
    """ds_to_universal writes the state as the *saving* stage's loader reads it. From ZeRO-3: each
    parameter's tensors flat and bare, Adam's step inside `optimizer_state_dict`, no DeepSpeed
    version. From ZeRO-1/2: `{"param": tensor in its shape, "cat_dim": 0}`, a `step.pt` per
    parameter, the groups at the top level. A resume may change stage (one rank runs ZeRO-3 as
    ZeRO-2; a recipe changes), so both forms are written, from the same values; ZeRO-3's loader
    reads the dict form too. (Its hyperparameters are not used: the loading backend keeps its
    own groups.) `source`: the ZeRO checkpoint converted, for the parameters' shapes."""
    import deepspeed

    path = zero_dir / "optimizer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    folders = [d for d in zero_dir.iterdir() if d.is_dir()]
    inner = state.get("optimizer_state_dict")
    if inner is not None:  # written from ZeRO-3
        step = inner["state"][0]["step"] if inner.get("state") else None
        groups = inner["param_groups"]
        models = sorted(source.glob("*model_states.pt"))
        shapes = {}
        for group in torch.load(models[0], map_location="cpu", weights_only=False)["param_shapes"]:
            shapes.update(group)
        for folder in folders:
            for file in folder.glob("*.pt"):
                tensor = torch.load(file, map_location="cpu", weights_only=False)
                if torch.is_tensor(tensor) and file.stem != "step":
                    torch.save({"param": tensor.view(shapes[folder.name]), "cat_dim": 0}, file)
    else:  # from ZeRO-1/2
        steps = [d / "step.pt" for d in folders if (d / "step.pt").is_file()]
        step = torch.load(steps[0], weights_only=False) if steps else None
        groups = state["param_groups"]
    state.setdefault("ds_version", deepspeed.__version__)
    state.setdefault("param_groups", groups)
    state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": groups})
    torch.save(state, path)
    if step is not None:
        for folder in folders:
            if not (folder / "step.pt").is_file():
                torch.save(step, folder / "step.pt")
