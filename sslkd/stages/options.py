"""What a stage's ``main(workspace, options)`` is asked to do besides its config (one signature for all)."""

from __future__ import annotations

from dataclasses import dataclass

from sslkd.store.checkpoints import CheckpointPolicy


@dataclass(frozen=True)
class StageOptions:
    """method: the evaluated method (``sslkd evaluate --method``; None for other stages); checkpoints: save
    the long stages' (teacher, experts, distill) state periodically and resume from it (a launcher's jobs;
    None inline)."""

    method: str | None = None
    checkpoints: CheckpointPolicy | None = None
