"""Shared fixtures: small deterministic problems for the library functions."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# No per-example deadline: on a shared 2-core machine an example's time says nothing about the code
# (a loaded machine made the loss properties "fail" at 255 ms against hypothesis's 200 ms default).
settings.register_profile("sslkd", deadline=None)
settings.load_profile("sslkd")

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("SSLKD_TRACKING", "off")  # tests/test_tracking.py switches it on where it tests it
os.environ.setdefault("SSLKD_UPLOADER_IDLE_SECONDS", "2")
os.environ.setdefault(
    "SSLKD_DEVICE", "cpu"
)  # the bit-for-bit checks hold on the CPU (sslkd/infra/devices.py)  # tests' tracking uploaders exit soon after their work

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_problem():
    return make_tiny_problem()


def make_tiny_problem():
    """A width-4 ConvNet on 8x8 RGB images regressing 6-d targets: (student, layout, images, targets)."""
    from sslkd.methods.experts import build_student
    from sslkd.models import ConvNetConfig, ParameterLayout

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 8, 8, generator=generator)
    targets = torch.randn(12, 6, generator=generator)
    student = build_student(ConvNetConfig(width=4, depth=2), (3, 8, 8), 6, seed=1)
    return student, ParameterLayout.of(student), images, targets


def make_workspace(root: Path) -> Path:
    """A workspace with the repo's gin files, the toy setting (tests/configs/tiny.gin) and default params."""
    import shutil

    shutil.copytree(REPO / "gin", root / "gin")
    shutil.copy(REPO / "tests" / "configs" / "tiny.gin", root / "gin" / "settings" / "tiny.gin")
    (root / "params.yaml").write_text(toy_params((REPO / "params.yaml").read_text()))
    return root


def toy_params(text: str) -> str:
    """params.yaml's text for the toy setting: setting tiny, 3 evaluation seeds (the default has 6)."""
    text = text.replace("setting: digits", "setting: tiny")
    return re.sub(r"(evaluate:\n  seeds: )\[[0-9, ]+\]", r"\1[0, 1, 2]", text)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A toy-setting workspace in which data, teacher, represent, experts and init ran inline."""
    from sslkd.cli import main

    root = make_workspace(tmp_path_factory.mktemp("tiny_study"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("data", "teacher", "represent", "experts", "init"):
            assert main([stage]) == 0, stage
    finally:
        os.chdir(cwd)
    return root


def clone_study(study: Path, root: Path, stages: tuple[str, ...]) -> Path:
    """A fresh workspace at ``root`` holding ``study``'s artifacts of ``stages`` (their folders)."""
    import shutil

    make_workspace(root)
    for stage in stages:
        shutil.copytree(study / "artifacts" / stage, root / "artifacts" / stage)
    return root


def copy_study(root: Path) -> Path:
    """A git repository at ``root`` holding the study (package, gin files, DVC files) on the toy setting."""
    import shutil
    import subprocess

    for name in ("sslkd", "gin", "studies", ".dvc", ".dvcignore", "dvc.yaml", "params.yaml", ".gitignore"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(source, root / name)
    (root / "gin" / "settings" / "tiny.gin").write_text(flat_tiny_setting())
    params = root / "params.yaml"
    params.write_text(toy_params(params.read_text()))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], git + ["add", "-A"], git + ["commit", "-qm", "study"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def flat_tiny_setting() -> str:
    """tests/configs/tiny.gin with its include of the digits setting replaced by that file's text: a DVC
    stage depends on its own setting file and the include folders only (tests/test_stage_deps.py)."""
    tiny = (REPO / "tests" / "configs" / "tiny.gin").read_text()
    digits = (REPO / "gin" / "settings" / "digits.gin").read_text()
    flat = tiny.replace("include 'settings/digits.gin'\n", digits + "\n")
    assert flat != tiny, "tests/configs/tiny.gin no longer includes settings/digits.gin"
    return flat
