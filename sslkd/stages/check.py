"""``sslkd check``: validate params.yaml before any other stage runs (the first stage of dvc.yaml).

DVC deletes a stage's outputs before it runs the stage's command, and ``dvc exp run -S`` writes
params.yaml before any stage runs. A bad value (``-S setting=nope``, an unknown key, a value of the wrong
type or range) used to be found by ``sslkd data`` after DVC had deleted ``artifacts/data``. Every stage of
the pipeline comes after this one (``data`` depends on its output), so a bad params.yaml now stops
``dvc repro`` / ``dvc exp run`` here, with one line and exit code 2, before any artifact is touched.

The check parses the setting and the params.yaml bindings strictly and builds every stage's config (and
the launcher's), so each config's own validation runs. Its output, artifacts/check/params.txt, names
the setting only: a change of any other value reruns the check, not the stages after it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sslkd import config
from sslkd.store.artifacts import write_text_atomic
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def output(workspace: Workspace) -> Path:
    return workspace.root / "artifacts" / "check" / "params.txt"


def main(workspace: Workspace, params_path: Path, config_dir: Path, setting: str | None) -> None:
    params = config.read_params(params_path)
    setting = setting or params.setting
    config.parse(config_dir, setting, [], params.bindings())
    for stage in config.STAGES:
        config.build_stage(stage)
    config.build("slurm")
    write_text_atomic(output(workspace), f"setting: {setting}\n")
    log.info("%s is valid: setting %s, sections %s", params_path, setting, ", ".join(params.sections) or "none")
