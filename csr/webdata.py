"""webdataset image-caption shards: expanding and checking shard lists, streaming decoded (image, caption)
batches split between DDP ranks and DataLoader workers, and the one-pass CLIP feature cache built from them."""
from __future__ import annotations

import io
import math
import os
import random
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from csr.clip import FrozenCLIP
from csr.distributed import Runtime, barrier
from csr.io import (CSRError, NpyWriter, atomic_save_npy, info, load_embeddings, read_sidecar, sidecar_path,
                    write_sidecar)
from csr.progress import progress_bar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"

def expand_shards(spec: str, flag: str = "--train-data") -> list[str]:
    """Expand `dir/shards-{0000..0575}.tar` (several sources joined by `::`); every local shard must exist."""
    import braceexpand
    urls: list[str] = []
    for part in spec.split("::"):
        urls += list(braceexpand.braceexpand(part.strip()))
    if not urls or not urls[0]:
        raise CSRError(f"{flag}: no shards in {spec!r}")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise CSRError(f"{flag}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def shard_keys(path: str, members: int | None = None) -> dict[str, set[str]]:
    """Sample key -> file extensions of a local tar shard (headers only; the first `members` files)."""
    keys: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for i, member in enumerate(tar):
                if members is not None and i >= members:
                    break
                base = os.path.basename(member.name)
                if member.isfile() and "." in base:  # webdataset's grouping: key = path up to the first dot
                    stem, ext = base.split(".", 1)
                    keys.setdefault(os.path.join(os.path.dirname(member.name), stem), set()).add(ext.lower())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CSRError(f"{path}: not a readable tar shard ({e})") from None
    return keys


def is_pair(exts: set[str]) -> bool:
    return bool(exts & set(IMAGE_EXTS)) and TEXT_EXT in exts


def check_shard(path: str, members: int = 64) -> None:
    """The first samples of a local shard must hold an image (jpg/png/webp) and a caption (txt)."""
    if "://" in path or path.startswith("pipe:"):
        return
    keys = shard_keys(path, members)
    if not keys:
        raise CSRError(f"{path}: empty shard (no files)")
    if not any(is_pair(e) for e in keys.values()):
        seen = sorted(set().union(*keys.values()))
        raise CSRError(f"{path}: samples lack an image ({'/'.join(IMAGE_EXTS)}) and a caption ({TEXT_EXT}); "
                       f"found extensions {seen}")


def count_pairs(shards: Sequence[str]) -> int:
    """Samples with an image and a caption across local shards (used when --train-num-samples is absent)."""
    n = sum(sum(1 for e in shard_keys(s).values() if is_pair(e)) for s in shards)
    if n == 0:
        raise CSRError(f"--train-data: no sample with an image and a caption in {len(shards)} shards")
    return n


def _decode_pair(sample: dict[str, Any]) -> tuple[Any, str] | None:
    """(PIL RGB image, caption) of a raw webdataset sample, or None when it lacks either or fails to decode."""
    from PIL import Image
    img = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    txt = sample.get(TEXT_EXT)
    if img is None or txt is None:
        return None
    try:
        caption = txt.decode("utf-8") if isinstance(txt, bytes) else str(txt)
        with Image.open(io.BytesIO(img)) as im:
            return im.convert("RGB"), caption.strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of (images, tokens, n_skipped) from webdataset shards for one DDP rank.

    Shards are split between ranks and DataLoader workers: each (rank, worker) reader gets its own shards, the
    split webdataset's split_by_node + split_by_worker make, done here from explicit rank and worker ids (the
    same in forked workers, whatever the environment says). Training shuffles the shard order per (seed, epoch, pass)
    and samples through a buffer. `batches_per_worker` fixes an epoch's length (--train-num-samples): a reader
    restarts its shards until it has produced that many batches. Without it, one pass (feature caching).
    """

    def __init__(self, shards: Sequence[str], preprocess: Callable, tokenizer: Callable, batch_size: int,
                 rank: int = 0, world_size: int = 1, batches_per_worker: int | None = None, shuffle: bool = True,
                 resampled: bool = False, buffer: int = 1000, seed: int = 0):
        super().__init__()
        self.shards, self.preprocess, self.tokenizer = list(shards), preprocess, tokenizer
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.batches_per_worker, self.shuffle, self.resampled = batches_per_worker, shuffle, resampled
        self.buffer, self.seed, self.epoch = buffer, seed, 0

    def _reader(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _shards_for_pass(self, reader: int, n_readers: int, pas: int) -> list[str]:
        if self.resampled:
            rng = random.Random(hash((self.seed, self.epoch, reader, pas)))
            return [rng.choice(self.shards) for _ in range(max(1, len(self.shards) // n_readers))]
        order = list(self.shards)
        if self.shuffle:  # the same permutation on every reader, so the split stays a partition
            random.Random(hash((self.seed, self.epoch, pas))).shuffle(order)
        return order[reader::n_readers]

    def _pairs(self, shards: list[str], seed: int) -> Iterator[tuple[Any, str] | None]:
        import webdataset as wds
        stages: list[Any] = [wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=wds.warn_and_continue)]
        if self.shuffle:
            stages.append(wds.shuffle(self.buffer, initial=min(self.buffer, 100), rng=random.Random(seed)))
        for sample in wds.DataPipeline(*stages):
            yield _decode_pair(sample)

    def __iter__(self):
        reader, n_readers = self._reader()
        produced, pas = 0, 0
        while True:
            shards = self._shards_for_pass(reader, n_readers, pas)
            images, captions, skipped, made_any = [], [], 0, False
            for pair in self._pairs(shards, hash((self.seed, self.epoch, reader, pas))):
                if pair is None:
                    skipped += 1
                    continue
                images.append(self.preprocess(pair[0]))
                captions.append(pair[1])
                if len(images) == self.batch_size:
                    yield torch.stack(images), self.tokenizer(captions), skipped
                    images, captions, skipped, made_any = [], [], 0, True
                    produced += 1
                    if self.batches_per_worker is not None and produced >= self.batches_per_worker:
                        return
            if self.batches_per_worker is None:
                if images:  # the last partial batch of a single pass (feature extraction)
                    yield torch.stack(images), self.tokenizer(captions), skipped
                return
            if not made_any:  # these shards cannot fill one batch: stop instead of looping forever
                return
            pas += 1


def shard_loader(stream: ShardStream, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=False)


def check_readers(n_shards: int, world_size: int, workers: int, resampled: bool) -> None:
    readers = world_size * max(1, workers)
    if not resampled and n_shards < readers:
        raise CSRError(f"--train-data has {n_shards} shards but {world_size} rank(s) x {max(1, workers)} "
                       f"worker(s) need at least one each; lower --workers, add shards or pass --dataset-resampled")


@torch.no_grad()
def extract_features(clip: FrozenCLIP, stream: ShardStream, workers: int, limit: int | None,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """One pass over this rank's shards: (image [n, d], text [n, d]) float32 L2-normalised, n <= limit."""
    imgs, txts, n, skipped = [], [], 0, 0
    bar = progress_bar(total=limit, desc="CLIP features", unit="pair", disable=not progress, leave=False)
    for images, tokens, sk in shard_loader(stream, workers, clip.device.type == "cuda"):
        skipped += int(sk)
        imgs.append(clip.image_features(images).cpu().numpy())
        txts.append(clip.text_features(tokens).cpu().numpy())
        n += len(images)
        bar.update(len(images))
        if limit is not None and n >= limit:
            break
    bar.close()
    if n == 0:
        return np.zeros((0, clip.embed_dim), np.float32), np.zeros((0, clip.embed_dim), np.float32), skipped
    img, txt = np.concatenate(imgs), np.concatenate(txts)
    return img[:limit], txt[:limit], skipped


def check_cache_shape(cache: Path, arrays: dict[str, np.ndarray], clip: FrozenCLIP) -> None:
    """Each cached array `{name: array}` is what its sidecar says (n pairs of width d) and d is the CLIP's
    width: an array written over, or a sidecar copied from another cache, is an error before training reads a
    row."""
    for name, arr in arrays.items():
        path = cache / name
        meta = read_sidecar(path)
        n, d = arr.shape
        recorded = (meta.get("n", n), meta.get("d", d))
        if (n, d) != recorded:
            raise CSRError(f"--feature-cache {path}: shape ({n}, {d}) but its sidecar {sidecar_path(path)} records "
                           f"{recorded}; delete the cache")
        if d != clip.embed_dim:
            raise CSRError(f"--feature-cache {path}: features of width {d} but {clip.name} embeds to "
                           f"{clip.embed_dim}; delete the cache")


def build_feature_cache(cache_dir: str | Path, clip: FrozenCLIP, shards: Sequence[str], spec: str,
                        batch_size: int, workers: int, limit: int | None, rt: Runtime,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Extract (or reuse) `cache_dir/{image,text}_emb.npy`; under DDP each rank extracts its own shards.

    A cache is reused only when its sidecar names the same CLIP, weights, shards and sample count; a
    different one is an error rather than a silent mix of features.
    """
    cache = Path(cache_dir)
    img_path, txt_path = cache / "image_emb.npy", cache / "text_emb.npy"
    want = {"clip_model": clip.name, "pretrained": clip.pretrained, "train_data": spec, "limit": limit}
    if img_path.exists() and txt_path.exists():
        img, txt = load_embeddings(img_path), load_embeddings(txt_path)  # a damaged cache names its file
        if len(img) != len(txt):
            raise CSRError(f"--feature-cache {cache}: {len(img)} image but {len(txt)} text features; delete it")
        meta = read_sidecar(img_path)
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            raise CSRError(f"--feature-cache {cache}: holds features of another run ({diff}); use another "
                           f"directory or delete it")
        check_cache_shape(cache, {img_path.name: img, txt_path.name: txt}, clip)
        if rt.is_main:
            info(f"feature cache: reusing {img_path} and {txt_path} ({meta.get('n')} pairs)")
        return img, txt
    per_rank = None if limit is None else math.ceil(limit / rt.world_size)
    stream = ShardStream(shards, clip.preprocess, clip.tokenizer, batch_size, rt.rank, rt.world_size,
                         batches_per_worker=None, shuffle=False)
    t0 = time.time()
    img, txt, skipped = extract_features(clip, stream, workers, per_rank, progress and rt.is_main)
    if rt.distributed:
        atomic_save_npy(cache / f".part{rt.rank}_image.npy", img)
        atomic_save_npy(cache / f".part{rt.rank}_text.npy", txt)
        barrier()
        if rt.is_main:
            parts = [(np.load(cache / f".part{r}_image.npy"), np.load(cache / f".part{r}_text.npy"))
                     for r in range(rt.world_size)]
            img = np.concatenate([p[0] for p in parts])
            txt = np.concatenate([p[1] for p in parts])
    if rt.is_main:
        if len(img) == 0:
            raise CSRError(f"--train-data {spec}: no sample with both an image and a caption")
        for path, arr in ((img_path, img), (txt_path, txt)):
            with NpyWriter(path, arr.shape, np.float32) as w:
                w.write(0, arr)
        for path in (img_path, txt_path):
            write_sidecar(path, **want, n=len(img), d=int(img.shape[1]), dtype="float32", skipped=skipped,
                          normalized=True, seconds=round(time.time() - t0, 2))
        if rt.distributed:
            for r in range(rt.world_size):
                for kind in ("image", "text"):
                    (cache / f".part{r}_{kind}.npy").unlink(missing_ok=True)
        info(f"feature cache: wrote {img_path} and {txt_path} ({len(img)} pairs, d={img.shape[1]}) "
              f"in {time.time() - t0:.1f}s")
    barrier()
    return np.load(img_path, mmap_mode="r"), np.load(txt_path, mmap_mode="r")
