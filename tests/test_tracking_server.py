"""The toy pipeline tracked by a real `mlflow server` (loopback, SQLite backend), checked through its REST
API: one finished run per stage of one pipeline, params, metrics with steps, image artifacts, the
comparison, and a crash mid-stage. The server runs in its own process group, stopped as a group."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from test_tracking import free_port

from sslkd.cli import main
from sslkd.infra import tracking
from sslkd.stage_configs import METHODS

from conftest import make_workspace

pytestmark = pytest.mark.slow

STAGES = (
    [["data"], ["teacher"], ["represent"], ["experts"], ["init"], ["distill"], ["krr_st"], ["mtt_ssl"]]
    + [["evaluate", "--method", method] for method in METHODS]
    + [["transfer", "--method", method] for method in METHODS]
    + [["report"]]
)


def rest(uri: str, endpoint: str, payload: dict | None = None, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    with open(root / "server.log", "w") as server_log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--artifacts-destination",
                str(root / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer /health in 180 s"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server forks workers: stop the whole group
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def tracked_study(tmp_path_factory, uri: str, experiment: str):
    with pytest.MonkeyPatch.context() as patch:
        study = make_workspace(tmp_path_factory.mktemp("study"))
        patch.chdir(study)
        patch.setenv("SSLKD_TRACKING", "on")
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        for name in ("SSLKD_PIPELINE_ID", "DVC_ROOT", "DVC_EXP_NAME"):
            patch.delenv(name, raising=False)
        yield study


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """The whole toy pipeline against the server; returns (study, runs by name, `sslkd compare` output)."""
    with tracked_study(tmp_path_factory, server, "pipeline") as study:
        for command in STAGES:
            assert main(command) == 0, command
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            assert main(["compare"]) == 0
    experiment = rest(server, "experiments/get-by-name", experiment_name="pipeline")["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    return study, {run["info"]["run_name"]: run for run in runs}, output.getvalue()


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def history(uri: str, run: dict, key: str) -> list[tuple[int, float]]:
    metrics = rest(uri, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)["metrics"]
    return sorted((int(metric.get("step", 0)), metric["value"]) for metric in metrics)


def artifacts(uri: str, run: dict) -> set[str]:
    return {entry["path"] for entry in rest(uri, "artifacts/list", run_id=run["info"]["run_id"]).get("files", [])}


def test_every_stage_is_one_finished_run_of_one_pipeline(pipeline):
    _, runs, _ = pipeline
    assert set(runs) == {
        "data",
        "teacher",
        "represent",
        "experts",
        "init",
        "distill",
        "krr_st",
        "mtt_ssl",
        "report",
    } | {f"{stage}@{method}" for method in METHODS for stage in ("evaluate", "transfer")}
    assert {run["info"]["status"] for run in runs.values()} == {"FINISHED"}
    assert len({tags(run)["sslkd.pipeline"] for run in runs.values()}) == 1
    for name, run in runs.items():
        assert tags(run)["sslkd.stage"] == name and len(tags(run)["sslkd.params_hash"]) == 64
        assert "mlflow.source.git.commit" in tags(run) or "+src." in tags(run)["sslkd.code_version"]


def test_params_are_the_operative_config_and_the_hash_links_the_artifact(pipeline):
    study, runs, _ = pipeline
    params = {param["key"]: param["value"] for param in runs["distill"]["data"]["params"]}
    assert params["distill.iterations"] == "3" and params["distill.syn_steps"] == "2"
    assert params["distill.seeds"] == "[0]" and params["distill.lr_images"] == "100.0"
    sidecar = json.loads((study / "artifacts" / "distill" / "synthetic_seed0.pt.meta.json").read_text())
    assert (
        tags(runs["distill"])["sslkd.params_hash"] == hashlib.sha256(sidecar["operative_config"].encode()).hexdigest()
    )


def test_metrics_are_logged_with_their_steps(pipeline, server):
    study, runs, _ = pipeline
    assert [step for step, _ in history(server, runs["teacher"], "ssl_loss")] == [1]
    for expert in (0, 1):
        assert [step for step, _ in history(server, runs["experts"], f"kd_loss/expert_{expert}")] == [1, 2, 3]
    assert [step for step, _ in history(server, runs["distill"], "matching_loss/seed_0")] == [0, 1, 2]
    assert all(lr > 0 for _, lr in history(server, runs["distill"], "inner_lr/seed_0"))
    assert [step for step, _ in history(server, runs["evaluate@random"], "pretrain_loss/equal_steps/eval_seed_1")] == [
        1,
        2,
    ]
    assert [
        step
        for step, _ in history(server, runs["evaluate@mkdt"], "pretrain_loss/equal_steps/eval_seed_1/distill_seed_0")
    ] == [
        1,
        2,
    ]
    summary = json.loads((study / "results" / "summary.json").read_text())
    for method in METHODS:
        run = runs[f"evaluate@{method}"]
        latest = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
        for fraction in ("0.05", "0.5"):
            per_seed = history(server, run, f"acc_{fraction}")
            assert [step for step, _ in per_seed] == [0, 1, 2]
            assert latest[f"acc_{fraction}_mean"] == pytest.approx(summary[method][fraction]["mean"])
            assert latest[f"acc_{fraction}_std"] == pytest.approx(summary[method][fraction]["std"])
            assert latest[f"acc_{fraction}_n"] == 3
    # fine-tuning (tests/configs/tiny.gin turns it on) and transfer to digits, as in the report's JSON files
    fine_tuned = json.loads((study / "results" / "fine_tune.json").read_text())
    transfer = json.loads((study / "results" / "transfer.json").read_text())["digits"]
    transfer_fine_tuned = json.loads((study / "results" / "transfer_fine_tune.json").read_text())["digits"]
    for method in METHODS:
        evaluated = {metric["key"]: metric["value"] for metric in runs[f"evaluate@{method}"]["data"]["metrics"]}
        transferred = {metric["key"]: metric["value"] for metric in runs[f"transfer@{method}"]["data"]["metrics"]}
        for fraction in ("0.05", "0.5"):
            assert evaluated[f"ft_acc_{fraction}_mean"] == pytest.approx(fine_tuned[method][fraction]["mean"])
            assert transferred[f"acc/digits/{fraction}_mean"] == pytest.approx(transfer[method][fraction]["mean"])
            assert transferred[f"ft_acc/digits/{fraction}_n"] == transfer_fine_tuned[method][fraction]["n"] == 3
            per_seed = history(server, runs[f"transfer@{method}"], f"acc/digits/{fraction}")
            assert [step for step, _ in per_seed] == [0, 1, 2]


def test_artifacts_include_the_config_the_results_and_the_images(pipeline, server):
    _, runs, _ = pipeline
    for run in runs.values():
        assert "operative_config.gin" in artifacts(server, run)
    assert {"synthetic_seed0.png", "distill_loss_seed0.png"} <= artifacts(server, runs["distill"])
    assert {"summary.json", "summary.md", "paired_differences.json", "accuracy_vs_labels.png"} <= artifacts(
        server, runs["report"]
    )
    assert "mkdt.json" in artifacts(server, runs["evaluate@mkdt"])
    run_id = runs["distill"]["info"]["run_id"]
    with urllib.request.urlopen(
        f"{server}/get-artifact?path=synthetic_seed0.png&run_uuid={run_id}", timeout=30
    ) as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_the_report_table_from_the_store(pipeline):
    study, _, output = pipeline
    report_rows = [
        line for line in (study / "results" / "summary.md").read_text().splitlines() if line.startswith("| ")
    ]
    compared_rows = [line for line in output.splitlines() if line.startswith("| ")]
    assert compared_rows[: len(METHODS) + 1] == report_rows[: len(METHODS) + 1]  # header, a row per method
    for title in ("fine-tuning, accuracy", "digits: linear probe, accuracy", "digits: fine-tuning, accuracy"):
        assert title in output
    transfer_rows = output.split("digits: linear probe")[1].splitlines()
    report_transfer = (study / "results" / "summary.md").read_text().split("### digits")[1].splitlines()
    method_rows = [line for line in transfer_rows if line.startswith("| ")][1 : len(METHODS) + 1]
    assert method_rows == [line for line in report_transfer if line.startswith("| ")][1 : len(METHODS) + 1]


def test_a_crash_mid_stage_marks_the_run_failed_and_a_rerun_continues_it(pipeline, server, tmp_path_factory):
    study, _, _ = pipeline
    with tracked_study(tmp_path_factory, server, "crash") as crash_study:
        shutil.copytree(study / "artifacts", crash_study / "artifacts")
        diverging = ["distill", "--bind", "sslkd.distill.lr_images = 1e30"]  # the loss turns non-finite
        assert main(diverging) == 2
        assert main(diverging) == 2
        tracking.upload_pending(tracking.target(crash_study, "tiny"))  # what the uploader may not have sent yet
    experiment = rest(server, "experiments/get-by-name", experiment_name="crash")["experiment"]
    [run] = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert run["info"]["status"] == "FAILED" and tags(run)["sslkd.attempts"] == "2"
    assert [step for step, _ in history(server, run, "matching_loss/seed_0")] == [0, 0]  # one per attempt
