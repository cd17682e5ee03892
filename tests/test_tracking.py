"""Experiment tracking (sslkd/infra/tracking.py): where runs go, failing fast, and run status and resumption
on the embedded SQLite store. tests/test_tracking_server.py runs the pipeline against a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sslkd.cli import main
from sslkd.errors import SslkdError
from sslkd.infra import termination, tracking, tracking_upload

from conftest import make_workspace

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "SSLKD_PIPELINE_ID", "DVC_ROOT", "DVC_EXP_NAME")


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The toy study as the working directory, tracking on, to the embedded default store."""
    monkeypatch.chdir(make_workspace(tmp_path))
    monkeypatch.setenv("SSLKD_TRACKING", "on")
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def stage_runs(study, name: str):
    from mlflow import MlflowClient

    destination = tracking.target(study, "tiny")
    tracking.upload_pending(destination)  # what the background uploader may not have sent yet
    client = MlflowClient(destination.uri)
    experiment = client.get_experiment_by_name("sslkd-tiny")
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def test_operative_config_becomes_params_with_values_cut_to_the_limit():
    fractions = ", ".join(["0.5"] * 200)
    text = f"sslkd.distill.iterations = 3\nfast/sslkd.convnet.width = 8\nsslkd.probe.label_fractions = ({fractions})\n"
    flat = tracking.flatten_config(text)
    assert flat["sslkd.distill.iterations"] == "3"
    assert flat["fast/sslkd.convnet.width"] == "8"
    cut = flat["sslkd.probe.label_fractions"]
    assert len(cut) == tracking.MAX_PARAM_LENGTH and cut.startswith("(0.5, 0.5") and cut.endswith("…")


def test_default_store_is_sqlite_in_the_workspace_unless_a_uri_is_set(tmp_path, monkeypatch):
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path.resolve()
    assert tracking.target(tmp_path, "digits") == tracking.Target(
        f"sqlite:///{root}/mlflow.db", "sslkd-digits", (root / "mlartifacts").as_uri()
    )
    monkeypatch.setenv("DVC_ROOT", str(root / "repo"))  # DVC running the stage in a temporary copy
    assert tracking.target(root / "repo/.dvc/tmp/exps/tmp1", "digits").uri == f"sqlite:///{root}/repo/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "study")
    assert tracking.target(tmp_path, "digits") == tracking.Target("http://tracking.example:5000", "study")


@pytest.mark.parametrize(
    "value, enabled", [("off", False), ("OFF", False), ("0", False), ("false", False), ("on", True), ("1", True)]
)
def test_the_switch(monkeypatch, value, enabled):
    monkeypatch.setenv("SSLKD_TRACKING", value)
    assert tracking.enabled() is enabled


def test_a_pipeline_id_from_the_environment_must_be_a_plain_name(monkeypatch):
    monkeypatch.setenv("SSLKD_PIPELINE_ID", "slurm:1234.5")
    assert tracking.pipeline_id("v", "config") == "slurm:1234.5"
    monkeypatch.setenv("SSLKD_PIPELINE_ID", "x' or '1")
    with pytest.raises(SslkdError, match="SSLKD_PIPELINE_ID"):
        tracking.pipeline_id("v", "config")
    monkeypatch.delenv("SSLKD_PIPELINE_ID")
    assert (
        tracking.pipeline_id("v", "config")
        == tracking.pipeline_id("v", "config")
        != tracking.pipeline_id("w", "config")
    )


@pytest.mark.parametrize("command", [["data"], ["compare"]])
def test_an_unreachable_server_fails_before_any_compute_in_one_line(study, monkeypatch, capsys, command):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    code = main(command)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"MLflow tracking server {uri} is unreachable" in err[0]
    assert time.monotonic() - start < 10
    assert not (study / "artifacts").exists()


def test_an_unwritable_spool_fails_before_any_compute_in_one_line(study, capsys):
    (study / tracking.SPOOL).write_text("a file where the spool folder goes")
    assert main(["data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the tracking spool" in err[0] and "SSLKD_TRACKING=off" in err[0], err
    assert not (study / "artifacts").exists()


def test_switched_off_no_store_is_written(study, monkeypatch):
    assert main(["data", "--no-tracking"]) == 0
    monkeypatch.setenv("SSLKD_TRACKING", "off")
    assert main(["init"]) == 2  # fails inside the stage: still no run, no store
    assert (study / "artifacts" / "data" / "dataset.pt").is_file()
    assert not (study / "mlflow.db").exists() and not (study / "mlartifacts").exists()
    assert not (study / tracking.SPOOL).exists()


@pytest.mark.slow
def test_a_failed_stage_is_marked_failed_and_its_rerun_continues_that_run(study):
    assert main(["teacher"]) == 2  # no dataset yet: the stage fails after its run was opened
    [failed] = stage_runs(study, "teacher")
    assert failed.info.status == "FAILED"
    assert main(["data"]) == 0 and main(["teacher"]) == 0
    [run] = stage_runs(study, "teacher")
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["sslkd.attempts"] == "2"
    assert "ssl_loss" in run.data.metrics and run.data.params["ssl.epochs"] == "1"
    assert main(["teacher"]) == 0  # a finished run is never reopened: a new execution, a new run
    assert sorted(r.info.status for r in stage_runs(study, "teacher")) == ["FINISHED", "FINISHED"]


def test_sigterm_ends_the_run_as_killed_with_its_metrics(study):
    destination = tracking.target(study, "tiny")
    try:
        with pytest.raises(SystemExit):
            with tracking.stage_run(
                destination, "terminated", {"sslkd.stage": "terminated"}, {}, lambda: "sslkd.distill.iterations = 3"
            ):
                tracking.log_metric("progress", 0.5, 7)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler interrupts this
    finally:
        termination.clear_request()  # else every later test's long loop in this process raises it (progress.py)
    [run] = stage_runs(study, "terminated")
    assert run.info.status == "KILLED"
    assert run.data.metrics == {"progress": 0.5} and run.data.params == {"sslkd.distill.iterations": "3"}


def test_metrics_go_in_batches_of_at_most_1000_and_a_failed_batch_stays_pending():
    class Store:
        def __init__(self):
            self.batches, self.down = [], True

        def log_batch(self, run_id, metrics):
            if self.down:
                self.down = False
                raise OSError("server down")
            self.batches.append([(metric.key, metric.step) for metric in metrics])

    store = Store()
    pending = [("loss", 1.0 / (step + 1), 0, step) for step in range(2500)]
    with pytest.raises(OSError):
        tracking_upload.send_metrics(store, "run", pending)
    assert len(pending) == 2500
    tracking_upload.send_metrics(store, "run", pending)
    assert [len(batch) for batch in store.batches] == [1000, 1000, 500] and not pending
    assert [step for batch in store.batches for _, step in batch] == list(range(2500))


@pytest.mark.slow
def test_a_stage_never_imports_mlflow_and_its_run_reaches_the_store_through_the_uploader(study):
    code = (
        "import sys; from sslkd.cli import main; status = main(['data']); "
        "assert 'mlflow' not in sys.modules, 'the stage imported mlflow'; sys.exit(status)"
    )
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0
    spool = study / tracking.SPOOL
    deadline = time.monotonic() + 120
    while tracking_upload.entries(spool) or tracking_upload.uploader_running(spool):  # the uploader's own work
        assert time.monotonic() < deadline, (spool / "uploader.log").read_text()
        time.sleep(0.5)
    [run] = stage_runs(study, "data")
    assert run.info.status == "FINISHED" and run.data.tags["sslkd.stage"] == "data"


def test_an_entry_whose_stage_died_ends_failed_and_a_torn_last_line_waits(study, monkeypatch):
    destination = tracking.target(study, "tiny")
    run = tracking.StageRun(destination, "killed", {"sslkd.stage": "killed"}, {}, {"a": "1"})
    monkeypatch.setattr(tracking, "start_uploader", lambda spool: None)
    run.start()
    run.metric("loss", 0.5, 3)
    run._events.write('{"event": "metric", "key": "lo')  # the stage died mid-write
    run._events.flush()
    tracking.upload_pending(destination)  # a live stage: the run is open, the entry stays
    assert tracking_upload.entries(destination.spool) == [run.entry]
    [opened] = stage_runs(study, "killed")
    assert opened.info.status == "RUNNING" and opened.data.metrics == {"loss": 0.5}
    stale = time.time() - tracking_upload.STALE_SECONDS - 1
    os.utime(run.entry / tracking_upload.EVENTS, (stale, stale))  # no heartbeat: the stage is gone
    [failed] = stage_runs(study, "killed")
    assert failed.info.status == "FAILED" and not tracking_upload.entries(destination.spool)
