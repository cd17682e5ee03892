"""A workspace whose KD targets lie between one-hot labels and the teacher's representations (issue 29):
where does the gain of supervised trajectory matching vanish as the targets become MKDT's?

    python benchmarks/mixed_targets.py --workdir W --out W_MIX --mix 0.5

W is a workspace in which ``sslkd data``, ``teacher`` and ``represent`` ran. W_MIX gets W's data and teacher
artifacts (hard links, with their sidecars) and a ``represent`` artifact whose row i is

    y_i(λ) = (1 − λ) · m_{c(i)} + λ · r_i,    m_c = mean of r_j over the training images of class c,

r_i being the teacher's representation of training image i and λ = ``--mix``. λ = 1 is MKDT's target;
λ = 0 regresses the class mean, a fixed linear code of the one-hot label in the same D dimensions at the
same scale as the teacher's, so that experts, distillation and evaluation run unchanged (the probe still
reads the labels). Every stage after ``represent`` (experts, init, distill, evaluate, benchmarks/ablate.py)
then runs in W_MIX as usual, on these targets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sslkd.errors import SslkdError
from sslkd.store.artifacts import load_artifact, save_artifact, sidecar_path
from sslkd.store.workspace import Workspace


def mixed_targets(representations: torch.Tensor, labels: torch.Tensor, mix: float) -> torch.Tensor:
    """(1 − mix) · class mean + mix · representation, row by row: representations [N, D], labels [N]."""
    means = torch.zeros(int(labels.max()) + 1, representations.shape[1], dtype=representations.dtype)
    means.index_add_(0, labels, representations)
    means /= torch.bincount(labels).clamp(min=1).unsqueeze(1).to(representations.dtype)
    return (1.0 - mix) * means[labels] + mix * representations


def link(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    for path, target in ((source, destination), (sidecar_path(source), sidecar_path(destination))):
        if target.exists():
            target.unlink()
        os.link(path, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a workspace with data, teacher, represent")
    parser.add_argument("--out", type=Path, required=True, help="the new workspace")
    parser.add_argument("--mix", type=float, required=True, help="λ in [0, 1]: 1 = the teacher's representations")
    args = parser.parse_args()
    if not 0.0 <= args.mix <= 1.0:
        sys.exit(f"mixed_targets: --mix must lie in [0, 1], got {args.mix}")
    source, out = Workspace(args.workdir), Workspace(args.out)
    try:
        dataset = load_artifact(source.dataset, "dataset", produced_by="data")
        representations = load_artifact(source.representations, "representations", produced_by="represent")
        for path in (source.dataset, source.teacher):
            link(path, out.root / path.relative_to(source.root))
        mixed = mixed_targets(representations["representations"].float(), dataset["train_labels"], args.mix)
        save_artifact(
            out.representations,
            "representations",
            {"representations": mixed},
            inputs={"dataset": out.dataset, "teacher": out.teacher},
            extra={
                "representation_dim": mixed.shape[1],
                "order": "dataset order (row i = training image i)",
                "mixed_targets": {"mix": args.mix, "source": str(source.representations.resolve())},
            },
        )
    except (SslkdError, OSError) as error:
        sys.exit(f"mixed_targets: {error}")
    print(f"{out.representations}: targets (1 - {args.mix}) x class mean + {args.mix} x teacher representation")


if __name__ == "__main__":
    main()
