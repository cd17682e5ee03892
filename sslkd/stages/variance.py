"""``sslkd variance``: the paper's variance claim measured on the configured data, teacher and student ->
results/variance.json and three plots (gradient variance vs batch size, dispersion vs epoch, matching
loss vs iteration).

From one student initialisation: relative minibatch gradient variance of the KD loss and of each SSL
loss; parameter dispersion across independently seeded KD and SSL runs from that init; and the
trajectory-matching loss when distilling from KD experts versus SSL experts ("MTT with SSL").
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from sslkd import config
from sslkd.data.training_data import TrainingData
from sslkd.errors import SslkdError
from sslkd.evaluation.plots import pyplot
from sslkd.infra import tracking
from sslkd.methods.experts import build_student
from sslkd.methods.selection import random_indices
from sslkd.methods.variance import (
    GradientVariance,
    VarianceConfig,
    matching_losses,
    measure_gradient_variance,
    parameter_dispersion,
    relative_dispersion,
    tail_mean,
    train_runs,
)
from sslkd.models import ConvNet
from sslkd.seeding import VarianceStream, derive_seed, generator
from sslkd.stages.inputs import representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import atomic_write, save_json_artifact
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)

PLOTS = ("variance_vs_batch_size.png", "dispersion_vs_epoch.png", "matching_loss_vs_iteration.png")


@contextmanager
def stopwatch(seconds: dict, part: str) -> Iterator[None]:
    """Record the wall and CPU seconds the block takes under seconds[part]."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    seconds[part] = {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}


def main(workspace: Workspace, options: StageOptions) -> None:
    variance_config = config.build("variance")
    data = student_data(workspace)
    targets = representations(workspace, data)
    if variance_config.measured_batch_sizes[-1] > len(data.images):
        raise SslkdError(
            f"variance batch sizes go up to {variance_config.measured_batch_sizes[-1]}, "
            f"the training set has {len(data.images)} images: lower variance.batch_sizes"
        )
    seed = variance_config.seed
    seconds: dict[str, dict[str, float]] = {}
    runs: dict[str, dict] = {}
    matching: dict[str, dict] = {}

    def make_student(init_seed: int) -> ConvNet:
        return build_student(variance_config.experts.student, data.image_shape, targets.shape[1], init_seed)

    init_seed = derive_seed(seed, VarianceStream.STUDENT_INIT)
    with stopwatch(seconds, "gradient_variance"):
        gradients = measure_gradient_variance(
            make_student(init_seed),
            data.images,
            targets,
            data.space,
            variance_config,
            generator(seed, VarianceStream.GRADIENT_BATCHES),
        )
    start_indices = random_indices(
        len(data.images), variance_config.init.size, generator(seed, VarianceStream.START_SUBSET)
    )
    for kind, objective in {"kd": "kd", "ssl": variance_config.ssl_objectives[0]}.items():
        with stopwatch(seconds, f"dispersion_{kind}"):
            runs[kind] = dispersion_runs(variance_config, objective, make_student, init_seed, data, targets)
        with stopwatch(seconds, f"matching_{kind}"):
            start = (data.images[start_indices], targets[start_indices])
            matching[kind] = matching_run(variance_config, objective, make_student, init_seed, data, targets, start)
        log.info(
            "%s (%s): relative dispersion per epoch %s; matching loss %.4f -> %.4f",
            kind,
            objective,
            ", ".join(f"{v:.4f}" for v in runs[kind]["relative"]),
            matching[kind]["initial"],
            matching[kind]["final"],
        )

    results = summarise(variance_config, gradients, runs, matching)
    log.info(
        "SSL/KD: gradient variance %.3g, dispersion %.3g; final matching loss kd %.4f, ssl %.4f",
        results["grad_variance_ratio"],
        results["dispersion_ratio"],
        results["final_matching_loss"]["kd"],
        results["final_matching_loss"]["ssl"],
    )
    write_results(workspace, results, seconds, matching)


def matching_run(
    variance_config: VarianceConfig,
    objective: str,
    make_student: Callable[[int], ConvNet],
    init_seed: int,
    data: TrainingData,
    targets: torch.Tensor,
    start: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """Train ``variance.matching_experts`` experts with ``objective`` (each its own init and data order),
    then distil from them starting from ``start`` (images [M, C, H, W], targets [M, D]): the matching losses."""
    seed, count = variance_config.seed, variance_config.matching_experts
    experts, _ = train_runs(
        make_student,
        [derive_seed(seed, VarianceStream.MATCHING_EXPERT_INIT, k) for k in range(count)],
        [generator(seed, VarianceStream.MATCHING_EXPERT_TRAINING, k) for k in range(count)],
        data.images,
        targets,
        variance_config.trajectories(objective, count),
        data.space,
    )
    images, start_targets = start
    return matching_losses(
        make_student(init_seed),
        experts,
        images,
        start_targets,
        variance_config,
        generator(seed, VarianceStream.MATCHING),
    )


def dispersion_runs(
    variance_config: VarianceConfig,
    objective: str,
    make_student: Callable[[int], ConvNet],
    init_seed: int,
    data: TrainingData,
    targets: torch.Tensor,
) -> dict[str, list]:
    """``variance.runs`` trainings with ``objective`` from the one init ``init_seed``, each with its own data
    order and augmentations: their absolute and relative dispersion per epoch and their losses."""
    seed = variance_config.seed
    snapshots, losses = train_runs(
        make_student,
        [init_seed] * variance_config.runs,
        [generator(seed, VarianceStream.DISPERSION_RUN, r) for r in range(variance_config.runs)],
        data.images,
        targets,
        variance_config.trajectories(objective, variance_config.runs),
        data.space,
    )
    return {
        "absolute": parameter_dispersion(snapshots).tolist(),
        "relative": relative_dispersion(snapshots).tolist(),
        "epoch_losses": losses,
    }


def write_results(workspace: Workspace, results: dict, seconds: dict, matching: dict) -> None:
    """results/variance.json and its plots, then the same to tracking. The parts' wall and CPU seconds go
    to the log and to tracking only: an artifact or its sidecar must be byte-identical when rerun."""
    plot(results, workspace.results)
    save_json_artifact(
        workspace.results / "variance.json",
        "variance",
        results,
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations},
        extra={"plots": list(PLOTS)},
    )
    log.info(
        "seconds per part (wall / CPU): %s", ", ".join(f"{p} {t['wall']} / {t['cpu']}" for p, t in seconds.items())
    )
    tracking.log_metrics(
        {
            "grad_variance_ratio": results["grad_variance_ratio"],
            "dispersion_ratio": results["dispersion_ratio"],
            "final_matching_loss_kd": results["final_matching_loss"]["kd"],
            "final_matching_loss_ssl": results["final_matching_loss"]["ssl"],
        },
        0,
    )
    tracking.log_metrics(
        {f"seconds/{part}/{clock}": value for part, t in seconds.items() for clock, value in t.items()}, 0
    )
    for kind, result in matching.items():
        for iteration, loss in enumerate(result["losses"]):
            tracking.log_metric(f"matching_loss/{kind}_experts", loss, iteration)
    tracking.log_artifact(workspace.results / "variance.json")
    for name in PLOTS:
        tracking.log_artifact(workspace.results / name, "plots")


def summarise(variance_config: VarianceConfig, gradients: GradientVariance, runs: dict, matching: dict) -> dict:
    """results/variance.json's payload: the three headline numbers first, then the detail."""
    headline = variance_config.ssl_objectives[0]
    default = gradients.batch_sizes.index(variance_config.experts.batch_size)
    by_objective = {o: values[default] / gradients.kd[default] for o, values in gradients.ssl.items()}
    return {
        "grad_variance_ratio": by_objective[headline],
        "dispersion_ratio": runs["ssl"]["relative"][-1] / runs["kd"]["relative"][-1],
        "final_matching_loss": {kind: matching[kind]["final"] for kind in ("kd", "ssl")},
        "ssl_objective": headline,
        "default_batch_size": variance_config.experts.batch_size,
        "gradient_variance": {
            "batch_sizes": gradients.batch_sizes,
            "kd": gradients.kd,
            **gradients.ssl,
            "ratio_by_objective": by_objective,
            "ssl_augmentation_only": gradients.augmentation_only,
            "reference": "kd: the exact full-data gradient; ssl: the mean of the sampled minibatch gradients "
            "at each batch size (unbiased R-1 divisor)",
            "minibatches": variance_config.minibatches,
        },
        "dispersion": {
            "epochs": list(range(len(runs["kd"]["relative"]))),
            "runs": variance_config.runs,
            "definition": "relative: mean squared distance to the across-run mean / mean squared distance "
            "from the shared init; absolute: the numerator",
            "absolute_ratio": runs["ssl"]["absolute"][-1] / runs["kd"]["absolute"][-1],
            **runs,
        },
        "matching": {
            "experts": variance_config.matching_experts,
            "iterations": variance_config.iterations,
            "final_window": variance_config.final_window,
            **matching,
        },
    }


def plot(results: dict, folder: Path) -> None:
    plt = pyplot()
    figures = []
    figure, axis = plt.subplots(figsize=(5.5, 4))
    grads = results["gradient_variance"]
    for name in ["kd", *grads["ratio_by_objective"]]:
        axis.plot(grads["batch_sizes"], grads[name], marker="o", label=name)
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="E‖g − ḡ‖² / ‖ḡ‖²",
        title="relative minibatch gradient variance at init",
    )
    axis.set_xticks(grads["batch_sizes"], [str(b) for b in grads["batch_sizes"]])
    axis.minorticks_off()
    figures.append(figure)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for kind in ("kd", "ssl"):
        axis.plot(results["dispersion"]["epochs"], results["dispersion"][kind]["relative"], marker="o", label=kind)
    axis.set(xlabel="epoch", ylabel="relative dispersion across runs", title="same init, seeded runs")
    figures.append(figure)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    window = results["matching"]["final_window"]
    for kind in ("kd", "ssl"):
        losses = results["matching"][kind]["losses"]
        (line,) = axis.plot(losses, alpha=0.3)
        running = [tail_mean(losses[: i + 1], window) for i in range(len(losses))]
        axis.plot(running, color=line.get_color(), label=f"{kind} experts (mean of last {window})")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set(
        yscale="log",
        xlabel="distillation iteration",
        ylabel="matching loss (1: no progress)",
        title="trajectory matching",
    )
    figures.append(figure)
    for figure, name in zip(figures, PLOTS):
        figure.axes[0].legend()
        figure.axes[0].grid(alpha=0.3)
        figure.tight_layout()
        atomic_write(folder / name, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
        plt.close(figure)
