"""Datasets stored as image files: the npz_jpeg source (round trip, greyscale and CMYK, resizing, the seeded
hold-out, every corrupt input as one line) and the downstream sets' readers on fake folder trees."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import data_config as datasets_config

from sslkd.cli import main
from sslkd.data.datasets import DataConfig, load_dataset
from sslkd.errors import SslkdError

from conftest import REPO


def data_config(**overrides) -> DataConfig:
    return datasets_config(**{"dataset": "npz_jpeg", "holdout_fraction": 0.25, **overrides})


def smooth_images(count: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, side, side, 3]: random smooth colour fields (JPEG keeps them within a few levels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 225, (count, 3, 4, 4)).astype(np.float32)
    fine = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(side, side), mode="bilinear")
    return fine.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_npz_jpeg(path: Path, files: list[bytes], labels, **extra) -> Path:
    """The format of tinyimagenet_train_subset.npz: JPEG files concatenated, offsets [N + 1], labels y."""
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    arrays = dict(jpeg=np.frombuffer(b"".join(files), dtype=np.uint8), offsets=offsets, y=np.asarray(labels))
    np.savez(path, **{**arrays, **extra})
    return path


def rgb_file(path: Path, count: int = 24, classes: int = 4, side: int = 32) -> tuple[Path, np.ndarray, list[bytes]]:
    pixels = smooth_images(count, side)
    files = [jpeg_bytes(Image.fromarray(image)) for image in pixels]
    names = np.array([f"n{c:08d}" for c in range(classes)])
    return write_npz_jpeg(path, files, np.arange(count) % classes, wnids=names), pixels, files


def test_round_trip_matches_the_encoded_images_and_pillows_decoding(tmp_path):
    path, pixels, files = rgb_file(tmp_path / "set.npz")
    dataset = load_dataset(data_config(root=str(path), holdout_fraction=0.25))
    assert dataset.train_images.shape == (16, 3, 32, 32) and dataset.test_images.shape == (
        8,
        3,
        32,
        32,
    )  # 2 of 6 a class
    assert dataset.train_images.dtype == torch.uint8 and dataset.class_names == [f"n{c:08d}" for c in range(4)]
    everything = torch.cat([dataset.train_images, dataset.test_images])
    labels = torch.cat([dataset.train_labels, dataset.test_labels])
    # each loaded image is image i of the file: bit-identical to Pillow decoding its bytes, close to its pixels
    for image, label in zip(everything, labels):
        matches = [i for i in range(24) if i % 4 == label and torch.equal(image, decoded(files[i]))]
        assert len(matches) == 1
        error = (image.permute(1, 2, 0).int() - torch.from_numpy(pixels[matches[0]]).int()).abs().float()
        assert error.mean() < 2.0 and error.max() < 24  # JPEG quality 95 on smooth images


def decoded(file: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(file)).convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_become_rgb(tmp_path, mode):
    colour = smooth_images(4, 16)
    files = [jpeg_bytes(Image.fromarray(image).convert(mode)) for image in colour]
    path = write_npz_jpeg(tmp_path / "set.npz", files, [0, 1, 0, 1])
    dataset = load_dataset(data_config(root=str(path), holdout_fraction=0.5))
    images = torch.cat([dataset.train_images, dataset.test_images])
    assert images.shape == (4, 3, 16, 16) and dataset.class_names == ["0", "1"]
    if mode == "L":  # grey: three equal channels, the luminance of the colour image it was made from
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
        grey = np.stack([np.asarray(Image.fromarray(c).convert("L").convert("RGB")) for c in colour])
        originals = torch.from_numpy(grey).permute(0, 3, 1, 2).int()
    else:  # CMYK back to RGB: close to the colour it was made from
        originals = torch.from_numpy(colour).permute(0, 3, 1, 2).int()
    for image in images:  # (the split reorders them)
        assert min(float((image.int() - o).abs().float().mean()) for o in originals) < 4.0


def test_resize_fits_every_image_to_the_setting_size(tmp_path):
    # a 32x32 image split into a dark left and a bright right half, and a 48x24 one (mixed sizes)
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 220
    wide = np.full((24, 48, 3), 120, np.uint8)
    files = [jpeg_bytes(Image.fromarray(image)) for image in (half, wide, half, wide)]
    path = write_npz_jpeg(tmp_path / "set.npz", files, [0, 1, 0, 1])
    with pytest.raises(SslkdError, match=r"image 1 is 48x24, image 0 32x32; set sslkd.data.image_size"):
        load_dataset(data_config(root=str(path), holdout_fraction=0.5))
    dataset = load_dataset(data_config(root=str(path), holdout_fraction=0.5, image_size=8))
    images = torch.cat([dataset.train_images, dataset.test_images])
    labels = torch.cat([dataset.train_labels, dataset.test_labels])
    assert images.shape == (4, 3, 8, 8)
    for image in images[labels == 0].float():  # the halves survive the bilinear downscale
        assert image[:, :, :3].mean() < 15 and image[:, :, 5:].mean() > 205
    for image in images[labels == 1].float():  # a flat image stays flat; the wide one is cropped to square
        assert (image - 120).abs().max() < 6


def test_the_hold_out_is_seeded_class_balanced_and_disjoint(tmp_path):
    path, _, _ = rgb_file(tmp_path / "set.npz", count=40, classes=4, side=8)
    first, again = (load_dataset(data_config(root=str(path), holdout_fraction=0.3)) for _ in range(2))
    assert torch.equal(first.test_images, again.test_images) and torch.equal(first.train_labels, again.train_labels)
    assert torch.bincount(first.test_labels).tolist() == [3] * 4  # round(0.3 · 10) of every class
    others = [load_dataset(data_config(root=str(path), holdout_fraction=0.3, split_seed=s)) for s in (1, 2)]
    assert any(not torch.equal(first.test_images, other.test_images) for other in others)
    train = {tuple(image.flatten().tolist()) for image in first.train_images}
    assert not train & {tuple(image.flatten().tolist()) for image in first.test_images}


def rewrite(path: Path, **changes) -> Path:
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def broken_jpeg(path: Path) -> Path:
    path, _, files = rgb_file(path)
    files[5] = files[5][: len(files[5]) // 3]  # image 5 cut short
    return write_npz_jpeg(path, files, np.arange(24) % 4)


def png_in_place(path: Path) -> Path:
    path, pixels, files = rgb_file(path)
    buffer = io.BytesIO()
    Image.fromarray(pixels[3]).save(buffer, format="PNG")
    files[3] = buffer.getvalue()
    return write_npz_jpeg(path, files, np.arange(24) % 4)


def flipped_bytes(path: Path) -> Path:
    path, _, _ = rgb_file(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # inside the stored jpeg array: a bad CRC
    path.write_bytes(bytes(data))
    return path


CORRUPT = {
    "missing file": (lambda p: p, "npz dataset not found"),
    "not a zip": (lambda p: p.write_bytes(b"not a zip") or p, "is not an .npz archive"),
    "corrupt member": (flipped_bytes, "cannot read"),
    "missing keys": (lambda p: rewrite(rgb_file(p)[0], offsets=None), r"lacks the arrays \['offsets'\]"),
    "non-monotonic offsets": (
        lambda p: rewrite(rgb_file(p)[0], offsets=np.r_[0, 900, 800, np.arange(22) * 1000 + 2000]),
        r"must increase strictly, but offsets\[1\] = 900 and offsets\[2\] = 800",
    ),
    "offsets past the end": (
        lambda p: rewrite(rgb_file(p)[0], offsets=np.arange(25) * 10**7),
        r"outside the \d+ bytes of 'jpeg'",
    ),
    "float offsets": (lambda p: rewrite(rgb_file(p)[0], offsets=np.arange(25) * 1.5), "'offsets' must be integers"),
    "label/offset count mismatch": (
        lambda p: rewrite(rgb_file(p)[0], y=np.arange(23) % 4),
        r"24 images \(offsets \(25,\)\) but labels 'y' int64 \(23,\)",
    ),
    "negative labels": (lambda p: rewrite(rgb_file(p)[0], y=np.arange(24) % 4 - 1), "labels must be class indices"),
    "jpeg not bytes": (
        lambda p: rewrite(rgb_file(p)[0], jpeg=np.zeros(10**6, np.int32)),
        "'jpeg' must be uint8 bytes",
    ),
    "undecodable jpeg": (broken_jpeg, r"image 5 is not a decodable JPEG"),
    "a png among the jpegs": (png_in_place, r"image 3 is not a decodable JPEG"),
    "too few class names": (
        lambda p: rewrite(rgb_file(p)[0], wnids=np.array(["a", "b"])),
        r"2 class names \(wnids\) for 4 classes",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_input_is_one_clear_line(tmp_path, case):
    make, message = CORRUPT[case]
    make(tmp_path / "bad.npz")
    with pytest.raises(SslkdError, match=message) as error:
        load_dataset(data_config(root=str(tmp_path / "bad.npz")))
    assert "\n" not in str(error.value)


def test_the_data_stage_refuses_a_corrupt_file_with_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "gin", tmp_path / "gin")
    broken_jpeg(tmp_path / "bad.npz")
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("root: data ", f"root: {tmp_path / 'bad.npz'} ")
    )
    monkeypatch.chdir(tmp_path)
    code = main(["data", "--bind", "sslkd.data.dataset = 'npz_jpeg'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sslkd data: error:") and "image 5 is not a decodable JPEG" in err[-1]
    assert not (tmp_path / "artifacts" / "data" / "dataset.pt").exists()


def test_tinyimagenet_reads_an_npz_jpeg_copy_and_checks_it_is_tinyimagenet(tmp_path):
    files = [jpeg_bytes(Image.fromarray(image)) for image in smooth_images(400, 64)]
    path = write_npz_jpeg(tmp_path / "tiny.npz", files, np.repeat(np.arange(200), 2))
    dataset = load_dataset(data_config(dataset="tinyimagenet", root=str(path), holdout_fraction=0.5, image_size=32))
    assert dataset.train_images.shape == (200, 3, 32, 32) and torch.bincount(dataset.test_labels).tolist() == [1] * 200
    few = write_npz_jpeg(tmp_path / "few.npz", files[:20], np.arange(20) % 10)
    with pytest.raises(SslkdError, match=r"is not tinyimagenet: 10 classes of \(3, 64, 64\) images, expected 200"):
        load_dataset(data_config(dataset="tinyimagenet", root=str(few)))


def test_a_separate_test_file_of_the_same_format(tmp_path):
    train, _, _ = rgb_file(tmp_path / "train.npz")
    test, _, _ = rgb_file(tmp_path / "test.npz", count=8)
    dataset = load_dataset(data_config(root=str(train), test_path=str(test)))
    assert len(dataset.train_images) == 24 and len(dataset.test_images) == 8


SHARED_TINY = os.environ.get("SSLKD_TINYIMAGENET_NPZ", "")


@pytest.mark.skipif(
    not Path(SHARED_TINY).is_file(), reason="set SSLKD_TINYIMAGENET_NPZ to tinyimagenet_train_subset.npz"
)
def test_the_real_tinyimagenet_subset():
    """The shared 20k file: 200 classes x 100, 10 per class held out, its 380 greyscale JPEGs as RGB."""
    dataset = load_dataset(data_config(dataset="tinyimagenet", root=SHARED_TINY, holdout_fraction=0.1))
    assert dataset.train_images.shape == (18000, 3, 64, 64) and len(dataset.class_names) == 200
    assert torch.bincount(dataset.test_labels).tolist() == [10] * 200
    images = torch.cat([dataset.train_images, dataset.test_images])
    grey = (images[:, 0] == images[:, 1]).flatten(1).all(1) & (images[:, 1] == images[:, 2]).flatten(1).all(1)
    assert int(grey.sum()) >= 380


# --- the downstream sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aircraft", "flowers102", "cub200", "stanford_dogs"])
def test_a_missing_downstream_set_says_where_and_how(tmp_path, name):
    with pytest.raises(SslkdError, match=rf"{name} not found under {tmp_path} .*download is off.*data.root") as error:
        load_dataset(data_config(dataset=name, root=str(tmp_path), image_size=32))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["aircraft", "flowers102", "cub200", "stanford_dogs"])
def test_a_failed_download_is_one_line(tmp_path, monkeypatch, name):
    """torchvision's real download code, with the network replaced by a failure (these machines are offline)."""
    import urllib.request
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SslkdError, match=rf"{name} not found .* its download failed: .*no route to host") as error:
        load_dataset(data_config(dataset=name, root=str(tmp_path), image_size=32, download=True))
    assert "\n" not in str(error.value)


def test_a_downstream_set_needs_an_image_size():
    with pytest.raises(SslkdError, match="cub200's images differ in size: set sslkd.data.image_size"):
        data_config(dataset="cub200", root="somewhere")


def save_jpeg(path: Path, value: int, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_cub_reads_its_official_split_and_labels(tmp_path):
    base = tmp_path / "CUB_200_2011"
    rows = [  # id, file, class (1-based), is_train; images of mixed sizes
        (1, "001.Black_footed_Albatross/a.jpg", 1, 1),
        (2, "002.Laysan_Albatross/b.jpg", 2, 0),
        (3, "001.Black_footed_Albatross/c.jpg", 1, 0),
        (4, "002.Laysan_Albatross/d.jpg", 2, 1),
    ]
    for image_id, file, label, _ in rows:
        save_jpeg(base / "images" / file, 40 + 150 * (label - 1), (50 + 10 * image_id, 40))
    (base / "images.txt").write_text("".join(f"{i} {f}\n" for i, f, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    dataset = load_dataset(data_config(dataset="cub200", root=str(tmp_path), image_size=16))
    assert dataset.train_labels.tolist() == [0, 1] and dataset.test_labels.tolist() == [1, 0]
    assert dataset.train_images.shape == (2, 3, 16, 16) and dataset.class_names[1] == "002.Laysan_Albatross"
    bright = [int(image.float().mean() > 120) for image in dataset.test_images]
    assert bright == [1, 0]  # the label matches the pixels
    (base / "image_class_labels.txt").write_text("1 1\n2 2\n")
    with pytest.raises(SslkdError, match="image ids .* differ"):
        load_dataset(data_config(dataset="cub200", root=str(tmp_path), image_size=16))


def test_stanford_dogs_reads_its_lists(tmp_path):
    from scipy.io import savemat

    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    files = {"train": [(f"{breeds[0]}/x0.jpg", 1), (f"{breeds[1]}/x1.jpg", 2)], "test": [(f"{breeds[1]}/x2.jpg", 2)]}
    for split, entries in files.items():
        for file, label in entries:
            save_jpeg(tmp_path / "Images" / file, 30 + 180 * (label - 1), (60, 45))
        savemat(
            tmp_path / f"{split}_list.mat",
            {
                "file_list": np.array([[np.array([f])] for f, _ in entries], dtype=object),
                "labels": np.array([[label] for _, label in entries]),
            },
        )
    dataset = load_dataset(data_config(dataset="stanford_dogs", root=str(tmp_path), image_size=8))
    assert dataset.train_labels.tolist() == [0, 1] and dataset.test_labels.tolist() == [1]
    assert dataset.class_names == ["Chihuahua", "Japanese_spaniel"] and dataset.test_images.shape == (1, 3, 8, 8)
    assert dataset.test_images.float().mean() > 200 and dataset.train_images[0].float().mean() < 40
    (tmp_path / "Images" / files["test"][0][0]).write_bytes(b"garbage")
    with pytest.raises(SslkdError, match=r"stanford_dogs: cannot read .*x2.jpg"):
        load_dataset(data_config(dataset="stanford_dogs", root=str(tmp_path), image_size=8))


def test_torchvision_downstream_sets_read_their_splits(tmp_path, monkeypatch):
    """aircraft's trainval / test (and flowers' train + val / test) through torchvision, with the dataset
    class replaced by a fake that yields PIL images as torchvision's does."""
    import torchvision.datasets

    class FakeAircraft(torch.utils.data.Dataset):
        classes = ["707-320", "A380"]

        def __init__(self, root, split, download):
            self.items = {"trainval": [(10, 0), (200, 1), (12, 0)], "test": [(210, 1)]}[split]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            value, label = self.items[index]
            return Image.fromarray(np.full((30, 40, 3), value, np.uint8)), label

    monkeypatch.setattr(torchvision.datasets, "FGVCAircraft", FakeAircraft)
    dataset = load_dataset(data_config(dataset="aircraft", root=str(tmp_path), image_size=8))
    assert dataset.train_labels.tolist() == [0, 1, 0] and dataset.test_labels.tolist() == [1]
    assert dataset.train_images.shape == (3, 3, 8, 8) and dataset.class_names == ["707-320", "A380"]
    assert [int(image.float().mean() > 100) for image in dataset.train_images] == [0, 1, 0]
