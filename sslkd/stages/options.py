"""What a stage and the layer that runs it (sslkd/runner/) tell each other: the options of ``main(workspace,
options)`` (one signature for all stages) and, for a stage whose work splits into parts, the parts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sslkd.store.checkpoints import CheckpointPolicy
from sslkd.store.workspace import Workspace


@dataclass(frozen=True)
class StageOptions:
    """method: the evaluated method (``sslkd evaluate --method``; None for other stages); checkpoints: save
    the long stages' (teacher, experts, distill) state periodically and resume from it (a launcher's jobs;
    None inline)."""

    method: str | None = None
    checkpoints: CheckpointPolicy | None = None


@dataclass(frozen=True)
class StageParts:
    """A stage whose work splits into independent parts, numbered 0, 1, ..., that a launcher may run as a job
    array before the stage's ``main`` merges them (the experts: one part per expert). A stage module declares
    its parts as ``PARTS`` (sslkd/runner/registry.py reads it). missing(workspace, checkpoints): the parts with
    no finished result yet; train(workspace, parts, checkpoints): run those parts, keeping each result where
    ``main`` finds it."""

    missing: Callable[[Workspace, CheckpointPolicy], list[int]]
    train: Callable[[Workspace, Sequence[int], CheckpointPolicy], None]
