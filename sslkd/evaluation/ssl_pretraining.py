"""SSL pre-training of an evaluated encoder: how the MTT-SSL baseline's set pre-trains (its KD counterpart is
:func:`sslkd.evaluation.probe.pretrain_kd`), with the SSL epoch of its experts."""

from __future__ import annotations

import torch

from sslkd.data.datasets import InputSpace
from sslkd.evaluation.probe import PretrainConfig
from sslkd.methods.experts import ssl_epoch
from sslkd.methods.teacher import SSLConfig
from sslkd.models import ConvNet
from sslkd.progress import track


def pretrain_ssl(
    student: ConvNet,
    images: torch.Tensor,
    lr: float,
    config: PretrainConfig,
    ssl: SSLConfig,
    generator: torch.Generator,
    input_space: InputSpace,
) -> list[float]:
    """Train ``student`` in place with the SSL objective ``ssl`` (its augmentations and loss; the
    student's output as the projection) on images [N, C, H, W] in ``input_space``, with the KD
    pre-training's optimiser (SGD, config's momentum, weight decay, batch size and horizon); returns the
    loss per epoch. The set of the MTT-SSL baseline is pre-trained on so."""
    optimiser = torch.optim.SGD(student.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    num_epochs = config.epochs_for(len(images))
    return [
        ssl_epoch(student, optimiser, images, ssl, config.batch_size, generator, input_space)
        for _ in track(range(num_epochs), desc="SSL pre-train")
    ]
