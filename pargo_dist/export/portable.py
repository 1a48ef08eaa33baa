"""The export's own code: what lets plain transformers load an export without pargo_dist.

Evaluation harnesses (lmms-eval, VLMEvalKit), serving and colleagues load a model with
`AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`. transformers then
imports the classes that config.json's `auto_map` names from Python files in the directory
(and the files they import relatively). So the export carries our model and processor modules
themselves, not a second copy of them kept by hand: each module below is copied as it is, with
its `from pargo_dist... import` lines made relative to the export directory. One source of
truth, and the test loads the export in a process where pargo_dist cannot be imported.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

# module -> the file name it gets in the export. Every pargo_dist import these modules make must
# be one of them (write_remote_code checks, so a new import cannot silently break exports).
SHIPPED = {
    "pargo_dist.errors": "errors",
    "pargo_dist.constants": "constants",
    "pargo_dist.batch": "batch",
    "pargo_dist.models.pretrained": "hf_checkpoint",
    "pargo_dist.models.projector_config": "projector_config",
    "pargo_dist.models.projector": "projector",
    "pargo_dist.models.vision": "vision",
    "pargo_dist.models.mllm": "modeling_pargo",
    "pargo_dist.data.schema": "schema",
    "pargo_dist.data.crops": "crops",
    "pargo_dist.data.image": "image_processing_pargo",
    "pargo_dist.data.prompt": "prompt",
    "pargo_dist.data.processor": "processing_pargo",
}
AUTO_MAP = {
    "AutoConfig": "modeling_pargo.ParGoConfig",
    "AutoModel": "modeling_pargo.ParGoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_pargo.ParGoForConditionalGeneration",
    "AutoProcessor": "processing_pargo.ParGoProcessor",
}
_IMPORT = re.compile(r"^(\s*)from (pargo_dist(?:\.\w+)*) import", re.MULTILINE)


def relative_source(module: str) -> str:
    """`module`'s source with its pargo_dist imports pointing at the export's own files."""
    path = Path(importlib.import_module(module).__file__)

    def relative(match: re.Match) -> str:
        target = match.group(2)
        if target not in SHIPPED:
            raise RuntimeError(f"{path} imports {target}, which the export does not ship: add it to "
                               "pargo_dist.export.portable.SHIPPED (with what it imports) or drop the import")
        return f"{match.group(1)}from .{SHIPPED[target]} import"

    return _IMPORT.sub(relative, path.read_text())


_RELATIVE = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def write_remote_code(out: str | Path) -> dict[str, str]:
    """Write the shipped modules into `out`; returns the auto_map for config.json and the processor.

    transformers copies a local directory's remote code into its module cache file by file: the
    file auto_map names and the files *it* imports, but not what those import in turn (a hub
    repository is followed all the way). So each auto_map module also names, at its end, every
    file it needs through the others."""
    out = Path(out)
    sources = {name: relative_source(module) for module, name in SHIPPED.items()}
    for name, source in sources.items():
        if name in {entry.split(".")[0] for entry in AUTO_MAP.values()}:
            direct, needed, todo = set(_RELATIVE.findall(source)), set(), [name]
            while todo:
                for dep in _RELATIVE.findall(sources[todo.pop()]):
                    if dep not in needed and dep != name:
                        needed.add(dep)
                        todo.append(dep)
            if needed - direct:
                source += ("\n\n# Added by `pargo-dist export`: transformers copies only the files this module imports\n"
                           "# directly; these are the ones it needs through them.\n")
                source += "".join(f"from .{dep} import __name__ as _needs_{dep}  # noqa: E402,F401\n"
                                  for dep in sorted(needed - direct))
        (out / f"{name}.py").write_text(source)
    return dict(AUTO_MAP)
