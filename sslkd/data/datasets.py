"""Datasets behind one interface: uint8 images [N, C, H, W] in dataset order, labels for evaluation only.

Sources: ``digits`` (scikit-learn's bundled UCI digits, the embedded default), ``cifar10``/``cifar100``
(torchvision's copy under ``root``, downloaded when allowed, or an offline .npz copy of the training set
when ``root`` is a .npz file), ``tinyimagenet`` (the CS231n archive, val folder relabelled from its
annotations, or an npz_jpeg copy of training images when ``root`` is a .npz file), ``npz`` (any file with
``x`` uint8 NHWC and ``y`` int64), ``npz_jpeg`` (JPEG files packed in one .npz, sslkd.data.image_sources) and
the paper's downstream sets ``aircraft``, ``flowers102``, ``cub200``, ``stanford_dogs`` (image folders,
sslkd.data.image_sources). Sets without a test split get a seeded, class-balanced held-out part of the
training set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sslkd.data.image_sources import DOWNSTREAM_READERS, Splits, npz_archive, read_npz_jpeg
from sslkd.errors import SslkdError

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "tinyimagenet", "npz", "npz_jpeg", *DOWNSTREAM_READERS)
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Sets whose root may name one .npz file (an offline copy of the training set) instead of their folder:
# classes and image shape [C, H, W] it must have, and whether it holds JPEG files (npz_jpeg) or pixels (npz).
NPZ_COPIES = {
    "cifar10": (10, (3, 32, 32), False),
    "cifar100": (100, (3, 32, 32), False),
    "tinyimagenet": (200, (3, 64, 64), True),
}


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how they are split.

    dataset: one of DATASETS; root: folder (torchvision sets, tinyimagenet, the downstream sets), or .npz
    file (npz, npz_jpeg; also an offline copy of a CIFAR or Tiny ImageNet training set); test_path: an .npz
    test file of the same format for .npz sources ("" for none); holdout_fraction: share of each class held
    out as test when there is no test split; train_subset: keep a seeded class-balanced subset of
    this many training images (0 keeps all); image_size: resize to this side (0 keeps it);
    download: let torchvision download a missing set; split_seed: seeds the hold-out and the subset.
    """

    dataset: str
    root: str
    test_path: str
    holdout_fraction: float
    train_subset: int
    image_size: int
    download: bool
    split_seed: int

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise SslkdError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise SslkdError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        if self.train_subset < 0 or self.image_size < 0:
            raise SslkdError("train_subset and image_size must be >= 0 (0 means keep)")
        if self.dataset in DOWNSTREAM_READERS and not self.image_size:
            raise SslkdError(f"{self.dataset}'s images differ in size: set sslkd.data.image_size (e.g. 32)")


@dataclass
class ImageDataset:
    """train_images / test_images: uint8 [N, C, H, W]; train_labels / test_labels: int64 [N].

    pool_images / pool_labels: every training image that is not held out [P, C, H, W] / [P], when the
    training set is a subset of them (``train_subset``), else None (the pool is the training set). The
    teacher trains on the pool, and the linear probe draws its labels from it.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    pool_images: torch.Tensor | None = None
    pool_labels: torch.Tensor | None = None


def class_balanced_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held_out), holding out round(fraction · n_c) of each class c.

    labels: int64 [N]. Both index sets come back sorted, so dataset order is kept.
    """
    held_out = []
    for label in torch.unique(labels, sorted=True):
        members = torch.nonzero(labels == label).flatten()
        count = int(round(fraction * len(members)))
        held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held = torch.sort(torch.cat(held_out)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def class_balanced_subset(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a seeded subset of ``size`` examples with (nearly) equal counts per class."""
    if size > len(labels):
        raise SslkdError(f"train_subset={size} exceeds the {len(labels)} training images")
    kept, _ = class_balanced_split(labels, 1.0 - size / len(labels), generator)
    return kept


CHANNELS = (1, 3)  # grey or RGB: what the teacher, the students and the augmentations take


def _from_nhwc(array: np.ndarray, what: str) -> torch.Tensor:
    """uint8 [N, H, W, C] (C in CHANNELS, N >= 1) -> uint8 [N, C, H, W]."""
    if array.dtype != np.uint8 or array.ndim != 4:
        raise SslkdError(f"{what}: expected uint8 images [N, H, W, C], got {array.dtype} {array.shape}")
    if array.shape[-1] not in CHANNELS:
        layout = " (it looks like NCHW: transpose it to NHWC)" if array.shape[1] in CHANNELS else ""
        raise SslkdError(
            f"{what}: expected images [N, H, W, C] with C = 1 or 3 channels last, got shape {array.shape}{layout}"
        )
    if len(array) == 0:
        raise SslkdError(f"{what}: holds no images (shape {array.shape})")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def _labels(array: np.ndarray, count: int, what: str) -> torch.Tensor:
    if array.ndim != 1 or len(array) != count or not np.issubdtype(array.dtype, np.integer):
        raise SslkdError(f"{what}: expected {count} integer labels, got {array.dtype} {array.shape}")
    if count and array.min() < 0:
        raise SslkdError(f"{what}: labels must be class indices >= 0, found {array.min()}")
    return torch.from_numpy(array.astype(np.int64))


def check_dataset(dataset: "ImageDataset", what: str) -> None:
    """Refuse a dataset the pipeline cannot evaluate: fewer than 2 training classes (the linear probe
    needs two), or an empty test split (too few images per class for the hold-out fraction)."""
    classes = torch.unique(dataset.train_labels)
    if len(classes) < 2:
        raise SslkdError(
            f"{what}: the training images hold {len(classes)} class(es); the linear-probe evaluation needs at least 2"
        )
    if len(dataset.test_images) == 0:
        counts = torch.bincount(dataset.train_labels)
        raise SslkdError(
            f"{what}: the test split is empty ({len(dataset.train_images)} training images, at most "
            f"{int(counts.max())} per class): give more images per class, a larger holdout_fraction "
            "or a test_path"
        )


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's 1,797 8×8 digits (values 0–16) as uint8 [N, 1, 8, 8] scaled to 0–255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(bunch.target.astype(np.int64)), [str(n) for n in bunch.target_names]


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ``npz`` file: ``x`` uint8 [N, H, W, C], ``y`` integer [N], optional ``class_names``."""
    with npz_archive(path, ("x", "y"), "x uint8 NHWC, y int64") as archive:
        images = _from_nhwc(archive["x"], str(path))
        labels = _labels(archive["y"], len(images), str(path))
        names = [str(n) for n in archive["class_names"]] if "class_names" in archive else []
    return images, labels, names or [str(c) for c in range(int(labels.max()) + 1)]


def _torchvision_cifar(name: str, root: Path, download: bool) -> Splits:
    from torchvision import datasets

    dataset_class = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    parts: list[torch.Tensor] = []
    for train in (True, False):
        try:
            data = dataset_class(str(root), train=train, download=download)
        except Exception as error:  # RuntimeError when absent, URLError/OSError when the download fails
            raise SslkdError(
                f"{name} not found under {root} ({dataset_class.base_folder}/) and "
                f"{'its download failed: ' + str(error).splitlines()[0] if download else 'download is off'}; "
                f"set data.root in params.yaml to a folder that holds it or to an .npz copy of its training set "
                f"(dvc exp run -S data.root=PATH), or sslkd.data.download = True when online"
            ) from None
        parts += [_from_nhwc(np.asarray(data.data), name), torch.tensor(data.targets, dtype=torch.int64)]
    return parts[0], parts[1], parts[2], parts[3], list(data.classes)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _tinyimagenet(root: Path, download: bool) -> Splits:
    """Train images from ``train/<wnid>/images``; val labels from ``val/val_annotations.txt``."""
    base = root / "tiny-imagenet-200"
    if not base.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINYIMAGENET_URL, download_root=str(root))
        except Exception as error:
            raise SslkdError(f"tinyimagenet download failed ({TINYIMAGENET_URL}): {error}") from None
    if not (base / "train").is_dir() or not (base / "val" / "val_annotations.txt").is_file():
        raise SslkdError(
            f"tinyimagenet not found under {base} (needs train/ and val/val_annotations.txt); "
            f"unzip {TINYIMAGENET_URL} into {root}, set sslkd.data.download = True when online, or set data.root "
            "to an npz_jpeg copy of training images (dvc exp run -S data.root=PATH.npz)"
        )
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    index_of = {wnid: i for i, wnid in enumerate(wnids)}
    train_images, train_labels = [], []
    for wnid in wnids:
        for path in sorted((base / "train" / wnid / "images").glob("*.JPEG")):
            train_images.append(_read_rgb(path))
            train_labels.append(index_of[wnid])
    test_images, test_labels = [], []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        if not line.strip():
            continue
        filename, wnid = line.split("\t")[:2]
        if wnid not in index_of:
            raise SslkdError(f"val annotation names class {wnid!r} that has no train folder")
        test_images.append(_read_rgb(base / "val" / "images" / filename))
        test_labels.append(index_of[wnid])
    return (
        _from_nhwc(np.stack(train_images), "tinyimagenet train"),
        torch.tensor(train_labels),
        _from_nhwc(np.stack(test_images), "tinyimagenet val"),
        torch.tensor(test_labels),
        wnids,
    )


def read_file(dataset: str, path: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A dataset given as one .npz file: ``npz``, ``npz_jpeg`` (decoded at image_size, 0 keeping it) or an
    NPZ_COPIES set's offline copy, checked to be that set (its classes and image shape)."""
    if dataset not in NPZ_COPIES:
        return read_npz_jpeg(path, image_size) if dataset == "npz_jpeg" else read_npz(path)
    classes, shape, jpeg = NPZ_COPIES[dataset]
    images, labels, names = read_npz_jpeg(path, image_size) if jpeg else read_npz(path)
    if jpeg and image_size:
        shape = (shape[0], image_size, image_size)  # decoded at that size
    if int(labels.max()) + 1 != classes or tuple(images.shape[1:]) != shape:
        raise SslkdError(
            f"{path} is not {dataset}: {int(labels.max()) + 1} classes of "
            f"{tuple(images.shape[1:])} images, expected {classes} of {shape}"
        )
    return images, labels, names


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size] (bilinear, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_dataset(config: DataConfig) -> ImageDataset:
    """Read the configured source, split off a held-out test set if it has none, subset and resize."""
    generator = torch.Generator().manual_seed(config.split_seed)
    root = Path(config.root).expanduser()
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    if config.dataset == "digits":
        images, labels, names = load_digits_images()
    elif config.dataset in ("npz", "npz_jpeg") or (config.dataset in NPZ_COPIES and root.suffix == ".npz"):
        images, labels, names = read_file(config.dataset, root, config.image_size)
        if config.test_path:
            test_images, test_labels, _ = read_file(
                config.dataset, Path(config.test_path).expanduser(), config.image_size
            )
            if test_images.shape[1:] != images.shape[1:]:
                raise SslkdError(
                    f"test images {tuple(test_images.shape[1:])} differ from train {tuple(images.shape[1:])}"
                )
            test = (test_images, test_labels)
    elif config.dataset in ("cifar10", "cifar100"):
        images, labels, test_images, test_labels, names = _torchvision_cifar(config.dataset, root, config.download)
        test = (test_images, test_labels)
    elif config.dataset == "tinyimagenet":
        images, labels, test_images, test_labels, names = _tinyimagenet(root, config.download)
        test = (test_images, test_labels)
    else:
        images, labels, test_images, test_labels, names = DOWNSTREAM_READERS[config.dataset](
            root, config.download, config.image_size
        )
        test = (test_images, test_labels)
    if test is None:
        kept, held_out = class_balanced_split(labels, config.holdout_fraction, generator)
        test = (images[held_out], labels[held_out])
        images, labels = images[kept], labels[kept]
    pool: tuple[torch.Tensor, torch.Tensor] | None = None
    if config.train_subset:
        subset = class_balanced_subset(labels, config.train_subset, generator)
        pool = (images, labels)
        images, labels = images[subset], labels[subset]
    if config.image_size:
        images, test = resize(images, config.image_size), (resize(test[0], config.image_size), test[1])
        pool = pool and (resize(pool[0], config.image_size), pool[1])
    log.info(
        "%s: %d train (of a pool of %d), %d test images of shape %s",
        config.dataset,
        len(images),
        len(pool[0]) if pool else len(images),
        len(test[0]),
        tuple(images.shape[1:]),
    )
    return ImageDataset(images, labels, test[0], test[1], names, *(pool or (None, None)))


class InputSpace(Protocol):
    """Where networks see images: ``apply`` maps [N, C, H, W] pixels in [0, 1] into it, ``invert`` back;
    ``name`` says which space (recorded with every artifact made of images in it)."""

    @property
    def name(self) -> str: ...

    def apply(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def invert(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Normalisation:
    """Per-channel standardisation with the training statistics: mean, std [C] on the [0, 1] scale."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, images: torch.Tensor) -> "Normalisation":
        """Statistics of uint8 images [N, C, H, W]."""
        scaled = images.double() / 255.0
        return cls(scaled.mean(dim=(0, 2, 3)).float(), scaled.std(dim=(0, 2, 3)).float())

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> standardised float32."""
        return (pixels - self.mean.view(1, -1, 1, 1).to(pixels)) / self.std.view(1, -1, 1, 1).to(pixels)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised [N, C, H, W] -> [0, 1] pixel scale."""
        return images * self.std.view(1, -1, 1, 1).to(images) + self.mean.view(1, -1, 1, 1).to(images)

    def from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> standardised float32, the one tensor training loops index into."""
        return self.apply(images.float() / 255.0)

    @property
    def name(self) -> str:
        return "standardised"


@dataclass(frozen=True)
class StudentInputConfig:
    """What the students (experts, distillation, evaluation) see. zca: ZCA-whiten the standardised images
    with a whitening fit on the training images (MTT's and MKDT's ``--zca`` for CIFAR; the teacher keeps
    the standardised images); zca_regularisation: ε added to the covariance's eigenvalues."""

    zca: bool
    zca_regularisation: float

    def __post_init__(self) -> None:
        if not self.zca_regularisation > 0.0:
            raise SslkdError(f"student_input.zca_regularisation must be > 0, got {self.zca_regularisation}")


@dataclass(frozen=True)
class ZCAWhitening:
    """ZCA whitening of standardised images, composed with their standardisation.

    With the training images' feature mean μ [F] (F = C·H·W) and covariance U diag(s) Uᵀ, an image x
    (flattened) maps to (x − μ) W with W = U diag(1/√(s + ε)) Uᵀ; ``unwhiten`` applies the inverse
    W⁻¹ = U diag(√(s + ε)) Uᵀ. ``apply``/``invert`` go between [0, 1] pixels and the whitened space, as
    :class:`Normalisation`'s do between pixels and the standardised space.
    """

    normalisation: Normalisation
    mean: torch.Tensor  # [F]
    matrix: torch.Tensor  # [F, F], symmetric
    inverse: torch.Tensor  # [F, F], symmetric
    regularisation: float

    @classmethod
    def fit(cls, normalisation: Normalisation, standardised: torch.Tensor, regularisation: float) -> "ZCAWhitening":
        """Fit on standardised training images [N, C, H, W] (float64 statistics, deterministic on the CPU)."""
        flat = standardised.detach().cpu().flatten(1).double()
        mean = flat.mean(dim=0)
        centred = flat - mean
        covariance = centred.T @ centred / max(len(flat) - 1, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=0.0) + regularisation
        matrix = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        inverse = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return cls(normalisation, mean.float(), matrix.float(), inverse.float(), regularisation)

    @property
    def name(self) -> str:
        return f"zca(regularisation={self.regularisation:g})"

    def whiten(self, standardised: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Standardised [N, C, H, W] -> whitened [N, C, H, W] (in batches: the matrix is F × F)."""
        matrix, mean = self.matrix.to(standardised), self.mean.to(standardised)
        return torch.cat(
            [((chunk.flatten(1) - mean) @ matrix).view_as(chunk) for chunk in standardised.split(batch_size)]
        )

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        """Whitened [N, C, H, W] -> standardised [N, C, H, W]."""
        return (whitened.flatten(1) @ self.inverse.to(whitened) + self.mean.to(whitened)).view_as(whitened)

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> whitened float32."""
        return self.whiten(self.normalisation.apply(pixels))

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened [N, C, H, W] -> [0, 1] pixel scale."""
        return self.normalisation.invert(self.unwhiten(images))
