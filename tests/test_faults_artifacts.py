"""Fault injection on artifacts: corrupt, truncated or unsigned inputs, full disks, read-only folders, and
sidecars that must not depend on the git work tree's state (issue 22, items 2, 5 and 6).

Each fault runs the real command (``python -m sslkd``, or sslkd.cli.main in-process where a subprocess
would only add interpreter start-up) and asserts exit 2, one line on stderr and nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from faults import assert_one_line_error, file_size_limit, sslkd

from sslkd.cli import main
from sslkd.errors import SslkdError
from sslkd.store.artifacts import load_json_artifact, save_json_artifact, sidecar_path

from conftest import clone_study, copy_study, make_workspace


def flip_floats(path: Path, count: int = 1024) -> None:
    """Flip the sign bit of ``count`` float32 values in the middle of ``path``: same size, wrong numbers."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2 - 2 * count)
        words = np.frombuffer(handle.read(4 * count), dtype=np.uint32)
        handle.seek(size // 2 - 2 * count)
        handle.write((words ^ np.uint32(0x80000000)).tobytes())
    assert path.stat().st_size == size


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def experts_done(tiny_study, tmp_path, monkeypatch):
    """A workspace holding the toy study's artifacts up to the experts (init not run)."""
    root = clone_study(tiny_study, tmp_path / "w", ("data", "teacher", "represent", "experts"))
    monkeypatch.chdir(root)
    return root


@pytest.mark.slow
def test_corrupt_trajectories_stop_init_and_distill(tiny_study, tmp_path):
    """Item 2: 1,024 flipped float32 values in the trajectories (same size) are refused by the real
    commands, and init writes nothing (before: exit 0, and init's sidecar recorded the corrupt hash)."""
    root = clone_study(tiny_study, tmp_path / "w", ("data", "teacher", "represent", "experts", "init"))
    shutil.rmtree(root / "artifacts" / "init")
    trajectories = root / "artifacts" / "experts" / "trajectories.pt"
    flip_floats(trajectories)
    result = sslkd(root, "init")
    assert_one_line_error(
        result.returncode,
        result.stderr,
        "init",
        str(Path("artifacts/experts/trajectories.pt")),
        "sha256",
        "rerun `sslkd experts`",
    )
    assert not (root / "artifacts" / "init").exists()
    shutil.copytree(tiny_study / "artifacts" / "init", root / "artifacts" / "init")
    result = sslkd(root, "distill")
    assert_one_line_error(result.returncode, result.stderr, "distill", "trajectories.pt", "rerun `sslkd experts`")
    assert not (root / "artifacts" / "distill").exists()


def test_truncated_dataset_is_refused(experts_done, tiny_study, capsys):
    dataset = experts_done / "artifacts" / "data" / "dataset.pt"
    with open(dataset, "r+b") as handle:
        handle.truncate(dataset.stat().st_size - 100)
    code, err = run(capsys, "represent")
    assert_one_line_error(code, err, "represent", "dataset.pt", "rerun `sslkd data`")
    output = Path("artifacts/represent/representations.pt")
    assert (experts_done / output).read_bytes() == (tiny_study / output).read_bytes()


def test_deleted_sidecar_is_refused(experts_done, capsys):
    sidecar_path(experts_done / "artifacts" / "represent" / "representations.pt").unlink()
    code, err = run(capsys, "experts")
    assert_one_line_error(code, err, "experts", "representations.pt", "no sidecar", "rerun `sslkd represent`")


def test_sidecar_of_another_artifact_is_refused(experts_done, capsys):
    data = experts_done / "artifacts" / "data"
    shutil.copy(sidecar_path(experts_done / "artifacts" / "teacher" / "encoder.pt"), sidecar_path(data / "dataset.pt"))
    code, err = run(capsys, "teacher")
    assert_one_line_error(code, err, "teacher", "dataset.pt", "'teacher'", "rerun `sslkd data`")


def test_sidecar_of_another_run_of_the_same_stage_is_refused(experts_done, capsys, tmp_path):
    """A dataset of another split seed with the first one's sidecar: same kind, other sha256."""
    dataset = experts_done / "artifacts" / "data" / "dataset.pt"
    kept = tmp_path / "kept.meta.json"
    shutil.copy(sidecar_path(dataset), kept)
    assert main(["data", "--bind", "sslkd.data.split_seed = 1"]) == 0
    shutil.copy(kept, sidecar_path(dataset))
    capsys.readouterr()
    code, err = run(capsys, "represent")
    assert_one_line_error(code, err, "represent", "dataset.pt", "sha256", "rerun `sslkd data`")


def test_corrupt_json_result_is_refused(tmp_path):
    """load_json_artifact (report's reader) verifies the sidecar too."""
    path = tmp_path / "mkdt.json"
    save_json_artifact(path, "evaluation", {"method": "mkdt", "runs": [{"accuracy": {"0.05": 40.0}}]})
    assert load_json_artifact(path, "evaluation", produced_by="evaluate --method mkdt")["method"] == "mkdt"
    path.write_text(path.read_text().replace("40.0", "90.0"))
    with pytest.raises(SslkdError, match="sha256.*rerun `sslkd evaluate --method mkdt`"):
        load_json_artifact(path, "evaluation", produced_by="evaluate --method mkdt")
    sidecar_path(path).write_text("{not json")
    with pytest.raises(SslkdError, match="cannot read the sidecar"):
        load_json_artifact(path, "evaluation", produced_by="evaluate --method mkdt")


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes left behind."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.mark.slow
def test_full_disk_writing_an_artifact(tiny_study, tmp_path):
    """Item 5: a write past the file size limit (RLIMIT_FSIZE, EFBIG: a full disk without root) ends in one
    line and exit 2, removes its temporary file and keeps the previous artifact (before: a RuntimeError
    traceback from torch.save's zip writer, exit 1)."""
    root = clone_study(tiny_study, tmp_path / "w", ("data",))
    before = {p.name: p.read_bytes() for p in (root / "artifacts" / "data").iterdir()}
    size = (root / "artifacts" / "data" / "dataset.pt").stat().st_size
    result = sslkd(root, "data", preexec_fn=file_size_limit(size // 2))
    assert_one_line_error(result.returncode, result.stderr, "data", "cannot write", "dataset.pt", "File too large")
    assert {p.name: p.read_bytes() for p in (root / "artifacts" / "data").iterdir()} == before
    assert leftovers(root / "artifacts") == []


@pytest.fixture
def mount_tmpfs():
    """mount_tmpfs(path, options): a small tmpfs mounted at ``path`` for the test (root only)."""
    mounted = []

    def mount(path: Path, options: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_no_space_left_writing_an_artifact(tmp_path, mount_tmpfs):
    """Item 5: ENOSPC from a real, full tmpfs under artifacts/ (the dataset artifact is ~130 kB)."""
    root = make_workspace(tmp_path / "w")
    mount_tmpfs(root / "artifacts" / "data", "size=64k")
    result = sslkd(root, "data")
    assert_one_line_error(
        result.returncode, result.stderr, "data", "cannot write", "dataset.pt", "No space left on device"
    )
    assert os.listdir(root / "artifacts" / "data") == []


def make_evaluations(root: Path) -> None:
    """Evaluation and (empty) transfer results of every method (the report stage's inputs), written as the
    evaluate and transfer stages do."""
    from sslkd.stage_configs import METHODS

    for method in METHODS:
        runs = [
            {
                "eval_seed": seed,
                "distill_seed": 0 if method in ("mkdt", "krr_st", "mtt_ssl") else None,
                "accuracy": {"0.05": 40.0 + seed, "0.5": 60.0 + seed},
            }
            for seed in range(3)
        ]
        save_json_artifact(
            root / "artifacts" / "evaluate" / f"{method}.json", "evaluation", {"method": method, "runs": runs}
        )
        save_json_artifact(
            root / "artifacts" / "transfer" / f"{method}.json", "transfer", {"method": method, "downstream": {}}
        )


def test_read_only_results_with_tracking_off(tmp_path, mount_tmpfs):
    """Item 5: `sslkd report` with a read-only results/ (before: a PermissionError / OSError traceback)."""
    root = make_workspace(tmp_path / "w")
    make_evaluations(root)
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is read-only for root too
        mount_tmpfs(root / "results", "ro,size=64k")
    else:
        (root / "results").mkdir()
        (root / "results").chmod(0o555)
    result = sslkd(root, "report", "--no-tracking")
    assert_one_line_error(result.returncode, result.stderr, "report", "cannot write", "results/")
    assert os.listdir(root / "results") == []


def git(root: Path, *arguments: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def data_outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "artifacts" / "data").iterdir())}


@pytest.mark.slow
def test_artifacts_do_not_depend_on_the_work_tree_state(tmp_path):
    """Item 6: the same stage at a clean tree, a dirty tree (as after DVC edits dvc.lock) and a later commit
    that changes no code writes byte-identical artifacts and sidecars (before: the sidecar held
    ``git describe --dirty``). The code version recorded is the sources' hash."""
    root = copy_study(tmp_path / "study")
    outputs = []
    assert sslkd(root, "data", pythonpath=root).returncode == 0
    outputs.append(data_outputs(root))
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "# edited\n")
    assert git(root, "status", "--porcelain").strip()  # the tree is dirty
    assert sslkd(root, "data", pythonpath=root).returncode == 0
    outputs.append(data_outputs(root))
    git(root, "commit", "-qam", "docs only")
    assert sslkd(root, "data", pythonpath=root).returncode == 0
    outputs.append(data_outputs(root))
    assert outputs[0] == outputs[1] == outputs[2]
    sidecar = json.loads(outputs[0]["dataset.pt.meta.json"])
    assert "+src." in sidecar["code_version"] and "git" not in sidecar["code_version"]
    # code that is not among the data stage's DVC deps (infrastructure, another stage's method) changes
    # nothing it writes: an incremental `dvc repro` skips the stage, so a clean run must write the same
    for module in ("infra/termination.py", "methods/unroll.py"):
        assert f"sslkd/{module}" not in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["data"]["deps"]
        edited = root / "sslkd" / module
        edited.write_text(edited.read_text() + "\n# a code change elsewhere\n")
        assert sslkd(root, "data", pythonpath=root).returncode == 0
        assert data_outputs(root) == outputs[0], module
    # ... and the code version does follow the stage's code
    source = root / "sslkd" / "data" / "datasets.py"
    source.write_text(source.read_text() + "\n# a code change\n")
    assert sslkd(root, "data", pythonpath=root).returncode == 0
    changed = json.loads(data_outputs(root)["dataset.pt.meta.json"])
    assert changed["code_version"] != sidecar["code_version"]
    assert data_outputs(root)["dataset.pt"] == outputs[0]["dataset.pt"]
