"""Networks: the ConvNet student/expert and the CIFAR-stem ResNet-18 teacher, plus flat-parameter layouts.

The student has no BatchNorm: instance norm (GroupNorm with one group per channel) keeps no running
statistics, so a network is a pure function of its parameters and unrolls functionally.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

from sslkd.errors import SslkdError


@dataclass(frozen=True)
class ConvNetConfig:
    """The MKDT student ("ConvNet"): depth × [conv3x3 → instance norm → ReLU → avgpool2], linear head.

    width: channels of every block (128 in the paper); depth: 3 (4 for 64×64 images). The head's output
    size is not configured: it is D, the size of the teacher representations the student regresses.
    """

    width: int
    depth: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise SslkdError(f"ConvNet width and depth must be positive, got {self}")


class ConvNet(nn.Module):
    """images [B, C, H, W] -> representations [B, out_dim]; :meth:`features` gives the trunk output."""

    def __init__(self, config: ConvNetConfig, in_channels: int, image_size: int, out_dim: int) -> None:
        super().__init__()
        if image_size % (2**config.depth):
            raise SslkdError(f"image size {image_size} is not divisible by 2**depth = {2**config.depth}")
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(config.depth):
            blocks += [
                nn.Conv2d(channels, config.width, kernel_size=3, padding=1),
                nn.GroupNorm(config.width, config.width, affine=True),
                nn.ReLU(inplace=False),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = config.width
        self.trunk = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = config.width * (image_size // 2**config.depth) ** 2
        self.head = nn.Linear(self.feature_dim, out_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> trunk features [B, feature_dim] (the head dropped, as for probing)."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))


def instance_norm(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """features [B, C, H, W] standardised over H, W per sample and channel (biased variance, two-pass),
    scaled by weight [C] and shifted by bias [C] -> [B, C, H, W]: ``nn.GroupNorm`` with one group per
    channel, written out in means and elementwise ops. Computed in float32 at least and returned in the
    features' dtype, as ATen's group norm treats bfloat16 features."""
    wide = features.to(torch.promote_types(features.dtype, torch.float32))
    centred = wide - wide.mean((2, 3), keepdim=True)
    variance = centred.square().mean((2, 3), keepdim=True)
    normalised = centred * (torch.rsqrt(variance + eps) * weight[:, None, None]) + bias[:, None, None]
    return normalised.to(features.dtype)


class WrittenOutInstanceNorm(nn.Module):
    """A ``nn.GroupNorm`` with one group per channel (the ConvNet's instance norm) as :func:`instance_norm`,
    sharing the norm's weight and bias (the same parameter names)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return instance_norm(features, self.weight, self.bias, self.eps)


def write_out_instance_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose instance norms (``nn.GroupNorm`` with a group per channel and an affine)
    are :class:`WrittenOutInstanceNorm`: the same function of the same named parameters, to float rounding.
    Compiled, its second derivative fuses into fewer passes over the activations than that of ATen's group
    norm (the gradient-of-gradient of distillation's adjoint, kd_steps.KDSteps)."""
    written_out = copy.deepcopy(module)
    for name, child in list(written_out.named_modules()):
        if isinstance(child, nn.GroupNorm) and child.num_groups == child.num_channels and child.affine:
            written_out.set_submodule(name, WrittenOutInstanceNorm(child))
    return written_out


@dataclass(frozen=True)
class ResNetConfig:
    """CIFAR-stem ResNet-18 (3×3 stride-1 stem, no max-pool). width 64 is the standard network (D = 512)."""

    width: int

    def __post_init__(self) -> None:
        if self.width < 1:
            raise SslkdError(f"ResNet width must be positive, got {self.width}")

    @property
    def representation_dim(self) -> int:
        return 8 * self.width


class ResNet18(nn.Module):
    """images [B, C, H, W] -> global-average-pooled trunk output [B, 8·width].

    Built from torchvision's BasicBlock with torchvision's attribute names (conv1, bn1, layer1–4), so
    the usual CIFAR ResNet-18 checkpoints import by name; no classifier head.
    """

    def __init__(self, config: ResNetConfig, in_channels: int) -> None:
        # imported here: torchvision.models pulls in torch._dynamo (~1.5 s), which only the stages that
        # build a teacher need
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        width = config.width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        for stage, planes in enumerate([width, 2 * width, 4 * width, 8 * width], start=1):
            stride = 1 if stage == 1 else 2
            downsample = None
            if stride != 1 or channels != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            setattr(
                self,
                f"layer{stage}",
                nn.Sequential(BasicBlock(channels, planes, stride, downsample), BasicBlock(planes, planes)),
            )
            channels = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.representation_dim = channels

    @property
    def stages(self) -> list[nn.Module]:
        """layer1 … layer4 (torchvision's names, so state dicts match its ResNet's)."""
        return [getattr(self, f"layer{stage}") for stage in range(1, 5)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(images)))
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(self.avgpool(x), 1)


@dataclass(frozen=True)
class BNConvNetConfig:
    """A plain BatchNorm ConvNet teacher, cheaper per image than the ResNet-18 on a CPU.

    Seven conv3x3–BatchNorm–ReLU layers with widths w | 2w, 2w | 4w, 4w | 8w, 8w, a 2×2 max-pool between the
    groups and a global average pool: D = 8·width (256 for width 32).
    """

    width: int

    def __post_init__(self) -> None:
        if self.width < 1:
            raise SslkdError(f"BN ConvNet width must be positive, got {self.width}")

    @property
    def representation_dim(self) -> int:
        return 8 * self.width


class BNConvNet(nn.Module):
    """images [B, C, H, W] -> global-average-pooled features [B, 8·width]."""

    def __init__(self, config: BNConvNetConfig, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for group, widths in enumerate(([1], [2, 2], [4, 4], [8, 8])):
            if group:
                layers.append(nn.MaxPool2d(2))
            for multiple in widths:
                out = multiple * config.width
                layers += [
                    nn.Conv2d(channels, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels = out
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.representation_dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)


TEACHER_ARCHITECTURES = {"resnet18": (ResNetConfig, ResNet18), "bn_convnet": (BNConvNetConfig, BNConvNet)}


def teacher_architecture(config: ResNetConfig | BNConvNetConfig) -> str:
    """The name a teacher checkpoint records for its encoder's config class."""
    for name, (config_class, _) in TEACHER_ARCHITECTURES.items():
        if isinstance(config, config_class):
            return name
    raise SslkdError(f"not a teacher encoder config: {config!r}")


def build_teacher_encoder(architecture: str, config: dict, in_channels: int) -> nn.Module:
    """A teacher encoder from its recorded architecture name and config fields (a teacher artifact's)."""
    if architecture not in TEACHER_ARCHITECTURES:
        raise SslkdError(f"unknown teacher architecture {architecture!r}; known: {', '.join(TEACHER_ARCHITECTURES)}")
    config_class, module_class = TEACHER_ARCHITECTURES[architecture]
    return module_class(config_class(**config), in_channels)


M = TypeVar("M", bound=nn.Module)


def seeded_module(build: Callable[[], M], seed: int) -> M:
    """Build a module with its parameters initialised from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a module's parameters, in the order of its flat parameter vector [P]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> "ParameterLayout":
        named = list(module.named_parameters())
        return cls(tuple(name for name, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters as one detached vector [P]."""
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """flat [P] -> {name: view of the given shape}, differentiable, for ``torch.func.functional_call``."""
        if flat.shape != (self.numel,):
            raise SslkdError(f"parameter vector has shape {tuple(flat.shape)}, the layout needs ({self.numel},)")
        views = torch.split(flat, [math.prod(shape) for shape in self.shapes])
        return {name: view.view(shape) for name, view, shape in zip(self.names, views, self.shapes)}

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat vector [P] into the module's parameters in place."""
        with torch.no_grad():
            for parameter, value in zip(module.parameters(), self.unflatten(flat).values()):
                parameter.copy_(value)

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, payload: dict) -> "ParameterLayout":
        return cls(tuple(payload["names"]), tuple(tuple(s) for s in payload["shapes"]))
