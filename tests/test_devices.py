"""The device a stage computes on: the choice (--device, $SSLKD_DEVICE, auto), its checks and the records."""

from __future__ import annotations

import json

import pytest
import torch

from sslkd.cli import main
from sslkd.errors import SslkdError
from sslkd.infra import devices
from sslkd.store import running_stage
from sslkd.store.artifacts import on_cpu, save_artifact, sidecar_path

from conftest import make_workspace

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_option_beats_environment_beats_auto(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    assert devices.chosen_device("cuda:1") == "cuda:1"
    assert devices.chosen_device(None) == "cpu"
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert devices.chosen_device(None) == "auto"
    assert devices.chosen_device("CUDA") == "cuda"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "mps", "cpu:0 "])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(SslkdError, match="is not one of auto, cpu, cuda, cuda:N"):
        devices.chosen_device(name)


def test_auto_is_cuda_exactly_when_there_is_a_gpu():
    assert devices.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_a_gpu_is_an_error_not_a_fallback():
    with pytest.raises(SslkdError, match="CUDA is not available"):
        devices.resolve_device("cuda")


def test_selection_is_what_stages_and_jobs_get(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "cuda")
    try:
        assert devices.select("cpu") == "cpu" and devices.selected_device() == "cpu"
        assert devices.stage_device() == torch.device("cpu") and running_stage.device() == "cpu"  # what sidecars record
        assert devices.select(None) == "cuda"  # no option: the environment's
    finally:
        devices.select("cpu")


def test_artifacts_are_saved_on_the_cpu_and_record_the_device(tmp_path):
    devices.select("cpu")
    devices.stage_device()
    nested = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "text"}
    moved = on_cpu(nested)
    assert moved["b"][1][1] == 3 and isinstance(moved["b"][1], tuple) and moved["c"] == "text"
    path = tmp_path / "x.pt"
    save_artifact(path, "thing", {"values": torch.arange(3.0)})
    assert json.loads(sidecar_path(path).read_text())["device"] == "cpu"
    assert torch.load(path, weights_only=True)["values"].device.type == "cpu"


def test_bad_device_option_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(make_workspace(tmp_path))
    assert main(["data", "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'tpu' is not one of" in err[0]
    assert not (tmp_path / "artifacts").exists()


@no_cuda
def test_stage_asked_for_cuda_without_a_gpu_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(make_workspace(tmp_path))
    try:
        assert main(["data"]) == 0
        before = sorted(p.name for p in (tmp_path / "artifacts").rglob("*"))
        capsys.readouterr()
        assert main(["teacher", "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sslkd teacher: error: device 'cuda': CUDA is not available")
        assert sorted(p.name for p in (tmp_path / "artifacts").rglob("*")) == before
    finally:
        devices.select("cpu")
