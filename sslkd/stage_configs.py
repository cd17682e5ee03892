"""Root configs of the stages whose settings no library function takes (the library's own configs live beside
the code they configure), and the methods a study compares (``sslkd evaluate --method``, the report's rows)."""

from __future__ import annotations

from dataclasses import dataclass

from sslkd.errors import SslkdError
from sslkd.evaluation.probe import ProbeConfig
from sslkd.methods.teacher import SSLConfig
from sslkd.models import BNConvNetConfig, ResNetConfig

METHODS = ("no_pretrain", "random", "high_loss", "full_data", "mkdt", "krr_st", "mtt_ssl")


@dataclass(frozen=True)
class RepresentConfig:
    """batch_size: images per forward pass of the teacher."""

    batch_size: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SslkdError(f"represent.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TeacherConfig:
    """encoder: the ResNet-18 or BN ConvNet; ssl: how it is trained (on every training image that is not
    held out, not only the distillation subset); checkpoint: import this encoder instead ("" trains);
    seed: initialisation, data order and augmentations; probe: how the teacher's own features are probed
    (against the same encoder untrained) after training and after each of ``probe_epochs``."""

    encoder: ResNetConfig | BNConvNetConfig
    ssl: SSLConfig
    checkpoint: str
    seed: int
    probe: ProbeConfig
    probe_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(epoch < 1 or epoch > self.ssl.epochs for epoch in self.probe_epochs):
            raise SslkdError(f"teacher.probe_epochs must lie in 1..{self.ssl.epochs}, got {self.probe_epochs}")


@dataclass(frozen=True)
class ReportConfig:
    """methods: rows of the summary, in this order (those evaluated)."""

    methods: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise SslkdError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
