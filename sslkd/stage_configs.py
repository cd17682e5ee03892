"""Root configs of the stages whose settings are not a library config of their own."""

from __future__ import annotations

from dataclasses import dataclass

from sslkd.errors import SslkdError
from sslkd.evaluation.probe import HORIZONS, FineTuneConfig, PretrainConfig, ProbeConfig
from sslkd.methods.selection import HIGH_LOSS_SCOPES, INIT_METHODS
from sslkd.methods.teacher import SSLConfig
from sslkd.models import ConvNetConfig

METHODS = ("no_pretrain", "random", "high_loss", "full_data", "mkdt", "krr_st", "mtt_ssl")
# Evaluation protocols of a pre-trained encoder: the linear probe (always, the headline) and full fine-tuning
PROTOCOLS = ("linear_probe", "fine_tune")


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
    (evaluation.HORIZONS), the first being the headline one of results/summary.json; protocols: what is
    done with each pre-trained encoder (PROTOCOLS): 'linear_probe' always, 'fine_tune' adds full
    fine-tuning with ``fine_tune``'s recipe at the probe's label fractions; methods come from the command
    line; ssl: the SSL objective MTT-SSL's set is pre-trained with (None: that method cannot be evaluated)."""

    encoder: ConvNetConfig
    pretrain: PretrainConfig
    probe: ProbeConfig
    seeds: tuple[int, ...]
    horizons: tuple[str, ...] = ("equal_steps", "paper")
    protocols: tuple[str, ...] = ("linear_probe",)
    fine_tune: FineTuneConfig | None = None
    ssl: SSLConfig | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SslkdError("evaluate.seeds must name at least one seed")
        unknown_protocols = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown_protocols or "linear_probe" not in self.protocols or len(set(self.protocols)) != len(self.protocols):
            raise SslkdError(
                f"evaluate.protocols must be distinct names from {', '.join(PROTOCOLS)} and include 'linear_probe', "
                f"got {self.protocols}"
            )
        if "fine_tune" in self.protocols and self.fine_tune is None:
            raise SslkdError("evaluate.protocols names 'fine_tune' but sslkd.evaluate.fine_tune is not bound")
        if self.fine_tune is not None:
            extra = set(self.fine_tune.label_fractions) - set(self.probe.label_fractions)
            if extra:
                raise SslkdError(
                    f"fine_tune.label_fractions {sorted(extra)} are not among the probe's "
                    f"{list(self.probe.label_fractions)}: fine-tuning uses the probe's labelled subsets"
                )
        unknown = [h for h in self.horizons if h not in HORIZONS]
        if not self.horizons or unknown or len(set(self.horizons)) != len(self.horizons):
            raise SslkdError(
                f"evaluate.horizons must be distinct names from {', '.join(HORIZONS)}, got {self.horizons}"
            )

    @property
    def fine_tunes(self) -> bool:
        return "fine_tune" in self.protocols


@dataclass(frozen=True)
class ReportConfig:
    """methods: rows of the summary, in this order (those evaluated)."""

    methods: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise SslkdError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
