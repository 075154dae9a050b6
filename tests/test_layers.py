"""embedkit is a stack without cycles: every import of embedkit.* points down or sideways, never up.

Every module under embedkit/ is parsed (not imported) and every `import embedkit...` /
`from embedkit... import ...` is collected, at module level and inside functions alike: a lazy
import is still a dependency, it only fails later. Three rules:

1. no import cycle between modules;
2. no import from a lower layer into a higher one (`LAYERS` below);
3. no cycle between the layers' units (subpackages and top-level modules), so two units of one
   layer depend on each other in one direction only (recipes -> reporting, objectives -> eval).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "embedkit"

#: The layer of every subpackage and top-level module. A unit may import units of its own layer or
#: lower ones. A new subpackage or top-level module must be given a layer here.
LAYERS = {
    # 0, the base: helpers that import nothing above themselves, used from any layer. They write
    # files whole (atomic_files), keep secrets out of them (redact: eval writes results with it),
    # name the checkout's commit (provenance), choose and lock run folders (folders), and register
    # the OmegaConf resolvers with those (config, imported by run.py, `python -m embedkit.mining`
    # and the report); checkpointing is Lightning plumbing that imports no embedkit module.
    "embedkit": 0,
    "embedkit.atomic_files": 0,
    "embedkit.redact": 0,
    "embedkit.provenance": 0,
    "embedkit.folders": 0,
    "embedkit.config": 0,
    "embedkit.checkpointing": 0,
    # 1: reading and batching training data.
    "embedkit.data": 1,
    # 2: encoders, tokenizers and vocabularies (the vocabulary reads the data's corpora).
    "embedkit.models": 2,
    # 3: what uses a model: training objectives, evaluation, hard-negative mining, data filters,
    # teacher scoring.
    "embedkit.objectives": 3,
    "embedkit.eval": 3,
    "embedkit.mining": 3,
    "embedkit.filters": 3,
    "embedkit.scoring": 3,   # teacher scores for KD (loads teachers as filters.teacher does)
    # 4: whole runs and what reads them.
    "embedkit.recipes": 4,
    "embedkit.reporting": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module an imported name lives in: `embedkit.data.sources` for itself, or for
    `embedkit.data.sources.zh_mini_jsonl`; None outside embedkit."""
    if name != "embedkit" and not name.startswith("embedkit."):
        return None
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, int]:
    """{imported embedkit module: first line} for one module, lazy imports included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def unit_of(module: str) -> str:
    """The LAYERS entry a module belongs to: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(module)


def find_cycle(graph: dict[str, set[str] | dict]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None."""
    cycles = find_cycles(graph)
    return cycles[0] if cycles else None


def find_cycles(graph: dict[str, set[str] | dict]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per group of nodes that reach each other (strongly connected)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []
    found: list[list[str]] = []
    seen: set[str] = set()

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                if not seen & set(cycle):   # one per group: a cycle through new nodes only
                    found.append(cycle + [nxt])
                    seen.update(cycle)
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start)
    return found


def test_the_scan_sees_the_package():
    assert {"embedkit.data.base", "embedkit.recipes.train_eval", "embedkit.config"} <= set(MODULES)
    # lazy (function-level) imports are collected too
    assert "embedkit.data.weak_pairs" in GRAPH["embedkit.models.build"] or \
        "embedkit.data.weak_pairs" in GRAPH["embedkit.data.corpus"]


def test_every_module_has_a_layer():
    missing = sorted({m for m in MODULES if not any(m == u or m.startswith(u + ".") for u in LAYERS)})
    assert not missing, f"give these a layer in tests/test_layers.py LAYERS: {missing}"


def test_no_import_cycle_between_modules():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_no_import_from_a_lower_layer_into_a_higher_one():
    upward = [f"{m} (layer {LAYERS[unit_of(m)]}) imports {t} (layer {LAYERS[unit_of(t)]}), "
              f"{MODULES[m].relative_to(ROOT.parent)}:{line}"
              for m, targets in GRAPH.items() for t, line in sorted(targets.items())
              if LAYERS[unit_of(t)] > LAYERS[unit_of(m)]]
    assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def test_no_cycle_between_packages():
    units: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        units.setdefault(unit_of(m), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(m))
    cycles = find_cycles(units)
    assert not cycles, "packages import each other:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, ["a", "b", "a"]),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_find_cycles_names_each_group_once():
    assert find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": {"e"}, "e": {"d"}}) == \
        [["a", "b", "a"], ["d", "e", "d"]]


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and _numerics.py, conftest.py fixtures): a test
    module importing another runs that module's collection side effects and couples the two."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} imports {m}" for m in mods if m.split(".")[-1] in names]
    assert not found, "\n".join(found)
