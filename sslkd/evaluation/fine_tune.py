"""Full fine-tuning, the second evaluation protocol beside the linear probe: the whole pre-trained trunk
plus a new linear head are trained with cross-entropy on a fraction of the labels.

As upstream (MKDT's fine-tuning), the trunk learns at ``backbone_lr_factor`` (0.1) times the head's lr;
training images get the usual CIFAR fine-tuning augmentation (random crop of the image padded by
``padding`` pixels, random horizontal flip: augmentations.padded_crop_flip), in pixel space before they
are put in the students' input space; SGD with momentum, a cosine schedule over a fixed epoch budget.
The head starts at zero, and batches and augmentations come from one generator: a run is determined by
its seed. The labelled subset is the probe's (probe.labelled_subset with the same generator), so
the two protocols see the same labels.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sslkd.data.augmentations import padded_crop_flip
from sslkd.data.training_data import TrainingData
from sslkd.evaluation.evaluate_config import EvaluateConfig
from sslkd.evaluation.probe import FineTuneConfig, fraction_key, labelled_subset, probe_at_fractions
from sslkd.models import ConvNet
from sslkd.progress import track


class Classifier(nn.Module):
    """A pre-trained ConvNet's trunk with a linear head: images [B, C, H, W] -> logits [B, classes]."""

    def __init__(self, encoder: ConvNet, classes: int) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(encoder.trunk)
        self.head = nn.Linear(encoder.feature_dim, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))


def parameter_groups(model: Classifier, config: FineTuneConfig) -> list[dict]:
    """SGD parameter groups: the trunk at backbone_lr_factor × lr, the head at lr."""
    return [
        {"params": list(model.trunk.parameters()), "lr": config.lr * config.backbone_lr_factor, "name": "backbone"},
        {"params": list(model.head.parameters()), "lr": config.lr, "name": "head"},
    ]


def fine_tune(
    encoder: ConvNet,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    config: FineTuneConfig,
    generator: torch.Generator,
) -> Classifier:
    """Fine-tune a copy of ``encoder`` (left as it is) with a new head on pixels [n, C, H, W] in [0, 1] (on
    the encoder's device) and labels [n] (CPU) of ``classes`` classes; ``to_input`` maps pixels to the
    encoder's input space. Returns the trained classifier."""
    device = pixels.device
    model = Classifier(encoder, classes).to(device)
    optimiser = torch.optim.SGD(
        parameter_groups(model, config), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(pixels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs * steps_per_epoch)
    labels = labels.to(device)
    model.train()
    for _ in track(range(config.epochs), total=config.epochs, desc="fine-tune"):
        order = torch.randperm(len(pixels), generator=generator).to(device)
        for batch in order.split(config.batch_size):
            views = to_input(padded_crop_flip(pixels[batch], config.padding, generator))
            loss = F.cross_entropy(model(views), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy (percent) of ``model`` on images [T, C, H, W] (on its device), labels [T] (CPU)."""
    model.eval()
    predictions = torch.cat(
        [model(images[i : i + batch_size]).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )
    return float(100.0 * (predictions == labels.cpu()).double().mean())


def fine_tune_at_fractions(
    encoder: ConvNet,
    pool_uint8: torch.Tensor,
    pool_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    label_fractions: tuple[float, ...],
    config: FineTuneConfig,
    label_generator: Callable[[int], torch.Generator],
    tune_generator: Callable[[int], torch.Generator],
) -> dict[str, float]:
    """Fine-tuned accuracy at every label fraction (the probe's) that config.label_fractions names (all when
    it names none): {"0.05": accuracy, ...}; a fraction's index is its index in ``label_fractions``.

    pool_uint8 [P, C, H, W] uint8 and pool_labels [P] (CPU): where the labelled subsets come from
    (``label_generator(fraction_index)``: the probe's, so the protocols see the same labels); test_images
    [T, C, H, W] in the encoder's input space, on the device to train on; ``tune_generator(fraction_index)``:
    batches and augmentations.
    """
    classes = int(max(pool_labels.max(), test_labels.max())) + 1
    accuracies = {}
    for index, fraction in enumerate(label_fractions):
        if config.label_fractions and fraction not in config.label_fractions:
            continue
        subset = labelled_subset(pool_labels, fraction, label_generator(index))
        model = fine_tune(
            encoder,
            pool_uint8[subset].to(test_images.device).float() / 255.0,
            pool_labels[subset],
            classes,
            to_input,
            config,
            tune_generator(index),
        )
        accuracies[fraction_key(fraction)] = accuracy(model, test_images, test_labels)
    return accuracies


def protocol_accuracies(
    encoder: ConvNet,
    pool: torch.Tensor,
    data: TrainingData,
    test_images: torch.Tensor,
    evaluate_config: EvaluateConfig,
    label_generator: Callable[[int], torch.Generator],
    tune_generator: Callable[[int], torch.Generator],
) -> dict[str, dict[str, float]]:
    """Every protocol of evaluate_config.protocols on one pre-trained encoder: {"accuracy": linear probe,
    "fine_tune": fine-tuned (with 'fine_tune' in the protocols)}, each {label_fraction: accuracy}.

    pool: data's pool in its input space [P, C, H, W] and test_images, both on the encoder's device;
    label_generator / tune_generator(fraction_index): the labelled subsets (one draw for both protocols) and
    fine-tuning's batches and augmentations.
    """
    results = {
        "accuracy": probe_at_fractions(
            encoder, pool, data.pool_labels, test_images, data.test_labels, evaluate_config.probe, label_generator
        )
    }
    if evaluate_config.fine_tune is not None and evaluate_config.fine_tunes:
        results["fine_tune"] = fine_tune_at_fractions(
            encoder,
            data.pool_uint8,
            data.pool_labels,
            test_images,
            data.test_labels,
            data.space.apply,
            evaluate_config.probe.label_fractions,
            evaluate_config.fine_tune,
            label_generator,
            tune_generator,
        )
    return results
