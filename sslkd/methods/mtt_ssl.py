"""MTT with SSL experts (the MKDT paper's "MTT-SSL" baseline): trajectory matching (sslkd/methods/distill.py)
on expert trajectories trained with an SSL objective instead of KD. The synthetic set learns its images
only; the inner steps regress the start images' fixed teacher representations (the distill machinery's
inner loss, as in the variance study's matchability test), and the set is pre-trained on with the SSL
objective at evaluation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from sslkd.errors import SslkdError
from sslkd.methods.distill import DistillConfig
from sslkd.methods.experts import ExpertsConfig, with_objective
from sslkd.methods.selection import InitConfig
from sslkd.methods.teacher import SSL_OBJECTIVES


@dataclass(frozen=True)
class MttSslConfig:
    """experts: the KD experts' settings (optimiser, student, epochs, number, seed), trained with
    ``objective`` instead; distill: the trajectory-matching settings and seeds, with the representations
    frozen (its seeds are not used); init: its size M and seed give the random real subset that starts the
    set (the init stage's random one); objective: the SSL objective the experts train with; seeds: one set
    per seed (params.yaml ``mtt_ssl.seeds``), paired with MKDT's set of the same seed."""

    experts: ExpertsConfig
    distill: DistillConfig
    init: InitConfig
    objective: str
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SslkdError("mtt_ssl.seeds must name at least one seed")
        if self.objective not in SSL_OBJECTIVES:
            raise SslkdError(f"unknown mtt_ssl.objective {self.objective!r}; choose one of {', '.join(SSL_OBJECTIVES)}")

    @property
    def ssl_experts(self) -> ExpertsConfig:
        return with_objective(self.experts, self.objective)

    @property
    def matching(self) -> DistillConfig:
        return replace(self.distill, seeds=tuple(self.seeds), learn_representations=False)


def final_matching_loss(losses: list[float]) -> float:
    """The mean matching loss over the last tenth of the iterations (at least one): each iteration matches
    a random start epoch, so single values scatter."""
    window = max(1, len(losses) // 10)
    return statistics.fmean(losses[-window:])
