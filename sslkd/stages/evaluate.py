"""``sslkd evaluate --method M``: pre-train a fresh encoder on M's set with the KD loss, probe it at every
label fraction and evaluation seed -> artifacts/evaluate/<method>.json.

Sets: no_pretrain (none), high_loss (the M real images ``init`` ranked highest), random (M real
images drawn afresh for every evaluation seed), both with teacher targets,
full_data (every training image) and mkdt (each distilled set, its learned targets and learned lr).
At a given evaluation seed every method starts from the same encoder init and sees the same labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sslkd import config
from sslkd.infra import tracking
from sslkd.artifacts import load_artifact, save_json_artifact
from sslkd.infra.devices import stage_device
from sslkd.datasets import InputSpace
from sslkd.errors import SslkdError
from sslkd.evaluation import pretrain_kd, probe_at_fractions
from sslkd.experts import build_student
from sslkd.kd_steps import KDSteps
from sslkd.models import ParameterLayout
from sslkd.report import summarise
from sslkd.seeding import EvaluateStream, derive_seed, generator
from sslkd.selection import random_indices
from sslkd.stage_configs import METHODS
from sslkd.stages.inputs import check_input_space, representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class PretrainingSet:
    """images [M, C, H, W] (normalised), targets [M, D], the lr to pre-train with; distill_seed for MKDT."""

    images: torch.Tensor
    targets: torch.Tensor
    lr: float
    distill_seed: int | None = None


def pretraining_sets(method: str, workspace: Workspace, images: torch.Tensor, targets: torch.Tensor,
                     baseline_lr: float, eval_seed: int, space: InputSpace) -> tuple[list[PretrainingSet | None], dict]:
    """The sets ``method`` pre-trains on at ``eval_seed`` (None: no pre-training) and their source files;
    ``images`` are in ``space``, and a distilled set must have been made in it."""
    if method == "no_pretrain":
        return [None], {}
    if method == "full_data":
        return [PretrainingSet(images, targets, baseline_lr)], {}
    if method in ("random", "high_loss"):
        high_loss = load_artifact(workspace.init_indices, "init", produced_by="init")["high_loss_indices"]
        indices = high_loss if method == "high_loss" else random_indices(len(images), len(high_loss), generator(eval_seed, EvaluateStream.RANDOM_SUBSET))
        return [PretrainingSet(images[indices], targets[indices], baseline_lr)], {"init": workspace.init_indices}
    paths = sorted(workspace.distill_dir.glob("synthetic_seed*.pt"))
    if not paths:
        raise SslkdError(f"no distilled sets in {workspace.distill_dir}: run `sslkd distill` first")
    sets = []
    for path in paths:
        synthetic = load_artifact(path, "synthetic", produced_by="distill")
        if tuple(synthetic["images"].shape[1:]) != tuple(images.shape[1:]) or synthetic["representations"].shape[1] != targets.shape[1]:
            raise SslkdError(f"{path} does not match the dataset's image shape or representation size")
        check_input_space(synthetic, space, path, "distill")
        seed = int(path.stem.removeprefix("synthetic_seed"))
        sets.append(PretrainingSet(synthetic["images"], synthetic["representations"], float(synthetic["lr"]), seed))
    return sets, {p.stem: p for p in paths}


def log_runs(method: str, runs: list[dict]) -> None:
    """Tracking: accuracy per label fraction at step = evaluation seed (several values at one step for
    several distilled sets) and its mean, std and n over all runs, under the same names for every method."""
    for run in runs:
        tracking.log_metrics({f"acc_{key}": value for key, value in run["accuracy"].items()}, run["eval_seed"])
    for key, stats in summarise({method: runs})[method].items():
        tracking.log_metrics({f"acc_{key}_{name}": value for name, value in stats.items()}, 0)


def main(workspace: Workspace, options: StageOptions) -> None:
    method = options.method
    if method not in METHODS:
        raise SslkdError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    evaluate_config = config.build("evaluate")
    device = stage_device()
    data = student_data(workspace)
    images, test_images = data.images.to(device), data.test_images.to(device)
    targets = representations(workspace, data).to(device)
    runs = []
    steps = None  # one KDSteps for every pre-training run: the step compiles once per stage
    for eval_seed in evaluate_config.seeds:
        sets, inputs = pretraining_sets(method, workspace, images, targets, evaluate_config.pretrain.lr, eval_seed, data.space)
        for pretraining_set in sets:
            student = build_student(evaluate_config.encoder, data.image_shape, targets.shape[1],
                                    derive_seed(eval_seed, EvaluateStream.ENCODER_INIT)).to(device)
            losses: list[float] = []
            if pretraining_set is not None:
                steps = steps or KDSteps(student, ParameterLayout.of(student), compile=evaluate_config.pretrain.compile,
                                         precision=evaluate_config.pretrain.precision)
                losses = pretrain_kd(student, pretraining_set.images.to(device), pretraining_set.targets.to(device),
                                     pretraining_set.lr,
                                     evaluate_config.pretrain, generator(eval_seed, EvaluateStream.PRETRAINING), steps)
                distilled = "" if pretraining_set.distill_seed is None else f"/distill_seed_{pretraining_set.distill_seed}"
                for epoch, loss in enumerate(losses, start=1):
                    tracking.log_metric(f"pretrain_loss/eval_seed_{eval_seed}{distilled}", loss, epoch)
            accuracy = probe_at_fractions(
                student, images, data.labels, test_images, data.test_labels, evaluate_config.probe,
                lambda fraction_index: generator(eval_seed, EvaluateStream.LABELLED_SUBSET, fraction_index),
            )
            log.info("%s eval seed %d%s: %s", method, eval_seed,
                     f" distill seed {pretraining_set.distill_seed}" if pretraining_set and pretraining_set.distill_seed is not None else "",
                     ", ".join(f"{k}: {v:.1f}%" for k, v in accuracy.items()))
            runs.append({
                "eval_seed": eval_seed,
                "distill_seed": pretraining_set.distill_seed if pretraining_set else None,
                "set_size": len(pretraining_set.images) if pretraining_set else 0,
                "pretrain_lr": pretraining_set.lr if pretraining_set else None,
                "pretrain_losses": losses,
                "accuracy": accuracy,
            })
    save_json_artifact(
        workspace.evaluation(method),
        "evaluation",
        {"method": method, "runs": runs},
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations, **inputs},
    )
    log_runs(method, runs)
    tracking.log_artifact(workspace.evaluation(method))
