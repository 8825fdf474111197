"""The package's layers import one way only, and no module imports itself round a cycle.

The layers, lowest first (``docs/concepts.md``, "How the package is laid out"): a module may import from its own
layer and the layers below it, never from a layer above. Imports inside functions count as much as top-level ones.
``peft_palora/__init__.py`` is the front door and may name anything (lazily, beyond the tuner).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peft_palora"

LAYERS = [
    ("utils", ["peft_palora.utils"]),
    ("tuner", ["peft_palora.tuner"]),
    ("method", ["peft_palora.preferences", "peft_palora.objectives", "peft_palora.pareto"]),
    ("fronts", ["peft_palora.fronts"]),
    ("training", ["peft_palora.training"]),
    ("alignment", ["peft_palora.alignment"]),
    ("interop", ["peft_palora.interop"]),
    ("cli", ["peft_palora.cli"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    return None


def _imports(path: Path) -> set[str]:
    """Every ``peft_palora`` module ``path`` imports, anywhere in the file (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import submodule` imports the submodule
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "peft_palora" or name.startswith("peft_palora.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path) if target in modules and target != name}
    return graph


def test_every_module_has_a_layer():
    unplaced = [name for name in _graph() if name != "peft_palora" and _layer_of(name) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS and docs/concepts.md): {unplaced}"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for name, targets in _graph().items():
        if name == "peft_palora":
            continue
        for target in targets:
            if target == "peft_palora":
                upward.append(f"{name} -> peft_palora (the front door)")
            elif _layer_of(target) > _layer_of(name):
                upward.append(f"{name} ({LAYERS[_layer_of(name)][0]}) -> {target} ({LAYERS[_layer_of(target)][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    # Package __init__ files import their children by design; a child importing its own package's __init__ back is
    # what makes a cycle, and that is caught as an edge like any other.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if target.startswith(node + "."):
                continue  # a package importing its own submodule
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a tuner module that imports the CLI is reported."""
    fake = tmp_path / "peft_palora"
    (fake / "tuner").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "tuner" / "__init__.py").write_text("")
    (fake / "tuner" / "layer.py").write_text("def f():\n    from peft_palora.cli import main\n")
    (fake / "cli.py").write_text("from .tuner import layer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"peft_palora.tuner.layer \(tuner\) -> peft_palora.cli \(cli\)"):
        test_no_module_imports_from_a_higher_layer()
