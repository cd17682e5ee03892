"""Root configs of the stages whose settings are not a library config of their own."""

from __future__ import annotations

from dataclasses import dataclass

from sslkd.errors import SslkdError
from sslkd.evaluation import HORIZONS, PretrainConfig, ProbeConfig
from sslkd.models import ConvNetConfig
from sslkd.selection import HIGH_LOSS_SCOPES, INIT_METHODS
from sslkd.teacher import SSLConfig

METHODS = ("no_pretrain", "random", "high_loss", "full_data", "mkdt", "krr_st", "mtt_ssl")


@dataclass(frozen=True)
class RepresentConfig:
    """batch_size: images per forward pass of the teacher."""

    batch_size: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SslkdError(f"represent.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class InitConfig:
    """size: M, the synthetic set's size; method: high_loss | random (which set starts distillation);
    high_loss_scope: global (the M highest losses, docs/method.md) | per_class (the highest M/C of each class:
    uses the labels, which an SSL pipeline otherwise never reads); seed: for ``random``."""

    size: int
    method: str
    high_loss_scope: str
    seed: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise SslkdError(f"init.size must be >= 1, got {self.size}")
        if self.method not in INIT_METHODS:
            raise SslkdError(f"unknown init method {self.method!r}; choose one of {', '.join(INIT_METHODS)}")
        if self.high_loss_scope not in HIGH_LOSS_SCOPES:
            raise SslkdError(
                f"unknown init.high_loss_scope {self.high_loss_scope!r}; choose one of {', '.join(HIGH_LOSS_SCOPES)}"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """encoder: the network pre-trained on each set; seeds: evaluation seeds (pre-training init, random
    subset, labelled subset); horizons: the pre-training horizons every set is evaluated at
    (evaluation.HORIZONS), the first being the headline one of results/summary.json; methods come from the
    command line; ssl: the SSL objective MTT-SSL's set is pre-trained with (None: that method cannot be
    evaluated)."""

    encoder: ConvNetConfig
    pretrain: PretrainConfig
    probe: ProbeConfig
    seeds: tuple[int, ...]
    horizons: tuple[str, ...] = ("equal_steps", "paper")
    ssl: SSLConfig | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SslkdError("evaluate.seeds must name at least one seed")
        unknown = [h for h in self.horizons if h not in HORIZONS]
        if not self.horizons or unknown or len(set(self.horizons)) != len(self.horizons):
            raise SslkdError(
                f"evaluate.horizons must be distinct names from {', '.join(HORIZONS)}, got {self.horizons}"
            )


@dataclass(frozen=True)
class ReportConfig:
    """methods: rows of the summary, in this order (those evaluated)."""

    methods: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise SslkdError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
