"""Fault injection on inputs: bad config values, bad npz datasets, a bad tracking switch and a full disk
under the tracking spool (issue 22, item 5). Each ends in exit 2 and exactly one line on stderr (besides
log records), before the stage writes anything.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from faults import assert_one_line_error, file_size_limit, sslkd

from sslkd.cli import main

from conftest import make_workspace


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "w")
    monkeypatch.chdir(root)
    return root


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "binding, fragment",
    [
        ("sslkd.distill.lr_images = -100.0", "lr_images, lr_representations, lr_lr >= 0"),
        ("sslkd.distill.lr_lr = -1e-4", "lr_lr >= 0"),
        ("sslkd.distill.momentum_images = -0.5", "momentum_images"),
        ("sslkd.distill.momentum_lr = 1.5", "[0, 1)"),
    ],
)
def test_out_of_range_optimiser_values(workspace, capsys, binding, fragment):
    """Before: torch's `ValueError: Invalid learning rate` traceback, exit 1, after loading every input."""
    code, err = run(capsys, "distill", "--bind", binding)
    assert_one_line_error(code, err, "distill", fragment)


@pytest.mark.parametrize(
    "binding, fragment",
    [
        ("sslkd.distill.iterations = 2.5", "sslkd.distill.iterations must be int, got 2.5 (float)"),
        ("sslkd.distill.iterations = 'abc'", "sslkd.distill.iterations must be int, got 'abc' (str)"),
        ("sslkd.distill.seeds = [0, 'one']", "sslkd.distill.seeds must be tuple[int, ...]"),
        ("sslkd.distill.learn_representations = 1", "learn_representations must be bool"),
        ("sslkd.augment.crop_scale = (0.2,)", "crop_scale must be tuple[float, float]"),
        ("teacher/sslkd.slurm.time_min = '30'", "teacher/sslkd.slurm.time_min must be int"),
    ],
)
def test_values_of_the_wrong_type(workspace, capsys, binding, fragment):
    """Checked when parsing, whatever the stage (before: 2.5 crashed in a slice, 'abc' gave a garbled
    "needs a binding for '<' not supported ..." message)."""
    code, err = run(capsys, "data", "--bind", binding)
    assert_one_line_error(code, err, "data", fragment)
    assert not (workspace / "artifacts").exists()


def test_a_wrong_type_in_params_yaml_through_the_real_command(workspace):
    """The documented sweep path: a params.yaml value (`dvc exp run -S distill.iterations=abc`)."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["distill"]["iterations"] = "abc"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = sslkd(workspace, "init")
    assert_one_line_error(result.returncode, result.stderr, "init", "sslkd.distill.iterations must be int, got 'abc'")


def write_npz(path, images, labels) -> str:
    np.savez(path, x=images, y=labels)
    return str(path)


def images(count: int, shape=(8, 8, 1)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)


def balanced(count: int, classes: int = 4) -> np.ndarray:
    return np.arange(count, dtype=np.int64) % classes


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: write_npz(p, images(0), balanced(0)), "holds no images"),
        (lambda p: write_npz(p, images(200, (1, 16, 16)), balanced(200)), "looks like NCHW"),
        (lambda p: write_npz(p, images(40, (8, 8, 7)), balanced(40)), "C = 1 or 3 channels last"),
        (lambda p: write_npz(p, images(40), balanced(40) - 1), "labels must be class indices >= 0"),
        (lambda p: write_npz(p, images(60), np.zeros(60, np.int64)), "1 class(es)"),
        (lambda p: write_npz(p, images(3), balanced(3, 3)), "the test split is empty"),
        (lambda p: p.write_bytes(b"x,y\n1,2\n") and str(p), "is not an .npz archive"),
    ],
)
def test_bad_npz_datasets(workspace, capsys, make, fragment):
    """Before: 0 images, 1 class or 3 images failed in sklearn at `evaluate`; NCHW, 7 channels and
    labels of -1 were accepted; a file that is not a zip was reported as a pickle."""
    path = make(workspace / "bad.npz")
    code, err = run(capsys, "data", "--bind", "sslkd.data.dataset = 'npz'", "--bind", f"sslkd.data.root = '{path}'")
    assert_one_line_error(code, err, "data", fragment)
    assert not (workspace / "artifacts").exists()


def test_a_good_npz_still_passes(workspace):
    path = write_npz(workspace / "good.npz", images(40, (8, 8, 3)), balanced(40))
    assert main(["data", "--bind", "sslkd.data.dataset = 'npz'", "--bind", f"sslkd.data.root = '{path}'"]) == 0


def test_unknown_tracking_switch(workspace, capsys, monkeypatch):
    """Before: SSLKD_TRACKING=maybe switched tracking on, silently."""
    monkeypatch.setenv("SSLKD_TRACKING", "maybe")
    code, err = run(capsys, "data")
    assert_one_line_error(code, err, "data", "SSLKD_TRACKING='maybe'")
    assert not (workspace / "artifacts").exists()


def test_full_disk_under_the_tracking_spool(workspace):
    """A spool write past the file size limit: one line, exit 2, no half-written spool entry (before: an
    OSError traceback from the spool's first event)."""
    result = sslkd(workspace, "data", env={"SSLKD_TRACKING": "on"}, preexec_fn=file_size_limit(256))
    assert_one_line_error(result.returncode, result.stderr, "data", "cannot write the tracking spool", "File too large")
    assert list((workspace / ".sslkd-tracking").iterdir()) == []
    assert not (workspace / "artifacts").exists()
