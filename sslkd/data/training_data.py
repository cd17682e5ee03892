"""The training data as a stage hands them to the library: images in the students' input space, labels, the
held-out test split and the pool of every training image (sslkd/stages/inputs.py loads them from the data
stage's artifact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from sslkd.data.datasets import InputSpace


@dataclass
class TrainingData:
    """images: the training images [N, C, H, W] float32 in ``space`` (standardised, or whitened for the
    students), built once; labels for evaluation. pool_uint8 / pool_labels: every training image that is
    not held out [P, C, H, W] uint8 / [P] (the training images themselves when they are not a subset);
    :meth:`pool_images` puts them in ``space`` on demand (they can be several times the training set)."""

    images: torch.Tensor
    labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    space: InputSpace
    pool_uint8: torch.Tensor
    pool_labels: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return cast("tuple[int, int, int]", tuple(self.images.shape[1:]))

    def pool_pixels(self) -> torch.Tensor:
        """The pool as float32 pixels in [0, 1]: [P, C, H, W]."""
        return self.pool_uint8.float() / 255.0

    def pool_images(self) -> torch.Tensor:
        """The pool in ``space``: [P, C, H, W] float32."""
        return self.space.apply(self.pool_pixels())
