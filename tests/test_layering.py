"""The package's shape, checked by walking its imports (every `import` statement, at any depth,
lazy ones included): each folder sits on a layer and imports only from layers below it (the
table in docs/architecture.md); models know nothing of ranks or data, backends nothing of data
formats, the loop no backend by name; and no two modules import each other, directly or round
a cycle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pargo_dist"

# Layer of each room (a subpackage, or a module at the package root), lowest first. A room may
# import from rooms on lower layers only, never from its own layer's other rooms or from above.
# The same table, with what belongs in each room, is in docs/architecture.md.
LAYERS = {
    "constants": 0, "errors": 0, "compat": 0,    # names, error kinds, environment shims
    "runtime": 1, "batch": 1,                      # what a rank stands on; the collated batch
    "models": 2, "observe": 2, "checkpoint": 2,    # the model; metrics and logs; the checkpoint format
    "data": 3,                                     # shards -> samples -> Batch
    "config": 4,                                   # the recipe schema
    "backends": 5,                                 # how a model is spread over ranks
    "build": 6,                                    # a recipe -> model, tokenizer, loaders
    "export": 7, "plan": 7,                        # checkpoints -> HF; memory and time before a run
    "evaluation": 8,                               # held-out loss, captions, MME
    "train": 9,                                    # the loop and what runs it
    "launch": 10,                                  # starting a job's ranks on nodes
    "cli": 11, "slurm": 11,                        # entry points
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """pargo_dist modules that `path` imports (`from pargo_dist.x import y` counts x, and x.y
    when that is a module)."""
    found = set()
    here = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pargo_dist")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = here.split(".")[: -node.level] if path.name != "__init__.py" else here.split(".")[: len(
                    here.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            if base.startswith("pargo_dist"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


@functools.cache
def _walk() -> dict[str, frozenset[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: frozenset(m for m in imports_of(path) if m in modules and m != name) for name, path in modules.items()}


def graph() -> dict[str, set[str]]:
    """module -> the pargo_dist modules it imports."""
    return {name: set(deps) for name, deps in _walk().items()}


def room(module: str) -> str | None:
    """The folder (or root module) a module lives in; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_across_rooms() -> list[tuple[str, str]]:
    return [(a, b) for a, deps in graph().items() for b in deps
            if room(a) and room(b) and room(a) != room(b)]


def test_every_room_has_a_layer():
    rooms = {room(m) for m in graph()} - {None}
    assert rooms == set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}; " \
                                 f"layers without a room: {sorted(set(LAYERS) - rooms)}"


def test_imports_run_down_the_layers_only():
    up = [f"{a} (layer {LAYERS[room(a)]}) imports {b} (layer {LAYERS[room(b)]})"
          for a, b in imports_across_rooms() if LAYERS[room(b)] >= LAYERS[room(a)]]
    assert not up, "imports that do not run down the layers:\n  " + "\n  ".join(sorted(up))


def test_the_package_itself_imports_only_its_environment_shims():
    """`import pargo_dist` must stay cheap: a launcher or `pargo-dist submit` never imports torch."""
    assert graph()["pargo_dist"] == {"pargo_dist.compat"}


def test_models_know_nothing_of_ranks_data_or_recipes():
    for name, deps in graph().items():
        if room(name) == "models":
            bad = {d for d in deps if room(d) in ("runtime", "data", "config", "backends", "checkpoint", "train")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_backends_know_nothing_of_data_formats():
    for name, deps in graph().items():
        if room(name) == "backends":
            bad = {d for d in deps if room(d) in ("data", "train")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_loop_knows_no_backend_by_name_except_where_it_builds_one():
    """train/trainer.py imports no concrete backend and neither DeepSpeed nor megatron; train/run.py
    imports one only inside make_backend (lazily)."""
    for path in (PACKAGE / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0] in ("deepspeed", "megatron") for n in names), (path.name, names)
    assert not {d for d in graph()["pargo_dist.train.trainer"]
                if d.startswith("pargo_dist.backends.") and d != "pargo_dist.backends.base"}
    tree = ast.parse((PACKAGE / "train" / "run.py").read_text())
    make_backend = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "make_backend")
    concrete = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith(("pargo_dist.backends.deepspeed", "pargo_dist.backends.megatron"))}
    inside = {n.module for n in ast.walk(make_backend) if isinstance(n, ast.ImportFrom)}
    assert concrete and concrete <= inside


def test_the_root_holds_only_the_package_face():
    """Everything else lives in a folder that names its concern."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert root == ["__init__", "batch", "build", "cli", "compat", "config", "constants", "errors", "slurm"], root


def test_no_import_cycle():
    deps = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(deps[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(deps):
        if name not in state:
            visit(name)


def test_the_walk_sees_real_imports():
    """The checks above would pass on an empty graph: make sure it is not one."""
    deps = graph()
    assert "pargo_dist.batch" in deps["pargo_dist.data.collate"]
    assert "pargo_dist.backends.base" in deps["pargo_dist.train.trainer"]
    assert "pargo_dist.backends.deepspeed.backend" in deps["pargo_dist.train.run"]  # lazily, in make_backend
    assert ("pargo_dist.launch.node", "pargo_dist.backends.megatron.layout") in imports_across_rooms()
    assert len(deps) > 60


@pytest.mark.parametrize("bad", [("pargo_dist.runtime.exits", "pargo_dist.launch.slurm"),
                                 ("pargo_dist.models.lora", "pargo_dist.config")])
def test_an_import_up_the_layers_is_caught(bad, monkeypatch):
    """Mutation check of the layer test itself: an import from a lower layer to a higher one (as
    runtime -> launch and models -> config once were) fails it."""
    real = graph()
    monkeypatch.setitem(globals(), "graph", lambda: {k: v | ({bad[1]} if k == bad[0] else set())
                                                     for k, v in real.items()})
    with pytest.raises(AssertionError, match="do not run down the layers"):
        test_imports_run_down_the_layers_only()
