"""Imports flow one way. At package level, in the order of :data:`LAYERS` (core ->
data/models -> train -> compress -> evaluate -> synth -> clean -> search -> deploy ->
run/cli): a module imports only its own package and packages of its layer or below, lazy
imports inside functions included, and no effray module loads code by name
(``importlib``/``__import__``), which this graph could not see. Within that, no module
imports another that (directly or through others) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import effray

ROOT = Path(effray.__file__).parent
# effray's packages and top-level modules, lowest first; a name imports only its own
# layer and those before it (and never the other name of its layer back: no circles)
LAYERS = (
    ("errors", "config", "registry", "console", "atomic", "storage", "hardware", "tracking", "cluster", "mailbox"),
    ("data", "models", "metrics"),
    ("train",),
    ("compress",),
    ("evaluate",),
    ("synth",),
    ("clean",),
    ("search",),
    ("deploy",),
    ("run", "cli", "local_cluster"),
)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> effray modules it imports anywhere in its file (``from a.b import c``
    counts as ``a.b``, or ``a.b.c`` when that is a module)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            for t in targets:
                if t.startswith("effray") and t in modules and t != name:
                    graph[name].add(t)
    return graph


def package(module: str) -> str:
    """``effray.train.loop`` -> ``train``; ``effray.cli`` -> ``cli``; ``effray`` -> ``effray``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a package from a lower layer's module (``effray/__init__`` aside)."""
    out = []
    for module, targets in sorted(graph.items()):
        if module == "effray":
            continue
        for t in sorted(targets):
            if package(t) != package(module) and package(t) != "effray" and layer(package(t)) > layer(package(module)):
                out.append(f"{module} -> {t}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_package_has_a_layer():
    names = {package(m) for m in import_graph()} - {"effray"}
    layered = {n for names_ in LAYERS for n in names_}
    assert names <= layered, sorted(names - layered)


def test_the_order_check_finds_an_import_that_runs_back_up():
    assert upward({"effray.train.loop": {"effray.evaluate.run"}, "effray.evaluate.run": {"effray.train.loop"}}) == [
        "effray.train.loop -> effray.evaluate.run"
    ]


def test_imports_flow_one_way_at_package_level():
    assert upward(import_graph()) == []


# the one place effray imports code by name: the user's own ``--model pkg.module:factory``
# (effray.models.reference), its ``import importlib`` and its one ``import_module`` call
USER_CODE = "models/reference.py"


def test_no_module_loads_code_by_name():
    """``importlib.import_module`` or ``__import__`` would hide an arrow from the graph; only
    the user's model factory is imported by name, in exactly one place."""
    hits = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in ("import_module", "__import__"):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                hits += [f"{path.relative_to(ROOT)}:{node.lineno}" for m in mods if m.split(".")[0] == "importlib"]
    others = [h for h in hits if not h.startswith(f"{USER_CODE}:")]
    assert others == []
    assert len(hits) == 2, hits  # reference.py: `import importlib` and its one import_module call


def test_effray_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "effray.train.parallel" in graph["effray.train.loop"]  # the graph is real
    assert cycles(graph) == []
    assert "effray.train.pipeline" not in graph["effray.train.strategy"]


def test_the_named_actors_start_without_torch():
    """An actor's process imports the module of its class: the driver's mailbox, the epoch
    clock and the progress-bar relay (one of each per fit or per command) start as bare
    Ray workers, not ones that load torch and the training stack first."""
    import subprocess
    import sys

    script = (
        "import sys, effray.mailbox, effray.data.clock, effray.console\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'effray')))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "torch" not in loaded and "effray.train" not in loaded, loaded
    assert "'effray.mailbox'" in loaded and "'effray.data.clock'" in loaded, loaded
