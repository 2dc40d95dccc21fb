"""Data flows one way (docs/design.md): every module of htnet/ and search/ sits in a layer, and a
module imports only from its own layer or lower ones, with no cycle anywhere. Imports are read with
`ast` from the source, function-level (lazy) imports included: a lazy import is still a dependency.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lowest first. metrics sits below the engine: the inner protocol picks its epoch by validation UF1.
LAYERS = [
    ("base", ["htnet.errors", "htnet.io"]),
    ("data", ["htnet.data", "htnet.preprocess"]),
    ("metrics", ["htnet.metrics"]),
    ("models", ["htnet.models"]),
    ("engine parts", ["htnet.folds", "htnet.models.grouped"]),
    ("engine", ["htnet.engine"]),
    ("loso", ["htnet.checkpoint", "htnet.loso"]),
    ("htnet cli", ["htnet.cli", "htnet.__main__"]),
    ("search space", ["search.pruners", "search.space", "search.spaces"]),  # spaces: the space files
    ("tracking", ["search.tracking", "search.driver.stores", "search.driver.ray_setup",
                  "search.driver.console"]),
    ("ray-optuna bridge", ["search.bridge", "search.pruning", "search.trainable"]),
    ("search driver", ["search.driver"]),
    ("reports", ["search.reports", "search.nested"]),
    ("search cli", ["search.cli", "search.__main__"]),
]


def modules():
    found = {}
    for package in ("htnet", "search"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


PACKAGE_ROOTS = ("htnet", "search")  # their __init__.py import nothing (checked below)


def layer_of(name):
    """(rank, layer name) of the longest listed prefix of `name`."""
    if name in PACKAGE_ROOTS:
        return (0, "package root")
    best = None
    for rank, (layer, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[2]):
                best = (rank, layer, len(prefix))
    return best[:2] if best else None


def imports(path, known):
    """The project modules `path` imports (a `from package import module` names the module)."""
    def resolve(name):
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else resolve(node.module))
    return found - {None}


def graph():
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_module_has_a_layer():
    modules_graph = graph()
    assert [name for name in modules_graph if layer_of(name) is None] == []
    assert {root: modules_graph[root] for root in PACKAGE_ROOTS} == {root: set() for root in PACKAGE_ROOTS}


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if layer_of(dep)[0] > layer_of(name)[0]:
                wrong.append(f"{name} ({layer_of(name)[1]}) imports {dep} ({layer_of(dep)[1]})")
    assert wrong == []


def cycles(edges):
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in edges.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    # a package importing its own submodules (htnet.data -> htnet.data.release) is not a cycle
    # unless a submodule imports the package back
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected
