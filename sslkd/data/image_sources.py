"""Datasets stored as encoded image files, decoded with Pillow into uint8 [N, 3, S, S].

* ``npz_jpeg``: one .npz holding JPEG files back to back (the format of
  ``tinyimagenet_train_subset.npz``): ``jpeg`` uint8 [B] (the files concatenated), ``offsets`` integer
  [N + 1] (image i is ``jpeg[offsets[i]:offsets[i + 1]]``), ``y`` integer [N]; optional ``wnids`` or
  ``class_names`` (str [C]) name the classes.
* The paper's downstream sets: FGVC-Aircraft and Flowers-102 through torchvision, CUB-200-2011 and
  Stanford Dogs (not in torchvision) from their archives' folder layouts.

Every image becomes RGB (greyscale and CMYK JPEGs too). With a ``size`` each is fitted to size × size
(``PIL.ImageOps.fit``: the central crop of the image's aspect ratio, bilinear with antialiasing), so a set
of mixed sizes is decoded straight into one array of the final size; square images are only resized.
"""

from __future__ import annotations

import functools
import io
import logging
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sslkd.errors import SslkdError
from sslkd.progress import track

log = logging.getLogger(__name__)

NPZ_JPEG_KEYS = ("jpeg", "offsets", "y")
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
DOGS_URLS = (
    "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
    "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
)
# (train images [N, 3, S, S], train labels [N], test images [T, 3, S, S], test labels [T], class names)
Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
# Pillow's errors for bytes that are no (complete) image of the expected format
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError)


@contextmanager
def npz_archive(path: Path, required: tuple[str, ...], layout: str) -> Iterator[Any]:
    """Open an .npz (no pickles) that must hold the arrays ``required``; a missing, non-zip or corrupt
    file, or a missing array, is one SslkdError line. ``layout`` describes the expected arrays."""
    if not path.is_file():
        raise SslkdError(f"npz dataset not found: {path} (set data.root in params.yaml to an .npz with {layout})")
    if not zipfile.is_zipfile(path):
        raise SslkdError(f"{path} is not an .npz archive (np.savez: a zip of the arrays {layout})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in required if key not in archive]
            if missing:
                raise SslkdError(f"{path} lacks the arrays {missing} ({layout}); it has {archive.files}")
            yield archive
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise SslkdError(f"cannot read {path}: {error}") from None


def check_offsets(offsets: np.ndarray, payload: int, what: str) -> None:
    """offsets: integer [N + 1] into a byte array of ``payload`` bytes, strictly increasing from >= 0."""
    if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise SslkdError(f"{what}: 'offsets' must be integers [N + 1] (N >= 1), got {offsets.dtype} {offsets.shape}")
    steps = np.diff(offsets)
    if (steps <= 0).any():
        index = int(np.argmax(steps <= 0))
        raise SslkdError(
            f"{what}: 'offsets' must increase strictly, but offsets[{index}] = {offsets[index]} and "
            f"offsets[{index + 1}] = {offsets[index + 1]} (image {index} would be empty or negative)"
        )
    if offsets[0] < 0 or offsets[-1] > payload:
        raise SslkdError(
            f"{what}: 'offsets' run from {offsets[0]} to {offsets[-1]}, outside the {payload} bytes of 'jpeg'"
        )


def fit_image(image: Any, size: int) -> Any:
    """A PIL image as RGB, fitted to size × size (0 keeps its size)."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if size and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    return image


def stack_images(images: Iterable[Any], count: int, size: int, what: str) -> torch.Tensor:
    """``count`` PIL images -> uint8 [count, 3, S, S], each through :func:`fit_image`; S = ``size``, or with
    size 0 the first image's (then all must share it). Decoded into one preallocated array."""
    array: np.ndarray | None = None
    for index, image in enumerate(track(images, total=count, desc=f"decode {what}")):
        pixels = np.asarray(fit_image(image, size), dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
        if array is None:
            array = np.empty((count, *pixels.shape), dtype=np.uint8)
        elif pixels.shape != array.shape[1:]:
            raise SslkdError(
                f"{what}: image {index} is {pixels.shape[2]}x{pixels.shape[1]}, image 0 "
                f"{array.shape[3]}x{array.shape[2]}; set sslkd.data.image_size to fit them all to one size"
            )
        array[index] = pixels
    if array is None:
        raise SslkdError(f"{what}: holds no images")
    return torch.from_numpy(array)


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, what: str) -> Iterator[Any]:
    """The PIL images of the JPEG files ``jpeg[offsets[i]:offsets[i + 1]]``, decoded; one that is no
    decodable JPEG is an SslkdError naming its index."""
    from PIL import Image

    for index in range(len(offsets) - 1):
        try:
            with Image.open(
                io.BytesIO(jpeg[offsets[index] : offsets[index + 1]].tobytes()), formats=("JPEG",)
            ) as image:
                image.load()
                yield image
        except DECODE_ERRORS + (Image.DecompressionBombError,) as error:
            raise SslkdError(f"{what}: image {index} is not a decodable JPEG ({error})") from None


def read_npz_jpeg(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An npz_jpeg file -> (images uint8 [N, 3, S, S], labels int64 [N], class names); S = size, or the
    images' own size when size is 0 (then they must all share it)."""
    layout = "jpeg uint8 (JPEG files concatenated), offsets int [N+1], y int [N]"
    with npz_archive(path, NPZ_JPEG_KEYS, layout) as archive:
        jpeg, offsets, labels = archive["jpeg"], archive["offsets"], archive["y"]
        names_key = next((key for key in ("wnids", "class_names") if key in archive), None)
        names = [str(name) for name in archive[names_key]] if names_key else []
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise SslkdError(f"{path}: 'jpeg' must be uint8 bytes [B], got {jpeg.dtype} {jpeg.shape}")
    check_offsets(offsets, len(jpeg), str(path))
    if labels.ndim != 1 or len(labels) != len(offsets) - 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SslkdError(
            f"{path}: {len(offsets) - 1} images (offsets {offsets.shape}) but labels 'y' {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0:
        raise SslkdError(f"{path}: labels must be class indices >= 0, found {labels.min()}")
    images = stack_images(decode_jpegs(jpeg, offsets, str(path)), len(labels), size, str(path))
    classes = int(labels.max()) + 1
    if names and len(names) < classes:
        raise SslkdError(f"{path}: {len(names)} class names ({names_key}) for {classes} classes")
    return images, torch.from_numpy(labels.astype(np.int64)), names or [str(c) for c in range(classes)]


# --- the paper's downstream sets -----------------------------------------------------------------------


def offline_error(name: str, root: Path, layout: str, failure: str) -> SslkdError:
    """The one line for a set that is not under ``root``; ``failure`` says why it was not fetched."""
    return SslkdError(
        f"{name} not found under {root} ({layout}) and {failure}; set data.root to the folder that holds it "
        f"(dvc exp run -S data.root=PATH), or sslkd.data.download = True when online"
    )


def download_failure(error: Exception) -> str:
    return "its download failed: " + (str(error).splitlines() or [type(error).__name__])[0]


def fetch_if_missing(
    name: str,
    root: Path,
    layout: str,
    required: tuple[Path, ...],
    download: bool,
    archives: tuple[tuple[str, str | None], ...],
) -> None:
    """Download and extract ``archives`` ((url, md5 or None), torchvision's helpers) into ``root`` when a
    ``required`` path is missing and ``download`` is on; a set still missing is one line."""
    from torchvision.datasets.utils import download_and_extract_archive

    if all(path.exists() for path in required):
        return
    if not download:
        raise offline_error(name, root, layout, "download is off")
    for url, md5 in archives:
        filename = url.rsplit("/", 1)[-1].split("?")[0]
        try:
            download_and_extract_archive(url, download_root=str(root), filename=filename, md5=md5)
        except Exception as error:  # URLError / OSError offline, RuntimeError on a bad checksum
            raise offline_error(name, root, layout, download_failure(error)) from None
    if not all(path.exists() for path in required):
        raise offline_error(
            name, root, layout, f"the downloaded archives ({', '.join(u for u, _ in archives)}) did not hold it"
        )


def read_torchvision_split(dataset: Any, size: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision image dataset yielding (PIL image, label) -> (uint8 [N, 3, S, S], int64 [N])."""
    labels = torch.empty(len(dataset), dtype=torch.int64)

    def images() -> Iterator[Any]:
        for index in range(len(dataset)):
            image, labels[index] = dataset[index]
            yield image

    return stack_images(images(), len(dataset), size, what), labels


TORCHVISION_SPLITS = {  # name -> (torchvision class, training splits, test split, folder under root)
    "aircraft": ("FGVCAircraft", ("trainval",), "test", "fgvc-aircraft-2013b/"),
    "flowers102": ("Flowers102", ("train", "val"), "test", "flowers-102/"),
}


def read_torchvision_set(name: str, root: Path, download: bool, size: int) -> Splits:
    """FGVC-Aircraft (trainval / test, 100 variants) or Flowers-102 (train + val / test) from torchvision:
    (train images, train labels, test images, test labels) at size × size, and the class names."""
    from torchvision import datasets

    class_name, train_splits, test_split, layout = TORCHVISION_SPLITS[name]
    dataset_class = getattr(datasets, class_name)
    parts: dict[str, Any] = {}
    for split in (*train_splits, test_split):
        try:
            parts[split] = dataset_class(str(root), split=split, download=download)
        except Exception as error:  # RuntimeError when absent, URLError/OSError when the download fails
            failure = download_failure(error) if download else "download is off"
            raise offline_error(name, root, layout, failure) from None
    train = [read_torchvision_split(parts[split], size, f"{name} {split}") for split in train_splits]
    test_images, test_labels = read_torchvision_split(parts[test_split], size, f"{name} {test_split}")
    classes = getattr(parts[test_split], "classes", None) or [str(c) for c in range(int(test_labels.max()) + 1)]
    return (
        torch.cat([images for images, _ in train]),
        torch.cat([labels for _, labels in train]),
        test_images,
        test_labels,
        list(classes),
    )


def open_images(paths: list[Path], what: str) -> Iterator[Any]:
    """The PIL images at ``paths``, opened one at a time; a missing or undecodable file is one line."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                yield image
        except DECODE_ERRORS + (Image.DecompressionBombError,) as error:
            raise SslkdError(f"{what}: cannot read {path} ({error})") from None


def read_cub(root: Path, download: bool, size: int) -> Splits:
    """CUB-200-2011 from ``root/CUB_200_2011`` (images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt, images/): its official train / test split, labels 1–200 as 0–199."""
    base, layout = root / "CUB_200_2011", "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt"
    lists = {name: base / f"{name}.txt" for name in ("images", "image_class_labels", "train_test_split", "classes")}
    fetch_if_missing("cub200", root, layout, tuple(lists.values()), download, ((CUB_URL, CUB_MD5),))
    columns = {name: read_columns(path) for name, path in lists.items()}
    files, labels, is_train = (dict(columns[key]) for key in ("images", "image_class_labels", "train_test_split"))
    if not files.keys() == labels.keys() == is_train.keys():
        raise SslkdError(
            f"cub200: the image ids of {base}'s images.txt, image_class_labels.txt and train_test_split.txt differ"
        )
    names = [name for _, name in sorted(columns["classes"], key=lambda row: int(row[0]))]
    split: dict[bool, tuple[list[Path], list[int]]] = {True: ([], []), False: ([], [])}
    for image_id in sorted(files, key=int):
        paths, classes = split[is_train[image_id] == "1"]
        paths.append(base / "images" / files[image_id])
        classes.append(int(labels[image_id]) - 1)
    return read_file_split("cub200", split[True], size) + read_file_split("cub200", split[False], size) + (names,)


def read_columns(path: Path) -> list[tuple[str, str]]:
    """The lines of a CUB list file as (id, value) pairs (whitespace-separated, the value may hold none)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise SslkdError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
            rows.append((parts[0], parts[1].strip()))
    return rows


def read_file_split(name: str, split: tuple[list[Path], list[int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image paths, labels) -> (uint8 [N, 3, S, S], int64 [N])."""
    paths, labels = split
    return stack_images(open_images(paths, name), len(paths), size, name), torch.tensor(labels, dtype=torch.int64)


def read_dogs(root: Path, download: bool, size: int) -> Splits:
    """Stanford Dogs from ``root`` (Images/<wnid>-<breed>/*.jpg and lists.tar's train_list.mat /
    test_list.mat, whose ``file_list`` and 1-based ``labels`` give the official 12k / 8.6k split)."""
    layout = "Images/ and train_list.mat, test_list.mat"
    lists = (root / "train_list.mat", root / "test_list.mat")
    archives = tuple((url, None) for url in DOGS_URLS)
    fetch_if_missing("stanford_dogs", root, layout, (*lists, root / "Images"), download, archives)
    splits = [read_dogs_list(path, root / "Images") for path in lists]
    breeds = sorted(path.name for path in (root / "Images").iterdir() if path.is_dir())
    names = [breed.split("-", 1)[-1] for breed in breeds]
    train, test = (read_file_split("stanford_dogs", split, size) for split in splits)
    return train + test + (names,)


def read_dogs_list(path: Path, images: Path) -> tuple[list[Path], list[int]]:
    """A Stanford Dogs list (.mat with ``file_list`` and 1-based ``labels``) -> (image paths, labels 0–119)."""
    from scipy.io import loadmat

    try:
        content = loadmat(path, squeeze_me=True)
        files, labels = np.atleast_1d(content["file_list"]), np.atleast_1d(content["labels"])
    except (OSError, ValueError, KeyError) as error:
        raise SslkdError(f"cannot read {path} (a Stanford Dogs list with file_list and labels): {error}") from None
    if len(files) != len(labels):
        raise SslkdError(f"{path}: {len(files)} files but {len(labels)} labels")
    return [images / str(name) for name in files], [int(label) - 1 for label in labels]


DOWNSTREAM_READERS: dict[str, Callable[[Path, bool, int], Splits]] = {
    "aircraft": functools.partial(read_torchvision_set, "aircraft"),
    "flowers102": functools.partial(read_torchvision_set, "flowers102"),
    "cub200": read_cub,
    "stanford_dogs": read_dogs,
}
