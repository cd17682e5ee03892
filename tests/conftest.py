"""Shared fixtures: small deterministic problems for the library functions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("SSLKD_TRACKING", "off")  # tests/test_tracking.py switches it on where it tests it

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_problem():
    return make_tiny_problem()


def make_tiny_problem():
    """A width-4 ConvNet on 8x8 RGB images regressing 6-d targets: (student, layout, images, targets)."""
    from sslkd.experts import build_student
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
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("setting: digits", "setting: tiny"))
    return root


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
