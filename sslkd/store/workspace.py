"""Where each stage's artifacts live, relative to the workspace (the repository root for ``dvc repro``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "artifacts" / "data" / "dataset.pt"

    @property
    def teacher(self) -> Path:
        return self.root / "artifacts" / "teacher" / "encoder.pt"

    @property
    def representations(self) -> Path:
        return self.root / "artifacts" / "represent" / "representations.pt"

    @property
    def trajectories(self) -> Path:
        return self.root / "artifacts" / "experts" / "trajectories.pt"

    @property
    def init_indices(self) -> Path:
        return self.root / "artifacts" / "init" / "indices.pt"

    @property
    def distill_dir(self) -> Path:
        return self.root / "artifacts" / "distill"

    def synthetic(self, seed: int) -> Path:
        return self.distill_dir / f"synthetic_seed{seed}.pt"

    def method_dir(self, method: str) -> Path:
        """Where a distilled method's sets are: artifacts/distill (mkdt), artifacts/krr_st, artifacts/mtt_ssl."""
        return self.distill_dir if method == "mkdt" else self.root / "artifacts" / method

    def method_set(self, method: str, seed: int) -> Path:
        return self.method_dir(method) / f"synthetic_seed{seed}.pt"

    def evaluation(self, method: str) -> Path:
        return self.root / "artifacts" / "evaluate" / f"{method}.json"

    def encoders(self, method: str) -> Path:
        """The encoders ``evaluate --method`` pre-trained (state dicts), which ``transfer`` evaluates."""
        return self.root / "artifacts" / "encoders" / f"{method}.pt"

    def transfer(self, method: str) -> Path:
        return self.root / "artifacts" / "transfer" / f"{method}.json"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def jobs(self) -> Path:
        """Launcher jobs: logs, code snapshots, checkpoints and expert parts (not a DVC output)."""
        return self.root / "jobs"

    def job_state(self, stage: str) -> Path:
        """Checkpoints and expert parts of a stage's runs under a launcher (``<run key>/`` each)."""
        return self.jobs / stage / "state"
