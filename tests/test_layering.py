"""The package's shape, checked by walking its imports (every `import` statement, at any depth,
lazy ones included): models know nothing of ranks or data, backends nothing of data formats,
and no two modules import each other, directly or round a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pargo_dist"


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


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_models_import_nothing_from_backends_data_or_the_loop():
    for name, deps in graph().items():
        if name.startswith("pargo_dist.models"):
            bad = {d for d in deps if d.startswith(("pargo_dist.backends", "pargo_dist.data", "pargo_dist.train",
                                                    "pargo_dist.checkpoint", "pargo_dist.launch"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_backends_import_nothing_from_data():
    for name, deps in graph().items():
        if name.startswith("pargo_dist.backends"):
            bad = {d for d in deps if d.startswith("pargo_dist.data") or d == "pargo_dist.train"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_loop_knows_no_backend_by_name_except_where_it_builds_one():
    """train.py imports a concrete backend only inside make_backend (lazily), never DeepSpeed or
    megatron themselves."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.split(".")[0] in ("deepspeed", "megatron") for n in names), names
    make_backend = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "make_backend")
    concrete = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("pargo_dist.backends.") and n.module != "pargo_dist.backends.base"}
    inside = {n.module for n in ast.walk(make_backend) if isinstance(n, ast.ImportFrom)}
    assert concrete and concrete <= inside


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
    assert "pargo_dist.backends.base" in deps["pargo_dist.train"]
    assert "pargo_dist.backends.deepspeed" in deps["pargo_dist.train"]  # lazily, in make_backend
    assert len(deps) > 40
