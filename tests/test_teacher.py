"""The teacher stage: a BN ConvNet teacher, the warm-up schedule, and the teacher's own probe (against the same
encoder untrained) recorded in its sidecar."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sslkd.cli import main
from sslkd.errors import SslkdError
from sslkd.methods.teacher import warmup_cosine
from sslkd.models import BNConvNet, BNConvNetConfig, build_teacher_encoder
from sslkd.store.artifacts import sidecar_path

from conftest import clone_study


def test_bn_convnet_gives_8_width_features_and_rebuilds_from_its_record():
    encoder = BNConvNet(BNConvNetConfig(width=4), in_channels=3)
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 32) and encoder.representation_dim == 32
    rebuilt = build_teacher_encoder("bn_convnet", {"width": 4}, 3)
    rebuilt.load_state_dict(encoder.state_dict())  # same parameter names and shapes
    with pytest.raises(SslkdError, match="unknown teacher architecture"):
        build_teacher_encoder("vit", {"width": 4}, 3)


def test_warmup_rises_linearly_then_the_cosine_falls_to_zero():
    factor = warmup_cosine(4, 14)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.5) and factor(14) == pytest.approx(0.0)
    assert warmup_cosine(0, 10)(0) == 1.0  # no warm-up: the cosine from the first step


@pytest.mark.slow
def test_teacher_stage_records_its_probe_against_the_untrained_encoder(tiny_study, tmp_path):
    workspace = clone_study(tiny_study, tmp_path, ("data",))
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        assert main(["teacher", "--bind", "sslkd.ssl.epochs = 2", "--bind", "sslkd.teacher.probe_epochs = (1,)"]) == 0
    finally:
        os.chdir(cwd)
    metadata = json.loads(sidecar_path(workspace / "artifacts" / "teacher" / "encoder.pt").read_text())
    probe, history = metadata["probe"], metadata["probe_history"]
    fractions = ["0.05", "0.5"]  # tests/configs/tiny.gin's label fractions
    for name in ("trained", "untrained", "gain"):
        assert list(probe[name]) == fractions and all(probe[name][f]["n"] == 3 for f in fractions)
    for fraction in fractions:  # the gain is the paired difference of the two probes
        assert probe["gain"][fraction]["mean"] == pytest.approx(
            probe["trained"][fraction]["mean"] - probe["untrained"][fraction]["mean"]
        )
    assert [entry["epoch"] for entry in history] == [1, 2] and history[-1]["probe"] == probe
    assert history[0]["probe"]["untrained"] == probe["untrained"]  # one untrained encoder for every probe
    dataset = torch.load(workspace / "artifacts" / "data" / "dataset.pt", weights_only=True)
    assert metadata["trained_on_images"] == len(dataset["train_labels"])  # no subset: the pool is the training set
