"""Fashion-MNIST (Debian package `dataset-fashion-mnist`, IDX files) -> an ImageFolder tree of PNGs.

`train/` comes from the 60k training file, `val/` from the 10k test file; one folder per class with readable
names; file names are the image's position in the IDX file (`03712.png`), so every PNG can be traced back.
`subset` keeps the first N images of each class in file order (deterministic; the files are pre-shuffled).
The tree is written into a temporary directory beside the target and renamed into place when complete.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from csr.io import CSRError, atomic_dir

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot")
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise CSRError(f"--source {source}: {stem}[.gz] not found (apt-get install dataset-fashion-mnist)")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CSRError(f"{path}: unreadable IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CSRError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CSRError(f"{path}: {body.size} bytes of data for declared shape {dims}")
    return body.reshape(dims)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of `split` ('train' or 'val')."""
    img_stem, lab_stem = SPLIT_FILES[split]
    images, labels = read_idx(_find(source, img_stem)), read_idx(_find(source, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CSRError(f"--source {source}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    if labels.max() >= len(CLASS_NAMES):
        raise CSRError(f"--source {source}: label {labels.max()} outside the 10 Fashion-MNIST classes")
    return images, labels.astype(np.int64)


def select_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in file order (all when per_class <= 0)."""
    if per_class <= 0:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))])
    return np.sort(keep)


def write_image_folder(out: str | os.PathLike, source: str | os.PathLike = DEFAULT_SOURCE,
                       subset: int = 0, overwrite: bool = False, progress: bool = True) -> dict[str, int]:
    """Write `out/train/<class>/NNNNN.png` and `out/val/...`; returns images written per split."""
    from PIL import Image
    from csr.progress import progress_bar
    out, source = Path(out), Path(source)
    if not source.is_dir():
        raise CSRError(f"--source {source}: not found (apt-get install dataset-fashion-mnist)")
    counts = {}
    with atomic_dir(out, overwrite) as tmp:
        for split in SPLIT_FILES:
            images, labels = load_split(source, split)
            keep = select_per_class(labels, subset)
            for name in CLASS_NAMES:
                (tmp / split / name).mkdir(parents=True)
            for i in progress_bar(keep, desc=split, unit="img", disable=not progress):
                Image.fromarray(images[i], mode="L").save(tmp / split / CLASS_NAMES[labels[i]] / f"{i:05d}.png")
            counts[split] = len(keep)
    return counts
