"""Which launcher runs a stage, and the resources of its jobs (gin: ``sslkd.slurm``, per-stage scopes).

``inline`` runs the stage in the CLI's process (the default); ``local`` runs it as a submitit job on this
machine; ``slurm`` submits it to a SLURM cluster. The launcher changes no result, so it is chosen outside
every file DVC tracks: ``sslkd <stage> --launcher slurm``, or ``SSLKD_LAUNCHER=slurm dvc repro``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sslkd.errors import SslkdError

LAUNCHERS = ("inline", "local", "slurm")
LAUNCHER_ENV = "SSLKD_LAUNCHER"


def chosen_launcher(option: str | None) -> str:
    """The ``--launcher`` option, else $SSLKD_LAUNCHER, else ``inline``."""
    launcher = option or os.environ.get(LAUNCHER_ENV, "").strip() or "inline"
    if launcher not in LAUNCHERS:
        raise SslkdError(f"{LAUNCHER_ENV}={launcher!r} is not a launcher; choose one of {', '.join(LAUNCHERS)}")
    return launcher


@dataclass(frozen=True)
class SlurmConfig:
    """Resources of one stage's jobs; gin/launch/slurm.gin binds defaults and per-stage values
    (``teacher/sslkd.slurm.time_min = 240``).

    partition: '' for the cluster's default; time_min: the job's time limit (a job that reaches it is
    requeued and resumes from its checkpoint, up to max_timeouts times); cpus: CPUs per task; gpus: GPUs
    per node; mem_gb: memory per node (0: the cluster's default); array_parallelism: experts jobs running
    at once; experts_per_job: experts trained by one array job; signal_delay_s: how long before the time
    limit SLURM signals the job to checkpoint and requeue; checkpoint_interval_min: least minutes between
    two checkpoints of a long stage (0: every epoch or iteration); sbatch_options: any other sbatch
    option, e.g. {'account': 'proj', 'qos': 'normal', 'constraint': 'a100'}. The local launcher uses
    time_min, max_timeouts, signal_delay_s, checkpoint_interval_min, gpus and array_parallelism.
    """

    partition: str
    time_min: int
    cpus: int
    gpus: int
    mem_gb: float
    array_parallelism: int
    experts_per_job: int
    max_timeouts: int
    signal_delay_s: int
    checkpoint_interval_min: float
    sbatch_options: dict

    def __post_init__(self) -> None:
        if min(self.time_min, self.cpus, self.array_parallelism, self.experts_per_job) < 1:
            raise SslkdError("slurm.time_min, cpus, array_parallelism and experts_per_job must be >= 1")
        if min(self.gpus, self.mem_gb, self.max_timeouts, self.signal_delay_s, self.checkpoint_interval_min) < 0:
            raise SslkdError(
                "slurm.gpus, mem_gb, max_timeouts, signal_delay_s and checkpoint_interval_min must be >= 0"
            )
        if not isinstance(self.sbatch_options, dict):
            raise SslkdError(f"slurm.sbatch_options must be a dict of sbatch options, got {self.sbatch_options!r}")
