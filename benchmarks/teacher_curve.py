"""The teacher's probe gain against training compute, on CIFAR-10 (the cifar10_cpu teacher's recipe).

Trains a width-32 BN ConvNet with Barlow Twins on the 45k non-held-out images of a CIFAR-10 .npz copy (the
data stage's split: seed 0, 10% of each class held out), AdamW lr 2e-3 / wd 1e-4, batch 256, a 100-step
linear warm-up then a cosine schedule over ``--steps``, and probes its features (standardised, logistic
regression, 1% and 5% of the 45k labels, 3 label draws) against the same network untrained after each of
``--probe-at`` steps (checkpoints of one run, so the earlier ones are mid-schedule, not fully annealed).
Writes the probes and training seconds as JSON and the encoder after each probe (importable as the
teacher stage's ``sslkd.teacher.checkpoint``). Usage:

    python benchmarks/teacher_curve.py --data PATH/cifar10_train.npz --out DIR [--steps 1400]
        [--probe-at 175 350 700 1400]
    python benchmarks/teacher_curve.py --plot DIR/teacher_curve.json --out DIR   # the plot alone
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslkd.data.augmentations import AugmentConfig, two_views
from sslkd.data.datasets import class_balanced_split
from sslkd.losses import barlow_twins_loss
from sslkd.methods.teacher import warmup_cosine
from sslkd.models import BNConvNet, BNConvNetConfig, seeded_module

log = logging.getLogger("teacher_curve")

AUGMENT = AugmentConfig(
    crop_scale=(0.2, 1.0),
    flip=True,
    jitter_prob=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    grayscale_prob=0.2,
    solarize_prob=0.0,
)


def probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    fraction: float,
    seed: int,
) -> float:
    """Accuracy (%) of a logistic regression on standardised features of a stratified fraction of the labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(1000 + 10 * seed)
    chosen = []
    for label in range(int(train_labels.max()) + 1):
        members = torch.nonzero(train_labels == label).flatten()
        chosen.append(
            members[torch.randperm(len(members), generator=generator)[: max(1, round(fraction * len(members)))]]
        )
    subset = torch.cat(chosen)
    scaler = StandardScaler().fit(train[subset].numpy())
    classifier = LogisticRegression(C=1.0, max_iter=1000).fit(
        scaler.transform(train[subset].numpy()), train_labels[subset].numpy()
    )
    return float(100 * np.mean(classifier.predict(scaler.transform(test.numpy())) == test_labels.numpy()))


@torch.no_grad()
def features(encoder: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder((chunk.float() / 255 - mean) / std) for chunk in images.split(1000)])


def plot(results: dict, path: Path) -> None:
    """The gain over the untrained network against training steps, one line per label fraction."""
    from sslkd.evaluation.plots import pyplot

    plt = pyplot()
    steps = sorted(int(key.removeprefix("step")) for key in results if key.startswith("step"))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for fraction in ("0.01", "0.05"):
        gains = [results[f"step{step}"][fraction] - results["untrained"][fraction] for step in steps]
        axis.plot(steps, gains, marker="o", label=f"{float(fraction) * 100:g}% labels")
    axis.set_xlabel("teacher training steps (batch 256)")
    axis.set_ylabel("probe gain over untrained (points)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="only plot this teacher_curve.json")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--probe-at", type=int, nargs="+", default=[175, 350, 700, 1400])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.out / "teacher_gain.png")
        return
    if args.data is None:
        parser.error("--data is required to train")
    with np.load(args.data) as archive:
        images = torch.from_numpy(archive["x"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(archive["y"].astype(np.int64))
    kept, held = class_balanced_split(labels, 0.1, torch.Generator().manual_seed(0))
    train, train_labels, test, test_labels = images[kept], labels[kept], images[held], labels[held]
    pixels = train.float() / 255
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3)).view(1, 3, 1, 1)
    encoder = seeded_module(lambda: BNConvNet(BNConvNetConfig(32), 3), 0)
    head = seeded_module(
        lambda: nn.Sequential(
            nn.Linear(256, 1024, bias=False),
            nn.BatchNorm1d(1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, 1024, bias=False),
        ),
        1,
    )
    results: dict[str, object] = {}

    def record(tag: str) -> None:
        train_features, test_features = features(encoder, train, mean, std), features(encoder, test, mean, std)
        results[tag] = {
            str(f): float(
                np.mean([probe(train_features, train_labels, test_features, test_labels, f, s) for s in range(3)])
            )
            for f in (0.01, 0.05)
        }
        log.info("%s: %s", tag, results[tag])

    record("untrained")
    optimiser = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(100, args.steps))
    generator, step, start = torch.Generator().manual_seed(2), 0, time.time()
    while step < args.steps:
        order = torch.randperm(len(pixels), generator=generator)
        for first in range(0, len(pixels) - 255, 256):
            encoder.train()
            head.train()
            view1, view2 = two_views(pixels[order[first : first + 256]], AUGMENT, generator)
            loss = barlow_twins_loss(head(encoder((view1 - mean) / std)), head(encoder((view2 - mean) / std)), 5e-3)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            if step in args.probe_at:
                results[f"train_s_{step}"] = time.time() - start
                record(f"step{step}")
                torch.save(encoder.state_dict(), args.out / f"bn32_step{step}.pt")
            if step >= args.steps:
                break
    (args.out / "teacher_curve.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "teacher_gain.png")


if __name__ == "__main__":
    main()
