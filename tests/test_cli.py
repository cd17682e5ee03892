"""Bad input through the real entry point: one line on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

from sslkd.cli import main
from sslkd.store.artifacts import file_sha256, sidecar_path

from conftest import make_workspace


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace with the repo's gin files, the toy setting and default params."""
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_unknown_setting(workspace, capsys):
    code, err = run(capsys, "data", "--setting", "nope")
    assert code == 2 and len(err) == 1 and "unknown setting 'nope'" in err[0]


def test_misspelled_binding(workspace, capsys):
    code, err = run(capsys, "data", "--bind", "sslkd.data.holdout = 0.2")
    assert code == 2 and err[-1].startswith("sslkd data: error: config error")


def test_invalid_value(workspace, capsys):
    code, err = run(capsys, "data", "--bind", "sslkd.data.holdout_fraction = 2.0")
    assert code == 2 and "holdout_fraction must lie in (0, 1)" in err[-1]


def test_missing_input_artifact_names_the_stage_to_run(workspace, capsys):
    code, err = run(capsys, "teacher")
    assert code == 2 and "missing dataset artifact" in err[-1] and "sslkd data" in err[-1]


def test_corrupt_artifact_is_refused_and_kept(workspace, capsys):
    assert main(["data"]) == 0
    path = workspace / "artifacts" / "data" / "dataset.pt"
    path.write_bytes(b"garbage")
    code, err = run(capsys, "teacher")
    assert code == 2 and "corrupt" in err[-1]
    assert path.read_bytes() == b"garbage"
    assert not (workspace / "artifacts" / "teacher").exists()


def test_unknown_method(workspace, capsys):
    code, err = run(capsys, "evaluate", "--method", "krrst")
    assert code == 2 and "unknown method 'krrst'" in err[-1]


@pytest.fixture
def trained_experts(workspace):
    for stage in ("data", "teacher", "represent", "experts"):
        assert main([stage]) == 0
    return workspace


@pytest.mark.slow
def test_trajectories_for_other_images_are_refused(trained_experts, capsys):
    before = (trained_experts / "artifacts" / "experts" / "trajectories.pt").read_bytes()
    assert main(["data", "--bind", "sslkd.data.image_size = 16"]) == 0
    assert main(["represent", "--bind", "sslkd.data.image_size = 16"]) == 0
    code, err = run(capsys, "init")
    assert code == 2 and "rerun `sslkd experts`" in err[-1]
    assert (trained_experts / "artifacts" / "experts" / "trajectories.pt").read_bytes() == before


@pytest.mark.slow
def test_trajectories_of_another_architecture_are_refused(trained_experts, capsys):
    path = trained_experts / "artifacts" / "experts" / "trajectories.pt"
    payload = torch.load(path, weights_only=True)
    payload["student"]["width"] = 16  # claims an architecture whose layout differs from the stored one
    torch.save(payload, path)
    sidecar = sidecar_path(path)  # signed, as if the experts stage had written it: the layout check must refuse it
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "sha256": file_sha256(path)}))
    code, err = run(capsys, "init")
    assert code == 2 and "parameter layout does not match" in err[-1]


@pytest.mark.slow
def test_distill_asks_for_longer_experts(trained_experts, capsys):
    assert main(["init"]) == 0
    code, err = run(capsys, "distill", "--bind", "sslkd.distill.max_start_epoch = 5")
    assert code == 2 and "raise experts.epochs" in err[-1]
    assert not list((trained_experts / "artifacts").glob("distill/*.pt"))


@pytest.mark.slow
def test_the_same_config_gives_a_bit_identical_distilled_set(trained_experts):
    assert main(["init"]) == 0
    path = trained_experts / "artifacts" / "distill" / "synthetic_seed0.pt"
    assert main(["distill"]) == 0
    first = path.read_bytes()
    assert main(["distill"]) == 0
    assert path.read_bytes() == first
    assert main(["distill", "--bind", "sslkd.distill.seeds = [1]"]) == 0
    other = torch.load(trained_experts / "artifacts" / "distill" / "synthetic_seed1.pt", weights_only=True)
    assert not torch.equal(other["images"], torch.load(path, weights_only=True)["images"])
