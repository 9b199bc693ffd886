"""The harness's module layout: imports between measure's modules run one way (function-level
imports included), and every module says what it owns and lists its public names."""

import ast
import importlib
from pathlib import Path

import pytest

MEASURE = Path(__file__).resolve().parents[2] / "measure"
MODULES = sorted(p.stem for p in MEASURE.glob("*.py") if p.stem != "__init__")


def measure_imports(name: str) -> set[str]:
    """The measure modules `name` imports anywhere in its source (top level or inside functions)."""
    tree = ast.parse((MEASURE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("measure."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "measure":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("measure."))
    return found - {name}


def test_imports_between_measure_modules_have_no_cycle():
    graph = {name: measure_imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


def test_matrix_sits_on_top_and_run_does_not_import_it():
    assert "matrix" not in set().union(*(measure_imports(n) for n in MODULES if n != "matrix"))
    assert {"record", "run", "setup"} <= measure_imports("matrix")


@pytest.mark.parametrize("name", MODULES)
def test_module_has_a_docstring_and_all(name):
    module = importlib.import_module(f"measure.{name}")
    assert module.__doc__ and module.__doc__.strip()
    assert isinstance(module.__all__, list) and len(module.__all__) == len(set(module.__all__))
    assert all(hasattr(module, n) and not n.startswith("_") for n in module.__all__)
