"""Launcher choice, the SLURM resource bindings, the code snapshot, and the local (submitit) launcher
writing exactly what an inline run writes. The SLURM cluster itself: tests/test_slurm.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sslkd import config
from sslkd.cli import main
from sslkd.errors import SslkdError
from sslkd.infra import slurm_nodes
from sslkd.infra.launchers import SlurmConfig, chosen_launcher
from sslkd.runner import registry
from sslkd.runner.launch import snapshot_code, stage_resources
from sslkd.store.artifacts import code_version

from conftest import REPO, clone_study

GIN = REPO / "gin"
SETTINGS = sorted(p.stem for p in (GIN / "settings").glob("*.gin"))


def test_the_option_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("SSLKD_LAUNCHER", "slurm")
    assert chosen_launcher("local") == "local"
    assert chosen_launcher(None) == "slurm"
    monkeypatch.delenv("SSLKD_LAUNCHER")
    assert chosen_launcher(None) == "inline"


def test_the_launcher_learns_a_stages_parts_from_the_stage_registry():
    """Only the experts declare parts (one per expert, a job array); the launcher names no stage."""
    from sslkd.stages import experts

    assert [stage for stage in config.STAGES if registry.has_parts(stage)] == ["experts"]
    parts = registry.stage_parts("experts")
    assert parts is not None and (parts.missing, parts.train) == (experts.missing_experts, experts.train_parts)
    with pytest.raises(ValueError, match="declares no parts"):
        registry.missing_parts("distill", None, None)  # type: ignore[arg-type]


def test_an_unknown_launcher_in_the_environment_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSLKD_LAUNCHER", "slurmm")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("setting: digits\n")
    assert main(["data", "--config-dir", str(GIN)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SSLKD_LAUNCHER='slurmm' is not a launcher" in err[0]


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_gives_every_stage_slurm_resources(setting):
    config.parse(GIN, setting, [], [])
    resources = {stage: stage_resources(stage) for stage in config.STAGES}
    assert resources["teacher"].time_min > resources["data"].time_min  # per-stage scopes apply
    assert all(r.cpus >= 1 and r.time_min >= 1 for r in resources.values())


def test_launch_gin_files_bind_only_slurm_resources():
    """gin/launch/ is hidden from DVC (.dvcignore): a result-changing binding there would go unnoticed."""
    for path in (GIN / "launch").glob("*.gin"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.match(r"(\w+/)?sslkd\.slurm\.\w+\s*=", line), f"{path.name}: {line}"
    assert "/gin/launch/" in (REPO / ".dvcignore").read_text().split()


def test_a_bad_resource_binding_is_one_clear_error():
    config.parse(GIN, "digits", [], ["sslkd.slurm.cpus = 0"])
    with pytest.raises(SslkdError, match="cpus.* must be >= 1"):
        stage_resources("teacher")


def slurm_request(**bindings) -> SlurmConfig:
    """gin/launch/slurm.gin's defaults (4 CPUs, 16 GB, no GPU), with ``bindings`` over them."""
    config.parse(GIN, "digits", [], [f"sslkd.slurm.{key} = {value!r}" for key, value in bindings.items()])
    return stage_resources("experts")


SINFO_OUTPUT = """\
small|2|7987|(null)|debug*
gpu1|8|64000|gpu:a100:2(S:0-1),shard:8|gpu
wide|64|32000|(null)|big
tall|4|512000+|(null)|big
garbage line
"""


def test_sinfo_rows_become_nodes_with_their_gpus():
    nodes = slurm_nodes.parse_sinfo(SINFO_OUTPUT)
    assert [(n.name, n.partition, n.default_partition, n.cpus, n.memory_mb, n.gpus) for n in nodes] == [
        ("small", "debug", True, 2, 7987, 0),
        ("gpu1", "gpu", False, 8, 64000, 2),
        ("wide", "big", False, 64, 32000, 0),
        ("tall", "big", False, 4, 512000, 0),
    ]
    assert slurm_nodes.gpu_count("gpu:a100:2,gpu:v100:1(S:0),mps:100") == 3
    assert slurm_nodes.gpu_count("(null)") == slurm_nodes.gpu_count("mps:100") == 0


def test_a_request_no_node_can_hold_is_named_with_the_largest_node():
    nodes = slurm_nodes.parse_sinfo(SINFO_OUTPUT)
    assert slurm_nodes.unsatisfiable("experts", slurm_request(partition="debug"), "debug", nodes) == (
        "experts: asked 4 CPUs and 16 GB per job; the largest node of partition debug has 2 CPUs and 7.8 GB: "
        "lower sslkd.slurm.cpus / mem_gb in gin/launch/slurm.gin"
    )
    # '' is the default partition; only what exceeds the largest node is named
    assert slurm_nodes.unsatisfiable("data", slurm_request(cpus=3, mem_gb=2), "", nodes) == (
        "data: asked 3 CPUs and 2 GB per job; the largest node of partition debug (the default) has 2 CPUs "
        "and 7.8 GB: lower sslkd.slurm.cpus in gin/launch/slurm.gin"
    )
    # mem_gb = 0: the cluster's default memory, not compared
    assert "asked 3 CPUs per job" in slurm_nodes.unsatisfiable("data", slurm_request(cpus=3, mem_gb=0), "", nodes)
    assert slurm_nodes.unsatisfiable("teacher", slurm_request(gpus=4, mem_gb=0), "gpu", nodes) == (
        "teacher: asked 4 CPUs and 4 GPUs per job; the largest node of partition gpu has 8 CPUs and 2 GPUs: "
        "lower sslkd.slurm.gpus in gin/launch/slurm.gin"
    )
    # one node with the CPUs, another with the memory, none with both: the nearer one is named
    assert "has 64 CPUs and 31.2 GB: lower sslkd.slurm.mem_gb" in slurm_nodes.unsatisfiable(
        "distill", slurm_request(cpus=16, mem_gb=100), "big", nodes
    )


def test_a_request_some_node_can_hold_or_an_unknown_partition_is_not_called_impossible():
    nodes = slurm_nodes.parse_sinfo(SINFO_OUTPUT)
    assert slurm_nodes.unsatisfiable("experts", slurm_request(), "big", nodes) is None  # wide holds it
    assert slurm_nodes.unsatisfiable("experts", slurm_request(), "debug,big", nodes) is None
    assert slurm_nodes.unsatisfiable("teacher", slurm_request(gpus=2), "gpu", nodes) is None
    assert slurm_nodes.unsatisfiable("experts", slurm_request(), "nope", nodes) is None  # sbatch refuses it
    assert slurm_nodes.unsatisfiable("experts", slurm_request(), "", []) is None  # sinfo said nothing


def test_the_partition_is_the_bindings_then_sbatch_s_environment(monkeypatch):
    monkeypatch.setenv("SBATCH_PARTITION", "fromenv")
    assert slurm_nodes.requested_partitions(slurm_request()) == "fromenv"
    assert slurm_nodes.requested_partitions(slurm_request(partition="cpu")) == "cpu"
    assert slurm_nodes.requested_partitions(slurm_request(sbatch_options={"partition": "a,b"})) == "a,b"
    monkeypatch.delenv("SBATCH_PARTITION")
    assert slurm_nodes.requested_partitions(slurm_request()) == ""


def test_the_code_snapshot_carries_the_code_version(tmp_path):
    code = snapshot_code(tmp_path / "code")
    assert (code / "sslkd" / "stages" / "experts.py").is_file()
    assert not list(code.rglob("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(code)}
    probe = "import sslkd.store.artifacts as a; print(a.PACKAGE_DIR); print(a.code_version())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout.split()
    assert out == [str(code / "sslkd"), code_version()]


@pytest.mark.slow
def test_local_launcher_writes_what_inline_writes(tiny_study, tmp_path, monkeypatch, capsys):
    workspace = clone_study(tiny_study, tmp_path, ("data", "teacher", "represent"))
    monkeypatch.chdir(workspace)
    assert main(["experts", "--launcher", "local"]) == 0
    for name in ("trajectories.pt", "trajectories.pt.meta.json"):
        produced = (workspace / "artifacts" / "experts" / name).read_bytes()
        assert produced == (tiny_study / "artifacts" / "experts" / name).read_bytes(), name
    assert not list((workspace / "jobs" / "experts" / "state").iterdir())  # parts merged and removed

    code = main(["distill", "--launcher", "local", "--bind", "sslkd.distill.max_start_epoch = 5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.match(
        r"sslkd distill: error: distill job \d+ failed: experts store epochs 0\.\.3, .*raise experts.epochs "
        r"\(log: .*jobs/distill/.*_log\.err\)$",
        err[0],
    ), err[0]
    assert not (workspace / "artifacts" / "distill").exists()
