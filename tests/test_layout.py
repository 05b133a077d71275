"""The package's layout holds together: every relative import, including the lazy ones inside functions that an
import of each module never runs, names a module or package that exists."""

import ast
from pathlib import Path

import nitrofusion

ROOT = Path(nitrofusion.__file__).parent


def _relative_imports():
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        package = parts if parts[-1] == "__init__" else parts[:-1]
        package = tuple(p for p in package if p != "__init__")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                yield f, node, (*base, *(node.module.split(".") if node.module else ()))


def _exists(dotted: tuple[str, ...]) -> bool:
    path = ROOT.parent.joinpath(*dotted)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_relative_import_resolves():
    missing = [f"{f.relative_to(ROOT)}:{node.lineno} -> {'.'.join(target)}"
               for f, node, target in _relative_imports() if not _exists(target)]
    assert not missing, missing
    # `from . import name` with a module name: that module exists too
    missing = [f"{f.relative_to(ROOT)}:{node.lineno} -> {'.'.join(target)}.{a.name}"
               for f, node, target in _relative_imports() if node.module is None
               for a in node.names if not _exists((*target, a.name)) and a.name not in ("__version__",)]
    assert not missing, missing


# docs/architecture.md, "Layers": each package may import its own layer and the layers below it, never above.
LAYERS = [
    ("core", ["errors", "io", "locks", "dtypes", "faults", "quiet", "threads", "config", "stopwatch",
              "preemption"]),
    ("schemas", ["distill_config", "sampling.spec"]),  # and every */config.py: torch-free config sections
    ("method", ["method", "sampling", "models"]),
    ("data", ["data", "evaluation"]),
    ("training", ["training"]),
    ("worlds", ["worlds"]),
    ("applications", ["studies", "app"]),
    ("entry points", ["commands", "cli", "__main__", ""]),
]
WORLDS = ("mini", "sdxl", "sd", "sd3", "flux")


def _layer(module: str) -> int:
    name = module.removeprefix("nitrofusion").removeprefix(".")
    if name.split(".")[-1] == "config" and name != "config":
        return 1  # a config section is a schema
    best = max(((i, prefix) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if name == prefix or name.startswith(prefix + ".") or prefix == ""), key=lambda ip: len(ip[1]))
    return best[0]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, lazy imports inside functions included, `if TYPE_CHECKING:` not."""
    modules = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(p for p in parts if p != "__init__")] = f
    graph = {}
    for name, f in modules.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        out = set()
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and node.module.startswith("nitrofusion"):
                target = node.module
            else:
                continue
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out.update(submodules or [target])
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    cycles, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in seen:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        seen.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_no_upward_imports_and_no_world_imports_another():
    bad = []
    for module, targets in _import_graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
            mine, theirs = module.split("."), target.split(".")
            if mine[1:2] == theirs[1:2] == ["worlds"] and len(mine) > 2 and len(theirs) > 2:
                a, b = mine[2], theirs[2]
                if a != b and (b in WORLDS and a in (*WORLDS, "pipelines")):
                    bad.append(f"{module} imports another world's {target}")
    assert not bad, bad
