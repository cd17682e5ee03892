"""Fault injection, tracking (docs/reliability.md): a broken store or a server that refuses everything
is reported once in one line and the uploader stops after a bound; the stage still succeeds; a
superseded attempt cannot fail the live run. Real stores, real processes, a real HTTP server."""

from __future__ import annotations

import http.server
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sslkd.cli import main
from sslkd.infra import tracking, tracking_upload

from conftest import REPO, make_workspace

ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "SSLKD_PIPELINE_ID", "DVC_ROOT", "DVC_EXP_NAME")


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The toy study as the working directory, tracking on, the uploader giving up after 3 s."""
    monkeypatch.chdir(make_workspace(tmp_path))
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSLKD_TRACKING", "on")
    monkeypatch.setenv("SSLKD_UPLOADER_GIVE_UP_SECONDS", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield tmp_path
    stop_uploaders(tmp_path / tracking.SPOOL)


def stop_uploaders(spool: Path) -> None:
    """SIGKILL the uploaders this test started that still run (their pids are in their log)."""
    log = spool / "uploader.log"
    for pid in set(re.findall(r"^\S+ \S+ (\d+) ", log.read_text(), re.M)) if log.is_file() else ():
        try:
            if b"sslkd.infra.tracking_upload" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def sslkd(study: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslkd", *command],
        cwd=study,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=900,
    )


def tracking_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "tracking:" in line]


def wait_for_the_uploader(spool: Path, timeout: float) -> None:
    """Until the spool's uploader has exited (bounded)."""
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    while tracking_upload.uploader_running(spool):
        log = spool / "uploader.log"
        assert time.monotonic() < deadline, "the uploader still runs:\n" + (
            log.read_text()[-3000:] if log.is_file() else ""
        )
        time.sleep(0.5)


def break_the_store_with_a_full_disk(path: Path) -> None:
    """Create mlflow's SQLite store with a 120 kB file size limit (a full disk): its schema migration
    stops half way, as it did on the user's full disk."""

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))

    create = f"from mlflow import MlflowClient; MlflowClient('sqlite:///{path}').search_experiments()"
    result = subprocess.run([sys.executable, "-c", create], preexec_fn=full_disk, capture_output=True, text=True)
    assert result.returncode != 0 and path.is_file(), result.stderr[-2000:]


@pytest.mark.slow
def test_a_store_broken_by_a_full_disk_is_reported_once_and_compare_says_so_in_one_line(study):
    break_the_store_with_a_full_disk(study / "mlflow.db")
    spool = study / tracking.SPOOL
    first = sslkd(study, "data")
    assert first.returncode == 0, first.stderr[-3000:]
    wait_for_the_uploader(spool, 300)  # it failed and gave up: it does not retry forever
    assert "uploader gives up" in (spool / "uploader.log").read_text()
    assert len(tracking_upload.entries(spool)) == 1  # the run is kept, not lost

    second = sslkd(study, "data")  # the next pipeline (its first stage: data is the cheapest)
    third = sslkd(study, "data")
    assert second.returncode == 0 and third.returncode == 0, second.stderr[-3000:] + third.stderr[-3000:]
    # said once, by the first stage to start or end after the uploader's failure
    [line] = tracking_lines(first.stderr + second.stderr + third.stderr)
    assert "runs do not reach sqlite:///" in line and "OperationalError" in line and " wait in " in line, line

    compare = sslkd(study, "compare")
    err = compare.stderr.strip().splitlines()
    assert compare.returncode == 2 and len(err) == 1, compare.stderr[-3000:]
    assert err[0].startswith("sslkd compare: error: cannot read the tracking store sqlite:///"), err[0]


class Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``code`` (``health``: what /health answers)."""

    code = 404
    health = 404

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        code = self.health if self.path.rstrip("/").endswith("/health") else self.code
        body = b'{"error_code": "INTERNAL_ERROR", "message": "refused"}' if code >= 500 else b"not found"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def refusing_server(request):
    code, health = request.param
    handler = type("Handler", (Refusing,), {"code": code, "health": health})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "refusing_server", [(404, 404), (500, 200)], indirect=True, ids=["404-everywhere", "500-on-the-api"]
)
def test_a_server_that_refuses_everything_stops_the_uploader_after_a_bound(study, monkeypatch, refusing_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", refusing_server)
    spool = study / tracking.SPOOL
    started = time.monotonic()
    first = sslkd(study, "data")
    assert first.returncode == 0, first.stderr[-3000:]  # the stage itself succeeds
    wait_for_the_uploader(spool, 300)
    log = (spool / "uploader.log").read_text()
    # one uploader per stage start and end at most (the stage's end starts one when the first has gone)
    assert 1 <= log.count("uploader gives up after 3 s of failures") <= 2, log[-3000:]
    assert time.monotonic() - started < 300  # bounded (on a loaded machine mlflow takes a while to import)
    assert len(tracking_upload.entries(spool)) == 1  # kept for a later uploader or --drain

    second = sslkd(study, "data")
    assert second.returncode == 0, second.stderr[-3000:]
    [line] = tracking_lines(first.stderr + second.stderr)
    assert f"runs do not reach {refusing_server}" in line, line
    wait_for_the_uploader(spool, 300)
    assert len(tracking_upload.entries(spool)) == 2


@pytest.mark.slow
def test_a_superseded_attempt_cannot_fail_the_live_run(study, monkeypatch):
    """Attempt 1 was SIGKILLed (no end, no heartbeat), its rerun continues the run; attempt 1's entry
    going stale (5 minutes later, while attempt 2 computes) must not mark the live run FAILED."""
    from mlflow import MlflowClient

    monkeypatch.setattr(tracking, "start_uploader", lambda spool: None)  # this process uploads
    destination = tracking.target(study, "tiny")
    identity = {"sslkd.stage": "teacher", "sslkd.pipeline": "p", "sslkd.params_hash": "h"}
    killed = tracking.StageRun(destination, "teacher", identity, {}, {"a": "1"}).start()
    killed.metric("loss", 2.0, 0)
    killed._stop.set()  # SIGKILLed: its heartbeat stops, no end is written
    tracking.upload_pending(destination)
    rerun = tracking.StageRun(destination, "teacher", identity, {}, {"a": "1"}).start()
    rerun.metric("loss", 1.0, 1)
    tracking.upload_pending(destination)
    client = MlflowClient(destination.uri)
    [run] = client.search_runs([client.get_experiment_by_name("sslkd-tiny").experiment_id])
    assert run.info.status == "RUNNING" and run.data.tags["sslkd.attempts"] == "2"

    stale = time.time() - tracking_upload.STALE_SECONDS - 1
    os.utime(killed.entry / tracking_upload.EVENTS, (stale, stale))
    tracking.upload_pending(destination)
    assert client.get_run(run.info.run_id).info.status == "RUNNING", "the live attempt's run was ended"
    assert tracking_upload.entries(destination.spool) == [rerun.entry]

    rerun.close("FINISHED", "sslkd.teacher.seed = 0")
    tracking.upload_pending(destination)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert not tracking_upload.entries(destination.spool)


def test_compare_on_a_broken_store_is_one_line(study, capsys):
    """`sslkd compare` on a file that is not a SQLite database: one line, exit 2 (it was a 134-line
    traceback)."""
    (study / "mlflow.db").write_bytes(b"\0" * 4096 + b"not a database")
    assert main(["compare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslkd compare: error: cannot read the tracking store"), err
