"""The stage registry: the one place that maps a stage's name to its module, its ``main(workspace, options)``
and, where the stage declares them, its parts (sslkd.stages.options.StageParts).

Stage modules are imported on first use, by name (importing them all would import torch, sklearn and more
for every command), so an inline run (sslkd/cli.py) and a launcher's job (sslkd/runner/stage_job.py)
dispatch the same way, and the launcher learns from the stage what parts it has without naming it
(sslkd/runner/launch.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Callable

from sslkd.config import STAGES
from sslkd.provenance import stage_source_files
from sslkd.stages.options import StageOptions, StageParts
from sslkd.store import running_stage
from sslkd.store.checkpoints import CheckpointPolicy
from sslkd.store.workspace import Workspace

StageMain = Callable[[Workspace, StageOptions], None]
STAGE_MODULES = {stage: f"sslkd.stages.{stage}" for stage in STAGES}


def stage_module(stage: str) -> ModuleType:
    """The module of stage ``stage`` (a name of sslkd.config.STAGES)."""
    return importlib.import_module(STAGE_MODULES[stage])


def stage_main(stage: str) -> StageMain:
    """The ``main`` of stage ``stage``."""
    return stage_module(stage).main


def stage_parts(stage: str) -> StageParts | None:
    """The parts stage ``stage`` declares (its module's ``PARTS``), None for a stage that is one piece."""
    return getattr(stage_module(stage), "PARTS", None)


def has_parts(stage: str) -> bool:
    return stage_parts(stage) is not None


def _declared_parts(stage: str) -> StageParts:
    parts = stage_parts(stage)
    if parts is None:
        raise ValueError(f"stage {stage} declares no parts")
    return parts


def missing_parts(stage: str, workspace: Workspace, checkpoints: CheckpointPolicy) -> list[int]:
    """The parts of stage ``stage`` that have no finished result yet (what a job array still has to run)."""
    return _declared_parts(stage).missing(workspace, checkpoints)


def run_stage_main(stage: str, workspace: Workspace, options: StageOptions) -> None:
    """Run stage ``stage``; its sidecars record its own code version (sslkd/provenance.py)."""
    running_stage.set_sources(stage_source_files(stage))
    try:
        stage_main(stage)(workspace, options)
    finally:
        running_stage.set_sources(None)


def run_stage_parts(stage: str, workspace: Workspace, parts: Sequence[int], checkpoints: CheckpointPolicy) -> None:
    """Run ``parts`` of stage ``stage`` (one job of a launcher's array), recording the stage's code version
    as its ``main`` does."""
    running_stage.set_sources(stage_source_files(stage))
    try:
        _declared_parts(stage).train(workspace, parts, checkpoints)
    finally:
        running_stage.set_sources(None)
