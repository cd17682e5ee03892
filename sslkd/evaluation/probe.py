"""The evaluation protocol: KD pre-training of a fresh ConvNet on a pre-training set, then a linear probe
on the frozen trunk features with a fraction of the labels.

The probe standardises features (statistics of the labelled subset) and fits an L2-regularised
multinomial logistic regression to convergence (scikit-learn, L-BFGS with line search). The upstream
probe (full-batch L-BFGS, lr 1, no line search, raw features) returns chance for a random encoder;
this one does not (tests/test_evaluation.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sslkd.data.augmentations import DSAConfig
from sslkd.errors import SslkdError
from sslkd.methods.kd_steps import KDSteps, check_precision, train_kd
from sslkd.models import ConvNet, ParameterLayout
from sslkd.progress import track

log = logging.getLogger(__name__)

# Pre-training horizons: 'paper' = pretrain.epochs passes (20 steps for 200 images at batch 256),
# 'equal_steps' = at least pretrain.min_steps SGD steps (what full-data KD gets).
HORIZONS = ("equal_steps", "paper")


@dataclass(frozen=True)
class PretrainConfig:
    """KD pre-training on a set: SGD with momentum and weight decay, constant lr, ``epochs`` passes, or
    more passes where a set is so small that ``epochs`` would give fewer than ``min_steps`` SGD steps.

    lr is used for every set except MKDT's, which pre-trains with its learned α; min_steps: 0 keeps
    the paper's protocol (docs/method.md: 20 epochs whatever the size, 20 steps for 200 images at batch 256);
    compile: torch.compile the training step once per stage; precision: 'float32', or 'bfloat16' for the forward
    pass in bfloat16 autocast (kd_steps.PRECISIONS); augment: every minibatch differentiably augmented (DSA,
    as MTT evaluates its sets; targets kept), None: none.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    compile: bool
    precision: str
    min_steps: int = 0
    augment: DSAConfig | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.min_steps < 0:
            raise SslkdError("pretraining needs epochs >= 0, batch_size >= 1, lr > 0 and min_steps >= 0")

    def at_horizon(self, horizon: str) -> "PretrainConfig":
        """This config at an evaluation horizon: 'paper' drops min_steps (``epochs`` passes whatever the set
        size, the paper's protocol), 'equal_steps' keeps it."""
        if horizon not in HORIZONS:
            raise SslkdError(f"unknown pre-training horizon {horizon!r}; choose one of {', '.join(HORIZONS)}")
        return self if horizon == "equal_steps" else dataclasses.replace(self, min_steps=0)

    def epochs_for(self, set_size: int) -> int:
        """Passes over a set of ``set_size`` images: ``epochs``, raised until at least min_steps steps."""
        if not self.epochs or not set_size:
            return 0
        steps_per_epoch = math.ceil(set_size / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))


@dataclass(frozen=True)
class ProbeConfig:
    """label_fractions: fractions of the labelled training split given to the probe (at least one label
    per class); inverse_regularisation: C of the logistic regression; max_iter: L-BFGS iterations."""

    label_fractions: tuple[float, ...]
    inverse_regularisation: float
    max_iter: int

    def __post_init__(self) -> None:
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise SslkdError(f"label_fractions must be non-empty and in (0, 1], got {self.label_fractions}")


@dataclass(frozen=True)
class FineTuneConfig:
    """Full fine-tuning (sslkd/evaluation/fine_tune.py). epochs: passes over the labelled subset (a fixed budget whatever its size); batch_size; lr: the
    head's (peak) lr, the trunk's is backbone_lr_factor × lr; momentum, weight_decay: SGD's; padding:
    pixels of zero padding around each image before the random crop (0: flips only); label_fractions: the
    probe's label fractions to fine-tune at (() all of them; each costs epochs passes over its labels)."""

    epochs: int
    batch_size: int
    lr: float
    backbone_lr_factor: float
    momentum: float
    weight_decay: float
    padding: int
    label_fractions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.padding < 0:
            raise SslkdError("fine_tune needs epochs >= 1, batch_size >= 1, lr > 0 and padding >= 0")
        if not 0 <= self.backbone_lr_factor <= 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise SslkdError("fine_tune needs backbone_lr_factor in [0, 1], momentum in [0, 1), weight_decay >= 0")


def pretrain_kd(
    student: ConvNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    config: PretrainConfig,
    generator: torch.Generator,
    steps: KDSteps | None = None,
) -> list[float]:
    """Train ``student`` in place to regress targets [N, D] from images [N, C, H, W]; returns the loss
    per epoch. Pass one :class:`KDSteps` to every run of a stage so that it compiles once (default:
    built here with config.compile)."""
    layout = ParameterLayout.of(student)
    steps = steps or KDSteps(student, layout, compile=config.compile, precision=config.precision)
    parameters, losses = layout.flatten(student), []
    num_epochs = config.epochs_for(len(images))
    epochs = train_kd(
        steps,
        parameters,
        images,
        targets,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        epochs=num_epochs,
        generator=generator,
        augment=config.augment,
    )
    for parameters, _, loss in track(epochs, total=num_epochs, desc="pre-train"):
        losses.append(loss)
    layout.load_into(student, parameters)
    return losses


@torch.no_grad()
def trunk_features(student: ConvNet, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Frozen trunk features (head dropped): images [N, C, H, W] on the student's device -> [N, F] on the CPU."""
    student.eval()
    return torch.cat([student.features(images[i : i + batch_size]).cpu() for i in range(0, len(images), batch_size)])


def labelled_subset(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a seeded, stratified fraction of the labels [N] (max(1, round(fraction · n_c)) per class)."""
    chosen = []
    for label in torch.unique(labels, sorted=True):
        members = torch.nonzero(labels == label).flatten()
        count = max(1, int(round(fraction * len(members))))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(chosen)).values


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: ProbeConfig,
) -> float:
    """Top-1 accuracy (percent) on the test features of a logistic regression fitted on the train features.

    train_features [n, F] / train_labels [n]; test_features [T, F] / test_labels [T].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features.numpy())
    classifier = LogisticRegression(C=config.inverse_regularisation, max_iter=config.max_iter)
    classifier.fit(scaler.transform(train_features.numpy()), train_labels.numpy())
    predictions = classifier.predict(scaler.transform(test_features.numpy()))
    return float(100.0 * np.mean(predictions == test_labels.numpy()))


def probe_at_fractions(
    student: ConvNet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: ProbeConfig,
    seed_generator: Callable[[int], torch.Generator],
) -> dict[str, float]:
    """Probe accuracy at every configured label fraction: {"0.05": accuracy, ...}.

    ``seed_generator(fraction_index)`` returns the generator that picks the labelled subset, so every
    method sees the same labels at a given seed.
    """
    return probe_features_at_fractions(
        trunk_features(student, train_images),
        train_labels,
        trunk_features(student, test_images),
        test_labels,
        config,
        seed_generator,
    )


def probe_features_at_fractions(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: ProbeConfig,
    seed_generator: Callable[[int], torch.Generator],
) -> dict[str, float]:
    """:func:`probe_at_fractions` on given features: train [N, F], test [T, F] (e.g. a teacher's)."""
    accuracies = {}
    for index, fraction in enumerate(config.label_fractions):
        subset = labelled_subset(train_labels, fraction, seed_generator(index))
        accuracies[fraction_key(fraction)] = linear_probe_accuracy(
            train_features[subset], train_labels[subset], test_features, test_labels, config
        )
    return accuracies


def summary_stats(values: list[float]) -> dict[str, float | int]:
    """mean, sample std (0 for one value) and count of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def fraction_key(fraction: float) -> str:
    """The summary key of a label fraction: 0.05 -> "0.05", 0.1 -> "0.1"."""
    return repr(float(fraction))


def probe_runs(
    features: tuple[torch.Tensor, torch.Tensor],
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    config: ProbeConfig,
    seed_generators: list[Callable[[int], torch.Generator]],
) -> list[dict[str, float]]:
    """One :func:`probe_features_at_fractions` per entry of ``seed_generators`` (its labelled subsets) on
    features (train [N, F], test [T, F])."""
    train, test = features
    return [
        probe_features_at_fractions(train, train_labels, test, test_labels, config, seed_generator)
        for seed_generator in seed_generators
    ]


def probe_gain(trained: list[dict[str, float]], untrained: list[dict[str, float]]) -> dict[str, dict[str, dict]]:
    """An encoder's own probe runs against the same architecture's untrained ones, paired by position (the
    same labelled subsets): {"trained" | "untrained" | "gain": {label_fraction: {"mean", "std", "n"}}}."""
    keys = list(trained[0])
    gains = [{k: t[k] - u[k] for k in keys} for t, u in zip(trained, untrained, strict=True)]
    return {
        name: {k: summary_stats([run[k] for run in runs]) for k in keys}
        for name, runs in (("trained", trained), ("untrained", untrained), ("gain", gains))
    }
