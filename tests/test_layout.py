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
