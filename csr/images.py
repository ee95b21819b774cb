"""Image sources for embedding extraction: PyTorch-style ImageFolder trees and FFCV `.beton` files.

Both sources yield `Batch`es of uint8 `[B, 3, S, S]` centre crops (normalisation happens on the device) with
int64 labels and the dataset indices they came from, in dataset order, so the extraction loop can place rows
exactly. Preprocessing is the same for both: resize the short side to `S / crop_pct` with Pillow's bicubic,
centre crop S. The FFCV path uses its own decoder (`timm_center_crop_decoder`, numba, `csr.image_resize`)
instead of FFCV's CenterCropRGBImageDecoder (OpenCV INTER_AREA, blocky when upsampling), so raw-stored
images give the same pixels as the ImageFolder path; JPEG-stored ones differ by the JPEG loss only.

Also here: FFCV writing (ImageFolder -> .beton with an RGB image field and an int label field) and an
image verification pass, because FFCV's writer hangs when a worker dies on an unreadable file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from csr.backbones import Preprocess
from csr.io import CSRError, atomic_path, warn

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Batch:
    """One batch of decoded images; `failures` lists (dataset index, message) of images that were skipped."""
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    indices: np.ndarray  # int64 [B], dataset indices of the rows
    failures: list[tuple[int, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- ImageFolder

def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None,
                      flag: str = "--train_dir") -> tuple[list[tuple[str, int]], list[str]]:
    """List `(path, label)` of an ImageFolder tree in sorted order, and the class names.

    With `classes` (the train split's), labels follow that list and unknown class folders are an error, so
    database and query labels agree even when a split lacks a class.
    """
    root = Path(root)
    if not root.is_dir():
        raise CSRError(f"{flag} {root}: image folder not found")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise CSRError(f"{flag} {root}: no class sub-folders (expected ROOT/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise CSRError(f"{flag} {root}: class folders {extra[:5]} are not among the train split's classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        for dirpath, dirnames, files in os.walk(root / c, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), index[c]) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise CSRError(f"{flag} {root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return samples, list(classes)


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class FolderDataset(torch.utils.data.Dataset):
    """`(uint8 tensor or None, label, index, error or None)`; unreadable files come back as None + message."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return self.transform(load_rgb(path)), label, i, None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            return None, label, i, f"{path}: unreadable image ({type(e).__name__}: {e})"


def collate_folder(items) -> Batch:
    ok = [it for it in items if it[0] is not None]
    failures = [(it[2], it[3]) for it in items if it[0] is None]
    if ok:
        images = torch.stack([it[0] for it in ok])
    else:
        images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    labels = torch.tensor([it[1] for it in ok], dtype=torch.int64)
    indices = np.array([it[2] for it in ok], dtype=np.int64)
    return Batch(images, labels, indices, failures)


class FolderSource:
    """An ImageFolder tree read by torchvision/PIL in DataLoader worker processes."""
    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, preprocess: Preprocess, classes: Sequence[str] | None = None,
                 flag: str = "--train_dir"):
        self.root = Path(root)
        self.samples, self.classes = scan_image_folder(root, classes, flag)
        self.dataset = FolderDataset(self.samples, preprocess.pil_transform())

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind, "path": str(self.root.resolve()), "images": len(self),
                "classes": self.classes}

    def batches(self, indices: np.ndarray, batch_size: int, workers: int, pin_memory: bool = False
                ) -> Iterator[Batch]:
        """Batches of `batch_size` consecutive entries of `indices`, decoded by `workers` processes."""
        chunks = [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=chunks, num_workers=workers, collate_fn=collate_folder,
            pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False)
        yield from loader


# ----------------------------------------------------------------------------- FFCV

def import_ffcv():
    """Import ffcv, undoing its side effect: importing it sets torch's thread count to 1."""
    threads = torch.get_num_threads()
    try:
        import ffcv
        import ffcv.loader  # noqa: F401 - the import that resets the thread count
    finally:
        torch.set_num_threads(threads)
    return ffcv


def ffcv_threads(workers: int) -> int:
    """FFCV decodes with numba threads; numba refuses more than NUMBA_NUM_THREADS (the CPU count)."""
    from numba import config
    return max(1, min(workers, config.NUMBA_NUM_THREADS))


def open_beton(path: str | os.PathLike, flag: str) -> tuple[Any, str, str]:
    """Open an FFCV file; return (reader, image field name, label field name)."""
    path = Path(path)
    if not path.is_file():
        raise CSRError(f"{flag} {path}: FFCV file not found")
    try:
        import_ffcv()
    except ImportError as e:
        raise CSRError(f"{flag} {path}: ffcv is not installed ({e}); use --train_dir/--eval_dir instead") from None
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors on foreign files
        raise CSRError(f"{flag} {path}: not an FFCV .beton file ({type(e).__name__}: {e})") from None
    image = [n for n, h in reader.handlers.items() if isinstance(h, RGBImageField)]
    label = [n for n, h in reader.handlers.items() if isinstance(h, IntField)]
    if not image or not label:
        raise CSRError(f"{flag} {path}: needs an RGBImageField and an IntField, has {list(reader.handlers)}")
    if reader.num_samples == 0:
        raise CSRError(f"{flag} {path}: FFCV file holds no samples")
    return reader, image[0], label[0]


class FFCVSource:
    """An FFCV .beton decoded by FFCV's threaded, JIT-compiled loader (deterministic centre crop)."""
    kind = "ffcv"

    def __init__(self, path: str | os.PathLike, preprocess: Preprocess, flag: str = "--train_data_ffcv"):
        self.path = Path(path)
        reader, self.image_field, self.label_field = open_beton(path, flag)
        self.n = int(reader.num_samples)
        self.preprocess = preprocess
        self.fields = list(reader.handlers)

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind, "path": str(self.path.resolve()), "images": self.n,
                "decoder": "csr.images.TimmCenterCropDecoder (PIL-exact bicubic resize + centre crop)"}

    def batches(self, indices: np.ndarray, batch_size: int, workers: int, pin_memory: bool = False
                ) -> Iterator[Batch]:
        """Batches of `batch_size` consecutive entries of `indices`, decoded by `workers` FFCV threads."""
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage
        pp = self.preprocess
        pipelines: dict[str, Any] = {
            self.image_field: [timm_center_crop_decoder(pp.size, pp.resize), ToTensor(),
                               ToTorchImage(channels_last=False)],
            self.label_field: [IntDecoder(), ToTensor(), Squeeze(1)],
        }
        for other in self.fields:
            pipelines.setdefault(other, None)
        threads = torch.get_num_threads()  # FFCV's Loader resets torch's thread count to num_workers
        try:
            loader = Loader(str(self.path), batch_size=batch_size, num_workers=ffcv_threads(workers), os_cache=True,
                            order=OrderOption.SEQUENTIAL, indices=np.asarray(indices, dtype=np.int64),
                            pipelines=pipelines, drop_last=False)
        finally:
            torch.set_num_threads(threads)
        names = [n for n in self.fields if pipelines[n] is not None]
        pos = 0
        for out in loader:
            data = dict(zip(names, out))
            images, labels = data[self.image_field], data[self.label_field]
            b = images.shape[0]
            yield Batch(images, labels.reshape(-1).to(torch.int64), np.asarray(indices[pos:pos + b], dtype=np.int64))
            pos += b


_DECODER_CLASS: Any = None
_COMPILED: list[Any] = []  # FFCV's per-Loader imdecode dispatchers, kept alive (see _jpeg_decoder)


def _jpeg_decoder():
    """FFCV's JPEG decoder, compiled afresh for each Loader as FFCV itself does.

    With numba 0.68 a dispatcher that calls FFCV's ctypes `imdecode` ends up with a corrupt overload table
    after a Loader has used it: reusing it in a second Loader kills that Loader's thread (and FFCV then waits
    forever), and garbage-collecting it prints a KeyError from numba's finalizer. So every Loader gets its
    own, and the used ones are kept (a few kB of machine code each) rather than collected.
    """
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler
    fn = Compiler.compile(imdecode)
    _COMPILED.append(fn)
    return fn


def timm_center_crop_decoder(size: int, resize: int):
    """FFCV decoder: JPEG/raw decode, then `csr.image_resize.resize_center_crop` (PIL-exact bicubic, timm geometry)."""
    global _DECODER_CLASS
    if _DECODER_CLASS is None:
        from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
        from ffcv.pipeline.compiler import Compiler

        from csr.image_resize import resize_center_crop

        class TimmCenterCropDecoder(ResizedCropRGBImageDecoder):
            """Deterministic eval decoder matching torchvision Resize(bicubic) + CenterCrop on PIL images."""

            def __init__(self, size: int, resize: int):
                super().__init__((size, size))
                self.resize = resize

            @property
            def get_crop_generator(self):  # required by the abstract base; the crop is computed in the kernel
                return None

            def generate_code(self):
                jpg = IMAGE_MODES["jpg"]
                mem_read = self.memory_read
                my_range = Compiler.get_iterator()
                imdecode_c = _jpeg_decoder()
                resize = self.resize
                kernel = resize_center_crop

                def decode(batch_indices, my_storage, metadata, storage_state):
                    destination, temp_storage = my_storage
                    for dst_ix in my_range(len(batch_indices)):
                        field = metadata[batch_indices[dst_ix]]
                        image_data = mem_read(field["data_ptr"], storage_state)
                        height = np.uint32(field["height"])
                        width = np.uint32(field["width"])
                        if field["mode"] == jpg:
                            buf = temp_storage[dst_ix]
                            imdecode_c(image_data, buf, height, width, height, width, 0, 0, 1, 1, False, False)
                            image = buf.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                        else:
                            image = image_data.reshape(height, width, 3)
                        kernel(image, resize, destination[dst_ix])
                    return destination[:len(batch_indices)]

                decode.is_parallel = True
                return decode

        _DECODER_CLASS = TimmCenterCropDecoder
    return _DECODER_CLASS(size, resize)


# ----------------------------------------------------------------------------- verification and writing

def _check_image(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # JPEG: decode at 1/8 scale
            img.convert("RGB")
        return None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"{path}: unreadable image ({type(e).__name__}: {e})"


def verify_images(paths: Sequence[str], workers: int) -> dict[int, str]:
    """Decode every image once (in `workers` processes); return {position: message} of unreadable ones."""
    from csr.progress import progress_bar
    bad: dict[int, str] = {}
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            results = pool.imap(_check_image, paths, chunksize=64)
            for i, msg in enumerate(progress_bar(results, total=len(paths), unit="img", desc="verify")):
                if msg:
                    bad[i] = msg
    else:
        for i, p in enumerate(progress_bar(paths, unit="img", desc="verify")):
            msg = _check_image(p)
            if msg:
                bad[i] = msg
    return bad


class _BetonSource(torch.utils.data.Dataset):
    """ImageFolder samples as (RGB uint8 array, label) for FFCV's writer; a failing read is recorded in
    `error_log` (one line per file) and replaced by a 1x1 image, because FFCV hangs when a worker raises.

    numpy's global RNG is re-seeded from (seed, index) before each sample: FFCV's `proportion` mode draws
    `np.random.rand()` right after `__getitem__` in the same worker, so which images are stored as JPEG no
    longer depends on how the work was split between writer processes.
    """

    def __init__(self, samples: list[tuple[str, int]], error_log: Path, seed: int = 0):
        self.samples = samples
        self.error_log = str(error_log)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        np.random.seed((self.seed * 1_000_003 + i) % 2**32)
        try:
            return np.asarray(load_rgb(path)), label
        except Exception as e:  # noqa: BLE001 - anything here would hang FFCV's writer
            with open(self.error_log, "a") as f:
                f.write(f"{path}: unreadable image ({type(e).__name__}: {e})\n")
            return np.zeros((1, 1, 3), np.uint8), label


def subset_indices(n: int, subset: int) -> np.ndarray:
    """`subset` indices spread evenly over `n` sorted samples (so every class keeps its share); all if <= 0."""
    if subset <= 0 or subset >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, subset)).astype(np.int64))


@dataclass
class BetonStats:
    path: Path
    written: int
    skipped: list[str]
    classes: list[str]
    bytes: int


def write_beton(data_dir: str | os.PathLike, write_path: str | os.PathLike, *, max_resolution: int | None,
                write_mode: str, compress_probability: float, jpeg_quality: int, workers: int, chunk_size: int,
                subset: int = -1, verify: bool = True, strict: bool = False, seed: int = 0,
                smart_threshold: int | None = None) -> BetonStats:
    """ImageFolder `data_dir` -> FFCV file `write_path` (fields `image`: RGBImageField, `label`: IntField)."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    samples, classes = scan_image_folder(data_dir, flag="--data_dir")
    samples = [samples[i] for i in subset_indices(len(samples), subset)]
    skipped: list[str] = []
    if verify:
        bad = verify_images([p for p, _ in samples], workers)
        if bad and strict:
            raise CSRError(next(iter(bad.values())) + f" ({len(bad)} unreadable in all; drop --strict to skip)")
        for msg in bad.values():
            warn(f"skipping {msg}")
        skipped = list(bad.values())
        samples = [s for i, s in enumerate(samples) if i not in bad]
    if not samples:
        raise CSRError(f"--data_dir {data_dir}: no readable images")
    with atomic_path(write_path, suffix=".tmp.beton") as tmp:
        error_log = tmp.with_suffix(".errors")
        try:
            dataset = _BetonSource(samples, error_log, seed)
            fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                             smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                             compress_probability=compress_probability),
                      "label": IntField()}
            DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=chunk_size)
            if error_log.exists():
                first = error_log.read_text().splitlines()
                raise CSRError(f"{first[0]} (found while writing, {len(first)} in all; rerun with "
                               "--verify_images True to skip unreadable files)")
        finally:
            if error_log.exists():
                error_log.unlink()
    return BetonStats(Path(write_path), len(samples), skipped, classes, Path(write_path).stat().st_size)
