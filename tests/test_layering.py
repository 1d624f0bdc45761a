"""The package's import layering (docs/concepts.md#the-packages): no cycles, no private name
imported across modules, and every import points down the layers below."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "arc_peft"

# Lowest first; a module may import only from its own layer or lower ones.
LAYERS = [
    ("arc_peft.errors", "arc_peft.state"),
    ("arc_peft.methods",),
    ("arc_peft.discovery",),
    ("arc_peft.runtime",),
    ("arc_peft.inject", "arc_peft.training"),
    ("arc_peft.merge",),
    ("arc_peft.io",),
    ("arc_peft.cli", "arc_peft.__main__", "arc_peft.integrations", "arc_peft"),
]


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                dest = full if full in modules else target
                if dest in modules and dest != module:
                    edges[module].add(dest)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module} imports {alias.name} from {dest}")
    return edges, private


def _layer(module: str) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), index))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS and docs/concepts.md"
    return best[1]


def test_no_cycles():
    edges, _ = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dest in sorted(edges[node]):
            if state.get(dest) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dest) :], dest]))
            if dest not in state:
                visit(dest, [*path, dest])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_no_private_names_across_modules():
    _, private = _graph()
    assert not private


def test_imports_point_down_the_layers():
    edges, _ = _graph()
    upward = [
        f"{m} -> {d}"
        for m, dests in edges.items()
        for d in dests
        if m != "arc_peft" and _layer(d) > _layer(m)
    ]
    assert not upward
