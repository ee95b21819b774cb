"""CSR on frozen CLIP features: open_clip towers, webdataset image-text shards, training, zero-shot retrieval.

One CSR is shared by both towers: a step encodes the L2-normalised image and text features of a batch of pairs
as one `[2B, d]` input. Loss = reconstruction at k and 4k + AuxK (`csr.train.step_losses` with `cl="none"`)
+ gamma * a CLIP-style symmetric InfoNCE scaled by the frozen CLIP's logit scale, computed on the
L2-normalised top-k reconstructions (as the reference does) or, with `cl_on="codes"`, on the sparse codes.

Features come either online (every step runs the frozen CLIP on decoded shard samples) or from a feature cache
(`image_emb.npy` / `text_emb.npy` extracted once, then epochs are shuffled passes over the cache).

Zero-shot retrieval: image->text and text->image recall@k with several captions per image (an image->text hit
when ANY of the image's captions is in its top k), exact search through `csr.knn.search` (the sparse engine for
codes, FAISS for dense features), ties broken by the lowest index.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from csr import losses as L
from csr.checkpoint import save_checkpoint
from csr.distributed import Runtime, all_reduce_, barrier
from csr.io import CSRError, NpyWriter, atomic_save_npy, atomic_write_text, read_sidecar, write_sidecar
from csr.model import CSR
from csr.train import Batches, TrainConfig, TrainData, accumulate, autocast, make_scheduler, optimizer_step, step_losses

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"

# A tiny open_clip architecture for tests and the CPU demo (random initialisation; ~3M parameters, most of
# them the 49408-token embedding the standard tokenizer needs).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


# ============================================================================ frozen CLIP

def _autocast_dtype(precision: str) -> torch.dtype | None:
    """open_clip's --precision names: amp = float16 autocast, amp_bf16 = bfloat16 autocast, fp32 = none."""
    return {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}.get(precision)


@dataclass
class FrozenCLIP:
    """An open_clip model in eval mode without gradients; features are L2-normalised float32."""
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> [3, S, S] tensor (deterministic, open_clip's val transform)
    tokenizer: Callable  # list[str] -> [B, context] long
    name: str
    pretrained: str
    embed_dim: int
    logit_scale: float  # exp of the model's learned logit scale (100 for trained CLIPs)
    device: torch.device
    precision: str = "fp32"

    def autocast(self):
        dtype = _autocast_dtype(self.precision)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            f = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            f = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(f.float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "pretrained": self.pretrained, "embed_dim": self.embed_dim,
                "logit_scale": self.logit_scale}


def read_json(path: Path, flag: str) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line CSRError naming `flag` and the path."""
    if not path.is_file():
        raise CSRError(f"{flag} {path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CSRError(f"{flag} {path}: not valid JSON ({e})") from None


def _resolve_model_name(model: str) -> str:
    """A built-in open_clip name, or a `.json` architecture file (registered under its stem)."""
    import open_clip
    if model.endswith(".json"):
        path = Path(model)
        cfg = read_json(path, "--model")
        if not isinstance(cfg, dict) or not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise CSRError(f"--model {model}: an open_clip config needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise CSRError(f"--model {model}: not an open_clip architecture (see open_clip.list_models()) "
                       f"nor a .json config file")
    return name


def _cached_tag_weights(name: str, tag: str) -> str | None:
    """Local path of a pretrained tag's weights if a previous download left them in a cache, else None."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo = cfg["hf_hub"].strip("/")
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    return None


def load_clip(model: str, pretrained: str | None, device: torch.device | str = "cpu", precision: str = "amp",
              force_quick_gelu: bool = False, seed: int = 0) -> FrozenCLIP:
    """Build a frozen open_clip model without touching the network.

    `pretrained`: a local weights file; `none`/empty for random initialisation (seeded, for tests); or an
    open_clip tag (e.g. `dfn2b`), accepted only when its weights are already in the local download cache.
    """
    import open_clip
    name = _resolve_model_name(model)
    weights: str | None = None
    quick_gelu = force_quick_gelu
    preprocess_cfg: dict[str, Any] = {}
    label = "none"
    if pretrained and pretrained.lower() not in ("none", "random"):
        label = pretrained
        if os.path.isfile(pretrained):
            weights = pretrained
        elif open_clip.get_pretrained_cfg(name, pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            weights = _cached_tag_weights(name, pretrained)
            if weights is None:
                hint = " --force-quick-gelu" if tag_cfg.get("quick_gelu") else ""
                raise CSRError(f"--pretrained {pretrained}: the {name}/{pretrained} weights are not on this "
                               f"machine and nothing is downloaded at run time; fetch them elsewhere (e.g. "
                               f"{tag_cfg.get('hf_hub') or tag_cfg.get('url')}) and pass "
                               f"--pretrained /path/to/weights{hint}")
            quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu"))
            preprocess_cfg = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                              if k in tag_cfg}
        else:
            raise CSRError(f"--pretrained {pretrained}: not a file, and not an open_clip tag of {name} "
                           f"(tags: {open_clip.list_pretrained_tags_by_model(name)}); pass a local weights file "
                           f"or 'none' for random initialisation")
    torch.manual_seed(seed)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, force_quick_gelu=quick_gelu, pretrained_text=False, **preprocess_cfg)
    except (RuntimeError, KeyError, ValueError) as e:
        why = str(e).splitlines()[0][:300]
        raise CSRError(f"--pretrained {pretrained}: weights do not fit {name} ({why})") from None
    device = torch.device(device)
    clip = clip.to(device).eval().requires_grad_(False)
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    scale = float(clip.logit_scale.exp().clamp(max=100)) if hasattr(clip, "logit_scale") else 100.0
    return FrozenCLIP(clip, preprocess, open_clip.get_tokenizer(name), name, label, embed_dim, scale, device,
                      precision)


# ============================================================================ webdataset shards

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
            for i, info in enumerate(tar):
                if members is not None and i >= members:
                    break
                base = os.path.basename(info.name)
                if info.isfile() and "." in base:  # webdataset's grouping: key = path up to the first dot
                    stem, ext = base.split(".", 1)
                    keys.setdefault(os.path.join(os.path.dirname(info.name), stem), set()).add(ext.lower())
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
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
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


# ============================================================================ feature sources

class OnlineFeatures:
    """Per step: decode a shard batch, run the frozen CLIP, yield (image_features, text_features) [B, d]."""

    def __init__(self, clip: FrozenCLIP, stream: ShardStream, workers: int):
        self.clip, self.stream, self.workers = clip, stream, workers
        self.skipped = 0
        per_worker = stream.batches_per_worker or 0
        self.steps_per_epoch = per_worker * max(1, workers)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.epoch = epoch
        for images, tokens, skipped in shard_loader(self.stream, self.workers, self.clip.device.type == "cuda"):
            self.skipped += int(skipped)
            yield self.clip.image_features(images), self.clip.text_features(tokens)


class CachedFeatures:
    """Shuffled global batches of cached (image, text) feature rows; each rank takes its slice."""

    def __init__(self, image: np.ndarray, text: np.ndarray, global_batch: int, seed: int, rt: Runtime):
        cfg = TrainConfig(batch_size=global_batch, seed=seed, cl="none")
        self.batches = Batches(TrainData(image, x_pair=text), cfg, rt)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.device, self.skipped = rt.device, 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for img, _, txt in self.batches.epoch(epoch):
            yield img.to(self.device, non_blocking=True), txt.to(self.device, non_blocking=True)


@torch.no_grad()
def extract_features(clip: FrozenCLIP, stream: ShardStream, workers: int, limit: int | None,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """One pass over this rank's shards: (image [n, d], text [n, d]) float32 L2-normalised, n <= limit."""
    imgs, txts, n, skipped = [], [], 0, 0
    bar = tqdm(total=limit, desc="CLIP features", unit="pair", disable=not progress, leave=False)
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
        meta = read_sidecar(img_path)
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            raise CSRError(f"--feature-cache {cache}: holds features of another run ({diff}); use another "
                           f"directory or delete it")
        if rt.is_main:
            print(f"feature cache: reusing {img_path} and {txt_path} ({meta.get('n')} pairs)")
        return np.load(img_path, mmap_mode="r"), np.load(txt_path, mmap_mode="r")
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
        print(f"feature cache: wrote {img_path} and {txt_path} ({len(img)} pairs, d={img.shape[1]}) "
              f"in {time.time() - t0:.1f}s")
    barrier()
    return np.load(img_path, mmap_mode="r"), np.load(txt_path, mmap_mode="r")


# ============================================================================ losses

def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import warnings

    import torch.distributed.nn.functional as dnn
    with warnings.catch_warnings():  # deprecated in favour of a private API; csr.losses uses it too
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dnn.all_gather(x), 0), dist.get_rank() * x.shape[0]


def clip_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between rows of `a` and `b` (row i of a pairs with row i of b).

    Rows are L2-normalised here. Under DDP, each rank's rows are scored against the global batch of the other
    side (all-gathered with gradient), so the averaged gradients are those of the global-batch loss.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, offset = _gather_with_grad(a)
    all_b, _ = _gather_with_grad(b)
    target = offset + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logit_scale * a @ all_b.t(), target)
                  + F.cross_entropy(logit_scale * b @ all_a.t(), target))


def multimodal_losses(out: dict[str, torch.Tensor], x: torch.Tensor, cfg: TrainConfig, hidden: int,
                      logit_scale: float, cl_on: str = "recon", distributed: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms of one step on `x = [image rows; text rows]` (2B rows, one shared CSR pass).

    The InfoNCE logits are computed in float32 even under autocast: at CLIP's logit scale (100) bfloat16
    would resolve logits only to ~0.5.
    """
    terms = step_losses(out, x, replace(cfg, cl="none"), hidden, None, distributed)
    half = x.shape[0] // 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        if cl_on == "recon":
            rec = out["recon_k"].float()
            terms["cl"] = clip_infonce(rec[:half], rec[half:], logit_scale)
        elif cl_on == "codes":
            k = int(out["k"])
            idx, vals = out["idx"][:, :k], out["vals"][:, :k].float()
            terms["cl"] = L.pair_contrastive(idx[:half], vals[:half], idx[half:], vals[half:], hidden,
                                             1.0 / logit_scale)
        else:
            raise CSRError(f"--csr-cl-on must be recon or codes, got {cl_on!r}")
    terms["total"] = terms["total"] + cfg.cl_coef * terms["cl"]
    return terms


# ============================================================================ training

def make_optimizer(model: CSR, lr: float, wd: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW as open_clip sets it up: weight decay on weight matrices, none on biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)


def train_multimodal(model: CSR, source, cfg: TrainConfig, out_dir: str | Path, rt: Runtime, logit_scale: float,
                     cl_on: str = "recon", save_frequency: int = 1, betas: tuple[float, float] = (0.9, 0.98),
                     eps: float = 1e-6, extra: dict[str, Any] | None = None, resume: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train the shared CSR on (image, text) feature batches from `source` (OnlineFeatures/CachedFeatures).

    Writes `out_dir/epoch_{E}.pt` every `save_frequency` epochs and at the end, `out_dir/last.pt` after every
    epoch (for resuming), `out_dir/csr.pt` at the end, and `out_dir/log.jsonl`. Returns a summary dict.
    """
    out_dir = Path(out_dir)
    extra = extra or {}
    steps_per_epoch = max(1, source.steps_per_epoch)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    model.to(rt.device)
    opt = make_optimizer(model, cfg.lr, cfg.wd, betas, eps)
    sched = make_scheduler(opt, cfg, total)
    start_epoch, step, log_lines = 0, 0, []
    if resume:
        from csr.checkpoint import check_resume, read_checkpoint
        ckpt = read_checkpoint(resume)
        check_resume(ckpt, resume, model.cfg.to_dict(), None)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        if (out_dir / "log.jsonl").exists():
            log_lines = [ln for ln in (out_dir / "log.jsonl").read_text().splitlines()
                         if ln.strip() and json.loads(ln)["epoch"] <= ckpt["epoch"]]
        if rt.is_main:
            print(f"resuming from {resume}: epoch {start_epoch + 1}, step {step}")
    net: torch.nn.Module = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    hidden, k = model.cfg.hidden_size, model.cfg.topk
    multi_k = cfg.multi_k or 4 * k
    summary: dict[str, Any] = {"epochs": cfg.epochs, "steps": step}
    saved: list[str] = []
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        sums: dict[str, float] = {}
        n_steps, n_pairs, t0 = 0, 0, time.time()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and rt.is_main), leave=False)
        it = source.epoch(epoch)
        while True:
            batch = next(it, None)
            if rt.distributed:  # every rank stops as soon as one runs out of data (never a hanging all-reduce)
                have = torch.tensor([0.0 if batch is None else 1.0], device=rt.device)
                if float(all_reduce_(have, dist.ReduceOp.MIN)) == 0:
                    break
            elif batch is None:
                break
            img, txt = batch
            x = torch.cat([img, txt]).float()
            dead = model.dead_mask()
            with autocast(rt.device, cfg.amp):
                out = net(x, k=k, multi_k=multi_k, dead=dead)
                terms = multimodal_losses(out, x, cfg, hidden, logit_scale, cl_on, rt.distributed)
            L.check_finite_loss(terms, step + 1)
            optimizer_step(model, opt, sched, terms["total"], out["idx"][:, :k], cfg.grad_clip)
            step += 1
            n_steps += 1
            n_pairs += img.shape[0] * rt.world_size
            accumulate(sums, terms)
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['total'].detach()):.4g}", cl=f"{float(terms['cl'].detach()):.3g}")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        bar.close()
        if n_steps == 0:
            raise CSRError("an epoch produced no batch: the shards hold fewer valid pairs than one batch "
                           "(lower --batch-size or check --train-data)")
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        stats = {"epoch": epoch, "step": step, **{f"loss_{n}": s / n_steps for n, s in sums.items()},
                 "dead_fraction": float(model.dead_mask().float().mean()), "samples_per_s": n_pairs / max(dt, 1e-9),
                 "pairs": n_pairs, "lr": sched.get_last_lr()[0], "epoch_time_s": dt,
                 "skipped_samples": int(getattr(source, "skipped", 0))}
        log_lines.append(json.dumps(stats))
        summary.update(stats)
        last_epoch = epoch == cfg.epochs - 1 or bool(cfg.max_steps and step >= cfg.max_steps)
        if rt.is_main:
            state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, step=step,
                         train_config=asdict(cfg), logit_scale=logit_scale, cl_on=cl_on, **extra)
            save_checkpoint(out_dir / "last.pt", model, **state)
            if (epoch + 1) % save_frequency == 0 or last_epoch:
                save_checkpoint(out_dir / f"epoch_{epoch + 1}.pt", model, **state)
                saved.append(str(out_dir / f"epoch_{epoch + 1}.pt"))
            atomic_write_text(out_dir / "log.jsonl", "\n".join(log_lines) + "\n")
            print(f"epoch {epoch + 1}/{cfg.epochs}: {n_steps} steps, loss {stats['loss_total']:.5g} (recon_k "
                  f"{stats['loss_recon_k']:.4g}, auxk {stats['loss_auxk']:.4g}, cl {stats['loss_cl']:.4g}), dead "
                  f"{stats['dead_fraction']:.1%}, {stats['samples_per_s']:.1f} samples/s")
        if last_epoch:
            break
    summary["steps"] = step
    if rt.is_main:
        final = out_dir / "csr.pt"
        save_checkpoint(final, model, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        epoch=summary.get("epoch", cfg.epochs - 1), step=step, train_config=asdict(cfg),
                        logit_scale=logit_scale, cl_on=cl_on, complete=True, **extra)
        write_sidecar(final, model_config=model.cfg.to_dict(), train_config=asdict(cfg), steps=step,
                      final_stats={k: v for k, v in summary.items() if k != "epochs"}, **extra)
        summary["checkpoint"] = str(final)
        summary["saved"] = saved
    barrier()
    model.eval()
    return summary


# ============================================================================ zero-shot retrieval data

DATASET_FILES = {"mscoco_captions": ("coco_test_karpathy.json", "dataset_coco.json"),
                 "flickr30k": ("dataset_flickr30k.json", "flickr30k_test_karpathy.json")}
IMAGE_DIRS = {"mscoco_captions": ("", "val2014", "images"),
              "flickr30k": ("flickr30k-images", "Images", "images", "")}


@dataclass
class CaptionSet:
    """Images and their captions; `text_to_image[j]` is the image of caption j."""
    image_paths: list[str]
    captions: list[str]
    text_to_image: np.ndarray  # int64 [n_captions]
    annotation: str

    @property
    def n_images(self) -> int:
        return len(self.image_paths)


def _parse_annotation(data: Any, split: str, ann: Path) -> list[tuple[str, list[str]]]:
    """Karpathy (`{"images": [{filepath?, filename, split, sentences: [{raw}]}]}`) or clip_benchmark/BLIP
    (`[{"image": relpath, "caption": [..]}]`) captions -> [(relative image path, captions)]."""
    items: list[tuple[str, list[str]]] = []
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        for im in data["images"]:
            if im.get("split", split) != split:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in im.get("sentences", [])]
            items.append((rel, [c.strip() for c in caps]))
    elif isinstance(data, list) and all(isinstance(d, dict) and "image" in d and "caption" in d for d in data):
        for d in data:
            caps = d["caption"] if isinstance(d["caption"], list) else [d["caption"]]
            items.append((d["image"], [str(c).strip() for c in caps]))
    else:
        raise CSRError(f"{ann}: not a Karpathy captions file (dict with 'images') nor a clip_benchmark list of "
                       f"{{'image', 'caption'}}")
    if not items:
        raise CSRError(f"{ann}: no images in split {split!r}")
    empty = [rel for rel, caps in items if not caps]
    if empty:
        raise CSRError(f"{ann}: {len(empty)} images have no captions (first: {empty[0]})")
    return items


def load_caption_set(dataset: str, root: str | Path, annotation: str | None = None, split: str = "test") -> CaptionSet:
    """Read a COCO / Flickr30k retrieval test set from its standard layout; missing images are an error."""
    if dataset not in DATASET_FILES:
        raise CSRError(f"--dataset must be one of {sorted(DATASET_FILES)}, got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise CSRError(f"--dataset_root {root}: directory not found")
    if annotation:
        ann = Path(annotation)
    else:
        ann = next((root / f for f in DATASET_FILES[dataset] if (root / f).is_file()), None)
        if ann is None:
            raise CSRError(f"--dataset_root {root}: no captions file ({' or '.join(DATASET_FILES[dataset])})")
    data = read_json(ann, "--annotation")
    items = _parse_annotation(data, split, ann)
    base = next((root / d for d in IMAGE_DIRS[dataset] if (root / d / items[0][0]).is_file()), root)
    missing = [rel for rel, _ in items if not (base / rel).is_file()]
    if missing:
        raise CSRError(f"{ann}: {len(missing)} of {len(items)} images are missing under {base} "
                       f"(e.g. {', '.join(missing[:3])})")
    paths, caps, owner = [], [], []
    for i, (rel, cs) in enumerate(items):
        paths.append(str(base / rel))
        caps += cs
        owner += [i] * len(cs)
    return CaptionSet(paths, caps, np.asarray(owner, dtype=np.int64), str(ann))


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                return self.preprocess(im.convert("RGB"))
        except OSError as e:
            raise CSRError(f"{self.paths[i]}: unreadable image ({e})") from None


@torch.no_grad()
def embed_images(clip: FrozenCLIP, paths: Sequence[str], batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> np.ndarray:
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, clip.preprocess), batch_size=batch_size,
                                         num_workers=workers, pin_memory=clip.device.type == "cuda")
    out = [clip.image_features(b).cpu().numpy()
           for b in tqdm(loader, desc="image features", disable=not progress, leave=False)]
    return np.concatenate(out)


@torch.no_grad()
def embed_texts(clip: FrozenCLIP, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    out = [clip.text_features(clip.tokenizer(list(texts[s:s + batch_size]))).cpu().numpy()
           for s in tqdm(range(0, len(texts), batch_size), desc="text features", disable=not progress, leave=False)]
    return np.concatenate(out)


# ============================================================================ recall@k

def recall_at_k(i2t: np.ndarray, t2i: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Zero-shot retrieval recall (%) from ranked neighbour lists.

    `i2t [n_images, K]`: caption indices ranked for each image; a hit at k when any of the image's captions
    is among the first k. `t2i [n_captions, K]`: image indices ranked for each caption; a hit when its own
    image is among the first k. k larger than the lists counts the whole list.
    """
    n_img = i2t.shape[0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * float(
            (text_to_image[i2t[:, :k]] == np.arange(n_img)[:, None]).any(1).mean())
        out[f"text_to_image_R@{k}"] = 100.0 * float((t2i[:, :k] == text_to_image[:, None]).any(1).mean())
    return out


def retrieval_neighbours(image, text, K: int, backend: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-K both ways (dense arrays or SparseCodes): (i2t [n_img, K'], t2i [n_txt, K'])."""
    from csr.knn import clip_k, search
    n_img = image.n if hasattr(image, "n") else len(image)
    n_txt = text.n if hasattr(text, "n") else len(text)
    i2t, _ = search(image, text, clip_k(K, n_txt, "--recall_k"), backend=backend, progress=progress)
    t2i, _ = search(text, image, clip_k(K, n_img, "--recall_k"), backend=backend, progress=progress)
    return i2t, t2i


def zero_shot_retrieval(image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int],
                        model: CSR | None = None, topks: Sequence[int] = (), device: str | torch.device = "cpu",
                        progress: bool = False) -> list[dict[str, Any]]:
    """Recall rows: one for the dense CLIP features (`model` None), else one per CSR k in `topks`."""
    K = max(ks)
    if model is None:
        i2t, t2i = retrieval_neighbours(image, text, K, "faiss", progress)
        return [{"representation": "clip", "active_dims": int(image.shape[1]),
                 **recall_at_k(i2t, t2i, text_to_image, ks)}]
    from csr.encode import encode_array
    rows = []
    for k in topks:
        ci = encode_array(model, image, k, device=device, progress=False)
        ct = encode_array(model, text, k, device=device, progress=False)
        i2t, t2i = retrieval_neighbours(ci, ct, K, "sparse", progress)
        rows.append({"representation": "csr", "active_dims": int(k), **recall_at_k(i2t, t2i, text_to_image, ks)})
    return rows
