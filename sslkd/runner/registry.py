"""The stage registry: the one place that maps a stage's name to its ``main(workspace, options)``.

Stage modules are imported on first use (importing them all would import torch, sklearn and more for
every command), so an inline run (sslkd/cli.py) and a launcher's job (sslkd/infra/stage_job.py)
dispatch the same way.
"""

from __future__ import annotations

import importlib
from typing import Callable

from sslkd.config import STAGES
from sslkd.provenance import set_running_stage
from sslkd.stages.options import StageOptions
from sslkd.store.workspace import Workspace

StageMain = Callable[[Workspace, StageOptions], None]
STAGE_MODULES = {stage: f"sslkd.stages.{stage}" for stage in STAGES}


def stage_main(stage: str) -> StageMain:
    """The ``main`` of stage ``stage`` (a name of sslkd.config.STAGES)."""
    return importlib.import_module(STAGE_MODULES[stage]).main


def run_stage_main(stage: str, workspace: Workspace, options: StageOptions) -> None:
    """Run stage ``stage``; its sidecars record its own code version (sslkd/provenance.py)."""
    set_running_stage(stage)
    try:
        stage_main(stage)(workspace, options)
    finally:
        set_running_stage(None)
