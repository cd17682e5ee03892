"""The job a launcher submits: the same stage main an inline run calls, made resumable.

A :class:`StageJob` replays the command line (:class:`StageRequest`) in the job: same working directory,
params, setting, gin files and bindings, so the stage writes the same files and sidecars as inline. Long
stages checkpoint under ``jobs/<stage>/state/`` and resume from there after a requeue; submitit calls
:meth:`StageJob.checkpoint` on SLURM's time-limit or preemption signal and requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import submitit

import sslkd
from sslkd import config, progress
from sslkd.infra import allocator, devices, termination
from sslkd.runner.registry import run_stage_main, run_stage_parts
from sslkd.stages.options import StageOptions
from sslkd.store.checkpoints import CheckpointPolicy
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)

RESUMABLE_STAGES = ("teacher", "experts", "distill")


@dataclass(frozen=True)
class StageRequest:
    """What ``sslkd <stage>`` was asked to do; paths as given, relative to ``cwd``."""

    stage: str
    method: str | None
    params: Path
    setting: str | None
    config_dir: Path
    gin_files: tuple[Path, ...]
    bindings: tuple[str, ...]
    workdir: Path
    cwd: Path
    device: str = "auto"  # sslkd.infra.devices: resolved on the node that runs the job
    launcher_pid: int | None = None  # a local job: the sslkd process that waits for it (the job ends with it)

    def parse_config(self) -> None:
        params = config.read_params(self.params)
        config.parse(
            self.config_dir,
            self.setting or params.setting,
            list(self.gin_files),
            params.bindings() + list(self.bindings),
        )


class StageJob(submitit.helpers.Checkpointable):
    """Runs ``request``'s stage (or, for a job of the array over a stage's parts, such as the experts, runs
    the parts ``parts``: sslkd.stages.options.StageParts).

    checkpoint_interval_s: least seconds between two checkpoints of a long stage.
    """

    def __init__(self, request: StageRequest, checkpoint_interval_s: float, parts: tuple[int, ...] | None = None):
        self.request = request
        self.checkpoint_interval_s = checkpoint_interval_s
        self.parts = parts

    def __call__(self) -> None:
        request = self.request
        progress.check_stops_with(termination.raise_if_requested)  # as sslkd.cli.main
        if request.launcher_pid is not None:  # a local job: stop with the sslkd command that launched it
            termination.handle_termination()
            termination.exit_with(request.launcher_pid)
        os.chdir(request.cwd)
        devices.select(request.device)
        allocator.keep_freed_memory()
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        logging.getLogger("submitit").propagate = False  # it has its own handler: no line twice
        log.info(
            "sslkd %s from %s (start %s)",
            request.stage,
            Path(sslkd.__file__).parent,
            int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1,
        )
        request.parse_config()
        workspace = Workspace(request.workdir)
        policy = CheckpointPolicy(workspace.job_state(request.stage), self.checkpoint_interval_s)
        if self.parts is not None:
            run_stage_parts(request.stage, workspace, self.parts, policy)
        else:
            checkpoints = policy if request.stage in RESUMABLE_STAGES else None
            run_stage_main(request.stage, workspace, StageOptions(request.method, checkpoints))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On SLURM's signal: requeue this same job; it resumes from the last checkpoint on disk.

        submitit then runs ``scontrol requeue`` as a child process, and the requeue's SIGTERM reaches the
        whole job, that child included, which then fails the attempt with an error. Ignored signals stay
        ignored across exec: ignoring SIGTERM here lets the child finish (this process exits right after).
        """
        log.warning(
            "sslkd %s: signalled (time limit or preemption): requeueing, resumes from the last checkpoint",
            self.request.stage,
        )
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return submitit.helpers.DelayedSubmission(self)
