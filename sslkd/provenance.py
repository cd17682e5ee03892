"""Which source files a stage's results depend on: its DVC code deps and what its sidecars' code version hashes.

A stage's artifacts record ``<version>+src.<hash>``, a hash of exactly the source files dvc.yaml lists as the
stage's code deps (tests/test_stage_deps.py holds the two equal): the stage registry
(sslkd/runner/registry.py) tells the store these files (:func:`stage_source_files`) before the stage runs,
and the store hashes them into each sidecar (sslkd/store/artifacts.py). An edit that DVC does not see as
changing a stage therefore leaves that stage's sidecars byte for byte the same, so the dvc.lock an
incremental ``dvc repro`` leaves is the one a clean run reproduces.

The rule for a stage's code (computed from the source with :mod:`ast`, nothing imported but the configs):

* Roots: the stage module ``sslkd/stages/<stage>.py``, the module defining the stage's root config class
  (``sslkd.config.configurables()[stage]``) and, for the stages whose students read it, the module of
  ``student_input``'s config class. ``check`` builds every config: its roots are every config's module.
* Follow every import of an ``sslkd`` module, at the top of a module or inside a function, transitively,
  with the packages' ``__init__.py`` files (importing ``sslkd.stages.data`` runs them).
* Except the imports inside ``sslkd.config.configurables``: it imports every stage's config class to
  register them with gin; a stage's results depend only on the configs it builds, which are its roots.
* Stop at infrastructure (not a dependency, not followed): how a stage is launched, tracked, placed on a
  device or allocated memory does not change what it writes. Infrastructure is the ``sslkd.infra`` and
  ``sslkd.runner`` packages, ``sslkd.cli``, and ``sslkd.evaluation.report``/``sslkd.evaluation.plots`` for
  stages whose outputs hold no table or plot (every stage but ``report`` and ``variance``; the others use
  them only for tracking pictures and metrics). The closure does not pass through it.

This module reads the config registry (sslkd/config.py), so it sits beside it, above the library and the
store (docs/architecture.md).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from sslkd import PACKAGE_DIR

SOURCE_ROOT = PACKAGE_DIR.parent  # module ``a.b`` is SOURCE_ROOT/a/b.py
INFRA = ("sslkd.cli", "sslkd.__main__", "sslkd.infra", "sslkd.runner")
PRESENTATION = ("sslkd.evaluation.report", "sslkd.evaluation.plots")
PRESENTING_STAGES = ("report", "variance")
NOT_FOLLOWED = (("sslkd.config", "configurables"),)


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None when it is not one."""
    path = SOURCE_ROOT.joinpath(*name.split("."))
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def is_infrastructure(name: str, stage: str) -> bool:
    if any(name == infra or name.startswith(infra + ".") for infra in INFRA):
        return True
    return name in PRESENTATION and stage not in PRESENTING_STAGES


def imported_modules(name: str) -> set[str]:
    """Every ``sslkd`` module that module ``name``'s source imports (the rule's exception left out)."""
    source = module_file(name)
    assert source is not None, name
    tree = ast.parse(source.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (name, node.name) in NOT_FOLLOWED:
            skipped |= {id(inner) for inner in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}"
                for alias in node.names
                if module_file(f"{node.module}.{alias.name}") is not None
            }
    return {module for module in found if module.split(".")[0] == "sslkd" and module_file(module) is not None}


def _with_packages(name: str) -> set[str]:
    """``name`` and the packages above it (importing a module runs their ``__init__``)."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def stage_roots(stage: str) -> set[str]:
    from sslkd import config

    if stage == "check":  # validates params.yaml by building every config (dvc.yaml's first stage)
        return {"sslkd.stages.check"} | {cls.__module__ for cls in config.configurables().values()}
    roots = {f"sslkd.stages.{stage}", config.configurables()[stage].__module__}
    if stage in config.STUDENT_STAGES:
        roots.add(config.configurables()["student_input"].__module__)
    return roots


@functools.cache
def stage_modules(stage: str) -> frozenset[str]:
    """The modules stage ``stage``'s results depend on, by the rule in this module's docstring."""
    seen: set[str] = set()
    todo = list(stage_roots(stage))
    while todo:
        for name in _with_packages(todo.pop()):
            if name in seen or is_infrastructure(name, stage):
                continue
            seen.add(name)
            todo.extend(imported_modules(name))
    return frozenset(seen)


def stage_source_files(stage: str) -> list[str]:
    """The stage's code deps, as dvc.yaml lists them: source paths relative to the repository, sorted."""
    paths = (module_file(name) for name in stage_modules(stage))
    return sorted(path.relative_to(SOURCE_ROOT).as_posix() for path in paths if path is not None)
