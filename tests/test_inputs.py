"""Loading stage inputs: trajectories are memory-mapped and only the snapshots read are paged in; the\nstudents' input space (standardised or ZCA-whitened) is recorded and checked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sslkd.store.artifacts import save_artifact
from sslkd.store.workspace import Workspace

from conftest import REPO, clone_study

READER = """
import sys, torch
from pathlib import Path
from sslkd.data.datasets import Normalisation
from sslkd.data.training_data import TrainingData
from sslkd.stages.inputs import expert_trajectories
from sslkd.store.workspace import Workspace

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

data = TrainingData(torch.zeros(1, 1, 32, 32), None, None, None, Normalisation(torch.zeros(1), torch.ones(1)), None, None)
before = rss_mb()
experts = expert_trajectories(Workspace(Path(sys.argv[1])), data, 64, epochs=1)
checksum = sum(experts.snapshots[k, e].float().sum().item() for k in range(8) for e in range(2))
print(rss_mb() - before, experts.snapshots.shape[1], checksum)
"""


@pytest.mark.slow
def test_expert_trajectories_page_in_only_the_epochs_read(tmp_path):
    from sslkd.methods.experts import build_student
    from sslkd.models import ConvNetConfig, ParameterLayout

    student = build_student(ConvNetConfig(width=16, depth=1), (1, 32, 32), 64, seed=0)
    layout = ParameterLayout.of(student)
    snapshots = torch.randn(8, 31, layout.numel)  # 8 experts × 31 epochs of 1 MB; 2 epochs are read
    save_artifact(
        Workspace(tmp_path).trajectories,
        "trajectories",
        {
            "snapshots": snapshots,
            "epoch_losses": torch.zeros(8, 30),
            "layout": layout.to_json(),
            "student": {"width": 16, "depth": 1},
            "image_shape": [1, 32, 32],
            "out_dim": 64,
            "objective": "kd",
        },
    )
    file_mb = snapshots.numel() * 4 / 2**20
    result = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True
    )
    grown_mb, epochs_kept, checksum = result.stdout.split()
    assert int(epochs_kept) == 2
    assert abs(float(checksum) - snapshots[:, :2].double().sum().item()) < 1e-2  # the right snapshots were read
    assert file_mb > 200 and float(grown_mb) < 0.25 * file_mb, f"RSS grew {grown_mb} MB for a {file_mb:.0f} MB file"


ZCA = "sslkd.student_input.zca = True"


def run_stage(workspace, *argv: str) -> int:
    import os

    from sslkd.cli import main

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_zca_students_record_their_space_and_refuse_artifacts_of_another(tiny_study, tmp_path, capsys):
    """With ZCA on, experts, distill and evaluate run on whitened images and record it; a stage whose
    input was made in the other space stops with a one-line error and writes nothing."""
    from sslkd import config
    from sslkd.stages.inputs import student_data, training_data
    from sslkd.store.artifacts import load_artifact

    workspace = clone_study(tiny_study, tmp_path, ("data", "teacher", "represent"))
    for stage in ("experts", "init", "distill"):
        assert run_stage(workspace, stage, "--bind", ZCA) == 0, stage
    assert run_stage(workspace, "evaluate", "--method", "mkdt", "--bind", ZCA) == 0
    space = "zca(regularisation=0.1)"
    paths = Workspace(workspace)
    assert load_artifact(paths.trajectories, "trajectories", produced_by="experts")["input_space"] == space
    assert load_artifact(paths.synthetic(0), "synthetic", produced_by="distill")["input_space"] == space

    config.parse(workspace / "gin", "tiny", [], [ZCA])
    whitened, standardised = student_data(paths), training_data(paths)
    assert whitened.space.name == space and standardised.space.name == "standardised"
    assert not torch.allclose(whitened.images, standardised.images)
    assert torch.allclose(
        whitened.space.invert(whitened.images), standardised.space.invert(standardised.images), atol=1e-3
    )

    evaluation = paths.evaluation("mkdt").read_bytes()
    capsys.readouterr()
    assert run_stage(workspace, "distill") == 2
    assert (
        "was made from zca(regularisation=0.1) images, but the students now see standardised" in capsys.readouterr().err
    )
    assert run_stage(workspace, "evaluate", "--method", "mkdt") == 2
    assert "rerun `sslkd distill`" in capsys.readouterr().err
    assert paths.evaluation("mkdt").read_bytes() == evaluation  # nothing already produced is lost
