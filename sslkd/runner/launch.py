"""Running a stage as submitit jobs (``--launcher local|slurm``) while DVC sees one blocking command.

``launch`` copies the sslkd package to a snapshot that the jobs import (a queued job runs the code as it
was at submission), submits the stage (for ``experts``: first a job array over the experts still
missing, then the merge), waits for every job and returns only when the stage's outputs are written by
the job, exactly as inline. A failed job fails the stage with its error and log path; outputs are
written atomically by the job, so nothing partial is ever promoted. Logs, pickles, the code snapshot,
checkpoints and expert parts live under ``jobs/<stage>/`` (not a DVC output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import gin
import submitit
from submitit.core.utils import FailedJobError, pickle_load

from sslkd import config
from sslkd.errors import SslkdError
from sslkd.infra import slurm_nodes
from sslkd.infra.devices import selected_device
from sslkd.infra.launchers import SlurmConfig
from sslkd.runner.registry import has_parts, missing_parts
from sslkd.runner.stage_job import StageJob, StageRequest
from sslkd.store.artifacts import CODE_VERSION_STAMP, PACKAGE_DIR, code_version
from sslkd.store.checkpoints import CheckpointPolicy
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often results are looked for
SQUEUE_EVERY_S = 5.0  # how often the scheduler is asked for the jobs' states
RESULT_GRACE_S = 30.0  # how long a job that ran to its end may take to show its result (slow shared file systems)
REQUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# SLURM's final job states; EXITED: a local job's process is gone; GONE: a job squeue no longer knows
ENDED_STATES = {
    "EXITED",
    "GONE",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}


def stage_resources(stage: str) -> SlurmConfig:
    """The ``sslkd.slurm`` bindings in the stage's scope (``<stage>/sslkd.slurm.*`` over the defaults)."""
    with gin.config_scope(stage):
        return config.build("slurm")


def snapshot_code(destination: Path) -> Path:
    """Copy the sslkd package to ``destination/sslkd``, stamped with its code version; returns destination."""
    shutil.copytree(
        PACKAGE_DIR, destination / "sslkd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", CODE_VERSION_STAMP)
    )
    (destination / "sslkd" / CODE_VERSION_STAMP).write_text(code_version() + "\n")
    return destination


def make_executor(launcher: str, folder: Path, resources: SlurmConfig, code: Path, stage: str) -> submitit.Executor:
    """A submitit executor whose jobs import sslkd from the snapshot ``code``.

    The job's Python starts in ``code`` (``python -m`` puts its working directory first on sys.path, which
    in a repository checkout would be the work tree's sslkd); the job then changes to the submission's
    working directory (StageJob).
    """
    snapshot = shlex.quote(str(code.resolve()))
    setup = [f"cd {snapshot}", f"export PYTHONPATH={snapshot}${{PYTHONPATH:+:$PYTHONPATH}}"]
    executor: submitit.Executor
    if launcher == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=resources.max_timeouts)
        executor.update_parameters(
            timeout_min=resources.time_min,
            signal_delay_s=resources.signal_delay_s,
            gpus_per_node=resources.gpus,
            setup=setup,
        )
        return executor
    if shutil.which("sbatch") is None:
        raise SslkdError("--launcher slurm needs the SLURM client commands (sbatch, squeue) on PATH")
    executor = submitit.SlurmExecutor(folder, max_num_timeout=resources.max_timeouts)
    parameters = {
        "job_name": f"sslkd-{stage}",
        "time": resources.time_min,
        "cpus_per_task": resources.cpus,
        "array_parallelism": resources.array_parallelism,
        "signal_delay_s": resources.signal_delay_s,
        "setup": setup,
        "additional_parameters": dict(resources.sbatch_options),
    }
    if resources.partition:
        parameters["partition"] = resources.partition
    if resources.gpus:
        parameters["gpus_per_node"] = resources.gpus
    if resources.mem_gb:
        parameters["mem"] = f"{math.ceil(resources.mem_gb * 1024)}M"
    executor.update_parameters(**parameters)
    return executor


def launch(launcher: str, args: argparse.Namespace, workspace: Workspace) -> None:
    """Run the stage of the parsed command line ``args`` as ``launcher`` jobs and wait for them."""
    request = StageRequest(
        stage=args.stage,
        method=getattr(args, "method", None),
        params=args.params,
        setting=args.setting,
        config_dir=args.config_dir,
        gin_files=tuple(args.gin),
        bindings=tuple(args.bind),
        workdir=args.workdir,
        cwd=Path.cwd(),
        device=selected_device(),
        launcher_pid=os.getpid() if launcher == "local" else None,
    )
    resources = stage_resources(args.stage)
    folder = workspace.jobs / args.stage / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    code = snapshot_code(folder / "code")
    executor = make_executor(launcher, folder, resources, code, args.stage)
    interval_s = resources.checkpoint_interval_min * 60
    started = time.monotonic()
    if has_parts(args.stage):
        submit_expert_array(launcher, executor, request, resources, workspace, interval_s)
    with refused_submissions(args.stage, resources):
        job = executor.submit(StageJob(request, interval_s))
    log.info("%s: submitted %s job %s; logs in %s", args.stage, launcher, job.job_id, folder)
    wait(launcher, [job], args.stage, resources)
    log.info("%s: %s jobs done in %.0f s", args.stage, launcher, time.monotonic() - started)


def submit_expert_array(
    launcher: str,
    executor: submitit.Executor,
    request: StageRequest,
    resources: SlurmConfig,
    workspace: Workspace,
    interval_s: float,
) -> None:
    """Train the experts that have no finished part yet as an array of jobs, and wait for them."""
    missing = missing_parts(request.stage, workspace, CheckpointPolicy(workspace.job_state(request.stage), interval_s))
    if not missing:
        log.info("experts: every expert has a finished part; merging")
        return
    per_job = resources.experts_per_job
    if launcher == "local":  # no scheduler to queue them: at most array_parallelism processes
        per_job = max(per_job, math.ceil(len(missing) / resources.array_parallelism))
    chunks = [tuple(missing[start : start + per_job]) for start in range(0, len(missing), per_job)]
    with refused_submissions("experts", resources), executor.batch():
        jobs = [executor.submit(StageJob(request, interval_s, chunk)) for chunk in chunks]
    log.info(
        "experts: training the %d missing experts (%s) in %d %s jobs: %s",
        len(missing),
        _preview(missing),
        len(jobs),
        launcher,
        _preview([job.job_id for job in jobs]),
    )
    wait(launcher, jobs, "experts", resources)


@contextlib.contextmanager
def refused_submissions(stage: str, resources: SlurmConfig):
    """sbatch's refusal (an unknown partition or account, ...) as one line (submitit also prints it: muted);
    a request too big for every node of the partition (sbatch refuses too much memory) names the request
    and the largest node."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except (FailedJobError, OSError) as error:
        if isinstance(error, FailedJobError):  # sbatch's refusal (the local executor raises others)
            nodes = slurm_nodes.cluster_nodes() or []
            partitions = slurm_nodes.requested_partitions(resources)
            if too_big := slurm_nodes.unsatisfiable(stage, resources, partitions, nodes):
                raise SslkdError(too_big) from None
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise SslkdError(
            f"{stage}: the job was refused: {lines[-1] if lines else type(error).__name__} "
            "(check the sslkd.slurm bindings)"
        ) from None


def _preview(items: list) -> str:
    return ", ".join(str(item) for item in items[:8]) + (" …" if len(items) > 8 else "")


def wait(launcher: str, jobs: list[submitit.Job], stage: str, resources: SlurmConfig) -> None:
    """Block until every job has ended; raise SslkdError naming the failures (error line and log path).

    A job ends with a result file (success or the error it raised), or without one when the scheduler
    killed it (cancelled, out of memory, node failure): SLURM's job states are read with squeue, which
    works without accounting. Why a job waits is logged when it changes. A pending job that no node of
    its partition could ever hold (sslkd/infra/slurm_nodes.py) fails the stage at once; one waiting for
    busy nodes keeps waiting. Ctrl-C, SIGTERM or SIGHUP (sslkd/infra/termination.py) and such a failure
    cancel the jobs: none outlives the command.
    """
    watch = JobWatch(launcher, stage, {job.job_id: job for job in jobs}, resources)
    next_query = time.monotonic() + SQUEUE_EVERY_S
    try:
        while watch.pending:
            watch.collect_results()
            if watch.pending and time.monotonic() >= next_query:
                watch.check_queue()
                next_query = time.monotonic() + SQUEUE_EVERY_S
            if watch.pending:
                time.sleep(POLL_S)
    except (KeyboardInterrupt, SystemExit, SslkdError):
        for job in watch.pending.values():
            job.cancel(check=False)
        log.warning("%s: cancelled jobs %s", stage, ", ".join(watch.pending))
        raise
    if watch.failures:
        summary = f"{len(watch.failures)} of {len(jobs)} {stage} jobs failed; first: " if len(jobs) > 1 else f"{stage} "
        raise SslkdError(summary + watch.failures[0])


@dataclass
class JobWatch:
    """The jobs of one :func:`wait` still pending, and the failures of those that ended."""

    launcher: str
    stage: str
    pending: dict[str, submitit.Job]
    resources: SlurmConfig
    failures: list[str] = field(default_factory=list)
    superseded: dict[str, int] = field(default_factory=dict)  # job id -> mtime of a requeued attempt's error
    ended_since: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    fits_a_node: bool = False  # some node of the partition can hold the jobs: pending means waiting

    def result_stamp(self, job: submitit.Job) -> int | None:
        """The mtime of the job's result file, None without one (or with a requeued attempt's only)."""
        path = job.paths.result_pickle
        stamp = path.stat().st_mtime_ns if path.exists() else None
        return None if stamp == self.superseded.get(job.job_id) else stamp

    def collect_results(self) -> None:
        for job_id, job in list(self.pending.items()):
            if (stamp := self.result_stamp(job)) is None:
                continue
            failure = _job_failure(job)
            if failure and self.launcher == "slurm":
                # An attempt can end in an error and still be requeued (a requeue racing the attempt):
                # the error is the job's only once SLURM says the job has ended.
                state = _queue_states(self.launcher, [job]).get(job_id, ("UNKNOWN", ""))[0]
                if state in REQUEUED_STATES:
                    self.superseded[job_id] = stamp
                    log.info("%s: job %s was requeued after an error; waiting for its next attempt", self.stage, job_id)
                if state not in ENDED_STATES:
                    continue
            del self.pending[job_id]
            if failure:
                self.failures.append(failure)

    def check_queue(self) -> None:
        """Log state changes; fail the jobs the scheduler ended without a result; raise SslkdError when
        jobs pend that no node can hold."""
        now = time.monotonic()
        states = _queue_states(self.launcher, list(self.pending.values()))
        if any(state == "PENDING" for state, _ in states.values()):
            self.check_fit()
        for job_id, (state, reason) in states.items():
            status = f"{state.lower()} ({reason})" if reason else state.lower()
            if self.status.get(job_id) != status:
                log.info("%s: job %s %s", self.stage, job_id, status)
                self.status[job_id] = status
            if state not in ENDED_STATES:
                self.ended_since.pop(job_id, None)  # queued or running (again, after a requeue)
                continue
            # a job that ran to its end may need a moment before its result shows on a shared file system
            grace = RESULT_GRACE_S if self.launcher == "slurm" and state in ("COMPLETED", "FAILED") else 0.0
            job = self.pending[job_id]
            if now - self.ended_since.setdefault(job_id, now) >= grace and self.result_stamp(job) is None:
                del self.pending[job_id]
                how = "left the queue" if state == "GONE" else f"ended ({state})"
                self.failures.append(f"job {job_id} {how} without a result (log: {job.paths.stderr})")

    def check_fit(self) -> None:
        """Raise SslkdError when no node of the jobs' partition can hold their request. Decided once, at
        the first answer of sinfo (none while it cannot answer): node sizes do not change while jobs wait."""
        if self.fits_a_node or self.launcher != "slurm" or (nodes := slurm_nodes.cluster_nodes()) is None:
            return
        partitions = slurm_nodes.requested_partitions(self.resources)
        if too_big := slurm_nodes.unsatisfiable(self.stage, self.resources, partitions, nodes):
            raise SslkdError(too_big)
        self.fits_a_node = True


def _job_failure(job: submitit.Job) -> str | None:
    """None for a job that succeeded, else 'job ID failed: <its error, one line> (log: PATH)'."""
    try:
        outcome, payload = pickle_load(job.paths.result_pickle)
    except Exception as error:  # a result file cut short
        return f"job {job.job_id}: unreadable result {job.paths.result_pickle} ({type(error).__name__})"
    if outcome == "success":
        return None
    lines = [line.strip() for line in str(payload).splitlines() if line.strip()]
    message = lines[-1].removeprefix("sslkd.errors.SslkdError: ") if lines else "unknown error"
    return f"job {job.job_id} failed: {message} (log: {job.paths.stderr})"


def _queue_states(launcher: str, jobs: list[submitit.Job]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason it waits); GONE for a job the scheduler no longer knows (a pending array
    task that was cancelled leaves no record). Empty when the scheduler cannot be asked right now."""
    if launcher == "local":
        return {job.job_id: ("EXITED" if job.done() else "RUNNING", "") for job in jobs}
    query = [
        "squeue",
        "--noheader",
        "--array",
        "--states=all",
        "--format=%i %T %r",
        "--jobs",
        ",".join(job.job_id for job in jobs),
    ]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        log.debug("squeue failed: %s", result.stderr.strip())
        return {}
    rows = [line.split(maxsplit=2) + ["", ""] for line in result.stdout.splitlines() if line.strip()]
    known = {row[0]: (row[1], "" if row[2] == "None" else row[2]) for row in rows}
    return {job.job_id: known.get(job.job_id, ("GONE", "")) for job in jobs}
