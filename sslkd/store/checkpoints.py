"""Resumable runs: periodic, atomic checkpoints of the long stages, so a preempted or timed-out job resumes.

The library loops (``train_ssl``, ``train_expert``, ``distill``) know nothing of files: at safe points
(epoch or iteration boundaries) they hand a state dict to an ``on_checkpoint`` hook and accept one back
as ``resume``. This module decides where and when states are written.

A run's checkpoints live in a folder named by its run key, a hash of everything that determines the
result (the stage's config, the sha256 of its input files and the sslkd sources), so a rerun with other
inputs, config or code never resumes from a stale state. Inline runs do not checkpoint (``NO_CHECKPOINTS``);
jobs started by a launcher do (sslkd.runner.stage_job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sslkd.errors import SslkdError
from sslkd.store.artifacts import file_sha256, on_cpu, source_digest, torch_save_atomic

log = logging.getLogger(__name__)


def run_key(stage: str, stage_config: Any, inputs: list[Path]) -> str:
    """16 hex digits determined by the stage, its config dataclass, its input files' contents and the code."""
    digest = hashlib.sha256(stage.encode())
    digest.update(json.dumps(dataclasses.asdict(stage_config), sort_keys=True, default=str).encode())
    for path in inputs:
        if not Path(path).is_file():
            raise SslkdError(f"missing input {path}: run the stage that makes it first (or `dvc repro`)")
        digest.update(file_sha256(Path(path)).encode())
    digest.update(source_digest().encode())
    return digest.hexdigest()[:16]


@dataclass
class RunCheckpoints:
    """Named states of one run in ``folder`` (None: checkpointing off, nothing is read or written).

    interval_s: least seconds between two periodic writes of the same name (0: at every safe point).
    """

    folder: Path | None
    interval_s: float = 0.0
    _last_write: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}.pt"

    def has(self, name: str) -> bool:
        return self.enabled and self.path(name).is_file()

    def load(self, name: str) -> dict[str, Any] | None:
        """The last state saved under ``name``, or None (none saved, or checkpointing off)."""
        if not self.has(name):
            return None
        try:
            return torch.load(self.path(name), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a corrupt file
            raise SslkdError(f"cannot read checkpoint {self.path(name)} ({type(error).__name__}): delete it") from None

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Write ``state`` now, atomically (a kill mid-write keeps the previous checkpoint)."""
        if self.enabled:
            torch_save_atomic(self.path(name), on_cpu(state))  # resumable on any device
            self._last_write[name] = time.monotonic()
            log.debug("checkpoint %s", self.path(name))

    def saver(self, name: str) -> Callable[[dict[str, Any]], None] | None:
        """An ``on_checkpoint`` hook that saves under ``name`` at most every ``interval_s`` (None when off)."""
        if not self.enabled:
            return None
        self._last_write.setdefault(name, time.monotonic())

        def save_if_due(state: dict[str, Any]) -> None:
            if time.monotonic() - self._last_write[name] >= self.interval_s:
                self.save(name, state)

        return save_if_due

    def delete(self, name: str) -> None:
        if self.enabled:
            self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the run's folder once its artifact is written."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


NO_CHECKPOINTS = RunCheckpoints(None)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where a stage's runs keep their checkpoints (``root/<run key>/``) and how often they write them."""

    root: Path
    interval_s: float

    def run(self, stage: str, stage_config: Any, inputs: list[Path]) -> RunCheckpoints:
        return RunCheckpoints(self.root / run_key(stage, stage_config, inputs), self.interval_s)


def run_checkpoints(
    policy: CheckpointPolicy | None, stage: str, stage_config: Any, inputs: list[Path]
) -> RunCheckpoints:
    """The run's checkpoints under ``policy``; ``NO_CHECKPOINTS`` when there is none (inline runs)."""
    return NO_CHECKPOINTS if policy is None else policy.run(stage, stage_config, inputs)
