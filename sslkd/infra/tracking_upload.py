"""The uploader: sends the stages' spooled runs (sslkd/infra/tracking.py) to MLflow.

A stage never imports mlflow: it appends its run's events (start with tags and params, metrics with
steps, artifacts, end with the status) to an entry of the spool, ``<workspace>/.sslkd-tracking/``, and
makes sure an uploader is running. The uploader is one detached process per spool
(``python -m sslkd.infra.tracking_upload SPOOL``, log in ``SPOOL/uploader.log``): it imports mlflow once,
streams every entry to its run — a run appears as RUNNING while its stage computes, with its metrics at
most FLUSH_SECONDS late — ends the run with the entry's status, deletes the entry, and exits after
IDLE_SECONDS without work. So a `dvc repro` pays mlflow's import and store set-up once instead of once
per stage (the stage processes of a pipeline on 2 cores paid ~4 s each).

Runs are found as before: an entry whose identity tags (pipeline, stage, params hash) match an
unfinished run continues it (``sslkd.attempts`` + 1); a finished run is never reopened. An entry whose
stage died without writing its end (SIGKILL, a lost node: no heartbeat for STALE_SECONDS) ends FAILED,
unless a later attempt continued its run: a superseded attempt never sets the run's status.

A store that cannot be reached or refuses (a server answering 404 or 500, a SQLite store broken by a
full disk) keeps the entry in the spool, retried every RETRY_SECONDS. The first failure writes one line
to ``SPOOL/store_error`` (removed by the next success), which the next stage to start or end reports
once on its stderr (sslkd/infra/tracking.py). After GIVE_UP_SECONDS of failures without a success
(``SSLKD_UPLOADER_GIVE_UP_SECONDS``, default 600) the uploader stops retrying and exits; the entries
wait for the next stage's uploader or ``--drain``. mlflow's own HTTP retries are bounded too
(MLFLOW_HTTP_REQUEST_MAX_RETRIES 3, BACKOFF_FACTOR 1, TIMEOUT 60 s unless set). :func:`upload_pending`
sends everything pending in the calling process (``sslkd compare`` and the tests call it).

Locks (flock): ``uploader.lock`` is held by the one running uploader; ``pass.lock`` around each pass
over the spool, so an in-process :func:`upload_pending` and the uploader never send an entry twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

EVENTS = "events.jsonl"
STATE = "uploaded.json"
FILES = "files"
UPLOADER_LOCK = "uploader.lock"
PASS_LOCK = "pass.lock"
FLUSH_SECONDS = 15.0  # metrics of a running stage reach the store at most this late
POLL_SECONDS = 0.5
IDLE_SECONDS = float(os.environ.get("SSLKD_UPLOADER_IDLE_SECONDS", "30"))  # exits after this long without entries
HEARTBEAT_SECONDS = 30.0  # a stage touches its events file this often
STALE_SECONDS = 300.0  # an entry without a heartbeat for this long: its stage died
RETRY_SECONDS = 30.0
GIVE_UP_SECONDS = float(os.environ.get("SSLKD_UPLOADER_GIVE_UP_SECONDS", "600"))  # failing this long: exit
STORE_ERROR = "store_error"  # the first failure since the last success, one line
STORE_ERROR_REPORTED = "store_error.reported"  # ... once a stage has shown it
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
MAX_PER_BATCH = 100  # MLflow's limit of params (or tags) per log_batch request
MAX_METRICS_PER_BATCH = 1000


def entries(spool: Path) -> list[Path]:
    """The spool's entries (one per stage execution), oldest first."""
    if not spool.is_dir():
        return []
    return sorted(path for path in spool.iterdir() if path.is_dir() and (path / EVENTS).is_file())


def read_events(entry: Path) -> list[dict[str, Any]]:
    """The complete lines of an entry's events (a line being appended is left for the next pass)."""
    text = (entry / EVENTS).read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def tags_filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def client_for(uri: str):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for name, value in MLFLOW_HTTP_DEFAULTS.items():  # a failing request may not block a pass for minutes
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic"):  # its store set-up chatter: not a line for the user
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(uri)


def experiment_id(client, name: str, artifact_location: str | None, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None or not create:
        return found.experiment_id if found is not None else None
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def send_metrics(client, run_id: str, metrics: list[tuple[str, float, int, int]]) -> None:
    """Send (key, value, time ms, step) in batches; what a failed batch held stays in ``metrics``."""
    from mlflow.entities import Metric

    while metrics:
        chunk = metrics[:MAX_METRICS_PER_BATCH]
        client.log_batch(run_id, metrics=[Metric(*entry) for entry in chunk])
        del metrics[: len(chunk)]


def open_run(client, start: Mapping[str, Any]) -> tuple[str, int]:
    """The run of a start event and the attempt this is: this work's unfinished run, continued (its
    ``sslkd.attempts`` + 1), or a new one (attempt 1)."""
    from mlflow.entities import Param, RunTag

    experiment = experiment_id(client, start["experiment"], start.get("artifact_location"), create=True)
    identity, tags, params = start["identity"], start["tags"], start["params"]
    previous = (
        client.search_runs(
            [experiment],
            filter_string=tags_filter(identity) + " and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if identity
        else []
    )
    if previous:
        run = previous[0]
        run_id = run.info.run_id
        client.update_run(run_id, status="RUNNING")
        attempts = int(run.data.tags.get("sslkd.attempts", "1")) + 1
        client.set_tag(run_id, "sslkd.attempts", str(attempts))
        params = {key: value for key, value in params.items() if key not in run.data.params}
        for chunk in _chunks([RunTag(key, value) for key, value in tags.items()], MAX_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        log.info("continuing MLflow run %s (%s, attempt %d)", run_id, start["stage"], attempts)
    else:
        attempts = 1
        run_id = client.create_run(
            experiment,
            run_name=start["stage"],
            start_time=start["time"],
            tags={**identity, **tags, "sslkd.attempts": "1"},
        ).info.run_id
    for chunk in _chunks([Param(key, value) for key, value in params.items()], MAX_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    return run_id, attempts


def superseded(client, run_id: str, attempt: int) -> bool:
    """Whether a later attempt (a rerun of the stage) has continued the run since ``attempt`` opened it."""
    return int(client.get_run(run_id).data.tags.get("sslkd.attempts", "1")) > attempt


@dataclass
class Uploader:
    """Sends entries to their stores; one MLflow client per tracking URI, created on first use."""

    clients: dict[str, Any] = field(default_factory=dict)
    failed_at: dict[Path, float] = field(default_factory=dict)
    failing_since: float | None = None  # monotonic time of the first failure since the last success

    def client(self, uri: str):
        if uri not in self.clients:
            self.clients[uri] = client_for(uri)
        return self.clients[uri]

    def upload(self, spool: Path, final: bool) -> int:
        """One pass over the spool; returns how many entries are still there and live (their stage
        wrote or beat within STALE_SECONDS). ``final``: send every pending metric now, and retry entries
        that failed recently."""
        spool.mkdir(parents=True, exist_ok=True)
        with open(spool / PASS_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for entry in entries(spool):
                if not final and time.monotonic() - self.failed_at.get(entry, -RETRY_SECONDS) < RETRY_SECONDS:
                    continue
                try:
                    self.upload_entry(entry, final)
                    self.failed_at.pop(entry, None)
                    self.failing_since = None
                    for name in (STORE_ERROR, STORE_ERROR_REPORTED):
                        (spool / name).unlink(missing_ok=True)
                except Exception as error:  # the store is down or refuses: keep the entry, retry later
                    self.failed_at[entry] = time.monotonic()
                    self.failing_since = self.failing_since or time.monotonic()
                    reason = one_line(error)
                    log.warning("%s: not sent yet (%s)", entry.name, reason)
                    record_store_error(spool, entry, reason)
                    if final:
                        raise
            return sum(1 for entry in entries(spool) if _live(entry))

    def gave_up(self) -> bool:
        """Whether every try has failed for GIVE_UP_SECONDS."""
        return self.failing_since is not None and time.monotonic() - self.failing_since > GIVE_UP_SECONDS

    def upload_entry(self, entry: Path, final: bool) -> None:
        state_path = entry / STATE
        state: dict[str, Any] = (
            json.loads(state_path.read_text()) if state_path.is_file() else {"run_id": None, "lines": 0, "flushed": 0.0}
        )
        events = read_events(entry)
        if not events:
            return
        start = events[0]
        client = self.client(start["uri"])
        if state["run_id"] is None:
            state["run_id"], state["attempt"] = open_run(client, start)
            _write_json(state_path, state)
        new = events[max(state["lines"], 1) :]
        end = next((event for event in new if event["event"] == "end"), None)
        stale = end is None and not _live(entry)
        metrics = [(e["key"], e["value"], e["time"], e["step"]) for e in new if e["event"] == "metric"]
        due = final or end is not None or stale or time.time() - state["flushed"] > FLUSH_SECONDS
        if metrics and due:
            send_metrics(client, state["run_id"], metrics)
        if due:
            state.update(lines=len(events), flushed=time.time())
            _write_json(state_path, state)
        if end is None and not stale:
            return
        for event in new:
            if event["event"] == "artifact":
                client.log_artifact(state["run_id"], str(entry / FILES / event["file"]), event["folder"])
        status = end["status"] if end is not None else "FAILED"
        if superseded(client, state["run_id"], state.get("attempt", 1)):  # its rerun's entry ends the run
            log.info(
                "%s: attempt %d of run %s (%s) ended %s; a later attempt continues the run",
                entry.name,
                state.get("attempt", 1),
                state["run_id"],
                start["stage"],
                status,
            )
        else:
            client.set_terminated(state["run_id"], status, end_time=end["time"] if end is not None else None)
            log.info("%s: run %s (%s) ended %s", entry.name, state["run_id"], start["stage"], status)
        shutil.rmtree(entry, ignore_errors=True)


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines[0].split())[:300]}" if lines else type(error).__name__


def record_store_error(spool: Path, entry: Path, reason: str) -> None:
    """Leave the first failure since the last success for a stage to report (once)."""
    if (spool / STORE_ERROR).exists() or (spool / STORE_ERROR_REPORTED).exists():
        return
    try:
        uri = read_events(entry)[0]["uri"]
    except (OSError, ValueError, IndexError, KeyError):
        uri = "the tracking store"
    _write_json(spool / STORE_ERROR, {"uri": uri, "error": reason, "time": time.time()})


def _live(entry: Path) -> bool:
    try:
        return time.time() - (entry / EVENTS).stat().st_mtime <= STALE_SECONDS
    except FileNotFoundError:
        return False


def _write_json(path: Path, value: Any) -> None:
    """Atomic, like sslkd.store.artifacts.write_json_atomic, which would import torch into the uploader; one
    fixed temporary name is enough under the pass lock."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def upload_pending(spool: Path) -> None:
    """Send everything in ``spool`` from this process (running stages' runs stay open); raises when the
    store cannot take it."""
    if entries(spool):
        Uploader().upload(spool, final=True)


def serve(spool: Path) -> Uploader:
    """The uploader's loop: passes over the spool until no entry has been live for IDLE_SECONDS, or every
    try has failed for GIVE_UP_SECONDS (what a store that is down or refuses leaves behind waits for the
    next uploader, or ``--drain``). Returns the uploader, with what it tried."""
    uploader = Uploader()
    idle_since = time.monotonic()
    while True:
        if uploader.upload(spool, final=False):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_SECONDS:
            return uploader
        if uploader.gave_up():
            notes = [spool / name for name in (STORE_ERROR, STORE_ERROR_REPORTED) if (spool / name).is_file()]
            error = json.loads(notes[0].read_text()) if notes else {}
            log.error(
                "uploader gives up after %.0f s of failures (%s); %d runs wait in %s",
                GIVE_UP_SECONDS,
                error.get("error", "see above"),
                len(entries(spool)),
                spool,
            )
            return uploader
        time.sleep(POLL_SECONDS)


def uploader_running(spool: Path) -> bool:
    """Whether an uploader holds the spool's uploader lock."""
    try:
        with open(spool / UPLOADER_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True


def main(argv: list[str] | None = None) -> int:
    """``python -m sslkd.infra.tracking_upload SPOOL``: run as the spool's uploader unless one already is.
    ``--drain SPOOL``: send what is pending now, in this process, and return (before a container or a
    job ends and would take a running uploader with it)."""
    argv = sys.argv[1:] if argv is None else argv
    drain = argv[:1] == ["--drain"]
    if drain:
        argv = argv[1:]
    if len(argv) != 1:
        sys.stderr.write("usage: python -m sslkd.infra.tracking_upload [--drain] SPOOL\n")
        return 2
    spool = Path(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if drain:
        try:
            upload_pending(spool)
        except Exception as error:
            sys.stderr.write(f"sslkd tracking: runs left in {spool}: {' '.join(str(error).split())[:300]}\n")
            return 1
        return 0
    spool.mkdir(parents=True, exist_ok=True)
    with open(spool / UPLOADER_LOCK, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another uploader is running: it will send this stage's entry
            try:
                uploader = serve(spool)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            # A stage that found the lock held just before it was released started no uploader: look again,
            # for the entries this uploader has not tried (those that failed wait for the next uploader).
            if uploader.gave_up() or not set(entries(spool)) - set(uploader.failed_at):
                log.info("uploader exits: %.2f s CPU", time.process_time())
                return 0


if __name__ == "__main__":
    sys.exit(main())
