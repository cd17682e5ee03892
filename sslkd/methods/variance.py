"""The variance claim behind MKDT, measured: minibatch gradient noise and run-to-run dispersion of the
KD objective versus an SSL objective, from the same initialisation.

- :func:`relative_variance`: E‖g − ḡ‖² / ‖ḡ‖² over sampled minibatch gradients;
- :func:`kd_gradient`, :func:`full_kd_gradient`, :func:`ssl_gradient`: flat gradients [P] of a model;
- :func:`sample_minibatches`: index sets drawn uniformly without replacement;
- :func:`parameter_dispersion`, :func:`relative_dispersion`: spread of parameters across runs per epoch;
- :func:`measure_gradient_variance`, :func:`train_runs`, :func:`matching_losses`: the drivers the
  ``variance`` stage calls.

Everything takes tensors, modules and generators; nothing reads config files or the environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from sslkd.data.augmentations import two_views
from sslkd.data.datasets import InputSpace
from sslkd.errors import SslkdError
from sslkd.losses import kd_mse_loss
from sslkd.methods.distill import DistillConfig, distill
from sslkd.methods.experts import ExpertsConfig, train_expert, with_objective
from sslkd.methods.selection import InitConfig
from sslkd.methods.teacher import SSL_OBJECTIVES, SSLConfig, ssl_loss
from sslkd.models import ConvNet, ParameterLayout
from sslkd.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VarianceConfig:
    """What ``sslkd variance`` measures. Optimisers, students and trajectory lengths are the setting's.

    experts: every training run's optimiser, student and epochs (objective, num_experts overridden);
    distill: the trajectory-matching settings (iterations overridden); init: its size M is the number
    of random real images (teacher targets) that start both distillations; batch_sizes: where gradient variance is
    measured (experts.batch_size, the headline, is always added); minibatches: gradients sampled per
    batch size and objective; ssl_objectives: SSL losses measured, the first is the headline and trains
    the SSL trajectories; runs: seeded runs per objective from one init (dispersion);
    matching_experts: experts per objective, fresh inits shared by both kinds (matchability);
    iterations: distillation iterations per kind of expert; final_window: the initial and final matching
    losses are means over this many first and last iterations (each iteration matches a random start
    epoch, whose loss level differs); seed: every init, data order and augmentation.
    """

    experts: ExpertsConfig
    distill: DistillConfig
    init: InitConfig
    batch_sizes: tuple[int, ...]
    minibatches: int
    ssl_objectives: tuple[str, ...]
    runs: int
    matching_experts: int
    iterations: int
    final_window: int
    seed: int

    def __post_init__(self) -> None:
        unknown = [o for o in self.ssl_objectives if o not in SSL_OBJECTIVES]
        if not self.ssl_objectives or unknown:
            raise SslkdError(f"variance.ssl_objectives must name SSL objectives out of {', '.join(SSL_OBJECTIVES)}")
        if min(self.batch_sizes, default=0) < 2 or self.minibatches < 2:
            raise SslkdError("variance needs batch_sizes >= 2 (the SSL losses need a batch) and minibatches >= 2")
        if self.runs < 2 or self.matching_experts < 1 or self.iterations < 1 or self.final_window < 1:
            raise SslkdError("variance needs runs >= 2, matching_experts >= 1, iterations >= 1, final_window >= 1")

    @property
    def measured_batch_sizes(self) -> list[int]:
        return sorted(set(self.batch_sizes) | {self.experts.batch_size})

    def trajectories(self, objective: str, count: int) -> ExpertsConfig:
        """The experts config of ``count`` runs with ``objective`` (kd or an SSL objective)."""
        return replace(with_objective(self.experts, objective), num_experts=count)

    def matching(self) -> DistillConfig:
        return replace(self.distill, iterations=self.iterations)


def flat_gradient(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """∇ loss w.r.t. the model's parameters, flattened in parameter order: [P]."""
    gradients = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gradients, model.parameters())]
    ).detach()


def kd_gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient [P] of the mean-reduced KD loss MSE(model(images), targets); images [B, ...], targets [B, D]."""
    return flat_gradient(kd_mse_loss(model(images), targets), model)


def full_kd_gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The exact full-data KD gradient [P], computed in chunks weighted by their share of the N examples
    (the loss is a mean over examples, so the weighted sum of chunk gradients is the full gradient)."""
    total = len(images)
    weighted = [
        kd_gradient(model, images[start : start + chunk], targets[start : start + chunk])
        * (min(chunk, total - start) / total)
        for start in range(0, total, chunk)
    ]
    return torch.stack(weighted).sum(0)


def ssl_gradient(
    model: nn.Module,
    pixels: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    config: SSLConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Gradient [P] of the SSL loss of two fresh augmented views; pixels [B, C, H, W] in [0, 1].

    The model's output acts as the projection, as for SSL experts.
    """
    view1, view2 = two_views(pixels, config.augment, generator)
    return flat_gradient(ssl_loss(config, model(normalise(view1)), model(normalise(view2))), model)


def sample_minibatches(size: int, batch: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` independent minibatches [count, batch], each ``batch`` distinct indices of [0, size)
    drawn uniformly without replacement."""
    if not 0 < batch <= size:
        raise SslkdError(f"batch size {batch} must lie in 1..{size} (the training images)")
    # the first ``batch`` entries of an independent uniform permutation per row
    return torch.rand(count, size, generator=generator, dtype=torch.float64).argsort(dim=1)[:, :batch]


def relative_variance(gradients: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """E‖g − ḡ‖² / ‖ḡ‖² of gradient samples gradients [R, P].

    reference: the exact mean gradient ḡ [P] (then the average runs over the R samples); None uses the
    sample mean and the unbiased R − 1 divisor.
    """
    if gradients.ndim != 2 or len(gradients) < (1 if reference is not None else 2):
        raise ValueError(f"expected gradient samples [R, P] (R >= 2 without a reference), got {tuple(gradients.shape)}")
    samples = gradients.double()
    if reference is None:
        mean, divisor = samples.mean(dim=0), len(samples) - 1
    else:
        mean, divisor = reference.double(), len(samples)
    spread = (samples - mean).pow(2).sum() / divisor
    norm = mean.pow(2).sum()
    if norm == 0:
        return 0.0 if spread == 0 else float("inf")
    return float(spread / norm)


def parameter_dispersion(runs: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to the across-run mean, per snapshot: runs [R, S, P] -> [S]."""
    samples = runs.double()
    return (samples - samples.mean(dim=0)).pow(2).sum(dim=2).mean(dim=0)


def relative_dispersion(runs: torch.Tensor) -> torch.Tensor:
    """Dispersion over mean squared distance travelled from the shared init, per snapshot: [R, S, P] -> [S].

    In [0, 1]: the share of the runs' movement that differs between runs (0 when every run takes the
    same path). Snapshot 0 is the shared init and gets 0. Runs must share snapshot 0.
    """
    if not torch.equal(runs[:, 0], runs[:1, 0].expand_as(runs[:, 0])):
        raise ValueError("relative dispersion needs runs that share their initial snapshot")
    travelled = (runs.double() - runs[:, :1].double()).pow(2).sum(dim=2).mean(dim=0)
    dispersion = parameter_dispersion(runs)
    return torch.where(travelled > 0, dispersion / travelled.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def tail_mean(values: Sequence[float], window: int) -> float:
    """Mean of the last ``window`` values (all of them when there are fewer)."""
    tail = list(values)[-window:]
    return sum(tail) / len(tail)


@dataclass
class GradientVariance:
    """Relative gradient variance per batch size: kd (exact ḡ) and each SSL objective (ḡ: the mean of the
    sampled minibatch gradients at that batch size); augmentation_only: SSL at the headline batch size
    with one fixed minibatch and fresh augmentations."""

    batch_sizes: list[int]
    kd: list[float] = field(default_factory=list)
    ssl: dict[str, list[float]] = field(default_factory=dict)
    augmentation_only: dict[str, float] = field(default_factory=dict)


def measure_gradient_variance(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    input_space: InputSpace,
    config: VarianceConfig,
    generator: torch.Generator,
) -> GradientVariance:
    """Relative gradient variances at the model's current parameters.

    images: [N, C, H, W] normalised; targets: [N, D] teacher representations.
    """
    result = GradientVariance(config.measured_batch_sizes, ssl={o: [] for o in config.ssl_objectives})
    pixels = input_space.invert(images)
    full = full_kd_gradient(model, images, targets)
    if config.experts.ssl is None:
        raise SslkdError("the variance study compares SSL objectives: bind sslkd.experts.ssl")
    ssl_configs = {o: replace(config.experts.ssl, objective=o) for o in config.ssl_objectives}
    for batch in track(result.batch_sizes, desc="gradient variance"):
        minibatches = sample_minibatches(len(images), batch, config.minibatches, generator)
        result.kd.append(
            relative_variance(torch.stack([kd_gradient(model, images[b], targets[b]) for b in minibatches]), full)
        )
        for objective, ssl in ssl_configs.items():
            gradients = torch.stack(
                [ssl_gradient(model, pixels[b], input_space.apply, ssl, generator) for b in minibatches]
            )
            result.ssl[objective].append(relative_variance(gradients))
            if batch == config.experts.batch_size:
                fixed = pixels[minibatches[0]]
                gradients = torch.stack(
                    [ssl_gradient(model, fixed, input_space.apply, ssl, generator) for _ in range(config.minibatches)]
                )
                result.augmentation_only[objective] = relative_variance(gradients)
        log.info(
            "batch %d: relative gradient variance kd %.4g, %s",
            batch,
            result.kd[-1],
            ", ".join(f"{o} {v[-1]:.4g}" for o, v in result.ssl.items()),
        )
    return result


def train_runs(
    make_student: Callable[[int], ConvNet],
    init_seeds: Sequence[int],
    generators: Sequence[torch.Generator],
    images: torch.Tensor,
    targets: torch.Tensor,
    config: ExpertsConfig,
    input_space: InputSpace,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Run r trains ``make_student(init_seeds[r])`` with data order and augmentations from ``generators[r]``.

    Returns (snapshots [R, epochs + 1, P], loss per epoch of each run).
    """
    snapshots, losses = [], []
    for init_seed, generator in track(list(zip(init_seeds, generators)), desc=f"{config.objective} runs"):
        run, epoch_losses = train_expert(make_student(init_seed), images, targets, config, generator, input_space)
        snapshots.append(run)
        losses.append(epoch_losses)
    return torch.stack(snapshots), losses


def matching_losses(
    student: ConvNet,
    experts: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    variance_config: VarianceConfig,
    generator: torch.Generator,
) -> dict:
    """Distil from experts [K, S, P], starting from images [M, C, H, W] with targets [M, D]: the matching
    loss per iteration, its mean over the first and the last final_window iterations, the learned lr."""
    result = distill(
        student, ParameterLayout.of(student), experts, images, targets, variance_config.matching(), generator
    )
    losses, window = result.matching_losses, variance_config.final_window
    return {
        "losses": losses,
        "initial": tail_mean(losses[:window], window),
        "final": tail_mean(losses, window),
        "learned_lr": result.lr,
    }
