"""Imports go one way: topology <- agents <- launch.comm <- launch.engine <- experiments <- launch.cli /
launch.bench <- the entry points, and no module imports itself back through a cycle.

Every module of the packages is parsed (ast, not imported), every ``import`` / ``from ... import``
anywhere in it (top level or inside a function: a lazy import is still a dependency) is resolved
to a module of the project, and

- a module may import only modules of its own layer or of a lower one (:data:`LAYERS`);
- the graph of module imports has no cycle.

A failure names the file and the line of the offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("topology", "agents", "launch", "experiments")

#: Layers, lowest first: a module of layer k may import modules of layers <= k.  The longest
#: prefix of a module's dotted name decides its layer.
LAYERS = {
    "topology": 0,
    "agents": 1,
    "launch.comm": 2,
    # Inside the engine, one direction too: placement <- guard <- sync <- core <- readout, store
    # <- the two doors (Simulation, the own loop) <- the package's face.
    "launch.engine.placement": 3.0,
    "launch.engine.guard": 3.1,       # errors, the lost-rank handler, the finiteness check
    "launch.engine.sync": 3.2,        # compiling and running a sync
    "launch.engine.core": 3.3,        # the per-rank engine
    "launch.engine.readout": 3.4,     # X c, every agent's and level's weights, distances
    "launch.engine.store": 3.4,       # checkpoints
    "launch.engine.record": 3.45,     # metrics.csv, eval.csv, the simulated clock
    "launch.engine.simulation": 3.5,  # the built-in loop's door
    "launch.engine.own_loop": 3.5,    # the user's loop's door
    "launch.engine": 3.6,
    "launch": 3.6,            # the package itself: the Python API (comm and engine only)
    "experiments": 4,         # problems and experiments: they use the engine
    "launch.cli": 5,          # the command line: the only place that knows configuration names
    "launch.bench": 5,
    "launch.__main__": 6,     # entry points: python -m launch, -m launch.equivalence
    "launch.equivalence": 6,
    "launch.plot": 6,
    "launch.compare": 6,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def modules() -> dict[str, Path]:
    """Every module of the project: dotted name -> file (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement of the module ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub when it is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if not _has_layer(m)] == []


def _has_layer(module: str) -> bool:
    try:
        layer(module)
    except KeyError:
        return False
    return True


def test_imports_go_one_way():
    known, edges = modules(), graph()
    wrong = [f"{known[a].relative_to(ROOT)}:{line}: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in edges.items() for b, line in targets if layer(b) > layer(a)]
    assert wrong == [], "imports against the direction:\n" + "\n".join(wrong)


def test_no_import_cycle():
    known, edges = modules(), graph()
    cycle = find_cycle({a: [b for b, _ in targets] for a, targets in edges.items()})
    if cycle:
        lines = []
        for a, b in zip(cycle, cycle[1:]):
            line = next(n for t, n in edges[a] if t == b)
            lines.append(f"{known[a].relative_to(ROOT)}:{line}: {a} imports {b}")
        pytest.fail("import cycle:\n" + "\n".join(lines))


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle ``[a, b, ..., a]`` of the directed graph, or None (depth-first search)."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_a_backward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks can fail: a planted backward import and a planted cycle are both reported."""
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": []}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": []}) is None
    fake = tmp_path / "topology"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("import os\n\ndef f():\n    from launch.engine import simulation\n")
    known = {"topology": fake / "__init__.py", "topology.bad": fake / "bad.py",
             "launch.engine.simulation": Path("x")}
    found = imports("topology.bad", fake / "bad.py", known)
    assert found == [("launch.engine.simulation", 4)]
    assert layer("launch.engine.simulation") > layer("topology.bad")


def test_the_checker_sees_a_backward_import_inside_the_engine(tmp_path):
    """The engine's own layers are enforced: the sync compiler may not import the core (a
    planted backward import is reported), the core may import the sync compiler."""
    fake = tmp_path / "launch" / "engine" / "sync"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from launch.engine.core import SyncEngine\n")
    known = {"launch.engine.sync.bad": fake / "bad.py", "launch.engine.core": Path("x")}
    found = imports("launch.engine.sync.bad", fake / "bad.py", known)
    assert found == [("launch.engine.core", 1)]
    assert layer("launch.engine.core") > layer("launch.engine.sync.bad")
    assert layer("launch.engine.sync.compile") > layer("launch.engine.guard.health") > layer("launch.engine.placement")
    assert layer("launch.engine.own_loop.agent_optimizer") > layer("launch.engine.store.checkpoint") > layer("launch.engine.core")
