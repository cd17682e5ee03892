"""dvc.yaml's per-stage dependencies match the code and gin files each stage actually reads.

Every DVC stage depends on the source files of the modules its ``sslkd <stage>`` runs and on the gin files
its setting reads, not on the whole ``sslkd`` and ``gin`` folders: editing a log line in the tracking code
must not make ``dvc status`` call the teacher (a quarter of an hour on cifar10) changed. The code rule is
sslkd/provenance.py's (the files a stage's sidecars hash into their code version), so what DVC reruns and
what changes a sidecar are the same files.

Gin files: a stage depends on its setting's file, ``gin/settings/${setting}.gin`` (DVC templates
``${setting}`` from params.yaml), and on the folders a setting may include (``INCLUDE_FOLDERS``): which
files a setting includes is only known by parsing it, so every stage depends on all of them; a test checks
that every include of every setting (transitively) lies in these folders, so an include of another
setting file, which DVC would not see, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sslkd import config, provenance

REPO = Path(__file__).resolve().parents[1]
INCLUDE_FOLDERS = ("gin/stages", "gin/launch", "gin/models", "gin/data", "gin/papers")


def code_deps(stage: str) -> set[str]:
    return set(provenance.stage_source_files(stage))


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
        "sslkd/methods/distill.py",
        "sslkd/methods/unroll.py",
        "sslkd/methods/kd_steps.py",
        "sslkd/__init__.py",
        "sslkd/methods/__init__.py",
        "sslkd/stages/__init__.py",
        "sslkd/stages/inputs.py",
        "sslkd/data/training_data.py",
        "sslkd/store/artifacts.py",
    } <= distill
    assert not any(path.startswith(("sslkd/infra/", "sslkd/runner/")) for path in distill)
    assert "sslkd/provenance.py" not in distill  # the registry (runner) applies the rule; no stage imports it
    assert "sslkd/evaluation/plots.py" not in distill and "sslkd/evaluation/plots.py" in code_deps("variance")
    assert "sslkd/evaluation/report.py" in code_deps("report") and "sslkd/evaluation/report.py" not in code_deps(
        "evaluate"
    )
    assert "sslkd/methods/distill.py" not in code_deps(
        "teacher"
    )  # configurables() imports it, but teacher builds no distill config
    assert "sslkd/methods/selection.py" in code_deps("init")  # InitConfig: init's root config
    assert "sslkd/stage_configs.py" in code_deps("teacher")  # TeacherConfig: teacher's root config


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
