"""Datasets: the npz reader, splits, TinyImageNet's relabelled val folder, clear errors offline, and the
ZCA whitening students may see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sslkd.data.datasets import (
    DataConfig,
    Normalisation,
    StudentInputConfig,
    ZCAWhitening,
    class_balanced_split,
    load_dataset,
)
from sslkd.errors import SslkdError


def data_config(**overrides) -> DataConfig:
    values = dict(
        dataset="digits",
        root="",
        test_path="",
        holdout_fraction=0.3,
        train_subset=0,
        image_size=0,
        download=False,
        split_seed=0,
    )
    return DataConfig(**{**values, **overrides})


def write_npz(path, count=40, classes=4, shape=(8, 8, 3), dtype=np.uint8):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (count, *shape)).astype(dtype), y=np.arange(count) % classes)
    return path


def test_digits_split_is_class_balanced_seeded_and_disjoint():
    first, second = load_dataset(data_config()), load_dataset(data_config())
    assert first.train_images.shape[1:] == (1, 8, 8) and first.train_images.dtype == torch.uint8
    assert len(first.train_images) + len(first.test_images) == 1797
    assert torch.equal(first.test_images, second.test_images)
    per_class = torch.bincount(torch.cat([first.train_labels, first.test_labels]))
    assert torch.bincount(first.test_labels).tolist() == [round(0.3 * int(n)) for n in per_class]
    other = load_dataset(data_config(split_seed=1))
    assert not torch.equal(first.test_labels, other.test_labels) or not torch.equal(
        first.test_images, other.test_images
    )


def test_split_indices_are_sorted_and_partition():
    labels = torch.arange(5).repeat(20)
    kept, held = class_balanced_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(kept.tolist() + held.tolist()) == list(range(100))
    assert kept.tolist() == sorted(kept.tolist()) and torch.bincount(labels[held]).tolist() == [4] * 5


def test_npz_with_holdout_subset_resize(tmp_path):
    path = write_npz(tmp_path / "set.npz", count=80)
    dataset = load_dataset(data_config(dataset="npz", root=str(path), train_subset=40, image_size=16))
    assert dataset.train_images.shape == (40, 3, 16, 16) and len(dataset.test_images) == 24
    assert torch.bincount(dataset.train_labels).tolist() == [10] * 4


def test_npz_with_a_separate_test_file(tmp_path):
    train, test = write_npz(tmp_path / "train.npz"), write_npz(tmp_path / "test.npz", count=12)
    dataset = load_dataset(data_config(dataset="npz", root=str(train), test_path=str(test)))
    assert len(dataset.train_images) == 40 and len(dataset.test_images) == 12


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "npz dataset not found"),
        (lambda p: write_npz(p, dtype=np.float32), "expected uint8 images"),
        (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)), "lacks the arrays"),
        (lambda p: p.write_bytes(b"not a zip"), "is not an .npz archive"),
    ],
)
def test_bad_npz_files_fail_with_one_clear_line(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(SslkdError, match=message) as error:
        load_dataset(data_config(dataset="npz", root=str(path)))
    assert "\n" not in str(error.value)


def test_missing_cifar_says_where_it_looked_and_how_to_provide_it(tmp_path):
    with pytest.raises(
        SslkdError, match=r"cifar10 not found under .*set data.root in params.yaml .* -S data.root=PATH"
    ):
        load_dataset(data_config(dataset="cifar10", root=str(tmp_path)))


def test_failed_download_is_reported_in_one_line(tmp_path, monkeypatch):
    """The real download path, with the network replaced by a failure (these machines are offline)."""
    from urllib.error import URLError

    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(utils, "urlretrieve", offline, raising=False)
    monkeypatch.setattr(utils, "download_url", offline)
    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(SslkdError, match="download failed"):
        load_dataset(data_config(dataset="tinyimagenet", root=str(tmp_path), download=True))
    with pytest.raises(SslkdError, match="download failed"):
        load_dataset(data_config(dataset="cifar10", root=str(tmp_path), download=True))


def test_tinyimagenet_val_labels_come_from_the_annotations(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    colours = {"n01": 30, "n02": 200}
    for wnid, value in colours.items():
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    annotations = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):  # val files are not grouped by class
        Image.fromarray(np.full((64, 64, 3), colours[wnid], np.uint8)).save(base / "val" / "images" / f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    dataset = load_dataset(data_config(dataset="tinyimagenet", root=str(tmp_path)))
    assert dataset.class_names == ["n01", "n02"]
    assert dataset.train_labels.tolist() == [0, 0, 1, 1]
    assert dataset.test_labels.tolist() == [1, 0, 1]
    # the label matches the pixels: class n02 images are bright
    assert [int(image.float().mean() > 100) for image in dataset.test_images] == [1, 0, 1]


def test_unknown_dataset_and_bad_fraction_are_refused():
    with pytest.raises(SslkdError, match="unknown dataset 'mnist'"):
        data_config(dataset="mnist")
    with pytest.raises(SslkdError, match="holdout_fraction"):
        data_config(holdout_fraction=1.5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), regularisation=st.sampled_from([1e-6, 1e-2, 0.1, 1.0]))
def test_zca_whitening_decorrelates_the_training_images_and_inverts_exactly(seed, regularisation):
    """Whitened training images have covariance U diag(s / (s + ε)) Uᵀ (the identity as ε → 0), the
    whitening is symmetric (ZCA, not PCA), and ``invert`` undoes ``apply``."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    pixels = (torch.rand(400, 12, generator=generator, dtype=torch.float64) @ mixing).view(400, 3, 2, 2)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    normalisation = Normalisation.of((pixels * 255).round().to(torch.uint8))
    standardised = normalisation.apply(pixels.float())
    whitening = ZCAWhitening.fit(normalisation, standardised, regularisation)
    whitened = whitening.whiten(standardised).flatten(1).double()
    covariance = torch.cov(whitened.T)
    flat = standardised.flatten(1).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(flat.T))
    expected = (
        eigenvectors * (eigenvalues.clamp(min=0) / (eigenvalues.clamp(min=0) + regularisation))
    ) @ eigenvectors.T
    assert torch.allclose(covariance, expected, atol=2e-4)
    assert torch.allclose(whitened.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(whitening.matrix, whitening.matrix.T)
    assert torch.allclose(whitening.invert(whitening.apply(pixels.float())), pixels.float(), atol=1e-3)
    assert whitening.name == f"zca(regularisation={regularisation:g})" and normalisation.name == "standardised"


def test_student_input_needs_a_positive_zca_regularisation():
    with pytest.raises(SslkdError, match="zca_regularisation must be > 0"):
        StudentInputConfig(zca=True, zca_regularisation=0.0)


def test_a_training_subset_keeps_its_pool_of_every_non_held_out_image(tmp_path):
    path = write_npz(tmp_path / "set.npz", count=80)
    dataset = load_dataset(data_config(dataset="npz", root=str(path), train_subset=40, image_size=16))
    assert dataset.pool_images.shape == (56, 3, 16, 16) and len(dataset.pool_labels) == 56  # 80 - 24 held out
    pool = {tuple(image.flatten().tolist()) for image in dataset.pool_images}
    assert all(tuple(image.flatten().tolist()) in pool for image in dataset.train_images)  # the subset is inside
    assert not pool & {tuple(image.flatten().tolist()) for image in dataset.test_images}
    assert load_dataset(data_config(dataset="npz", root=str(path))).pool_images is None  # no subset: the training set


def test_cifar_settings_read_an_offline_npz_copy_and_hold_out_a_test_split(tmp_path):
    path = write_npz(tmp_path / "cifar10_train.npz", count=100, classes=10, shape=(32, 32, 3))
    dataset = load_dataset(data_config(dataset="cifar10", root=str(path), holdout_fraction=0.2))
    assert dataset.train_images.shape == (80, 3, 32, 32) and len(dataset.test_images) == 20
    assert torch.bincount(dataset.test_labels).tolist() == [2] * 10
    with pytest.raises(SslkdError, match="is not cifar100"):
        load_dataset(data_config(dataset="cifar100", root=str(path)))
