"""The dependency rule of docs/architecture.md, enforced on the import graph.

Every module of the package sits on a floor; a module may import only from lower floors, or from
its own folder. No import cycle between files, none between folders. Lazy imports inside
functions count: an upward import is a dependency wherever it is written.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moestream"

# bottom to top; a unit is a top-level module (errors) or a folder (model)
FLOORS = [
    ("errors",),  # the one exception type
    ("files", "units", "data", "memory"),  # safe file writes; size/count parsing and formatting; the embedded data; weights on huge pages
    ("profiling",),  # spans, counters, routing traces, profile reports: written by every part above
    ("config",),  # settings declared once
    ("model",),  # config dialects, presets, checkpoint, the experts seam, Llama 4, tokenizer, sampling
    ("cache",),  # the KV cache and its tiers
    ("offload",),  # expert offloading: store, expert cache, policies, transfer, prefetch, cost, builder
    ("analysis", "scheduler"),  # offline replay and oracles | placement plan and the generation loop
    ("stats",),  # one snapshot of every part's counters
    ("llm",),  # the thin facade
    ("server",),  # the OpenAI-compatible HTTP server over the batcher
    ("cli",),  # the commands
    ("__main__", "__init__"),  # the package's faces
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """moestream modules imported anywhere in the file (absolute and relative)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "moestream"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moestream":
                continue
            # `from . import chat` imports a module; `from .x import name` imports x
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                out.add(candidate if _exists(candidate) else target)
    return {m for m in out if m != me}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    files = sorted(p for p in PACKAGE.rglob("*.py"))
    return {module_name(p): imports(p) for p in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_every_unit_has_a_floor():
    units = {unit_of(m) for m in graph()}
    assert units <= set(FLOOR), f"give these a floor in FLOORS (and docs/architecture.md): {sorted(units - set(FLOOR))}"


def test_no_upward_import():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            a, b = unit_of(module), unit_of(target)
            if a == b or target == "moestream":
                continue
            if FLOOR[b] >= FLOOR[a]:
                upward.append(f"{module} -> {target} ({a} on floor {FLOOR[a]}, {b} on floor {FLOOR[b]})")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(sorted(upward))


def test_no_cycle_between_files():
    edges = {m: {t for t in ts if t != "moestream"} for m, ts in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_no_cycle_between_folders():
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        a = unit_of(module)
        edges.setdefault(a, set()).update(unit_of(t) for t in targets if unit_of(t) != a and t != "moestream")
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing the offload engine is reported."""
    fake = tmp_path / "moestream"
    (fake / "model").mkdir(parents=True)
    (fake / "offload").mkdir()
    for p in (fake / "__init__.py", fake / "model" / "__init__.py", fake / "offload" / "__init__.py"):
        p.write_text("")
    (fake / "offload" / "engine.py").write_text("X = 1\n")
    (fake / "model" / "llama4.py").write_text("def f():\n    from ..offload.engine import X\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert "moestream.offload.engine" in imports(fake / "model" / "llama4.py")
    try:
        test_no_upward_import()
    except AssertionError as e:
        assert "moestream.model.llama4 -> moestream.offload.engine" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")
