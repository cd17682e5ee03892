"""The evaluate stage's config: how every method's set is pre-trained and scored (sslkd/stages/evaluate.py), and
the evaluation protocols of a pre-trained encoder."""

from __future__ import annotations

from dataclasses import dataclass

from sslkd.errors import SslkdError
from sslkd.evaluation.probe import HORIZONS, FineTuneConfig, PretrainConfig, ProbeConfig
from sslkd.methods.teacher import SSLConfig
from sslkd.models import ConvNetConfig

# Evaluation protocols of a pre-trained encoder: the linear probe (always, the headline) and full fine-tuning
PROTOCOLS = ("linear_probe", "fine_tune")


@dataclass(frozen=True)
class EvaluateConfig:
    """encoder: the network pre-trained on each set; seeds: evaluation seeds (pre-training init, random
    subset, labelled subset); horizons: the pre-training horizons every set is evaluated at
    (probe.HORIZONS), the first being the headline one of results/summary.json; protocols: what is
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
