"""The SLURM launcher on a real cluster (no mocked scheduler): job arrays, requeue and preemption,
failures, the code snapshot, and DVC driving it.

Needs a running cluster (`scripts/slurm-cluster.sh start DIR`, then SLURM_CONF=DIR/slurm.conf); the tests
skip without one unless SSLKD_REQUIRE_SLURM=1 (CI), where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslkd.cli import main
from sslkd.runner.launch import snapshot_code

from conftest import clone_study, copy_study, make_workspace

# Small jobs for a one-node test cluster; checkpoint at every epoch/iteration so a requeue can land anywhere
SLURM = [
    "--launcher",
    "slurm",
    "--bind",
    "sslkd.slurm.cpus = 1",
    "--bind",
    "sslkd.slurm.mem_gb = 2",
    "--bind",
    "sslkd.slurm.checkpoint_interval_min = 0",
]
ONE_AT_A_TIME = ["--bind", "sslkd.slurm.array_parallelism = 1"]


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if cluster_answers():
        return
    if os.environ.get("SSLKD_REQUIRE_SLURM") == "1":
        pytest.fail(
            "SSLKD_REQUIRE_SLURM=1 but no SLURM cluster answers `sinfo` (is SLURM_CONF set? "
            "scripts/slurm-cluster.sh start DIR starts one)"
        )
    pytest.skip("no SLURM cluster answers `sinfo` (CI starts one with scripts/slurm-cluster.sh)")


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_cli(workspace: Path, code: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m sslkd ARGV`` in ``workspace``, importing sslkd from ``code`` (``env``: more variables)."""
    env = {**os.environ, "PYTHONPATH": str(code), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "sslkd", *argv],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def submitted_jobs(workspace: Path, stage: str) -> list[str]:
    """Job ids submitted so far for ``stage`` (submitit names its pickles after them)."""
    return sorted(p.name.removesuffix("_submitted.pkl") for p in (workspace / "jobs" / stage).glob("*/*_submitted.pkl"))


def logs(workspace: Path, stage: str, job: str) -> str:
    """The job's stderr and stdout logs (submitit logs its own progress to stdout)."""
    return "".join(path.read_text() for path in sorted((workspace / "jobs" / stage).glob(f"*/{job}_0_log.*")))


def same_artifact(produced: Path, reference: Path) -> None:
    """Same bytes for the artifact and its sidecar (hence also the same tensors)."""
    for name in (produced.name, produced.name + ".meta.json"):
        assert (produced.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


@pytest.fixture
def code(tmp_path):
    """A copy of the package for a CLI subprocess to import (stamped with this tree's code version)."""
    return snapshot_code(tmp_path / "code")


@pytest.mark.slow
def test_experts_array_reruns_only_missing_experts_equals_inline_and_runs_the_submitted_code(
    tiny_study, tmp_path, code
):
    workspace = clone_study(tiny_study, tmp_path / "workspace", ("data", "teacher", "represent"))
    process = start_cli(workspace, code, "experts", *SLURM, *ONE_AT_A_TIME)
    array = wait_for(lambda: submitted_jobs(workspace, "experts"), "the experts array")[0].split("_")[0]
    subprocess.run(["scancel", f"{array}_1"], check=True)  # still pending behind expert 0
    returncode, output = finish(process)
    assert returncode == 2, output
    assert f"training the 2 missing experts (0, 1) in 2 slurm jobs: {array}_0, {array}_1" in output, output
    # a pending array task that is cancelled leaves no record at all: "left the queue"
    last = output.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"sslkd experts: error: 1 of 2 experts jobs failed; first: job {array}_1 "
        r"(ended \(CANCELLED\)|left the queue) without a result \(log: .*_log\.err\)",
        last,
    ), last
    assert not (workspace / "artifacts" / "experts").exists()
    parts = sorted(p.name for p in (workspace / "jobs" / "experts" / "state").glob("*/part_*.pt"))
    assert parts == ["part_00000.pt"]

    submitted = len(submitted_jobs(workspace, "experts"))
    process = start_cli(workspace, code, "experts", *SLURM)
    wait_for(lambda: len(submitted_jobs(workspace, "experts")) > submitted, "the second array")
    # The merge job is submitted after the array ends: editing the work tree now must not reach it.
    (code / "sslkd" / "stages" / "experts.py").write_text("raise RuntimeError('edited after submission')\n")
    returncode, output = finish(process)
    assert returncode == 0, output
    assert "training the 1 missing experts (1) in 1 slurm jobs" in output, output
    same_artifact(
        workspace / "artifacts" / "experts" / "trajectories.pt",
        tiny_study / "artifacts" / "experts" / "trajectories.pt",
    )
    reference = torch.load(tiny_study / "artifacts" / "experts" / "trajectories.pt", weights_only=True)
    produced = torch.load(workspace / "artifacts" / "experts" / "trajectories.pt", weights_only=True)
    assert torch.equal(produced["snapshots"], reference["snapshots"])
    assert not list((workspace / "jobs" / "experts" / "state").iterdir())  # parts merged and removed


@pytest.mark.slow
def test_a_requeued_then_signalled_job_resumes_to_the_identical_artifact(tiny_study, tmp_path, code, monkeypatch):
    # long enough that the requeue lands mid-run on an idle machine (400 iterations took 5 s: the first
    # attempt finished inside SLURM's grace period and cleared its checkpoint before the requeue took effect)
    long_run = ["--bind", "sslkd.distill.iterations = 3000"]
    stages = ("data", "teacher", "represent", "experts", "init")
    reference = clone_study(tiny_study, tmp_path / "inline", stages)
    monkeypatch.chdir(reference)
    assert main(["distill", *long_run]) == 0

    workspace = clone_study(tiny_study, tmp_path / "workspace", stages)
    process = start_cli(workspace, code, "distill", *SLURM, *long_run)
    job = wait_for(lambda: submitted_jobs(workspace, "distill"), "the distill job")[0]
    checkpoint = lambda: next((workspace / "jobs" / "distill" / "state").glob("*/seed0.pt"), None)
    job_log = lambda: logs(workspace, "distill", job)

    wait_for(checkpoint, "a first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)  # preemption: killed, queued again
    wait_for(lambda: "resuming after iteration" in job_log(), "the requeued job to resume")
    resumed_at = time.time()
    wait_for(lambda: checkpoint() and checkpoint().stat().st_mtime > resumed_at, "a checkpoint after resuming")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # SLURM's time-limit warning
    returncode, output = finish(process)
    assert returncode == 0, output + job_log()

    log = job_log()
    assert log.count("resuming after iteration") == 2 and "(start 3)" in log, log
    assert "signalled (time limit or preemption): requeueing" in log, log
    assert "Requeued job" in log, log  # submitit's `scontrol requeue` survived the requeue's own SIGTERM
    same_artifact(
        workspace / "artifacts" / "distill" / "synthetic_seed0.pt",
        reference / "artifacts" / "distill" / "synthetic_seed0.pt",
    )
    assert not list((workspace / "jobs" / "distill" / "state").iterdir())  # checkpoints cleared


def test_a_failing_or_refused_job_fails_the_stage_in_one_line(tiny_study, tmp_path, monkeypatch, capsys):
    workspace = clone_study(tiny_study, tmp_path, ("data", "teacher", "represent", "experts", "init"))
    monkeypatch.chdir(workspace)
    assert main(["distill", *SLURM, "--bind", "sslkd.distill.max_start_epoch = 5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    match = re.fullmatch(
        r"sslkd distill: error: distill job \d+ failed: experts store epochs 0\.\.3, epoch 6 is "
        r"needed: raise experts\.epochs \(log: (.*_log\.err)\)",
        err[0],
    )
    assert match, err[0]
    assert "Traceback" in Path(match.group(1)).read_text()
    assert not (workspace / "artifacts" / "distill").exists()

    assert main(["init", *SLURM, "--bind", "sslkd.slurm.partition = 'nope'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init: the job was refused:" in err[0] and "sslkd.slurm" in err[0], err


@pytest.mark.slow
def test_dvc_repro_on_slurm_and_switching_the_launcher_invalidates_nothing(tmp_path):
    root = copy_study(tmp_path)
    launch_gin = root / "gin" / "launch" / "slurm.gin"
    launch_gin.write_text(launch_gin.read_text() + "sslkd.slurm.cpus = 1\nsslkd.slurm.mem_gb = 2\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(*command: str, launcher: str = "inline") -> str:
        result = subprocess.run(
            command, cwd=root, env={**env, "SSLKD_LAUNCHER": launcher}, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout + result.stderr

    output = sh("dvc", "repro", "data", launcher="slurm")
    assert "Running stage 'data'" in output and "slurm jobs done" in output, output
    job_log = next((root / "jobs" / "data").glob("*/*_0_log.err")).read_text()
    assert re.search(r"sslkd data from \S+/jobs/data/[\w-]+/code/sslkd \(start 1\)", job_log), job_log  # not ./sslkd
    lock = (root / "dvc.lock").read_text()
    assert "Running stage" not in sh("dvc", "repro", "data")  # another launcher: nothing to rerun
    sh("dvc", "repro", "--force", "data")  # rerun inline: the very same output hashes
    assert (root / "dvc.lock").read_text() == lock
    launch_gin.write_text(launch_gin.read_text() + "sslkd.slurm.time_min = 45\n")
    assert "up to date" in sh("dvc", "status", "data")  # gin/launch/ is hidden from DVC
    assert sh("git", "status", "--porcelain", "--untracked-files=no").split() == ["M", "gin/launch/slurm.gin"]
    setting = root / "gin" / "settings" / "tiny.gin"
    setting.write_text(setting.read_text() + "# any other gin file stays a dependency\n")
    assert "modified:" in sh("dvc", "status", "data")


def node_size() -> tuple[int, int]:
    """CPUs and memory (MB) of the test cluster's one node."""
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c %m"], capture_output=True, text=True)
    cpus, memory_mb = out.stdout.split()[:2]
    return int(cpus), int(memory_mb)


def live_jobs(*job_ids: str) -> str:
    """'<job id> <state>' lines of those of ``job_ids`` still pending or running."""
    query = ["squeue", "--noheader", "--format=%i %T", "--states=PENDING,RUNNING,CONFIGURING", "--jobs"]
    query.append(",".join(job_ids))
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


def test_a_request_no_node_can_hold_ends_the_stage_at_once_and_cancels_its_job(tmp_path, code, monkeypatch, capsys):
    """More CPUs than the node has: SLURM queues the job and it would pend forever (PartitionConfig)."""
    cpus, memory_mb = node_size()
    workspace = make_workspace(tmp_path / "workspace")
    started = time.monotonic()
    process = start_cli(
        workspace,
        code,
        "data",
        *["--bind", f"sslkd.slurm.cpus = {cpus + 2}", "--bind", "sslkd.slurm.mem_gb = 1"],
        env={"SSLKD_LAUNCHER": "slurm"},
    )
    returncode, output = finish(process)
    elapsed = time.monotonic() - started
    assert returncode == 2, output
    assert output.strip().splitlines()[-1] == (
        f"sslkd data: error: data: asked {cpus + 2} CPUs and 1 GB per job; the largest node of partition debug "
        f"(the default) has {cpus} CPUs and {round(memory_mb / 1024, 1):g} GB: lower sslkd.slurm.cpus in "
        "gin/launch/slurm.gin"
    ), output
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert "Traceback" not in output
    [job] = submitted_jobs(workspace, "data")
    assert not live_jobs(job), "the job was left in the queue"
    assert not (workspace / "artifacts").exists()

    # More memory than the node has: sbatch refuses the job; the same line, naming mem_gb
    monkeypatch.chdir(workspace)
    too_much = f"sslkd.slurm.mem_gb = {memory_mb // 1024 + 8}"
    assert main(["data", *SLURM, "--bind", too_much]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "data: asked 1 CPU and" in err[0]
        and err[0].endswith("lower sslkd.slurm.mem_gb in gin/launch/slurm.gin")
    ), err
    assert not (workspace / "artifacts").exists()


@pytest.mark.slow
def test_a_job_waiting_for_busy_nodes_keeps_waiting(tmp_path, code):
    cpus, _ = node_size()
    blocker = subprocess.run(
        ["sbatch", "--parsable", f"--cpus-per-task={cpus}", "--mem=512M", "--wrap", "sleep 600"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        wait_for(lambda: "RUNNING" in live_jobs(blocker), "the job that takes every CPU")
        workspace = make_workspace(tmp_path / "workspace")
        process = start_cli(workspace, code, "data", *SLURM)
        job = wait_for(lambda: submitted_jobs(workspace, "data"), "the data job")[0]
        wait_for(lambda: "PENDING" in live_jobs(job), "the data job to pend")
        time.sleep(15)  # three of the launcher's queue checks
        assert process.poll() is None, "the stage gave up on a job that merely waits"
        subprocess.run(["scancel", blocker], check=True)
        returncode, output = finish(process)
        assert returncode == 0, output
        assert f"job {job} pending (" in output, output
        assert (workspace / "artifacts" / "data").is_dir()
    finally:
        subprocess.run(["scancel", blocker])
