"""The cost of one fine-tuning run at cifar10_cpu scale: a width-32 depth-3 ConvNet on 32x32 RGB images,
the recipe of gin/stages/mkdt.gin (30 epochs, batch 64), ``--labels`` labelled images (450 = 1% of the
45k pool), then scored on 5,000 test images. Random pixels: the cost does not depend on what they show.

    nice -n 19 python benchmarks/fine_tune_cost.py --labels 450 2250

Prints, per label count, the wall time and the process CPU time (the latter is what 2 dedicated cores
would take when the machine is shared: CPU seconds / 2 threads), as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sslkd.evaluation.fine_tune import accuracy, fine_tune
from sslkd.evaluation.probe import FineTuneConfig
from sslkd.methods.experts import build_student
from sslkd.models import ConvNetConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[450])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = FineTuneConfig(
        epochs=args.epochs, batch_size=64, lr=0.1, backbone_lr_factor=0.1, momentum=0.9, weight_decay=5e-4, padding=4
    )
    encoder = build_student(ConvNetConfig(width=32, depth=3), (3, 32, 32), 256, seed=0)
    generator = torch.Generator().manual_seed(0)
    test = torch.rand(5000, 3, 32, 32, generator=generator)
    results = []
    for count in args.labels:
        pixels = torch.rand(count, 3, 32, 32, generator=generator)
        labels = torch.arange(count) % 10
        wall, cpu = time.perf_counter(), time.process_time()
        model = fine_tune(encoder, pixels, labels, 10, lambda x: (x - 0.5) / 0.25, config, generator)
        accuracy(model, (test - 0.5) / 0.25, torch.arange(5000) % 10)
        results.append(
            {
                "labels": count,
                "epochs": args.epochs,
                "threads": args.threads,
                "wall_s": round(time.perf_counter() - wall, 1),
                "cpu_s": round(time.process_time() - cpu, 1),
            }
        )
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
