"""Loading stage inputs: trajectories are memory-mapped and only the snapshots read are paged in."""

from __future__ import annotations

import subprocess
import sys

import torch

from sslkd.artifacts import save_artifact
from sslkd.workspace import Workspace

from conftest import REPO

READER = """
import sys, torch
from pathlib import Path
from sslkd.stages.inputs import TrainingData, expert_trajectories
from sslkd.workspace import Workspace

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

data = TrainingData(torch.zeros(1, 1, 32, 32), None, None, None, None)
before = rss_mb()
experts = expert_trajectories(Workspace(Path(sys.argv[1])), data, 64, epochs=1)
checksum = sum(experts.snapshots[k, e].float().sum().item() for k in range(8) for e in range(2))
print(rss_mb() - before, experts.snapshots.shape[1], checksum)
"""


def test_expert_trajectories_page_in_only_the_epochs_read(tmp_path):
    from sslkd.experts import build_student
    from sslkd.models import ConvNetConfig, ParameterLayout

    student = build_student(ConvNetConfig(width=16, depth=1), (1, 32, 32), 64, seed=0)
    layout = ParameterLayout.of(student)
    snapshots = torch.randn(8, 31, layout.numel)  # 8 experts × 31 epochs of 1 MB; 2 epochs are read
    save_artifact(Workspace(tmp_path).trajectories, "trajectories", {
        "snapshots": snapshots, "epoch_losses": torch.zeros(8, 30), "layout": layout.to_json(),
        "student": {"width": 16, "depth": 1}, "image_shape": [1, 32, 32], "out_dim": 64, "objective": "kd"})
    file_mb = snapshots.numel() * 4 / 2**20
    result = subprocess.run([sys.executable, "-c", READER, str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, check=True)
    grown_mb, epochs_kept, checksum = result.stdout.split()
    assert int(epochs_kept) == 2
    assert abs(float(checksum) - snapshots[:, :2].double().sum().item()) < 1e-2  # the right snapshots were read
    assert file_mb > 200 and float(grown_mb) < 0.25 * file_mb, f"RSS grew {grown_mb} MB for a {file_mb:.0f} MB file"
