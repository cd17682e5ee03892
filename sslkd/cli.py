"""``sslkd <stage>``: the command-line entry point of every pipeline stage.

Each stage reads the setting named in params.yaml (``--setting`` overrides it), the params.yaml sections
as gin bindings, extra ``--gin`` files and ``--bind`` bindings (applied last), runs, and writes its
artifacts under the workspace; it is recorded as one MLflow run (sslkd/infra/tracking.py).
``sslkd compare`` prints the methods' accuracies from the tracking store; ``sslkd check`` validates
params.yaml (dvc.yaml's first stage, sslkd/stages/check.py). Errors in the user's input
end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from sslkd import progress
from sslkd.config import STAGES
from sslkd.errors import SslkdError
from sslkd.infra import allocator, devices, termination
from sslkd.infra.launchers import LAUNCHERS, chosen_launcher

log = logging.getLogger("sslkd")
METHOD_STAGES = ("evaluate", "transfer")  # run once per method: `sslkd <stage> --method M`, DVC stage <stage>@M

STAGE_HELP = {
    "data": "read, split and normalise the dataset",
    "teacher": "train the SSL teacher (Barlow Twins) or import a checkpoint",
    "represent": "teacher representations of the training images",
    "experts": "KD expert trajectories",
    "init": "high-loss (and random) initial subsets",
    "distill": "trajectory matching: learn the synthetic set",
    "krr_st": "KRR-ST baseline: learn a synthetic set by kernel ridge regression onto teacher representations",
    "mtt_ssl": "MTT-SSL baseline: SSL experts, then trajectory matching on them",
    "evaluate": "KD pre-training + linear probe (and fine-tuning) of one method's set",
    "transfer": "probe (and fine-tune) one method's pre-trained encoders on the downstream sets",
    "report": "summary tables and plots of all evaluations",
    "variance": "measure SSL vs KD gradient variance, run dispersion and matchability",
}


def _add_study_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params.yaml: the setting and the DVC-tracked values (default: %(default)s)",
    )
    command.add_argument("--setting", help="gin/settings/<SETTING>.gin instead of params.yaml's setting")
    command.add_argument("--workdir", type=Path, default=Path("."), help="workspace root (default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="sslkd", description=__doc__.splitlines()[0])
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = root.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage in STAGES:
        command = commands.add_parser(stage, help=STAGE_HELP[stage])
        _add_study_options(command)
        command.add_argument("--config-dir", type=Path, default=Path("gin"), help="gin folder (default: %(default)s)")
        command.add_argument("--gin", type=Path, action="append", default=[], help="extra gin file (repeatable)")
        command.add_argument(
            "--bind",
            action="append",
            default=[],
            help="extra gin binding, e.g. 'sslkd.distill.iterations = 10' (repeatable)",
        )
        command.add_argument(
            "--no-tracking", action="store_true", help="record no MLflow run (same as SSLKD_TRACKING=off)"
        )
        command.add_argument(
            "--launcher",
            choices=LAUNCHERS,
            help="inline (this process), local (submitit job) or slurm (SLURM job); "
            "default: $SSLKD_LAUNCHER, else inline",
        )
        command.add_argument(
            "--device", help="cpu, cuda, cuda:N or auto (CUDA when there is a GPU); default: $SSLKD_DEVICE, else auto"
        )
        if stage in METHOD_STAGES:
            command.add_argument(
                "--method", required=True, help="no_pretrain | random | high_loss | full_data | mkdt | krr_st | mtt_ssl"
            )
    check = commands.add_parser("check", help="validate params.yaml and the setting (dvc.yaml's first stage)")
    _add_study_options(check)
    check.add_argument("--config-dir", type=Path, default=Path("gin"), help="gin folder (default: %(default)s)")
    compare = commands.add_parser("compare", help="the methods' accuracies, read back from the MLflow store")
    _add_study_options(compare)
    compare.add_argument("--experiment", help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME or sslkd-<setting>)")
    compare.add_argument("--pipeline", help="the runs' sslkd.pipeline tag (default: that of the latest evaluate run)")
    return root


def _run_tags(args: argparse.Namespace, setting: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(identity, other tags) of the stage's MLflow run; the stage's root config must be built."""
    from sslkd import config
    from sslkd.infra import tracking
    from sslkd.store.artifacts import code_version, git_commit

    version = code_version()
    identity = {
        "sslkd.pipeline": tracking.pipeline_id(version, config.parsed_config()),
        "sslkd.stage": name,
        "sslkd.params_hash": tracking.config_hash(config.operative_config()),
    }
    tags = {
        "sslkd.setting": setting,
        "sslkd.code_version": version,
        "sslkd.workspace": str(Path(args.workdir).resolve()),
    }
    if args.stage in METHOD_STAGES:
        tags["sslkd.method"] = args.method
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return identity, tags


def run_stage(args: argparse.Namespace) -> None:
    from sslkd import config
    from sslkd.infra import tracking
    from sslkd.runner.registry import run_stage_main
    from sslkd.stages.options import StageOptions
    from sslkd.store.workspace import Workspace

    params = config.read_params(args.params)
    setting = args.setting or params.setting
    devices.select(args.device)  # where the stage (or its launcher's job) computes
    allocator.keep_freed_memory()  # (a launcher's job sets it again in its own process)
    destination = None if args.no_tracking or not tracking.enabled() else tracking.target(args.workdir, setting)
    if destination is not None:
        tracking.check_reachable(destination.uri)
    config.parse(args.config_dir, setting, args.gin, params.bindings() + args.bind)
    workspace = Workspace(args.workdir)
    name = f"{args.stage}@{args.method}" if args.stage in METHOD_STAGES else args.stage  # dvc.yaml's stage name
    identity: dict[str, str] = {}
    tags: dict[str, str] = {}
    if destination is not None:
        config.build_stage(args.stage)  # the stage's operative config (the run's params) is then known
        identity, tags = _run_tags(args, setting, name)
    log.info("sslkd %s (setting %s)", name, setting)
    launcher = chosen_launcher(args.launcher)
    with tracking.stage_run(destination, name, identity, tags, config.operative_config):
        if launcher != "inline":
            from sslkd.runner.launch import launch

            launch(launcher, args, workspace)
        else:
            run_stage_main(args.stage, workspace, StageOptions(method=getattr(args, "method", None)))


def run_check(args: argparse.Namespace) -> None:
    from sslkd.stages import check
    from sslkd.store.workspace import Workspace

    check.main(Workspace(args.workdir), args.params, args.config_dir, args.setting)


def run_compare(args: argparse.Namespace) -> None:
    from sslkd import config
    from sslkd.evaluation.report import markdown_table
    from sslkd.infra import tracking

    setting = args.setting or (None if args.experiment else config.read_params(args.params).setting)
    destination = tracking.target(args.workdir, setting, args.experiment)
    tracking.check_reachable(destination.uri)
    comparison = tracking.compare(destination, args.pipeline)
    ui = destination.uri.rstrip("/") if destination.uri.startswith("http") else "http://127.0.0.1:5000"
    tables = "".join(
        f"\n{title}, accuracy (%):\n\n{markdown_table(table, {})}" for title, table in comparison.tables.items()
    )
    sys.stdout.write(
        f"experiment {comparison.experiment}, pipeline {comparison.pipeline}: linear-probe accuracy (%), "
        f"mean ± std (n)\n\n{markdown_table(comparison.summary, {})}{tables}\n"
        f"side by side in the MLflow UI: {ui}/{comparison.ui_route()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """The ``sslkd`` command (``argv`` None: the process's own command line, and the process ends with
    its parent, sslkd/infra/termination.py). SIGTERM and SIGHUP end the stage with one line, nothing half-written."""
    if argv is None:
        termination.die_with_parent()
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    previous = {signum: signal.getsignal(signum) for signum in termination.SIGNALS}
    termination.handle_termination()
    progress.check_stops_with(termination.raise_if_requested)  # every long loop's step raises a stop request
    try:
        {"compare": run_compare, "check": run_check}.get(args.stage, run_stage)(args)
    except SslkdError as error:
        print(f"sslkd {args.stage}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sslkd {args.stage}: interrupted", file=sys.stderr)
        return 130
    except termination.Terminated as stop:
        print(
            f"sslkd {args.stage}: stopped by {stop.name} before it finished (nothing half-written; rerun it)",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        termination.clear_request()
        if threading.current_thread() is threading.main_thread():
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
