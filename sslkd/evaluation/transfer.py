"""Transfer: a pre-trained encoder evaluated on downstream sets (what ``sslkd transfer`` runs).

A setting names its downstream sets (:class:`DownstreamConfig`, gin); where each is read from is a
params.yaml value (:class:`TransferConfig`'s files, as data.root / data.test_path), so a study can be scored
on test files one has. A downstream set is read like the data stage's (datasets.load_dataset), resized to
the encoder's input size, made grey or RGB as the encoder takes, and put in the students' kind of input
space fit on its own training pool (docs/transfer.md).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from sslkd.data.datasets import (
    DATASETS,
    DataConfig,
    Normalisation,
    StudentInputConfig,
    ZCAWhitening,
    check_dataset,
    load_dataset,
)
from sslkd.data.training_data import TrainingData
from sslkd.errors import SslkdError
from sslkd.evaluation.evaluate_config import EvaluateConfig


@dataclass(frozen=True)
class DownstreamConfig:
    """A downstream (transfer) set: name (its key in results/transfer.json and in params.yaml's
    transfer.files); dataset (datasets.DATASETS); holdout_fraction and split_seed: the seeded,
    class-balanced test split when it has no test file; train_subset: keep a class-balanced subset of its
    training pool (0 keeps all); download: let torchvision download a missing set; label_fractions: the
    fractions of its training pool the probe gets labels for (() the in-domain probe's), fine-tuning at
    those of them fine_tune.label_fractions names (all when it names none). Its images are resized to the encoder's input size; where they are read
    from (root, test_path) is a params.yaml value (TransferConfig.files)."""

    name: str
    dataset: str
    holdout_fraction: float
    split_seed: int
    train_subset: int = 0
    download: bool = False
    label_fractions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or " " in self.name:
            raise SslkdError(f"a downstream set needs a name without '/' or spaces, got {self.name!r}")
        if self.dataset not in DATASETS:
            raise SslkdError(
                f"downstream {self.name!r}: unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if not all(0 < f <= 1 for f in self.label_fractions):
            raise SslkdError(
                f"downstream {self.name!r}: label_fractions must lie in (0, 1], got {self.label_fractions}"
            )
        if not 0.0 < self.holdout_fraction < 1.0 or self.train_subset < 0:
            raise SslkdError(f"downstream {self.name!r}: holdout_fraction must lie in (0, 1) and train_subset >= 0")


# Datasets that need no files: a downstream of these needs no entry in params.yaml's transfer.files
BUNDLED_DATASETS = ("digits",)


@dataclass(frozen=True)
class TransferConfig:
    """downstream: the downstream sets every method's pre-trained encoders are evaluated on (gin; none:
    the transfer stage writes empty results); files: where each one is read from, {name: {"root", "test_path"}}
    as data.root / data.test_path are (params.yaml, so a study can be scored on test files one has);
    evaluate: the evaluation whose encoders, probe, fine-tuning recipe and protocols transfer uses."""

    downstream: tuple[DownstreamConfig, ...]
    evaluate: EvaluateConfig
    files: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [d.name for d in self.downstream]
        if len(set(names)) != len(names):
            raise SslkdError(f"transfer.downstream names a set twice: {names}")
        for name, entry in self.files.items():
            if not isinstance(entry, dict) or set(entry) - {"root", "test_path"} or "root" not in entry:
                raise SslkdError(
                    f"params.yaml transfer.files.{name} must map 'root' (and optionally 'test_path') to paths, got {entry!r}"
                )
        for downstream in self.downstream:
            if downstream.name not in self.files and downstream.dataset not in BUNDLED_DATASETS:
                raise SslkdError(
                    f"downstream {downstream.name!r} has no files: add transfer: {{files: {{{downstream.name}: "
                    "{root: PATH, test_path: ''}}} to params.yaml"
                )

    def location(self, downstream: DownstreamConfig) -> tuple[str, str]:
        """(root, test_path) of a downstream set ('' for a bundled one without an entry)."""
        entry = self.files.get(downstream.name, {})
        return str(entry.get("root", "")), str(entry.get("test_path", ""))


def downstream_evaluation(evaluate: EvaluateConfig, downstream: DownstreamConfig) -> EvaluateConfig:
    """The evaluation of a downstream set: the in-domain one at the downstream's label fractions (when it
    names some), fine-tuning at those of them fine_tune.label_fractions names (none of them: no fine-tuning)."""
    if not downstream.label_fractions:
        return evaluate
    probe = dataclasses.replace(evaluate.probe, label_fractions=downstream.label_fractions)
    if evaluate.fine_tune is None or not evaluate.fine_tune.label_fractions:
        return dataclasses.replace(evaluate, probe=probe)
    tuned = tuple(f for f in downstream.label_fractions if f in evaluate.fine_tune.label_fractions)
    if not tuned:
        return dataclasses.replace(evaluate, probe=probe, protocols=("linear_probe",), fine_tune=None)
    return dataclasses.replace(
        evaluate, probe=probe, fine_tune=dataclasses.replace(evaluate.fine_tune, label_fractions=tuned)
    )


GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as augmentations' grayscale


def downstream_key(name: str) -> int:
    """The seed key of a downstream set: a stable hash of its name (not its position in the list)."""
    return zlib.crc32(name.encode())


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] (C 1 or 3) -> uint8 [N, channels, H, W]: grey repeated to RGB, RGB to luma."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise SslkdError(f"cannot turn {images.shape[1]}-channel images into {channels}-channel ones")


def downstream_data(
    downstream: DownstreamConfig,
    location: tuple[str, str],
    image_shape: tuple[int, int, int],
    student_input: StudentInputConfig,
) -> TrainingData:
    """A downstream set as the encoder takes it: images of ``image_shape`` (C, H, W) in the students' kind of
    input space, fit on the downstream training pool (which its labelled subsets come from)."""
    root, test_path = location
    data_config = DataConfig(
        dataset=downstream.dataset,
        root=root,
        test_path=test_path,
        holdout_fraction=downstream.holdout_fraction,
        train_subset=downstream.train_subset,
        image_size=image_shape[1],
        download=downstream.download,
        split_seed=downstream.split_seed,
    )
    dataset = load_dataset(data_config)
    check_dataset(dataset, f"downstream {downstream.name} ({downstream.dataset} {root})".strip())
    train = match_channels(dataset.train_images, image_shape[0])
    test = match_channels(dataset.test_images, image_shape[0])
    standardisation = Normalisation.of(train)
    space: Normalisation | ZCAWhitening = standardisation
    if student_input.zca:
        space = ZCAWhitening.fit(standardisation, standardisation.from_uint8(train), student_input.zca_regularisation)
    return TrainingData(
        space.apply(train.float() / 255.0),
        dataset.train_labels,
        space.apply(test.float() / 255.0),
        dataset.test_labels,
        space,
        train,
        dataset.train_labels,
    )
