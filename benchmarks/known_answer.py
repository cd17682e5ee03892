"""The engine's known answer (issue 29): sslkd's own experts and trajectory matching with *supervised*
targets on CIFAR-10, evaluated as MTT evaluates (a fresh ConvNet trained on the set, test accuracy),
against random real sets of the same size under the identical training.

    python benchmarks/known_answer.py --data PATH/cifar10_train.npz --out DIR [--recipe mtt] \\
        [--set key=value ...] [--threads 2]

A recipe (RECIPES) binds every value; ``--set`` overrides one (``--set distill.iterations=200``). What runs:
1. the data: the .npz training set, a seeded class-balanced 10% held out as test (5,000 images), the
   rest the pool; ``data.pool`` images of it (class-balanced) train the experts;
2. the students' input space: standardised, or ZCA-whitened (``data.zca``, fit on the pool);
3. ``experts.count`` experts (sslkd.experts.train_expert) on one-hot targets, under ``loss`` (mse: the
   KD loss on one-hot rows; cross_entropy), SGD with ``experts.lr`` / ``experts.momentum``, optionally
   with DSA (``experts.augment``);
4. trajectory matching (sslkd.distill.distill, the product's engine) from a random real start of
   ``ipc`` images per class, with DSA in the inner steps if ``distill.augment``;
5. evaluation at ``eval.seeds``: for each seed, the distilled set, its start and a fresh random real set
   each train one ConvNet (the same init and batch order) for ``eval.steps`` SGD steps (momentum 0.9,
   weight decay 5e-4, DSA if ``eval.augment``); test accuracy on the 5,000 held-out images (``eval.sets``
   names the baselines beside the distilled set: its start, a random real set). Every set is
   trained at every lr of ``eval.lrs`` and at the distilled α, and reported at the lr whose mean over
   seeds is best for that set (the same choice for the random baseline as for the distilled set).
Experts and distilled sets are cached in DIR by a hash of what made them. DIR/summary.json:
``{"<set>": {"mean", "std", "n", "lr"}, ..., "distilled_minus_random": {...}, "distilled_minus_start": {...}}``
in percent; DIR/run.json has the recipe, the timings and every accuracy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sslkd.data.augmentations import DSAConfig
from sslkd.data.datasets import DataConfig, Normalisation, ZCAWhitening, class_balanced_subset, load_dataset
from sslkd.evaluation.probe import PretrainConfig, pretrain_kd
from sslkd.methods.distill import DistillConfig, distill
from sslkd.methods.experts import ExpertsConfig, build_student, train_expert
from sslkd.methods.kd_steps import KDSteps
from sslkd.models import ConvNetConfig, ParameterLayout
from sslkd.seeding import derive_seed, generator
from sslkd.store.artifacts import torch_save_atomic, write_json_atomic

log = logging.getLogger("known_answer")

# MTT's recipe for CIFAR-10, 10 images per class (Cazenavette et al. 2022, its buffer.py / distill.py
# defaults: plain-SGD experts, ZCA, DSA, cross-entropy, α learned from the experts' lr), at CPU scale: a
# width-32 ConvNet-3; 8 experts of 5 epochs on a 10k pool at lr 0.05 instead of 100 of 50 epochs on 50k at
# 0.01 (the same distance in fewer steps); start epochs up to 3 instead of 20; 20 unrolled steps of 50
# images instead of 30 of all 100; 300 iterations instead of 5,000; 500 evaluation steps at a constant lr
# instead of 1,000 with the lr decayed at half.
RECIPES: dict[str, dict[str, Any]] = {
    "mtt": {
        "ipc": 10,
        "loss": "cross_entropy",
        "width": 32,
        "data": {"pool": 10000, "zca": True, "split_seed": 0},
        "experts": {"count": 8, "epochs": 5, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "augment": True},
        "distill": {
            "iterations": 300,
            "syn_steps": 20,
            "expert_epochs": 2,
            "max_start_epoch": 3,
            "lr_images": 1000.0,
            "lr_lr": 1e-5,
            "lr_init": 0.05,
            "batch_syn": 50,
            "learn_targets": False,
            "augment": True,
            "compile": True,
            "seed": 0,
        },
        "eval": {"steps": 500, "lrs": [0.03], "augment": True, "seeds": [0, 1, 2], "sets": ["start", "random"]},
    },
}


def override(recipe: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as JSON, else a string) to the recipe, strictly."""
    path, sep, raw = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set takes key=value, got {assignment!r}")
    *sections, key = path.split(".")
    node = recipe
    for section in sections:
        if not isinstance(node.get(section), dict):
            raise SystemExit(f"--set {path}: no section {section!r}")
        node = node[section]
    if key not in node:
        raise SystemExit(f"--set {path}: unknown key {key!r} (known: {', '.join(node)})")
    try:
        node[key] = json.loads(raw)
    except json.JSONDecodeError:
        node[key] = raw


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class Data:
    """The pool (expert data) and test images in the students' input space, with one-hot targets."""

    pool: torch.Tensor  # [N, 3, 32, 32]
    pool_labels: torch.Tensor  # [N]
    test: torch.Tensor  # [T, 3, 32, 32]
    test_labels: torch.Tensor  # [T]
    classes: int

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels, self.classes).float()


def load(path: Path, recipe: dict[str, Any]) -> Data:
    config = recipe["data"]
    dataset = load_dataset(DataConfig("cifar10", str(path), "", 0.1, 0, 0, False, split_seed=config["split_seed"]))
    subset = class_balanced_subset(dataset.train_labels, config["pool"], generator(config["split_seed"], 1))
    normalisation = Normalisation.of(dataset.train_images[subset])
    pool = normalisation.from_uint8(dataset.train_images[subset])
    test = normalisation.from_uint8(dataset.test_images)
    if config["zca"]:
        zca = ZCAWhitening.fit(normalisation, pool, regularisation=0.1)
        pool, test = zca.whiten(pool), zca.whiten(test)
    classes = int(dataset.train_labels.max()) + 1
    return Data(pool, dataset.train_labels[subset], test, dataset.test_labels, classes)


def dsa_or_none(enabled: bool) -> DSAConfig | None:
    return DSAConfig() if enabled else None


def student_for(data: Data, recipe: dict[str, Any], seed: int) -> torch.nn.Module:
    return build_student(ConvNetConfig(recipe["width"], 3), tuple(data.pool.shape[1:]), data.classes, seed)


def expert_trajectories(data: Data, recipe: dict[str, Any], out: Path) -> torch.Tensor:
    """[K, epochs + 1, P] expert snapshots, cached in ``out``."""
    key = digest(recipe["data"], recipe["loss"], recipe["width"], recipe["experts"])
    path = out / f"experts_{key}.pt"
    if path.is_file():
        return torch.load(path)
    spec = recipe["experts"]
    config = ExpertsConfig(
        student=ConvNetConfig(recipe["width"], 3),
        objective="kd",
        num_experts=spec["count"],
        epochs=spec["epochs"],
        lr=spec["lr"],
        momentum=spec["momentum"],
        weight_decay=spec["weight_decay"],
        batch_size=256,
        ssl=None,  # KD experts have no SSL objective
        compile=False,
        precision="float32",
        seed=0,
        augment=dsa_or_none(spec["augment"]),
    )
    started, trajectories = time.perf_counter(), []
    targets = data.one_hot(data.pool_labels)
    for index in range(spec["count"]):
        student = student_for(data, recipe, derive_seed(0, index))
        steps = KDSteps(student, ParameterLayout.of(student), compile=False, target_loss=recipe["loss"])
        snapshots, losses = train_expert(student, data.pool, targets, config, generator(0, index, 1), steps=steps)
        log.info("expert %d: losses per epoch %s", index, [round(loss, 4) for loss in losses])
        trajectories.append(snapshots)
    stacked = torch.stack(trajectories)
    torch_save_atomic(path, stacked)  # a run killed mid-write leaves no cache the next run would load
    log.info("experts: %.0f s", time.perf_counter() - started)
    return stacked


def start_indices(data: Data, ipc: int, seed: int) -> torch.Tensor:
    """A random real set of ``ipc`` images per class of the pool, seeded."""
    return class_balanced_subset(data.pool_labels, ipc * data.classes, generator(seed, 2))


def distilled_set(data: Data, recipe: dict[str, Any], trajectories: torch.Tensor, out: Path) -> dict[str, Any]:
    spec = recipe["distill"]
    key = digest(recipe["data"], recipe["loss"], recipe["width"], recipe["experts"], recipe["ipc"], spec)
    path = out / f"distilled_{key}.pt"
    if path.is_file():
        return torch.load(path)
    config = DistillConfig(
        iterations=spec["iterations"],
        syn_steps=spec["syn_steps"],
        expert_epochs=spec["expert_epochs"],
        max_start_epoch=spec["max_start_epoch"],
        batch_syn=spec["batch_syn"],
        lr_images=spec["lr_images"],
        momentum_images=0.5,
        lr_representations=1.0 if spec["learn_targets"] else 0.0,
        momentum_representations=0.5,
        lr_lr=spec["lr_lr"],
        momentum_lr=0.5,
        lr_init=spec["lr_init"],
        lr_min=1e-4,
        learn_representations=spec["learn_targets"],
        unroll="adjoint",
        adjoint_snapshots="all",
        compile=spec["compile"],
        seeds=(spec["seed"],),
        augment=dsa_or_none(spec["augment"]),
    )
    start = start_indices(data, recipe["ipc"], spec["seed"])
    student = student_for(data, recipe, 0)
    started = time.perf_counter()
    result = distill(
        student,
        ParameterLayout.of(student),
        trajectories,
        data.pool[start],
        data.one_hot(data.pool_labels[start]),
        config,
        generator(spec["seed"]),
        target_loss=recipe["loss"],
    )
    losses = result.matching_losses
    tenth = max(1, len(losses) // 10)
    saved = {
        "images": result.images,
        "targets": result.representations,
        "lr": result.lr,
        "start": start,
        "seconds": time.perf_counter() - started,
        "matching_loss_first_tenth": statistics.fmean(losses[:tenth]),
        "matching_loss_last_tenth": statistics.fmean(losses[-tenth:]),
        "images_rms_change": float((result.images - data.pool[start]).pow(2).mean().sqrt()),
    }
    torch_save_atomic(path, saved)
    log.info(
        "distilled in %.0f s: matching loss %.3f -> %.3f, lr %.4f",
        saved["seconds"],
        saved["matching_loss_first_tenth"],
        saved["matching_loss_last_tenth"],
        result.lr,
    )
    return saved


def test_accuracy(
    data: Data, recipe: dict[str, Any], images: torch.Tensor, targets: torch.Tensor, lr: float, seed: int
) -> float:
    """Train a fresh ConvNet (init and batch order from ``seed``) on the set; accuracy (%) on the test split."""
    spec = recipe["eval"]
    student = student_for(data, recipe, derive_seed(seed, 3))
    steps_per_epoch = -(-len(images) // 256)
    config = PretrainConfig(
        epochs=-(-spec["steps"] // steps_per_epoch),
        batch_size=256,
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        compile=False,
        precision="float32",
        augment=dsa_or_none(spec["augment"]),
    )
    steps = KDSteps(student, ParameterLayout.of(student), compile=False, target_loss=recipe["loss"])
    pretrain_kd(student, images, targets, lr, config, generator(seed, 4), steps=steps)
    student.eval()
    with torch.no_grad():
        predictions = torch.cat([student(chunk).argmax(1) for chunk in data.test.split(1000)])
    return float(100.0 * (predictions == data.test_labels).float().mean())


def stats(values: list[float]) -> dict[str, float | int]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def evaluate(data: Data, recipe: dict[str, Any], distilled: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of the distilled set, its start and a fresh random real set per seed, at every lr."""
    spec = recipe["eval"]
    lrs = sorted(set(spec["lrs"]) | {round(distilled["lr"], 6)})
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in ("distilled", *spec["sets"])}
    for lr in lrs:
        for seed in spec["seeds"]:
            random_set = start_indices(data, recipe["ipc"], derive_seed(seed, 5))
            sets = {
                "distilled": (distilled["images"], distilled["targets"]),
                "start": (data.pool[distilled["start"]], data.one_hot(data.pool_labels[distilled["start"]])),
                "random": (data.pool[random_set], data.one_hot(data.pool_labels[random_set])),
            }
            for name, (images, targets) in sets.items():
                if name not in runs:
                    continue
                accuracy = test_accuracy(data, recipe, images, targets, lr, seed)
                runs[name].setdefault(str(lr), []).append(accuracy)
                log.info("eval seed %d lr %g %s: %.2f", seed, lr, name, accuracy)
    best = {name: max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr])) for name, by_lr in runs.items()}
    summary: dict[str, Any] = {name: {**stats(runs[name][lr]), "lr": float(lr)} for name, lr in best.items()}
    for other in spec["sets"]:
        pairs = zip(runs["distilled"][best["distilled"]], runs[other][best[other]], strict=True)
        summary[f"distilled_minus_{other}"] = stats([d - o for d, o in pairs])
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 training set as .npz (x uint8 NHWC, y)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="mtt")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = copy.deepcopy(RECIPES[args.recipe])
    for assignment in args.set:
        override(recipe, assignment)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load(args.data, recipe)
    trajectories = expert_trajectories(data, recipe, args.out)
    distilled = distilled_set(data, recipe, trajectories, args.out)
    evaluation = evaluate(data, recipe, distilled)
    record = {
        "recipe_name": args.recipe,
        "recipe": recipe,
        "overrides": args.set,
        "threads": torch.get_num_threads(),
        "distill": {k: v for k, v in distilled.items() if k not in ("images", "targets", "start")},
        "runs": evaluation["runs"],
        "summary": evaluation["summary"],
        "seconds_total_this_call": time.perf_counter() - started,
    }
    write_json_atomic(args.out / "run.json", record)
    write_json_atomic(args.out / "summary.json", evaluation["summary"])
    print(json.dumps(evaluation["summary"], indent=2))


if __name__ == "__main__":
    main()
