"""dvc.yaml's per-stage dependencies match the code and gin files each stage actually reads.

Every DVC stage depends on the source files of the modules its ``sslkd <stage>`` runs and on the gin files
its setting reads, not on the whole ``sslkd`` and ``gin`` folders: editing a log line in the tracking code
must not make ``dvc status`` call the teacher (a quarter of an hour on cifar10) changed.

The rule for a stage's code (computed here from the source with :mod:`ast`, no import, no DVC run):

* Roots: the stage module ``sslkd/stages/<stage>.py``, the module defining the stage's root config class
  (``sslkd.config.configurables()[stage]``) and, for the stages whose students read it, the module of
  ``student_input``'s config class.
* Follow every import of an ``sslkd`` module, at the top of a module or inside a function, transitively,
  with the packages' ``__init__.py`` files (importing ``sslkd.stages.data`` runs them).
* Except the imports inside ``sslkd.config.configurables``: it imports every stage's config class to
  register them with gin; a stage's results depend only on the configs it builds, which are its roots.
* Stop at infrastructure (not a dependency, not followed): how a stage is launched, tracked, placed on a
  device or allocated memory does not change what it writes. Infrastructure is the ``sslkd.infra``
  package, ``sslkd.cli``, and ``sslkd.report``/``sslkd.plots`` for stages whose outputs hold no table or
  plot (every stage but ``report`` and ``variance``; the others use them only for tracking pictures and
  metrics). Any module may import infrastructure (stage modules log to tracking, sslkd.artifacts records
  the stage's device in sidecars): the closure does not pass through it, so tracking code and what it
  imports stay out of every stage's dependencies.

Gin files: a stage depends on its setting's file, ``gin/settings/${setting}.gin`` (DVC templates
``${setting}`` from params.yaml), and on the folders a setting may include (``INCLUDE_FOLDERS``): which
files a setting includes is only known by parsing it, so every stage depends on all of them; a test checks
that every include of every setting (transitively) lies in these folders, so an include of another
setting file, which DVC would not see, fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from sslkd import config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sslkd"
INFRA = {"sslkd.cli", "sslkd.__main__", "sslkd.infra"}
PRESENTATION = {"sslkd.report", "sslkd.plots"}
PRESENTING_STAGES = {"report", "variance"}
NOT_FOLLOWED = {("sslkd.config", "configurables")}
INCLUDE_FOLDERS = ("gin/stages", "gin/launch", "gin/models", "gin/data", "gin/papers")


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None when it is not one."""
    path = REPO.joinpath(*name.split("."))
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def is_infra(name: str, stage: str) -> bool:
    if any(name == infra or name.startswith(infra + ".") for infra in INFRA):
        return True
    return name in PRESENTATION and stage not in PRESENTING_STAGES


def imported_modules(name: str) -> set[str]:
    """Every ``sslkd`` module that module ``name``'s source imports (the rule's exception left out)."""
    tree = ast.parse(module_file(name).read_text())
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


def with_packages(name: str) -> set[str]:
    """``name`` and the packages above it (importing a module runs their ``__init__``)."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def stage_roots(stage: str) -> set[str]:
    if stage == "check":  # validates params.yaml by building every config (dvc.yaml's first stage)
        return {"sslkd.stages.check"} | {cls.__module__ for cls in config.configurables().values()}
    roots = {f"sslkd.stages.{stage}", config.configurables()[stage].__module__}
    if stage in config.STUDENT_STAGES:
        roots.add(config.configurables()["student_input"].__module__)
    return roots


def closure(stage: str) -> set[str]:
    """The modules a stage's results depend on, by the rule in this module's docstring."""
    seen: set[str] = set()
    todo = list(stage_roots(stage))
    while todo:
        for name in with_packages(todo.pop()):
            if name in seen or is_infra(name, stage):
                continue
            seen.add(name)
            todo.extend(imported_modules(name))
    return seen


def code_deps(stage: str) -> set[str]:
    return {module_file(name).relative_to(REPO).as_posix() for name in closure(stage)}


def gin_deps() -> set[str]:
    return {"gin/settings/${setting}.gin", *INCLUDE_FOLDERS}


def dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage name -> (sslkd stage, deps) of the root pipeline and the variance study."""
    stages = {}
    for path in (REPO / "dvc.yaml", REPO / "studies" / "variance" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            body = stage.get("do", stage)
            sslkd_stage = body["cmd"].split()[1]
            stages[name] = (sslkd_stage, body["deps"])
    return stages


def test_every_sslkd_stage_is_a_dvc_stage():
    assert {stage for stage, _ in dvc_stages().values()} == set(config.STAGES) | {"check"}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_deps_are_the_stage_code_and_gin_files(name):
    stage, deps = dvc_stages()[name]
    source = {dep for dep in deps if not dep.startswith(("artifacts/", "${item}"))}
    expected = code_deps(stage) | gin_deps()
    if stage == "check":  # every setting file: DVC must not stop at a missing one before sslkd check runs
        expected = expected - {"gin/settings/${setting}.gin"} | {"gin/settings"}
    assert source == expected, (
        f"dvc.yaml stage {name}: deps drifted from the code it runs; missing {sorted(expected - source)}, "
        f"extra {sorted(source - expected)}; its deps are:\n{sorted(expected)}"
    )


def test_the_closure_follows_imports_and_stops_at_infrastructure():
    """The rule on known cases: the distill stage runs unroll.py (via distill.py) and logs to tracking."""
    distill = code_deps("distill")
    assert {
        "sslkd/stages/distill.py",
        "sslkd/distill.py",
        "sslkd/unroll.py",
        "sslkd/kd_steps.py",
        "sslkd/__init__.py",
        "sslkd/stages/__init__.py",
        "sslkd/stages/inputs.py",
    } <= distill
    assert not any(path.startswith("sslkd/infra/") for path in distill)
    assert "sslkd/plots.py" not in distill and "sslkd/plots.py" in code_deps("variance")
    assert "sslkd/report.py" in code_deps("report") and "sslkd/report.py" not in code_deps("evaluate")
    assert "sslkd/distill.py" not in code_deps(
        "teacher"
    )  # configurables() imports it, but teacher builds no distill config
    assert "sslkd/stage_configs.py" in code_deps("init")  # InitConfig: init's root config


def includes(path: Path) -> list[str]:
    return re.findall(r"^include\s+['\"]([^'\"]+)['\"]", path.read_text(), flags=re.MULTILINE)


@pytest.mark.parametrize("setting", sorted(path.stem for path in (REPO / "gin" / "settings").glob("*.gin")))
def test_every_include_of_a_setting_is_in_the_include_folders(setting):
    todo, seen = [f"settings/{setting}.gin"], set()
    while todo:
        relative = todo.pop()
        if relative in seen:
            continue
        seen.add(relative)
        todo.extend(includes(REPO / "gin" / relative))
    outside = {
        name
        for name in seen - {f"settings/{setting}.gin"}
        if not any(f"gin/{name}".startswith(folder + "/") for folder in INCLUDE_FOLDERS)
    }
    assert not outside, f"{setting} includes {sorted(outside)}, outside the folders every stage depends on"
