"""``sslkd evaluate --method M``: pre-train a fresh encoder on M's set with the KD loss, probe it at every
label fraction, evaluation seed and pre-training horizon -> artifacts/evaluate/<method>.json.

The probe's labels are a fraction of every training image that is not held out (the data stage's pool),
not only of the distillation subset; it is scored on the held-out (or given) test split. Horizons
(evaluation.HORIZONS): 'paper' pre-trains pretrain.epochs passes, 'equal_steps' at least pretrain.min_steps
SGD steps; a set whose two horizons give the same number of passes is pre-trained once.

Sets: no_pretrain (none), high_loss (the M real images ``init`` ranked highest), random (M real
images drawn afresh for every evaluation seed), both with teacher targets,
full_data (every training image) and mkdt (each distilled set, its learned targets and learned lr);
the baselines krr_st (each KRR-ST set, its learned targets, KD pre-training at the baselines' lr) and
mtt_ssl (each MTT-SSL set's images, pre-trained on with the SSL objective ``evaluate.ssl`` at that lr).
At a given evaluation seed every method starts from the same encoder init and sees the same labels.

With 'fine_tune' in evaluate.protocols, each pre-trained encoder is also fine-tuned (sslkd/fine_tune.py) at
every label fraction, with the probe's labels; a run's "fine_tune" holds its accuracies. Every pre-trained
encoder (state dict per evaluation seed, distilled set and horizon) goes to artifacts/encoders/<method>.pt,
which ``sslkd transfer`` evaluates on the downstream sets without pre-training again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from sslkd import config
from sslkd.infra import tracking
from sslkd.store.artifacts import load_artifact, save_artifact, save_json_artifact
from sslkd.infra.devices import stage_device
from sslkd.data.datasets import InputSpace
from sslkd.errors import SslkdError
from sslkd.evaluation.probe import pretrain_kd
from sslkd.methods.experts import build_student
from sslkd.evaluation.ssl_pretraining import pretrain_ssl
from sslkd.evaluation.fine_tune import protocol_accuracies
from sslkd.methods.kd_steps import KDSteps
from sslkd.models import ConvNet, ParameterLayout
from sslkd.evaluation.report import protocol_runs, summarise
from sslkd.seeding import EvaluateStream, derive_seed, generator
from sslkd.methods.selection import random_indices
from sslkd.stage_configs import METHODS
from sslkd.evaluation.evaluate_config import EvaluateConfig
from sslkd.data.training_data import TrainingData
from sslkd.stages.inputs import check_input_space, representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class PretrainingSet:
    """images [M, C, H, W] (normalised), targets [M, D], the lr to pre-train with; distill_seed for a
    distilled set; objective: kd (regress the targets) or ssl (``evaluate.ssl``, the targets unused);
    matching_loss_final: an MTT-SSL set's final matching loss, reported."""

    images: torch.Tensor
    targets: torch.Tensor
    lr: float
    distill_seed: int | None = None
    objective: str = "kd"
    matching_loss_final: float | None = None


# The distilled methods: the stage that writes their sets (sslkd <stage>; Workspace.method_dir)
DISTILLED = {"mkdt": "distill", "krr_st": "krr_st", "mtt_ssl": "mtt_ssl"}


def pretraining_sets(
    method: str,
    workspace: Workspace,
    images: torch.Tensor,
    targets: torch.Tensor,
    baseline_lr: float,
    eval_seed: int,
    space: InputSpace,
) -> tuple[list[PretrainingSet | None], dict]:
    """The sets ``method`` pre-trains on at ``eval_seed`` (None: no pre-training) and their source files;
    ``images`` are in ``space``, and a distilled set must have been made in it."""
    if method == "no_pretrain":
        return [None], {}
    if method == "full_data":
        return [PretrainingSet(images, targets, baseline_lr)], {}
    if method in ("random", "high_loss"):
        high_loss = load_artifact(workspace.init_indices, "init", produced_by="init")["high_loss_indices"]
        indices = (
            high_loss
            if method == "high_loss"
            else random_indices(len(images), len(high_loss), generator(eval_seed, EvaluateStream.RANDOM_SUBSET))
        )
        return [PretrainingSet(images[indices], targets[indices], baseline_lr)], {"init": workspace.init_indices}
    stage = DISTILLED[method]
    paths = sorted(workspace.method_dir(method).glob("synthetic_seed*.pt"))
    if not paths:
        raise SslkdError(f"no distilled sets in {workspace.method_dir(method)}: run `sslkd {stage}` first")
    sets: list[PretrainingSet | None] = []
    for path in paths:
        synthetic = load_artifact(path, "synthetic", produced_by=stage)
        if (
            tuple(synthetic["images"].shape[1:]) != tuple(images.shape[1:])
            or synthetic["representations"].shape[1] != targets.shape[1]
        ):
            raise SslkdError(f"{path} does not match the dataset's image shape or representation size")
        check_input_space(synthetic, space, path, stage)
        seed = int(path.stem.removeprefix("synthetic_seed"))
        lr = float(synthetic["lr"]) if method == "mkdt" else baseline_lr
        objective = "ssl" if method == "mtt_ssl" else "kd"
        final = float(synthetic["matching_loss_final"]) if method == "mtt_ssl" else None
        sets.append(PretrainingSet(synthetic["images"], synthetic["representations"], lr, seed, objective, final))
    return sets, {p.stem: p for p in paths}


def log_runs(method: str, runs: list[dict], horizons: tuple[str, ...], metric: str = "acc") -> None:
    """Tracking: accuracy per label fraction at step = evaluation seed (several values at one step for
    several distilled sets) and its mean, std and n over all runs, under the same names for every method;
    the first (headline) horizon as ``<metric>_<fraction>``, the others as ``<metric>_<horizon>_<fraction>``
    (metric: ``acc`` for the linear probe, ``ft_acc`` for fine-tuning)."""
    for horizon in horizons:
        prefix = metric if horizon == horizons[0] else f"{metric}_{horizon}"
        at_horizon = [run for run in runs if run["horizon"] == horizon]
        for run in at_horizon:
            tracking.log_metrics({f"{prefix}_{key}": value for key, value in run["accuracy"].items()}, run["eval_seed"])
        for key, stats in summarise({method: at_horizon})[method].items():
            tracking.log_metrics({f"{prefix}_{key}_{name}": value for name, value in stats.items()}, 0)


def pretrain(
    student: ConvNet,
    pretraining_set: PretrainingSet | None,
    eval_seed: int,
    horizon: str,
    data: TrainingData,
    evaluate_config: EvaluateConfig,
    device: torch.device,
    steps: KDSteps | None,
) -> tuple[list[float], KDSteps | None]:
    """Pre-train ``student`` in place on one set at one horizon (none: no pre-training), by KD regression
    onto its targets or, for an SSL set (MTT-SSL's), with the SSL objective; returns the loss per epoch and
    the KD steps (built on first use, shared by the stage's runs)."""
    pretrain_config = evaluate_config.pretrain.at_horizon(horizon)
    losses: list[float] = []
    if pretraining_set is not None and pretraining_set.objective == "ssl":
        if evaluate_config.ssl is None:
            raise SslkdError("evaluating an SSL-pre-trained set needs sslkd.evaluate.ssl (the SSL objective)")
        losses = pretrain_ssl(
            student,
            pretraining_set.images.to(device),
            pretraining_set.lr,
            pretrain_config,
            evaluate_config.ssl,
            generator(eval_seed, EvaluateStream.SSL_PRETRAINING),
            data.space,
        )
    elif pretraining_set is not None:
        steps = steps or KDSteps(
            student, ParameterLayout.of(student), compile=pretrain_config.compile, precision=pretrain_config.precision
        )
        losses = pretrain_kd(
            student,
            pretraining_set.images.to(device),
            pretraining_set.targets.to(device),
            pretraining_set.lr,
            pretrain_config,
            generator(eval_seed, EvaluateStream.PRETRAINING),
            steps,
        )
    return losses, steps


def evaluate_set(
    pretraining_set: PretrainingSet | None,
    eval_seed: int,
    horizon: str,
    data: TrainingData,
    pool: torch.Tensor,
    out_dim: int,
    evaluate_config: EvaluateConfig,
    device: torch.device,
    steps: KDSteps | None,
) -> tuple[dict[str, Any], KDSteps | None, torch.nn.Module]:
    """Pre-train a fresh encoder on one set at one horizon, probe (and fine-tune) it; returns the run's
    record, the KD steps and the pre-trained encoder."""
    student = build_student(
        evaluate_config.encoder, data.image_shape, out_dim, derive_seed(eval_seed, EvaluateStream.ENCODER_INIT)
    ).to(device)
    losses, steps = pretrain(student, pretraining_set, eval_seed, horizon, data, evaluate_config, device, steps)
    if pretraining_set is not None:
        distilled = "" if pretraining_set.distill_seed is None else f"/distill_seed_{pretraining_set.distill_seed}"
        for epoch, loss in enumerate(losses, start=1):
            tracking.log_metric(f"pretrain_loss/{horizon}/eval_seed_{eval_seed}{distilled}", loss, epoch)

    results = protocol_accuracies(
        student,
        pool,
        data,
        data.test_images.to(device),
        evaluate_config,
        lambda fraction_index: generator(eval_seed, EvaluateStream.LABELLED_SUBSET, fraction_index),
        lambda fraction_index: generator(eval_seed, EvaluateStream.FINE_TUNING, fraction_index),
    )
    record = {
        "eval_seed": eval_seed,
        "horizon": horizon,
        "distill_seed": pretraining_set.distill_seed if pretraining_set else None,
        "set_size": len(pretraining_set.images) if pretraining_set else 0,
        "pretrain_lr": pretraining_set.lr if pretraining_set else None,
        "pretrain_epochs": len(losses),
        "pretrain_losses": losses,
        **results,
        **(
            {"matching_loss_final": pretraining_set.matching_loss_final}
            if pretraining_set and pretraining_set.matching_loss_final is not None
            else {}
        ),
    }
    return record, steps, student


def evaluate_at_horizons(
    method: str,
    pretraining_set: PretrainingSet | None,
    eval_seed: int,
    data: TrainingData,
    pool: torch.Tensor,
    out_dim: int,
    evaluate_config: EvaluateConfig,
    device: torch.device,
    steps: KDSteps | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], KDSteps | None]:
    """One set at every horizon (horizons whose pre-training coincides run once): the runs, the pre-trained
    encoders (one per horizon) and the KD steps."""
    runs: list[dict[str, Any]] = []
    encoders: list[dict[str, Any]] = []
    done: dict[int, tuple[dict[str, Any], dict]] = {}  # epochs -> (run, encoder state)
    for horizon in evaluate_config.horizons:
        set_size = len(pretraining_set.images) if pretraining_set else 0
        epochs = evaluate_config.pretrain.at_horizon(horizon).epochs_for(set_size)
        if epochs in done:
            run, state = {**done[epochs][0], "horizon": horizon}, done[epochs][1]
        else:
            run, steps, student = evaluate_set(
                pretraining_set, eval_seed, horizon, data, pool, out_dim, evaluate_config, device, steps
            )
            state = {name: value.detach().cpu().clone() for name, value in student.state_dict().items()}
            done[epochs] = run, state
        encoders.append(
            {"eval_seed": eval_seed, "distill_seed": run["distill_seed"], "horizon": horizon, "state_dict": state}
        )
        log.info(
            "%s eval seed %d%s, %s horizon (%d epochs): %s",
            method,
            eval_seed,
            f" distill seed {run['distill_seed']}" if run["distill_seed"] is not None else "",
            horizon,
            epochs,
            ", ".join(f"{k}: {v:.1f}%" for k, v in run["accuracy"].items()),
        )
        runs.append(run)
    return runs, encoders, steps


def main(workspace: Workspace, options: StageOptions) -> None:
    method = options.method
    if method not in METHODS:
        raise SslkdError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    evaluate_config = config.build("evaluate")
    device = stage_device()
    data = student_data(workspace)
    images, pool = data.images.to(device), data.pool_images().to(device)
    targets = representations(workspace, data).to(device)
    runs: list[dict[str, Any]] = []
    encoders: list[dict[str, Any]] = []  # the pre-trained encoders, one per run: what `sslkd transfer` evaluates
    steps = None  # one KDSteps for every pre-training run: the step compiles once per stage
    for eval_seed in evaluate_config.seeds:
        sets, inputs = pretraining_sets(
            method, workspace, images, targets, evaluate_config.pretrain.lr, eval_seed, data.space
        )
        for pretraining_set in sets:
            set_runs, set_encoders, steps = evaluate_at_horizons(
                method, pretraining_set, eval_seed, data, pool, targets.shape[1], evaluate_config, device, steps
            )
            runs += set_runs
            encoders += set_encoders
    save_json_artifact(
        workspace.evaluation(method),
        "evaluation",
        {"method": method, "horizons": list(evaluate_config.horizons), "runs": runs},
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations, **inputs},
    )
    save_artifact(
        workspace.encoders(method),
        "encoders",
        {
            "method": method,
            "encoder": dataclasses.asdict(evaluate_config.encoder),
            "image_shape": list(data.image_shape),
            "out_dim": int(targets.shape[1]),
            "input_space": data.space.name,
            "horizons": list(evaluate_config.horizons),
            "encoders": encoders,
        },
        config=config.operative_config(),
        inputs={"evaluation": workspace.evaluation(method)},
    )
    log_runs(method, runs, evaluate_config.horizons)
    if evaluate_config.fine_tunes:
        log_runs(method, protocol_runs(runs, "fine_tune"), evaluate_config.horizons, metric="ft_acc")
    tracking.log_artifact(workspace.evaluation(method))
