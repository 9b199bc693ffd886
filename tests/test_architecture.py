"""Pins the code architecture of peftcalc/ and measure/ by static analysis (ast only).

Nothing analysed here is imported: every module is parsed from its source. The rules' data
(layers, limits, exceptions) live in tests/architecture_rules.py; this file holds the checkers and
one test per rule:

1. the import graph (every Import/ImportFrom anywhere in a file, TYPE_CHECKING blocks and
   function-level imports included) is built, and is not vacuous;
2. it has no cycle;
3. peftcalc/ is layered (architecture_rules.LAYERS), and peftcalc/measure/reports keep their
   boundaries;
4. files and functions stay under the size limits;
5. every module has a docstring and (peftcalc/) an `__all__` naming only what it defines;
6. tests use public names only;
7. user-facing text does not mention internal seeds.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _load_rules():
    spec = importlib.util.spec_from_file_location("architecture_rules", TESTS / "architecture_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load_rules()


# --------------------------------------------------------------------------------------------
# Parsing the tree
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str          # "peftcalc.ops.linear"; a package's __init__ is "peftcalc.ops"
    path: Path
    is_package: bool
    source: str
    tree: ast.Module

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class ImportRef:
    source: str        # the importing module
    target: str        # the imported dotted name, resolved (a submodule when `from p import sub`)
    line: int
    lazy: bool         # inside a function (runs only when the function is called)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@functools.lru_cache(maxsize=None)
def parse_modules() -> dict[str, Module]:
    modules = {}
    for package in rules.PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            source = path.read_text(encoding="utf-8")
            name, is_package = _module_name(path)
            modules[name] = Module(name, path, is_package, source, ast.parse(source, filename=str(path)))
    return modules


class _ImportCollector(ast.NodeVisitor):
    """Every Import/ImportFrom of a tree, with its line and whether it sits inside a function."""

    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.found.append((node, self._depth > 0))

    visit_ImportFrom = visit_Import


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        package = package[: len(package) - (level - 1)]
    return ".".join(package + ([name] if name else []))


def resolve_imports(module: str, is_package: bool, tree: ast.AST, known: Iterable[str]) -> list[ImportRef]:
    """The dotted names a module imports: `import a.b` -> a.b; `from a import b` -> a.b when a.b
    is a known module, else a; relative imports resolved against the module's package."""
    known = set(known)
    collector = _ImportCollector()
    collector.visit(tree)
    refs = []
    for node, lazy in collector.found:
        if isinstance(node, ast.Import):
            refs.extend(ImportRef(module, alias.name, node.lineno, lazy) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            base = _resolve_relative(module, is_package, node.level, node.module)
        for alias in node.names:
            candidate = f"{base}.{alias.name}" if base else alias.name
            target = candidate if alias.name != "*" and candidate in known else base
            refs.append(ImportRef(module, target, node.lineno, lazy))
    return refs


def internal_target(target: str, known: set[str]) -> str | None:
    """The known module a dotted import name lands on (its longest known prefix), if any."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


Graph = dict  # module -> {imported module -> [lines]}


@functools.lru_cache(maxsize=None)
def all_imports() -> tuple[ImportRef, ...]:
    modules = parse_modules()
    refs = []
    for m in modules.values():
        refs.extend(resolve_imports(m.name, m.is_package, m.tree, modules))
    return tuple(refs)


@functools.lru_cache(maxsize=None)
def import_graph() -> Graph:
    known = set(parse_modules())
    graph: Graph = {name: {} for name in known}
    for ref in all_imports():
        target = internal_target(ref.target, known)
        if target is not None and target != ref.source:
            graph[ref.source].setdefault(target, []).append(ref.line)
    return graph


def as_graph(edges: Mapping[str, Iterable[str]]) -> Graph:
    """A plain {module: {imported, ...}} mapping as a Graph (no line numbers)."""
    graph: Graph = {}
    for src, dsts in edges.items():
        graph.setdefault(src, {})
        for dst in dsts:
            graph[src].setdefault(dst, [])
            graph.setdefault(dst, {})
    return graph


def _where(graph: Graph, src: str, dst: str) -> str:
    lines = graph.get(src, {}).get(dst) or []
    return f"{src}:{','.join(map(str, sorted(set(lines))))}" if lines else src


# --------------------------------------------------------------------------------------------
# Cycles
# --------------------------------------------------------------------------------------------

def strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _shortest_path(graph: Graph, start: str, goal: str, allowed: set[str]) -> list[str] | None:
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = previous[node]
            return path[::-1]
        for child in sorted(graph.get(node, {})):
            if child in allowed and child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def find_cycles(graph: Graph) -> list[list[str]]:
    """For every edge inside a strongly connected component, the shortest cycle through it
    (deduplicated), as [a, b, ..., a]: every import that takes part in a cycle shows up."""
    cycles = {}
    for component in strongly_connected_components(graph):
        members = set(component)
        for src in component:
            for dst in sorted(graph[src]):
                if dst not in members:
                    continue
                path = _shortest_path(graph, dst, src, members)
                cycle = [src] + path
                ring = cycle[:-1]
                start = ring.index(min(ring))
                ring = ring[start:] + ring[:start]
                cycles[tuple(ring)] = ring + [ring[0]]
    return [cycles[key] for key in sorted(cycles, key=lambda k: (len(k), k))]


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    edges = "; ".join(f"{_where(graph, a, b)} imports {b}" for a, b in zip(cycle, cycle[1:]))
    return f"{' -> '.join(cycle)}\n      ({edges})"


# --------------------------------------------------------------------------------------------
# Layers and package boundaries
# --------------------------------------------------------------------------------------------

def _matches(entry: str, module: str) -> bool:
    if "." not in entry:                      # a bare package: its __init__ only
        return module == entry
    return module == entry or module.startswith(entry + ".")


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    best = None  # (prefix length, layer)
    for level, entries in enumerate(layers):
        for entry in entries:
            if _matches(entry, module) and (best is None or len(entry) > best[0]):
                best = (len(entry), level)
    return None if best is None else best[1]


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(graph: Graph, layers: list[list[str]], package: str) -> list[str]:
    """Modules of `package` that no layer places, and imports from a lower layer to a higher one."""
    problems = []
    for module in sorted(graph):
        if _in_package(module, package) and layer_of(module, layers) is None:
            problems.append(f"{module}: not placed in any layer of LAYERS")
    for src in sorted(graph):
        if not _in_package(src, package):
            continue
        for dst in sorted(graph[src]):
            if not _in_package(dst, package):
                continue
            low, high = layer_of(src, layers), layer_of(dst, layers)
            if low is not None and high is not None and high > low:
                problems.append(f"{_where(graph, src, dst)} (layer {low}) imports {dst} (layer {high}): upward")
    return problems


def boundary_violations(refs: Iterable[ImportRef], package: str, upper: Iterable[str],
                        lazy_ok: set[str], no_reports: Iterable[str]) -> list[str]:
    """`package` imports the packages above it only from `lazy_ok` modules, inside functions; the
    `no_reports` packages never import reports."""
    upper, no_reports = tuple(upper), tuple(no_reports)
    problems = []
    for ref in sorted(refs, key=lambda r: (r.source, r.line, r.target)):
        root = ref.target.split(".")[0]
        if _in_package(ref.source, package) and root in upper:
            if ref.source not in lazy_ok:
                problems.append(f"{ref.source}:{ref.line} imports {ref.target}: only "
                                f"{', '.join(sorted(lazy_ok))} may import {'/'.join(upper)}")
            elif not ref.lazy:
                problems.append(f"{ref.source}:{ref.line} imports {ref.target} at module level: "
                                "import it inside the function that needs it")
        if root == "reports" and any(_in_package(ref.source, p) for p in no_reports):
            problems.append(f"{ref.source}:{ref.line} imports {ref.target}: "
                            f"{ref.source.split('.')[0]} must never import reports")
    return problems


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def function_lengths(tree: ast.AST) -> dict[str, tuple[int, int]]:
    """qualname -> (def line, length in lines), for every function, method and nested function."""
    lengths = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                lengths[qualname] = (child.lineno, child.end_lineno - child.lineno + 1)
                visit(child, qualname + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


# --------------------------------------------------------------------------------------------
# Module hygiene
# --------------------------------------------------------------------------------------------

def _module_level_statements(body):
    """Statements executed at import time: module body, descending into if/try/with/for/while."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level_statements(getattr(stmt, field, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _module_level_statements(handler.body)
        for case in getattr(stmt, "cases", []) or []:
            yield from _module_level_statements(case.body)


def _target_names(target) -> Iterable[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def defined_names(module: Module, known: Iterable[str]) -> tuple[set[str], bool]:
    """Names a module binds at module level (plus `global` ones, names its module-level
    __getattr__ serves lazily, and a package's direct submodules); and whether it star-imports."""
    names: set[str] = set()
    star = False
    for stmt in _module_level_statements(module.tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
            if stmt.name == "__getattr__" and not isinstance(stmt, ast.ClassDef):
                names.update(n.value for n in ast.walk(stmt)
                             if isinstance(n, ast.Constant) and isinstance(n.value, str))
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                names.update(_target_names(target))
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
            names.update(_target_names(stmt.target))
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                names.update(_target_names(item.optional_vars))
        elif isinstance(stmt, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            if stmt.module == "__future__":       # a compiler directive, not a name to export
                continue
            star |= any(a.name == "*" for a in stmt.names)
            names.update(a.asname or a.name for a in stmt.names if a.name != "*")
        elif isinstance(stmt, ast.Try):
            names.update(h.name for h in stmt.handlers if h.name)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Global):
            names.update(node.names)
        elif isinstance(node, ast.NamedExpr):
            names.update(_target_names(node.target))
    if module.is_package:
        names.update(k.rsplit(".", 1)[1] for k in known if k.rsplit(".", 1)[0] == module.name and "." in k)
    return names, star


def _string_list(node) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)):
        if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            return [e.value for e in node.elts]
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_list(node.left), _string_list(node.right)
        return None if left is None or right is None else left + right
    return None


def dunder_all(module: Module) -> tuple[list[str] | None, list[str]]:
    """The names of a module's __all__ (None if it has none) and problems with its form."""
    found = None
    problems = []
    for stmt in _module_level_statements(module.tree.body):
        if isinstance(stmt, ast.Assign):
            targets, value = [t for t in stmt.targets if isinstance(t, ast.Name)], stmt.value
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name):
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if not any(t.id == "__all__" for t in targets):
            continue
        names = _string_list(value) if value is not None else None
        if names is None:
            problems.append(f"{module.rel}:{stmt.lineno}: __all__ is not a list or tuple of string constants")
            names = []
        found = (found or []) + names if isinstance(stmt, ast.AugAssign) else names
    return found, problems


# --------------------------------------------------------------------------------------------
# Tests' use of private names
# --------------------------------------------------------------------------------------------

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node) -> list[str] | None:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else base + [node.attr]
    return None


def private_uses(tree: ast.AST, rel: str, known: set[str], packages: Iterable[str]) -> list[str]:
    """`from pkg... import _x`, and `mod._x` where mod names a module of `packages`."""
    packages = tuple(packages)
    problems = []
    bound: dict[str, str] = {}   # local name -> module of `packages` it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in packages:
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] not in packages:
                continue
            for alias in node.names:
                if _private(alias.name):
                    problems.append(f"{rel}:{node.lineno}: from {node.module} import {alias.name}")
                elif f"{node.module}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node.value)
            if chain and chain[0] in bound:
                owner = ".".join([bound[chain[0]]] + chain[1:])
                if owner in known:
                    problems.append(f"{rel}:{node.lineno}: {'.'.join(chain)}.{node.attr} "
                                    f"(private name of module {owner})")
    return sorted(set(problems), key=lambda p: (p.split(":")[0], int(p.split(":")[1])))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def fail_if_any(problems: list[str], title: str, hint: str = "") -> None:
    if problems:
        text = f"{len(problems)} {title}:\n  " + "\n  ".join(problems)
        pytest.fail(text + (f"\n{hint}" if hint else ""), pytrace=False)


# --------------------------------------------------------------------------------------------
# The checkers work
# --------------------------------------------------------------------------------------------

def test_checkers_find_known_violations():
    graph = as_graph({
        "peftcalc.a": {"peftcalc.b"},
        "peftcalc.b": {"peftcalc.c", "peftcalc.a"},   # a <-> b
        "peftcalc.c": {"peftcalc.d"},                  # c (layer 0) -> d (layer 1): upward
        "peftcalc.d": {"peftcalc.e", "peftcalc.c"},    # and a cycle c -> d -> c
        "peftcalc.e": {"peftcalc.f"},
        "peftcalc.f": {"peftcalc.e"},                  # e <-> f, one layer
        "peftcalc.g": set(),                           # placed by no layer
    })
    assert strongly_connected_components(graph) == [
        ["peftcalc.a", "peftcalc.b"], ["peftcalc.c", "peftcalc.d"], ["peftcalc.e", "peftcalc.f"]]
    cycles = [" -> ".join(c) for c in find_cycles(graph)]
    assert "peftcalc.a -> peftcalc.b -> peftcalc.a" in cycles
    assert "peftcalc.c -> peftcalc.d -> peftcalc.c" in cycles
    assert "peftcalc.e -> peftcalc.f -> peftcalc.e" in cycles
    assert find_cycles(as_graph({"x": {"y"}, "y": {"z"}, "z": set()})) == []

    layers = [["peftcalc.a", "peftcalc.b", "peftcalc.c"], ["peftcalc.d", "peftcalc.e.sub"],
              ["peftcalc.e", "peftcalc.f", "peftcalc"]]
    assert layer_of("peftcalc.e.sub.x", layers) == 1          # longest prefix wins
    assert layer_of("peftcalc.ex", layers) is None             # dotted components only
    assert layer_of("peftcalc", layers) == 2 and layer_of("peftcalc.zz", layers) is None
    assert layer_violations(graph, layers, "peftcalc") == [    # not a <-> b, nor e <-> f: same layer
        "peftcalc.g: not placed in any layer of LAYERS",
        "peftcalc.c (layer 0) imports peftcalc.d (layer 1): upward",
        "peftcalc.d (layer 1) imports peftcalc.e (layer 2): upward"]

    refs = [ImportRef("peftcalc.cli", "measure.run", 5, lazy=True),        # allowed
            ImportRef("peftcalc.cli", "reports.cli_api", 7, lazy=False),   # not lazily
            ImportRef("peftcalc.api", "measure.run", 9, lazy=True),        # not cli
            ImportRef("measure.run", "reports.rows", 3, lazy=True),        # measure -> reports
            ImportRef("measure.run", "peftcalc.api", 4, lazy=False)]       # allowed
    problems = boundary_violations(refs, "peftcalc", ("measure", "reports"), {"peftcalc.cli"}, ("measure",))
    assert [p.split(" ")[0] for p in problems] == ["measure.run:3", "peftcalc.api:9", "peftcalc.cli:7"]


def test_import_resolution():
    known = {"peftcalc", "peftcalc.ops", "peftcalc.ops.linear", "peftcalc.ops.norm", "peftcalc.api"}
    source = (
        "import peftcalc.api as api\n"
        "from peftcalc.ops import linear, helper\n"
        "from peftcalc import ops\n"
        "from . import norm\n"
        "from .. import api as a2\n"
        "from ..ops.norm import thing\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from peftcalc.api import Estimate\n"
        "def f():\n"
        "    import measure.run\n"
    )
    refs = resolve_imports("peftcalc.ops.linear", False, ast.parse(source), known)
    targets = [(r.target, r.line, r.lazy) for r in refs]
    assert targets == [
        ("peftcalc.api", 1, False), ("peftcalc.ops.linear", 2, False), ("peftcalc.ops", 2, False),
        ("peftcalc.ops", 3, False), ("peftcalc.ops.norm", 4, False), ("peftcalc.api", 5, False),
        ("peftcalc.ops.norm", 6, False), ("typing", 7, False), ("peftcalc.api", 9, False),
        ("measure.run", 11, True)]
    assert resolve_imports("peftcalc.ops", True, ast.parse("from . import linear\nfrom .x import y\n"), known) == [
        ImportRef("peftcalc.ops", "peftcalc.ops.linear", 1, False), ImportRef("peftcalc.ops", "peftcalc.ops.x", 2, False)]
    assert internal_target("peftcalc.ops.x", known) == "peftcalc.ops" and internal_target("torch.nn", known) is None

    tree = ast.parse("import peftcalc.api as api\nfrom peftcalc import ops\nfrom peftcalc.ops import _x, __version__\n"
                     "import peftcalc.ops.linear\n"
                     "api._memo(1); ops._y; peftcalc.ops.linear._z; api.estimate._cache; other._w\n")
    assert sorted(p.split(": ", 1)[1] for p in private_uses(tree, "t.py", known, ("peftcalc",))) == [
        "api._memo (private name of module peftcalc.api)", "from peftcalc.ops import _x",
        "ops._y (private name of module peftcalc.ops)",
        "peftcalc.ops.linear._z (private name of module peftcalc.ops.linear)"]
    assert private_uses(tree, "t.py", known, ("measure",)) == []


# --------------------------------------------------------------------------------------------
# Rule 1: the import graph
# --------------------------------------------------------------------------------------------

def test_import_graph_is_not_vacuous():
    graph = import_graph()
    edges = sum(len(dsts) for dsts in graph.values())
    problems = []
    if len(graph) < rules.MIN_MODULES:
        problems.append(f"only {len(graph)} modules found under {', '.join(rules.PACKAGES)}/ "
                        f"(expected at least {rules.MIN_MODULES})")
    if edges < rules.MIN_EDGES:
        problems.append(f"only {edges} import edges between them (expected at least {rules.MIN_EDGES})")
    fail_if_any(problems, "problems with the import graph itself",
                "The walker must see the whole tree, or the other rules pass vacuously.")


# --------------------------------------------------------------------------------------------
# Rule 2: no import cycle
# --------------------------------------------------------------------------------------------

def test_no_import_cycles():
    graph = import_graph()
    components = strongly_connected_components(graph)
    cycles = find_cycles(graph)
    problems = [describe_cycle(graph, cycle) for cycle in cycles]
    hint = ("Modules in one cycle: " + " | ".join(", ".join(c) for c in components) +
            "\nEvery import (module-level, function-level, TYPE_CHECKING) counts. Move the shared record "
            "to a leaf module both can import.") if components else ""
    fail_if_any(problems, "import cycles (one per import that closes a cycle)", hint)


# --------------------------------------------------------------------------------------------
# Rule 3: layers and package boundaries
# --------------------------------------------------------------------------------------------

def test_peftcalc_layers():
    problems = layer_violations(import_graph(), rules.LAYERS, rules.LAYERED_PACKAGE)
    fail_if_any(problems, "layering violations in peftcalc/",
                "A module may import from its own layer or a lower one (tests/architecture_rules.py: LAYERS, "
                "lowest first). Move the imported code down, or move the module in LAYERS.")


def test_layers_are_well_formed():
    entries = [entry for layer in rules.LAYERS for entry in layer]
    duplicates = sorted({e for e in entries if entries.count(e) > 1})
    outside = sorted(e for e in entries if not _in_package(e, rules.LAYERED_PACKAGE))
    problems = [f"{e}: listed more than once" for e in duplicates]
    problems += [f"{e}: not in package {rules.LAYERED_PACKAGE}" for e in outside]
    fail_if_any(problems, "problems with LAYERS")


def test_package_boundaries():
    problems = boundary_violations(all_imports(), rules.LAYERED_PACKAGE, rules.UPPER_PACKAGES,
                                   rules.MAY_IMPORT_UPPER_LAZILY, rules.MUST_NOT_IMPORT_REPORTS)
    fail_if_any(problems, "imports across package boundaries")


# --------------------------------------------------------------------------------------------
# Rule 4: sizes
# --------------------------------------------------------------------------------------------

def test_file_sizes():
    problems = []
    for module in parse_modules().values():
        lines = len(module.source.splitlines())
        if lines > rules.MAX_FILE_LINES:
            problems.append((lines, f"{module.rel}: {lines} lines"))
    fail_if_any([p for _, p in sorted(problems, reverse=True)],
                f"files over {rules.MAX_FILE_LINES} lines")


def test_function_sizes():
    limit = rules.MAX_FUNCTION_LINES
    long, seen = [], {}
    for module in parse_modules().values():
        for qualname, (line, length) in function_lengths(module.tree).items():
            key = f"{module.name}:{qualname}"
            seen[key] = length
            if length > limit and key not in rules.LONG_FUNCTION_EXCEPTIONS:
                long.append((length, f"{key} ({module.rel}:{line}): {length} lines"))
    problems = [p for _, p in sorted(long, key=lambda x: (-x[0], x[1]))]
    for key in sorted(rules.LONG_FUNCTION_EXCEPTIONS):
        if key not in seen:
            problems.append(f"{key}: listed in LONG_FUNCTION_EXCEPTIONS but no such function (remove the entry)")
        elif seen[key] <= limit:
            problems.append(f"{key}: listed in LONG_FUNCTION_EXCEPTIONS but only {seen[key]} lines now "
                            "(remove the entry)")
    fail_if_any(problems, f"functions over {limit} lines (or stale exceptions)",
                "Split the function, or (rarely, with a reason) add it to LONG_FUNCTION_EXCEPTIONS.")


# --------------------------------------------------------------------------------------------
# Rule 5: module hygiene
# --------------------------------------------------------------------------------------------

def hygiene_problems(module: Module, known: Iterable[str]) -> list[str]:
    """A module without a docstring; a peftcalc module without a literal __all__, or whose __all__
    names what it neither defines nor imports."""
    problems = []
    if not (ast.get_docstring(module.tree) or "").strip():
        problems.append(f"{module.rel}: no module docstring")
    if not _in_package(module.name, rules.LAYERED_PACKAGE) or module.name in rules.ALL_NOT_REQUIRED:
        return problems
    names, form_problems = dunder_all(module)
    problems += form_problems
    if names is None:
        return problems + [f"{module.rel}: no __all__"]
    defined, star = defined_names(module, known)
    if star:
        return problems + [f"{module.rel}: star import: __all__ cannot be checked"]
    missing = [n for n in names if n not in defined]
    if missing:
        problems.append(f"{module.rel}: __all__ names what the module neither defines nor imports: "
                        f"{', '.join(missing)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"{module.rel}: __all__ lists more than once: {', '.join(duplicates)}")
    return problems


def test_hygiene_checker_finds_known_problems():
    def module(name, source, is_package=False):
        path = ROOT / (name.replace(".", "/") + ("/__init__.py" if is_package else ".py"))
        return Module(name, path, is_package, source, ast.parse(source))

    known = {"peftcalc.pkg", "peftcalc.pkg.sub"}
    good = module("peftcalc.pkg", '"""Doc."""\nfrom x import (a as b)\nimport c.d\nif 1:\n    E, *F = 1, 2\n'
                  "def __getattr__(n):\n    if n == 'lazy':\n        return 1\n"
                  "__all__ = ['b', 'c', 'E', 'F', 'lazy', 'sub'] + ['__getattr__']\n", is_package=True)
    assert hygiene_problems(good, known) == []
    bad = module("peftcalc.bad", "from __future__ import annotations\nx = 1\n__all__ = ['annotations', 'x', 'y', 'x']\n")
    assert hygiene_problems(bad, known) == [
        "peftcalc/bad.py: no module docstring",
        "peftcalc/bad.py: __all__ names what the module neither defines nor imports: annotations, y",
        "peftcalc/bad.py: __all__ lists more than once: x"]
    assert hygiene_problems(module("peftcalc.odd", '"""D."""\n__all__ = [name for name in "ab"]\n'), known) == [
        "peftcalc/odd.py:2: __all__ is not a list or tuple of string constants"]
    assert hygiene_problems(module("peftcalc.none", '"""D."""\n'), known) == ["peftcalc/none.py: no __all__"]
    assert hygiene_problems(module("measure.m", "x = 1\n"), known) == ["measure/m.py: no module docstring"]


def test_module_hygiene():
    modules = parse_modules()
    problems = [p for module in modules.values() for p in hygiene_problems(module, modules)]
    fail_if_any(problems, "module hygiene problems",
                "Every module needs a docstring; every peftcalc module (but __main__) a literal __all__ "
                "of names it defines or imports.")


# --------------------------------------------------------------------------------------------
# Rule 6: tests use public names only
# --------------------------------------------------------------------------------------------

def test_tests_use_public_names_only():
    known = set(parse_modules())
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += private_uses(tree, path.relative_to(ROOT).as_posix(), known, rules.PACKAGES)
    fail_if_any(problems, "uses of private names of peftcalc/measure in tests/",
                "Test through the public API (or make the name public and list it in __all__).")


# --------------------------------------------------------------------------------------------
# Rule 7: user-facing text
# --------------------------------------------------------------------------------------------

def _excerpt(text: str, match: re.Match, width: int = 40) -> str:
    start, end = max(0, match.start() - width), min(len(text), match.end() + width)
    snippet = " ".join(text[start:end].split())
    return ("..." if start else "") + snippet + ("..." if end < len(text) else "")


def test_no_internal_seed_references_in_user_facing_text():
    pattern = re.compile(rules.FORBIDDEN_TEXT)
    problems = []
    for name in rules.USER_FACING_FILES:
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
            for match in pattern.finditer(line):
                problems.append(f"{name}:{number}: {match.group(0)!r} in {_excerpt(line, match)!r}")
    for name in rules.USER_FACING_MODULES:
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in pattern.finditer(node.value):
                    problems.append(f"{name}:{node.lineno}: {match.group(0)!r} in {_excerpt(node.value, match)!r}")
    fail_if_any(sorted(set(problems)), "references to internal seeds/examples in user-facing text")
