"""The package's layers and the directions its imports may run: the map of docs/architecture.md, checked.

Every module of sslkd/ belongs to one layer (LAYERS: module names, or ``package.*`` for a package and all in
it), and each layer names the layers it may import (MAY_IMPORT), all of them below it. Every import of an
``sslkd`` module, at the top of a module or inside a function (a lazy import is a dependency too), is read
from the sources with :mod:`ast`: an import from a layer into one it may not import fails here, and so does a
circle of imports, within a layer too. The stage registry finding a stage module by its name
(sslkd/runner/registry.py, importlib) is no import, and the runner is above the stages anyway.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top.
LAYERS: dict[str, tuple[str, ...]] = {
    "ground": ("sslkd", "sslkd.errors", "sslkd.losses", "sslkd.models", "sslkd.progress", "sslkd.seeding"),
    "data": ("sslkd.data.*",),
    "methods": ("sslkd.methods.*",),
    "evaluation": ("sslkd.evaluation.*",),
    "store": ("sslkd.store.*",),
    "infra": ("sslkd.infra.*",),
    "config": ("sslkd.config", "sslkd.stage_configs", "sslkd.provenance"),
    "stages": ("sslkd.stages.*",),
    "runner": ("sslkd.runner.*",),
    "cli": ("sslkd.cli", "sslkd.__main__"),
}
_SCIENCE = ("ground", "data", "methods", "evaluation")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "ground": (),
    "data": ("ground",),
    "methods": ("ground", "data"),
    "evaluation": ("ground", "data", "methods"),
    "store": ("ground",),
    "infra": ("ground", "store"),
    "config": (*_SCIENCE, "store", "infra"),
    "stages": (*_SCIENCE, "store", "infra", "config"),
    "runner": (*_SCIENCE, "store", "infra", "config", "stages"),
    "cli": (*_SCIENCE, "store", "infra", "config", "stages", "runner"),
}


def source_modules(root: Path) -> dict[str, Path]:
    """Module name -> source file of every module under ``root``/sslkd (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted((root / "sslkd").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name module ``name`` imports: ``import a.b``, ``from a import b`` (a and a.b), relative
    imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the sslkd modules it imports (a name that is no module counts as its nearest module above:
    ``from sslkd import __version__`` imports ``sslkd``)."""
    modules = source_modules(root)
    graph = {}
    for name, path in modules.items():
        imported = set()
        for target in imported_names(name, path):
            while target.startswith("sslkd.") and target not in modules:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                imported.add(target)
        graph[name] = imported
    return graph


def layers_of(module: str) -> list[str]:
    return [
        layer
        for layer, members in LAYERS.items()
        for member in members
        if module == member or (member.endswith(".*") and (module == member[:-2] or module.startswith(member[:-1])))
    ]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) -> b (layer)' for every import into a layer that a's layer may not import."""
    found = []
    for module, imported in sorted(graph.items()):
        (layer,) = layers_of(module)
        for target in sorted(imported):
            (target_layer,) = layers_of(target)
            if target_layer != layer and target_layer not in MAY_IMPORT[layer]:
                found.append(f"{module} ({layer}) -> {target} ({target_layer})")
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of imports: every strongly connected set of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_every_module_is_in_exactly_one_layer():
    misplaced = {module: layers_of(module) for module in source_modules(REPO) if len(layers_of(module)) != 1}
    assert not misplaced, f"put each module in one layer of LAYERS (and docs/architecture.md): {misplaced}"


def test_a_layer_may_import_only_layers_below_it():
    order = list(LAYERS)
    assert list(MAY_IMPORT) == order
    for layer, allowed in MAY_IMPORT.items():
        assert all(order.index(below) < order.index(layer) for below in allowed), layer


def test_no_import_runs_upward():
    found = upward_imports(import_graph(REPO))
    assert not found, "imports against the layers (docs/architecture.md):\n" + "\n".join(found)


def test_no_circle_of_imports():
    found = circles(import_graph(REPO))
    assert not found, f"circles of imports: {found}"


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    """The checks themselves, on a copy of the package with two bad imports added (so they can fail)."""
    shutil.copytree(REPO / "sslkd", tmp_path / "sslkd", ignore=shutil.ignore_patterns("__pycache__"))
    assert not upward_imports(import_graph(tmp_path)) and not circles(import_graph(tmp_path))
    distill = tmp_path / "sslkd" / "methods" / "distill.py"
    distill.write_text(distill.read_text() + "\n\ndef _log(loss):\n    from sslkd.infra import tracking\n")
    models = tmp_path / "sslkd" / "models.py"
    models.write_text(models.read_text() + "\nfrom . import losses\n")
    losses = tmp_path / "sslkd" / "losses.py"
    losses.write_text(losses.read_text() + "\nimport sslkd.models\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "sslkd.methods.distill (methods) -> sslkd.infra (infra)",
        "sslkd.methods.distill (methods) -> sslkd.infra.tracking (infra)",
    ]
    assert circles(graph) == [["sslkd.losses", "sslkd.models"]]


def map_rows() -> dict[str, list[str]]:
    """docs/architecture.md's map, top to bottom: layer -> the cells of its row (| layer | modules | may import |...)."""
    rows = re.findall(r"^\| \*\*(\w+)\*\* \|(.*)$", (REPO / "docs" / "architecture.md").read_text(), re.MULTILINE)
    return {layer: [cell.strip() for cell in rest.split("|")] for layer, rest in rows}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_the_map_in_the_docs_is_this_one(layer):
    rows = map_rows()
    assert list(rows) == list(reversed(LAYERS))
    may_import = set(re.findall(r"\w+", rows[layer][1])) - {"nothing"}
    assert may_import == set(MAY_IMPORT[layer]), f"docs/architecture.md's row {layer} says it may import {may_import}"
    files = {
        path.name
        for module, path in source_modules(REPO).items()
        if layers_of(module) == [layer] and (path.name != "__init__.py" or module == "sslkd")
    }
    listed = set(re.findall(r"`([\w.]+\.py)`", rows[layer][0]))
    assert files == listed, f"docs/architecture.md's row {layer} lists {sorted(listed)}, the layer has {sorted(files)}"
