"""Batched augmentations with independent random parameters per image: the SSL views, and the
differentiable augmentation (DSA) of the students' inputs.

torchvision's transforms draw one set of random parameters per call, so per-image randomness on a batch
would need a Python loop over images; these functions draw per-image parameters from a generator and
apply them in a few tensor operations (random resized crop and flip as one affine resampling, colour
jitter, grayscale, solarisation), following the Barlow Twins recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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


# --- Differentiable augmentation of the students' inputs (DSA: Zhao & Bilen, ICML 2021), as MTT uses it
#     while training experts, while unrolling the synthetic steps and while evaluating a set.

DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAConfig:
    """Differentiable augmentation of a minibatch in the students' input space (standardised or whitened
    images): each call draws one family of ``families`` for the whole minibatch and its parameters per image
    (MTT's single-family mode). color: brightness shift U(−b/2, b/2), saturation factor U(0, s), contrast
    factor U(c, c + 1); crop: translation by up to ``crop`` of the side, zero fill; cutout: a zeroed square of
    ``cutout`` of the side; flip: horizontal, probability 1/2; scale: factors U(1/scale, scale) per axis;
    rotate: angle U(−rotate, rotate) degrees. Every family is linear (color: affine) in the images, so its
    vector-Jacobian product is exact and cheap."""

    families: tuple[str, ...] = DSA_FAMILIES
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0

    def __post_init__(self) -> None:
        unknown = [family for family in self.families if family not in DSA_FAMILIES]
        if not self.families or unknown:
            raise SslkdError(f"dsa.families must name one or more of {', '.join(DSA_FAMILIES)}, got {self.families}")
        if not (0 <= self.crop < 1 and 0 < self.cutout < 1 and self.scale >= 1 and self.rotate >= 0):
            raise SslkdError("dsa needs 0 <= crop < 1, 0 < cutout < 1, scale >= 1 and rotate >= 0")
        if min(self.brightness, self.saturation, self.contrast) < 0:
            raise SslkdError("dsa needs brightness, saturation and contrast >= 0")


@dataclass(frozen=True)
class DSADraw:
    """One drawn augmentation of a minibatch: the family and its per-image parameters [B, …] (on the CPU)."""

    family: str
    parameters: tuple[torch.Tensor, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> augmented [B, C, H, W]; differentiable in the images."""
        return _DSA_APPLY[self.family](images, *(p.to(images.device) for p in self.parameters))


def draw_dsa(images_shape: torch.Size | tuple[int, ...], config: DSAConfig, generator: torch.Generator) -> DSADraw:
    """Draw the family and parameters of one augmentation of a minibatch of shape [B, C, H, W]."""
    batch, _, height, _ = images_shape
    family = config.families[int(torch.randint(len(config.families), (1,), generator=generator))]
    if family == "color":
        parameters: tuple[torch.Tensor, ...] = (
            (torch.rand(batch, generator=generator) - 0.5) * config.brightness,
            torch.rand(batch, generator=generator) * config.saturation,
            torch.rand(batch, generator=generator) + config.contrast,
        )
    elif family == "crop":
        reach = int(height * config.crop + 0.5)
        parameters = tuple(torch.randint(-reach, reach + 1, (batch,), generator=generator) for _ in range(2))
    elif family == "cutout":
        parameters = tuple(torch.randint(0, height, (batch,), generator=generator) for _ in range(2)) + (
            torch.tensor(int(height * config.cutout + 0.5)),
        )
    elif family == "flip":
        parameters = (torch.rand(batch, generator=generator) < 0.5,)
    elif family == "scale":
        parameters = tuple(
            torch.rand(batch, generator=generator) * (config.scale - 1 / config.scale) + 1 / config.scale
            for _ in range(2)
        )
    else:  # rotate
        parameters = ((torch.rand(batch, generator=generator) - 0.5) * 2 * math.radians(config.rotate),)
    return DSADraw(family, parameters)


def dsa(images: torch.Tensor, config: DSAConfig, generator: torch.Generator) -> torch.Tensor:
    """One differentiable augmentation of images [B, C, H, W] (drawn from ``generator``)."""
    return draw_dsa(images.shape, config, generator)(images)


def _color(images: torch.Tensor, shift: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    images = images + shift.view(-1, 1, 1, 1)
    channel_mean = images.mean(dim=1, keepdim=True)
    images = (images - channel_mean) * saturation.view(-1, 1, 1, 1) + channel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * contrast.view(-1, 1, 1, 1) + image_mean


def _translate(images: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = images.shape
    reach = int(max(shift_y.abs().max(), shift_x.abs().max()))
    padded = F.pad(images, (reach, reach, reach, reach))
    rows = (reach - shift_y)[:, None] + torch.arange(height, device=images.device)  # [B, H]
    columns = (reach - shift_x)[:, None] + torch.arange(width, device=images.device)  # [B, W]
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


def _cutout(images: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    _, _, height, width = images.shape
    half = int(size) // 2
    rows = torch.arange(height, device=images.device)[None, :]
    columns = torch.arange(width, device=images.device)[None, :]
    inside_rows = (rows >= centre_y[:, None] - half) & (rows < centre_y[:, None] - half + int(size))  # [B, H]
    inside_columns = (columns >= centre_x[:, None] - half) & (columns < centre_x[:, None] - half + int(size))
    keep = ~(inside_rows[:, :, None] & inside_columns[:, None, :])  # [B, H, W]
    return images * keep[:, None].to(images.dtype)


def _flip(images: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    return torch.where(flipped.view(-1, 1, 1, 1), images.flip(3), images)


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(images: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale_x, scale_y
    return _affine(images, theta)


def _rotate(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, sin, torch.zeros_like(cos)], 1), torch.stack([-sin, cos, torch.zeros_like(cos)], 1)], 1
    )
    return _affine(images, theta)


_DSA_APPLY: dict[str, Callable[..., torch.Tensor]] = {
    "color": _color,
    "crop": _translate,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}
