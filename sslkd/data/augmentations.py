"""Batched SSL augmentations with independent random parameters per image.

torchvision's transforms draw one set of random parameters per call, so per-image randomness on a batch
would need a Python loop over images; these functions draw per-image parameters from a generator and
apply them in a few tensor operations (random resized crop and flip as one affine resampling, colour
jitter, grayscale, solarisation), following the Barlow Twins recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslkd.errors import SslkdError


@dataclass(frozen=True)
class AugmentConfig:
    """crop_scale: (min, max) area fraction of the random resized crop; flip: random horizontal flips;
    jitter_prob, brightness, contrast, saturation: colour jitter; grayscale_prob; solarize_prob."""

    crop_scale: tuple[float, float]
    flip: bool
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    grayscale_prob: float
    solarize_prob: float

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise SslkdError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def random_resized_crop(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """images [B, C, H, W] in [0, 1] -> crops of random area and aspect ratio (3/4–4/3), resized back."""
    batch = images.shape[0]
    area = _uniform(batch, *config.crop_scale, generator)
    log_ratio = _uniform(batch, -0.28768, 0.28768, generator)  # log(3/4), log(4/3)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (1.0 - width) * (2 * torch.rand(batch, generator=generator) - 1)
    centre_y = (1.0 - height) * (2 * torch.rand(batch, generator=generator) - 1)
    sign = torch.ones(batch)
    if config.flip:
        sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images)


def colour_jitter(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn per image, applied with probability jitter_prob."""
    batch = images.shape[0]

    def factors(strength: float) -> torch.Tensor:
        return _uniform(batch, max(0.0, 1 - strength), 1 + strength, generator).view(-1, 1, 1, 1).to(images)

    jittered = images * factors(config.brightness)
    mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (jittered - mean) * factors(config.contrast) + mean
    gray = _grayscale(jittered)
    jittered = ((jittered - gray) * factors(config.saturation) + gray).clamp(0.0, 1.0)
    apply = (torch.rand(batch, generator=generator) < config.jitter_prob).view(-1, 1, 1, 1).to(images.device)
    return torch.where(apply, jittered, images)


def augment(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, solarize_prob: float
) -> torch.Tensor:
    """One random view of each image. images [B, C, H, W] in [0, 1] -> [B, C, H, W] in [0, 1]."""
    batch = images.shape[0]
    views = colour_jitter(random_resized_crop(images, config, generator), config, generator)
    gray = (torch.rand(batch, generator=generator) < config.grayscale_prob).view(-1, 1, 1, 1).to(images.device)
    views = torch.where(gray, _grayscale(views), views)
    solarize = (torch.rand(batch, generator=generator) < solarize_prob).view(-1, 1, 1, 1).to(images.device)
    return torch.where(solarize & (views >= 0.5), 1.0 - views, views)


def two_views(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barlow Twins' asymmetric pair: solarisation only in the second view."""
    return augment(images, config, generator, 0.0), augment(images, config, generator, config.solarize_prob)


def padded_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """The usual CIFAR fine-tuning augmentation: a random H×W crop of each image zero-padded by ``padding``
    pixels on every side, then a random horizontal flip (probability 1/2), parameters drawn per image.

    images [B, C, H, W] (pixels in [0, 1]) -> [B, C, H, W].
    """
    if padding < 0:
        raise SslkdError(f"crop padding must be >= 0, got {padding}")
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # [B, H]
    columns = left[:, None] + torch.arange(width, device=images.device)  # [B, W]
    columns = torch.where(flip[:, None], columns.flip(1), columns)
    index = torch.arange(batch, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], columns[:, None, :]]  # [B, H, W, C]
    return crops.permute(0, 3, 1, 2).contiguous()
