"""``sslkd <stage>``: the command-line entry point of every pipeline stage.

Each stage reads the setting named in params.yaml (``--setting`` overrides it), the params.yaml sections
as gin bindings, extra ``--gin`` files and ``--bind`` bindings (applied last), runs, and writes its
artifacts under the workspace. Errors in the user's input end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from sslkd.config import STAGES
from sslkd.errors import SslkdError
from sslkd.launchers import LAUNCHERS, chosen_launcher

log = logging.getLogger("sslkd")

STAGE_HELP = {
    "data": "read, split and normalise the dataset",
    "teacher": "train the SSL teacher (Barlow Twins) or import a checkpoint",
    "represent": "teacher representations of the training images",
    "experts": "KD expert trajectories",
    "init": "high-loss (and random) initial subsets",
    "distill": "trajectory matching: learn the synthetic set",
    "evaluate": "KD pre-training + linear probe of one method's set",
    "report": "summary tables and plots of all evaluations",
    "variance": "measure SSL vs KD gradient variance, run dispersion and matchability",
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="sslkd", description=__doc__.splitlines()[0])
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = root.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage in STAGES:
        command = commands.add_parser(stage, help=STAGE_HELP[stage])
        command.add_argument("--params", type=Path, default=Path("params.yaml"),
                             help="params.yaml: the setting and the DVC-tracked values (default: %(default)s)")
        command.add_argument("--setting", help="gin/settings/<SETTING>.gin instead of params.yaml's setting")
        command.add_argument("--config-dir", type=Path, default=Path("gin"), help="gin folder (default: %(default)s)")
        command.add_argument("--gin", type=Path, action="append", default=[], help="extra gin file (repeatable)")
        command.add_argument("--bind", action="append", default=[],
                             help="extra gin binding, e.g. 'sslkd.distill.iterations = 10' (repeatable)")
        command.add_argument("--workdir", type=Path, default=Path("."), help="workspace root (default: %(default)s)")
        command.add_argument("--launcher", choices=LAUNCHERS,
                             help="inline (this process), local (submitit job) or slurm (SLURM job); "
                                  "default: $SSLKD_LAUNCHER, else inline")
        if stage == "evaluate":
            command.add_argument("--method", required=True,
                                 help="no_pretrain | random | high_loss | full_data | mkdt")
    return root


def run_stage(args: argparse.Namespace) -> None:
    from sslkd import config
    from sslkd.workspace import Workspace

    params = config.read_params(args.params)
    setting = args.setting or params.setting
    config.parse(args.config_dir, setting, args.gin, params.bindings() + args.bind)
    module = importlib.import_module(f"sslkd.stages.{args.stage}")
    workspace = Workspace(args.workdir)
    log.info("sslkd %s (setting %s)", args.stage, setting)
    launcher = chosen_launcher(args.launcher)
    if launcher != "inline":
        from sslkd.launch import launch

        launch(launcher, args, workspace)
    elif args.stage == "evaluate":
        module.main(workspace, args.method)
    else:
        module.main(workspace)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        run_stage(args)
    except SslkdError as error:
        print(f"sslkd {args.stage}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sslkd {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
