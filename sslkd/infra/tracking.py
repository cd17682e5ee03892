"""Experiment tracking: every stage execution is one MLflow run. MLflow records; it never configures.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a server, or any store MLflow accepts), otherwise a
SQLite store ``<workspace>/mlflow.db`` with artifacts in ``<workspace>/mlartifacts`` (the workspace:
the repository DVC runs the stage for, even from a temporary experiment folder). The experiment is
``MLFLOW_EXPERIMENT_NAME`` or ``sslkd-<setting>``. Off: ``SSLKD_TRACKING=off`` (or ``sslkd <stage>
--no-tracking``): every logging function here is then a no-op and mlflow is never imported.

A run is tagged with its DVC stage name (``sslkd.stage``, e.g. ``evaluate@mkdt``), the sha256 of its
operative gin config (``sslkd.params_hash``; the artifact sidecars hold the same text, so
``sha256(sidecar["operative_config"])`` finds the run of an artifact), the git commit and a pipeline id
(``sslkd.pipeline``) shared by every stage run on the same code and configuration (``SSLKD_PIPELINE_ID``
overrides it). A stage run again with the same three tags continues its unfinished run (failed, killed
or left running by a killed job) instead of starting another; a finished run is never reopened.

Cost: a stage never imports mlflow. It appends its run's events to a spool in the workspace
(``.sslkd-tracking/``), and one detached uploader per spool (sslkd/infra/tracking_upload.py) imports mlflow
once and sends them, so a pipeline pays mlflow's import and store set-up once, not once per stage.
``sslkd compare`` sends what is still pending before it reads. Only this module's ``compare`` and the
uploader import mlflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from sslkd.errors import SslkdError
from sslkd.infra import termination
from sslkd.infra import tracking_upload as upload

log = logging.getLogger(__name__)

SWITCH_ENV = "SSLKD_TRACKING"
PIPELINE_ENV = "SSLKD_PIPELINE_ID"
OFF_VALUES = ("off", "0", "false", "no")
ON_VALUES = ("on", "1", "true", "yes")
SPOOL = ".sslkd-tracking"
MAX_PARAM_LENGTH = 500  # the value limit of older MLflow servers (3.x allows 6000): safe for any
HEALTH_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Target:
    """Where runs are recorded: a tracking URI, the experiment name, and for the embedded default store
    the artifact folder (other stores choose their own); ``spool``: where stages leave their runs for
    the uploader (the workspace's ``.sslkd-tracking/``)."""

    uri: str
    experiment: str
    artifact_location: str | None = None
    spool: Path | None = field(default=None, compare=False)


def enabled() -> bool:
    """Whether $SSLKD_TRACKING (default on) switches tracking on; a value that is neither is an error."""
    value = os.environ.get(SWITCH_ENV, "on").strip().lower()
    if value not in ON_VALUES + OFF_VALUES:
        raise SslkdError(
            f"{SWITCH_ENV}={os.environ[SWITCH_ENV]!r} is neither on ({', '.join(ON_VALUES)}) "
            f"nor off ({', '.join(OFF_VALUES)})"
        )
    return value in ON_VALUES


def target(workdir: Path, setting: str | None, experiment: str | None = None) -> Target:
    """Where runs of ``setting`` go (``experiment`` overrides the experiment name)."""
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"sslkd-{setting}"
    # DVC_ROOT: the repository DVC runs the stage for, also when it runs it in a temporary copy
    # (`dvc exp run --temp/--queue`), whose store (and spool) would be deleted with it
    root = Path(os.environ.get("DVC_ROOT") or workdir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Target(uri, experiment, spool=root / SPOOL)
    return Target(f"sqlite:///{root / 'mlflow.db'}", experiment, (root / "mlartifacts").as_uri(), root / SPOOL)


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """Fail fast, before any compute, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:  # it answers (a proxy without /health, or one that wants credentials)
            return
        reason: Any = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
    raise SslkdError(
        f"MLflow tracking server {uri} is unreachable ({reason}): start it, fix MLFLOW_TRACKING_URI, "
        f"or run with {SWITCH_ENV}=off"
    )


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def flatten_config(operative_config: str) -> dict[str, str]:
    """Every binding of a gin operative config as ``[scope/]name.parameter`` -> value (gin syntax),
    values cut to MAX_PARAM_LENGTH characters (the full text is logged as an artifact)."""
    import gin
    from gin import config_parser

    flat = {}
    for statement in config_parser.ConfigParser(operative_config, gin.config.ParserDelegate(skip_unknown=True)):
        if isinstance(statement, config_parser.BindingStatement):
            scope = f"{statement.scope}/" if statement.scope else ""
            value = repr(statement.value)
            if len(value) > MAX_PARAM_LENGTH:
                value = value[: MAX_PARAM_LENGTH - 1] + "…"
            flat[f"{scope}{statement.selector}.{statement.arg_name}"] = value
    return flat


def pipeline_id(code_version: str, parsed_config: str) -> str:
    """The group of a pipeline's runs: SSLKD_PIPELINE_ID, else a hash of the code version and the whole
    parsed configuration (the same for every stage of one `dvc repro`)."""
    chosen = os.environ.get(PIPELINE_ENV)
    if chosen is not None and not re.fullmatch(r"[\w.:-]{1,100}", chosen):
        raise SslkdError(f"{PIPELINE_ENV}={chosen!r}: use 1-100 letters, digits and . _ : -")
    return chosen or config_hash(f"{code_version}\n{parsed_config}")[:12]


@dataclass
class StageRun:
    """The run of one stage execution, spooled: events appended to ``<spool>/<entry>/events.jsonl``
    (files under ``files/``) for the uploader (sslkd/infra/tracking_upload.py), which this process starts when
    none is running. Nothing here imports mlflow or waits for a store.

    identity: the tags that make a run the same work (pipeline, stage, params hash); tags: the rest.
    """

    destination: Target
    stage: str
    identity: dict[str, str]
    tags: dict[str, str]
    params: dict[str, str]
    entry: Path | None = None
    _events: Any = None
    _artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def spooled(self) -> Path:
        """The run's spool entry (:meth:`start` makes it)."""
        if self.entry is None:
            raise RuntimeError(f"the tracking run of {self.stage} was used before it started")
        return self.entry

    def start(self) -> "StageRun":
        spool = self.destination.spool or Path.cwd().resolve() / SPOOL
        self.entry = spool / f"{time.time_ns():020d}-{os.getpid()}"
        try:
            (self.entry / upload.FILES).mkdir(parents=True)
            self._events = open(self.entry / upload.EVENTS, "a")
        except OSError as error:
            raise SslkdError(
                f"cannot write the tracking spool {spool} ({error.strerror or error}): make it "
                f"writable, or run with {SWITCH_ENV}=off"
            ) from None
        try:
            self._write(
                event="start",
                uri=self.destination.uri,
                experiment=self.destination.experiment,
                artifact_location=self.destination.artifact_location,
                stage=self.stage,
                identity=self.identity,
                tags=self.tags,
                params=self.params,
                pid=os.getpid(),
            )
        except SslkdError:  # no half-written entry for the uploader to puzzle over
            with contextlib.suppress(OSError):
                self._events.close()
            shutil.rmtree(self.spooled, ignore_errors=True)
            raise
        threading.Thread(target=self._heartbeat, name="tracking-heartbeat", daemon=True).start()
        report_store_error(spool)
        start_uploader(spool)
        return self

    def _write(self, **event: Any) -> None:
        event.setdefault("time", int(time.time() * 1000))
        try:
            self._events.write(json.dumps(event) + "\n")
            self._events.flush()
        except OSError as error:  # a full disk: one line, not a traceback from deep in the stage
            raise SslkdError(
                f"cannot write the tracking spool {self.spooled.parent} ({error.strerror or error}): "
                f"free space, or run with {SWITCH_ENV}=off"
            ) from None

    def _heartbeat(self) -> None:
        """Touch the events file: an entry left untouched for STALE_SECONDS belongs to a dead stage."""
        while not self._stop.wait(upload.HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.spooled / upload.EVENTS)

    def metric(self, key: str, value: float, step: int) -> None:
        self._write(event="metric", key=key, value=float(value), step=int(step))

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Attach a file; it is copied when the stage ends."""
        self._artifacts.append((Path(path), folder))

    def _spool_file(self, write: Callable[[Path], object], name: str, folder: str | None) -> None:
        """Write an artifact of the run into the entry (``write(path)``) and record it."""
        file = Path(folder or ".") / name
        (self.spooled / upload.FILES / file).parent.mkdir(parents=True, exist_ok=True)
        write(self.spooled / upload.FILES / file)
        self._write(event="artifact", file=str(file), folder=folder)

    def image(self, name: str, draw: Callable[[Path], None], folder: str | None = None) -> None:
        self._spool_file(draw, name, folder)

    def close(self, status: str, operative_config: str) -> None:
        """Spool the artifacts, the operative config and the end with ``status``; a failure here is a
        warning: the stage's artifacts are the record, the run only shows them."""
        try:
            self._spool_file(lambda copy: copy.write_text(operative_config), "operative_config.gin", None)
            for path, folder in self._artifacts:
                if path.is_file():
                    self._spool_file(lambda copy: shutil.copyfile(path, copy), path.name, folder)
            self._write(event="end", status=status)
        except (OSError, SslkdError) as error:
            log.warning("tracking: the run of %s is incomplete: %s", self.stage, error)
        finally:
            self._stop.set()
            with contextlib.suppress(OSError):  # what a full disk kept in the buffer is lost with the run
                self._events.close()
        report_store_error(self.spooled.parent)
        start_uploader(self.spooled.parent)


def report_store_error(spool: Path) -> None:
    """Say once, in one line, that the uploader could not send runs (the first stage to see its note)."""
    note = spool / upload.STORE_ERROR
    try:
        os.rename(note, spool / upload.STORE_ERROR_REPORTED)  # exactly one process wins
        error = json.loads((spool / upload.STORE_ERROR_REPORTED).read_text())
    except (OSError, ValueError):
        return
    log.warning(
        "tracking: runs do not reach %s (%s); %d wait in %s for the next uploader (fix the store, or "
        "move a broken mlflow.db aside, then `python -m sslkd.infra.tracking_upload --drain %s`; %s=off "
        "stops tracking)",
        error.get("uri"),
        error.get("error"),
        len(upload.entries(spool)),
        spool,
        spool,
        SWITCH_ENV,
    )


def start_uploader(spool: Path) -> None:
    """Start the spool's uploader, detached (its own session; log in the spool), unless one runs."""
    if upload.uploader_running(spool):
        return
    with open(spool / "uploader.log", "a") as uploader_log:
        subprocess.Popen(
            [sys.executable, "-m", "sslkd.infra.tracking_upload", str(spool)],
            stdin=subprocess.DEVNULL,
            stdout=uploader_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def upload_pending(destination: Target) -> None:
    """Send what the spool still holds, from this process (before reading the store back)."""
    if destination.spool is not None:
        upload.upload_pending(destination.spool)


_active: StageRun | None = None


@contextlib.contextmanager
def stage_run(
    destination: Target | None,
    stage: str,
    identity: dict[str, str],
    tags: dict[str, str],
    operative_config: Callable[[], str],
) -> Iterator[StageRun | None]:
    """Record the enclosed stage as one MLflow run (nothing when ``destination`` is None).

    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (which is turned into
    sslkd.infra.termination.Terminated, a SystemExit, so that the run is closed); ``operative_config()`` is read at the end.
    """
    global _active
    if destination is None:
        yield None
        return
    params = flatten_config(operative_config())
    run = StageRun(destination, stage, identity, tags, params).start()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, termination.raise_terminated) if in_main_thread else None
    _active = run
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        _active = None
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        run.close(status, operative_config())


# What stages call: no-ops when no run is active.


def log_metric(key: str, value: float, step: int) -> None:
    if _active is not None:
        _active.metric(key, value, step)


def log_metrics(values: Mapping[str, float], step: int) -> None:
    if _active is not None:
        for key, value in values.items():
            _active.metric(key, value, step)


def log_artifact(path: Path, folder: str | None = None) -> None:
    """Attach a file (read when the stage ends) to the run."""
    if _active is not None:
        _active.artifact(path, folder)


def log_image(name: str, draw: Callable[[Path], None], folder: str | None = None) -> None:
    """Attach a picture: ``draw(path)`` writes it, and is called only when tracking is on."""
    if _active is not None:
        _active.image(name, draw, folder)


# Reading back: the comparison of the evaluate runs.

_ACCURACY = re.compile(r"^acc_(?P<fraction>[0-9.e-]+)_(?P<stat>mean|std|n)$")
# evaluate's fine-tuning (headline horizon) and transfer's metrics (sslkd/stages/transfer.py)
_FINE_TUNED = re.compile(r"^ft_acc_(?P<fraction>[0-9.e-]+)_(?P<stat>mean|std|n)$")
_TRANSFER = re.compile(r"^(?P<metric>acc|ft_acc)/(?P<downstream>[^/]+)/(?P<fraction>[0-9.e-]+)_(?P<stat>mean|std|n)$")
PROTOCOL_NAMES = {"acc": "linear probe", "ft_acc": "fine-tuning"}

Table = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class Comparison:
    """The evaluate (and transfer) runs of one pipeline, methods in the order they ran: run ids, the summary
    {method: {fraction: {mean, std, n}}} of report.py, and further tables of the same shape by title
    ("fine-tuning", "<downstream>: linear probe", "<downstream>: fine-tuning") where those were logged."""

    experiment: str
    experiment_id: str
    pipeline: str
    run_ids: dict[str, str]
    summary: Table
    tables: dict[str, Table] = field(default_factory=dict)
    transfer_run_ids: dict[str, str] = field(default_factory=dict)

    def ui_route(self) -> str:
        """The MLflow UI's run-comparison page of these runs, relative to the UI's address."""
        ids = [self.run_ids[method] for method in self.summary] + list(self.transfer_run_ids.values())
        runs = json.dumps(ids, separators=(",", ":"))
        experiments = json.dumps([self.experiment_id], separators=(",", ":"))
        return f"#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(experiments)}"


def compare(destination: Target, pipeline: str | None = None) -> Comparison:
    """The latest finished evaluate run of each method in ``pipeline`` (default: the pipeline of the
    most recent evaluate run), read from the tracking store. A store that cannot be read (a broken
    mlflow.db, a server that refuses) is one SslkdError line."""
    try:
        return _compare(destination, pipeline)
    except SslkdError:
        raise
    except Exception as error:
        raise SslkdError(
            f"cannot read the tracking store {destination.uri} ({upload.one_line(error)}); a broken "
            f"mlflow.db can be moved aside (a new one is created by the next stage)"
        ) from None


def _compare(destination: Target, pipeline: str | None) -> Comparison:
    uploader_log = logging.getLogger(upload.__name__)
    level = uploader_log.level
    uploader_log.setLevel(logging.ERROR)  # a store that refuses the pending runs is compare's one error line
    try:
        upload_pending(destination)
    finally:
        uploader_log.setLevel(level)
    if destination.uri.startswith("sqlite:///") and not Path(destination.uri.removeprefix("sqlite:///")).is_file():
        raise SslkdError(f"no tracking store {destination.uri.removeprefix('sqlite:///')}: run `dvc repro` first")
    client = upload.client_for(destination.uri)
    experiment_id = upload.experiment_id(client, destination.experiment, None, create=False)
    if experiment_id is None:
        raise SslkdError(f"no MLflow experiment {destination.experiment!r} at {destination.uri}")
    query = "tags.`sslkd.stage` LIKE 'evaluate@%' and attributes.status = 'FINISHED'"
    if pipeline:
        query += " and " + upload.tags_filter({"sslkd.pipeline": pipeline})
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    if not runs:
        raise SslkdError(
            f"no finished evaluate runs in experiment {destination.experiment!r}"
            + (f" for pipeline {pipeline}" if pipeline else "")
            + ": run `dvc repro` first"
        )
    pipeline = pipeline or runs[0].data.tags["sslkd.pipeline"]
    latest = _latest_by_method(runs, pipeline)
    summary: Table = {}
    tables: dict[str, Table] = {}
    for method, run in latest.items():
        summary[method] = {}
        for key, value in run.data.metrics.items():
            if match := _ACCURACY.match(key):
                _cell(summary, method, match, value)
            elif match := _FINE_TUNED.match(key):
                _cell(tables.setdefault("fine-tuning", {}), method, match, value)
    query = "tags.`sslkd.stage` LIKE 'transfer@%' and attributes.status = 'FINISHED' and "
    transfers = _latest_by_method(
        client.search_runs(
            [experiment_id],
            filter_string=query + upload.tags_filter({"sslkd.pipeline": pipeline}),
            order_by=["attributes.start_time DESC"],
        ),
        pipeline,
    )
    for method, run in transfers.items():
        for key, value in sorted(run.data.metrics.items()):
            if match := _TRANSFER.match(key):
                title = f"{match['downstream']}: {PROTOCOL_NAMES[match['metric']]}"
                _cell(tables.setdefault(title, {}), method, match, value)
    run_ids = {method: latest[method].info.run_id for method in summary}
    transfer_run_ids = {method: run.info.run_id for method, run in transfers.items()}
    return Comparison(destination.experiment, experiment_id, pipeline, run_ids, summary, tables, transfer_run_ids)


def _latest_by_method(runs: list, pipeline: str) -> dict[str, Any]:
    """The newest run of each method in ``pipeline`` (runs newest first), methods in the order they ran."""
    latest: dict[str, Any] = {}
    for run in runs:
        if run.data.tags.get("sslkd.pipeline") == pipeline:
            latest.setdefault(run.data.tags["sslkd.method"], run)
    return dict(sorted(latest.items(), key=lambda item: item[1].info.start_time))


def _cell(table: Table, method: str, match: re.Match, value: float) -> None:
    """Put a logged statistic (``match``: its fraction and stat) into ``table``'s row of ``method``."""
    table.setdefault(method, {}).setdefault(match["fraction"], {})[match["stat"]] = (
        int(value) if match["stat"] == "n" else value
    )
