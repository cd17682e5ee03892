"""Smoke test: the real `dvc repro` on the toy setting in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_study

pytestmark = pytest.mark.slow


def sh(cwd: Path, *command: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    root = copy_study(tmp_path_factory.mktemp("study"))
    return root, sh(root, "dvc", "repro")


def test_repro_runs_every_stage_and_writes_the_summary(repro):
    root, output = repro
    assert {"data", "teacher", "represent", "experts", "init", "distill", "krr_st", "mtt_ssl", "report"} <= ran(output)
    assert not any("variance" in stage for stage in ran(output)), "the variance study is not in the default repro"
    summary = json.loads((root / "results" / "summary.json").read_text())
    methods = {"mkdt", "random", "high_loss", "no_pretrain", "full_data", "krr_st", "mtt_ssl"}
    assert set(summary) == methods | {
        "mkdt - random",
        "mkdt - high_loss",
        "mkdt - no_pretrain",
        "full_data - random",
        "full_data - no_pretrain",
        "mkdt - krr_st",
        "mkdt - mtt_ssl",
    }
    accuracies = {
        method: [
            run["accuracy"]
            for run in json.loads((root / "artifacts" / "evaluate" / f"{method}.json").read_text())["runs"]
            if run["horizon"] == "equal_steps"
        ]
        for method in methods
    }
    for name, rows in summary.items():
        assert set(rows) == {"0.05", "0.5"}
        for fraction, cell in rows.items():
            paired = {"sem"} if " - " in name else set()
            assert set(cell) == {"mean", "std", "n"} | paired and cell["n"] == 3 and cell["std"] >= 0
            if name in methods:  # the mean of the method's 3 evaluation runs, each an accuracy in percent
                values = [accuracy[fraction] for accuracy in accuracies[name]]
                assert all(0 <= value <= 100 for value in values)
                assert cell["mean"] == pytest.approx(sum(values) / 3)
            else:  # one distilled set, 3 evaluation seeds: the paired differences' mean is that of the means
                method, baseline = name.split(" - ")
                assert cell["mean"] == pytest.approx(
                    summary[method][fraction]["mean"] - summary[baseline][fraction]["mean"]
                )
    # 2 horizon tables, in-domain fine-tuning, and transfer to digits by probe and by fine-tuning
    summary_md = (root / "results" / "summary.md").read_text()
    assert summary_md.count("| mkdt |") == 5
    assert "## MTT-SSL's matching loss" in summary_md
    assert {f"transfer@{method}" for method in methods} <= ran(output)
    transfers = {
        method: json.loads((root / "artifacts" / "transfer" / f"{method}.json").read_text())["downstream"]["digits"]
        for method in methods
    }
    for name, protocol in (("transfer.json", "accuracy"), ("transfer_fine_tune.json", "fine_tune")):
        table = json.loads((root / "results" / name).read_text())
        assert set(table) == {"digits"} and set(table["digits"]) == set(summary)
        for method in methods:  # each method's 3 encoders (one per evaluation seed) on digits
            for fraction in ("0.05", "0.5"):
                values = [run[protocol][fraction] for run in transfers[method]["runs"]]
                assert table["digits"][method][fraction]["n"] == 3
                assert table["digits"][method][fraction]["mean"] == pytest.approx(sum(values) / 3)
        paired = table["digits"]["mkdt - random"]["0.05"]
        assert paired["mean"] == pytest.approx(
            table["digits"]["mkdt"]["0.05"]["mean"] - table["digits"]["random"]["0.05"]["mean"]
        )
    fine_tuned = json.loads((root / "results" / "fine_tune.json").read_text())
    assert set(fine_tuned) == set(summary) and all(fine_tuned[m]["0.5"]["n"] == 3 for m in methods)
    assert (root / "results" / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sidecar = json.loads((root / "artifacts" / "distill" / "synthetic_seed0.pt.meta.json").read_text())
    assert {"operative_config", "inputs", "shapes", "code_version", "sha256"} <= set(sidecar)
    assert sidecar["shapes"]["images"]["shape"] == [20, 1, 8, 8]


def test_second_repro_runs_nothing(repro):
    root, _ = repro
    assert ran(sh(root, "dvc", "repro")) == set()


def test_a_distill_value_reruns_only_distill_and_what_follows(repro):
    root, _ = repro
    output = sh(root, "dvc", "exp", "run", "-S", "+distill.lr_images=50.0")
    # check validates every params.yaml value first; its output (the setting) is unchanged, so data is not rerun;
    # MTT-SSL matches with distill's values
    assert ran(output) == {
        "check",
        "distill",
        "evaluate@mkdt",
        "transfer@mkdt",
        "mtt_ssl",
        "evaluate@mtt_ssl",
        "transfer@mtt_ssl",
        "report",
    }


def test_the_variance_study_runs_on_its_own_from_the_pipeline_artifacts(repro):
    root, _ = repro
    assert ran(sh(root, "dvc", "repro", "studies/variance/dvc.yaml")) == {"studies/variance/dvc.yaml:variance"}
    results = json.loads((root / "results" / "variance.json").read_text())
    assert {"grad_variance_ratio", "dispersion_ratio", "final_matching_loss"} <= set(results)
    assert ran(sh(root, "dvc", "repro", "studies/variance/dvc.yaml")) == set()


def changed_stages(root: Path) -> set[str]:
    return set(json.loads(sh(root, "dvc", "status", "--json")))


def test_editing_tracking_code_changes_no_stage_but_editing_method_code_does(repro):
    """Per-stage deps (tests/test_stage_deps.py): a comment appended to the tracking module leaves every
    stage unchanged; one appended to the unrolled matching's module changes exactly the stages running it."""
    root, _ = repro
    sh(root, "dvc", "repro")
    sh(root, "dvc", "repro", "studies/variance/dvc.yaml")
    assert changed_stages(root) == set()
    for module, expected in (
        ("infra/tracking.py", set()),
        # check builds every config (distill's among them): it reruns, and its unchanged output stops there
        # (krr_st reads distill's minibatch sampler, mtt_ssl runs the matching)
        ("methods/unroll.py", {"check", "distill", "krr_st", "mtt_ssl", "studies/variance/dvc.yaml:variance"}),
    ):
        path = root / "sslkd" / module
        original = path.read_text()
        path.write_text(original + "# an edit\n")
        try:
            assert changed_stages(root) == expected, module
        finally:
            path.write_text(original)
