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

Cost: mlflow is imported and the run opened on a background thread while the stage computes; metrics
are buffered and sent in batches (at most every FLUSH_SECONDS during a stage, and at its end).
This module is the only one that imports mlflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from sslkd.errors import SslkdError

log = logging.getLogger(__name__)

SWITCH_ENV = "SSLKD_TRACKING"
PIPELINE_ENV = "SSLKD_PIPELINE_ID"
OFF_VALUES = ("off", "0", "false", "no")
FLUSH_SECONDS = 15.0
MAX_PARAM_LENGTH = 500    # the value limit of older MLflow servers (3.x allows 6000): safe for any
MAX_PER_BATCH = 100       # MLflow's limit of params (or tags) per log_batch request
MAX_METRICS_PER_BATCH = 1000
HEALTH_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Target:
    """Where runs are recorded: a tracking URI, the experiment name, and for the embedded default store
    the artifact folder (other stores choose their own)."""

    uri: str
    experiment: str
    artifact_location: str | None = None


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "on").strip().lower() not in OFF_VALUES


def target(workdir: Path, setting: str, experiment: str | None = None) -> Target:
    """Where runs of ``setting`` go (``experiment`` overrides the experiment name)."""
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"sslkd-{setting}"
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Target(uri, experiment)
    # DVC_ROOT: the repository DVC runs the stage for, also when it runs it in a temporary copy
    # (`dvc exp run --temp/--queue`), whose store would be deleted with it
    root = Path(os.environ.get("DVC_ROOT") or workdir).resolve()
    return Target(f"sqlite:///{root / 'mlflow.db'}", experiment, (root / "mlartifacts").as_uri())


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


def _filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _client(uri: str):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _experiment_id(client, experiment: Target, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment.experiment)
    if found is not None or not create:
        return found.experiment_id if found is not None else None
    try:
        return client.create_experiment(experiment.experiment, artifact_location=experiment.artifact_location)
    except MlflowException:  # created meanwhile by a stage running in parallel
        return client.get_experiment_by_name(experiment.experiment).experiment_id


@dataclass
class StageRun:
    """The MLflow run of one stage execution; opened on a background thread, closed by :meth:`close`.

    identity: the tags that make a run the same work (pipeline, stage, params hash); tags: the rest.
    """

    destination: Target
    stage: str
    identity: dict[str, str]
    tags: dict[str, str]
    params: dict[str, str]
    run_id: str | None = None
    resumed: bool = False
    _client: Any = None
    _error: BaseException | None = None
    _metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, time (ms), step
    _artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    _scratch: tempfile.TemporaryDirectory = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="sslkd-tracking-"))
    _last_flush: float = field(default_factory=time.monotonic)
    _thread: threading.Thread | None = None

    def start(self) -> "StageRun":
        self._thread = threading.Thread(target=self._open_quietly, name="mlflow-open", daemon=True)
        self._thread.start()
        return self

    def _open_quietly(self) -> None:
        try:
            self._open()
        except BaseException as error:  # re-tried, then reported, by close()
            self._error = error

    def _open(self) -> None:
        """Find this work's unfinished run (same identity tags) and continue it, or create a run."""
        from mlflow.entities import Param, RunTag

        client = _client(self.destination.uri)
        experiment_id = _experiment_id(client, self.destination, create=True)
        previous = client.search_runs(
            [experiment_id], filter_string=_filter(self.identity) + " and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if previous:
            run = previous[0]
            self.run_id, self.resumed = run.info.run_id, True
            client.update_run(self.run_id, status="RUNNING")
            attempts = int(run.data.tags.get("sslkd.attempts", "1")) + 1
            client.set_tag(self.run_id, "sslkd.attempts", str(attempts))
            params = {key: value for key, value in self.params.items() if key not in run.data.params}
            log.info("tracking: continuing MLflow run %s (%s, attempt %d)", self.run_id, self.stage, attempts)
        else:
            run = client.create_run(experiment_id, run_name=self.stage,
                                    tags={**self.identity, **self.tags, "sslkd.attempts": "1"})
            self.run_id, params = run.info.run_id, self.params
        for chunk in _chunks([Param(key, value) for key, value in params.items()], MAX_PER_BATCH):
            client.log_batch(self.run_id, params=chunk)
        if self.resumed:
            for chunk in _chunks([RunTag(key, value) for key, value in self.tags.items()], MAX_PER_BATCH):
                client.log_batch(self.run_id, tags=chunk)
        self._client = client

    def _ready(self) -> bool:
        return self._client is not None and self._thread is not None and not self._thread.is_alive()

    def metric(self, key: str, value: float, step: int) -> None:
        self._metrics.append((key, float(value), int(time.time() * 1000), int(step)))
        if self._ready() and time.monotonic() - self._last_flush > FLUSH_SECONDS:
            try:
                self._flush()
            except Exception as error:  # never stop the computation; close() sends what is still pending
                log.warning("tracking: metrics not sent yet (%s)", " ".join(str(error).split())[:200])

    def _flush(self) -> None:
        """Send the pending metrics in batches; what a failed batch held stays pending."""
        from mlflow.entities import Metric

        self._last_flush = time.monotonic()
        while self._metrics:
            chunk = self._metrics[:MAX_METRICS_PER_BATCH]
            self._client.log_batch(self.run_id, metrics=[Metric(*entry) for entry in chunk])
            del self._metrics[:len(chunk)]

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self._artifacts.append((Path(path), folder))

    def image(self, name: str, draw: Callable[[Path], None], folder: str | None = None) -> None:
        path = Path(self._scratch.name) / name
        draw(path)
        self.artifact(path, folder)

    def close(self, status: str, operative_config: str) -> None:
        """Send what is pending and end the run with ``status``; a tracking failure here is a warning:
        the stage's artifacts are the record, the run only shows them."""
        try:
            self._thread.join()
            if self._client is None:  # the background open failed: try once more, here
                log.debug("tracking: opening the run again after %r", self._error)
                self._open()
            self._flush()
            self._client.log_text(self.run_id, operative_config, "operative_config.gin")
            for path, folder in self._artifacts:
                if path.is_file():
                    self._client.log_artifact(self.run_id, str(path), folder)
            self._client.set_terminated(self.run_id, status)
        except Exception as error:
            log.warning("tracking: the MLflow run of %s at %s is incomplete: %s", self.stage,
                        self.destination.uri, " ".join(str(error).split())[:300])
        finally:
            self._scratch.cleanup()


_active: StageRun | None = None


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stage_run(destination: Target | None, stage: str, identity: dict[str, str], tags: dict[str, str],
              operative_config: Callable[[], str]) -> Iterator[StageRun | None]:
    """Record the enclosed stage as one MLflow run (nothing when ``destination`` is None).

    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (which is turned into
    SystemExit so that the run is closed); ``operative_config()`` is read at the end.
    """
    global _active
    if destination is None:
        yield None
        return
    params = flatten_config(operative_config())
    run = StageRun(destination, stage, identity, tags, params).start()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
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


@dataclass(frozen=True)
class Comparison:
    """The evaluate runs of one pipeline, methods in the order they ran: run ids, and the summary
    {method: {fraction: {mean, std, n}}} of report.py."""

    experiment: str
    experiment_id: str
    pipeline: str
    run_ids: dict[str, str]
    summary: dict[str, dict[str, dict[str, float]]]

    def ui_route(self) -> str:
        """The MLflow UI's run-comparison page of these runs, relative to the UI's address."""
        runs = json.dumps([self.run_ids[method] for method in self.summary], separators=(",", ":"))
        experiments = json.dumps([self.experiment_id], separators=(",", ":"))
        return f"#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(experiments)}"


def compare(destination: Target, pipeline: str | None = None) -> Comparison:
    """The latest finished evaluate run of each method in ``pipeline`` (default: the pipeline of the
    most recent evaluate run), read from the tracking store."""
    if destination.uri.startswith("sqlite:///") and not Path(destination.uri.removeprefix("sqlite:///")).is_file():
        raise SslkdError(f"no tracking store {destination.uri.removeprefix('sqlite:///')}: run `dvc repro` first")
    client = _client(destination.uri)
    experiment_id = _experiment_id(client, destination, create=False)
    if experiment_id is None:
        raise SslkdError(f"no MLflow experiment {destination.experiment!r} at {destination.uri}")
    query = "tags.`sslkd.stage` LIKE 'evaluate@%' and attributes.status = 'FINISHED'"
    if pipeline:
        query += " and " + _filter({"sslkd.pipeline": pipeline})
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    if not runs:
        raise SslkdError(f"no finished evaluate runs in experiment {destination.experiment!r}"
                         + (f" for pipeline {pipeline}" if pipeline else "") + ": run `dvc repro` first")
    pipeline = pipeline or runs[0].data.tags["sslkd.pipeline"]
    latest: dict[str, Any] = {}
    for run in runs:  # newest first
        if run.data.tags.get("sslkd.pipeline") == pipeline:
            latest.setdefault(run.data.tags["sslkd.method"], run)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method, run in sorted(latest.items(), key=lambda item: item[1].info.start_time):
        rows = summary.setdefault(method, {})
        for key, value in run.data.metrics.items():
            if match := _ACCURACY.match(key):
                rows.setdefault(match["fraction"], {})[match["stat"]] = int(value) if match["stat"] == "n" else value
    run_ids = {method: latest[method].info.run_id for method in summary}
    return Comparison(destination.experiment, experiment_id, pipeline, run_ids, summary)
