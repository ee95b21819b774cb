"""Fashion-MNIST images with templated captions: small real-format image-text data sets (shards, COCO and
Flickr30k retrieval files, a tiny CLIP) for the multimodal tests and the CPU demo.

Images are real (the Debian package `dataset-fashion-mnist`, IDX files, as RGB JPEGs); the CAPTIONS ARE
TEMPLATED from each image's class name and simple attributes measured on its pixels (brightness, how much of
the frame it fills, tall/wide/square outline). They exercise the file formats and the code path, not language.

Layout written under OUT (built in a temporary directory and renamed into place):
    OUT/shards/shards-{0000..NNNN}.tar     webdataset shards: `%06d.jpg`, `%06d.txt` (one caption), `%06d.cls`
    OUT/coco/val2014/COCO_val2014_%012d.jpg + OUT/coco/coco_test_karpathy.json
                                           (clip_benchmark's list of {"image", "caption": [5 captions]})
    OUT/flickr30k/flickr30k-images/%010d.jpg + OUT/flickr30k/dataset_flickr30k.json
                                           (Karpathy's format: images with split and 5 sentences each)
    OUT/tiny-clip.json, OUT/tiny-clip-random.pt  a tiny open_clip architecture and random weights for it
    OUT/tiny-clip-fmnist.pt                (optional, `train_tiny_clip`) that CLIP trained on the shards, so that
                                           the demo's retrieval numbers are above chance
    OUT/fixtures.json                      what was written, and the note that captions are templated
Train shards come from the Fashion-MNIST training file, the retrieval sets from the test file (disjoint).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from csr.fashion_mnist import DEFAULT_SOURCE, load_split
from csr.io import CSRError, check_output

CLASS_WORDS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
TEMPLATES = ("a photo of a {bright} {name}",
             "a {size} {name} on a black background",
             "a {shape} grayscale picture of a {name}",
             "a {bright}, {size} {name}",
             "an image showing a {name}")
NOTE = ("captions are TEMPLATED from Fashion-MNIST class names and pixel attributes (brightness, size, "
        "outline); images are real Fashion-MNIST images")


def attributes(img: np.ndarray) -> dict[str, str]:
    """Words for a 28x28 uint8 image: brightness of the garment, how much of the frame it fills, outline."""
    on = img > 30
    bright = float(img[on].mean()) if on.any() else 0.0
    fill = float(on.mean())
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    h = rows[-1] - rows[0] + 1 if len(rows) else 1
    w = cols[-1] - cols[0] + 1 if len(cols) else 1
    return {"bright": "dark" if bright < 100 else "light" if bright > 170 else "grey",
            "size": "small" if fill < 0.35 else "large" if fill > 0.55 else "medium-sized",
            "shape": "tall" if h > 1.3 * w else "wide" if w > 1.3 * h else "squarish"}


def captions(img: np.ndarray, label: int, n: int = 5, rng: np.random.Generator | None = None) -> list[str]:
    """`n` templated captions (all five templates in order when n = 5; random templates with `rng`)."""
    words = {**attributes(img), "name": CLASS_WORDS[label]}
    order = rng.choice(len(TEMPLATES), size=n) if rng is not None else np.arange(n) % len(TEMPLATES)
    return [TEMPLATES[t].format(**words) for t in order]


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(out: Path, images: np.ndarray, labels: np.ndarray, per_shard: int, seed: int = 0) -> str:
    """webdataset shards `out/shards-%04d.tar` (keys `%06d`, one random-template caption each); returns the
    brace pattern naming them."""
    import webdataset as wds
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_shards = (len(images) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"shards-{s:04d}.tar")) as tw:
            for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                tw.write({"__key__": f"{i:06d}", "jpg": jpeg_bytes(images[i]),
                          "txt": captions(images[i], int(labels[i]), 1, rng)[0], "cls": int(labels[i])})
    return str(out / f"shards-{{0000..{n_shards - 1:04d}}}.tar")


def write_coco(root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Path:
    """COCO-style retrieval set: `val2014/COCO_val2014_%012d.jpg` + clip_benchmark's `coco_test_karpathy.json`."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    entries = []
    for img, lab, i in zip(images, labels, ids):
        rel = f"val2014/COCO_val2014_{int(i):012d}.jpg"
        (root / rel).write_bytes(jpeg_bytes(img))
        entries.append({"image": rel, "caption": captions(img, int(lab))})
    ann = root / "coco_test_karpathy.json"
    ann.write_text(json.dumps(entries, indent=1))
    return ann


def write_flickr30k(root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, n_train: int = 4) -> Path:
    """Flickr30k-style set: `flickr30k-images/%010d.jpg` + Karpathy's `dataset_flickr30k.json`; the first
    `n_train` images are marked split "train" (the evaluation must skip them), the rest "test"."""
    (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    entries, sent = [], 0
    for j, (img, lab, i) in enumerate(zip(images, labels, ids)):
        name = f"{int(i):010d}.jpg"
        (root / "flickr30k-images" / name).write_bytes(jpeg_bytes(img))
        caps = captions(img, int(lab))
        entries.append({"filename": name, "imgid": j, "split": "train" if j < n_train else "test",
                        "sentids": list(range(sent, sent + len(caps))),
                        "sentences": [{"raw": c, "tokens": c.split(), "imgid": j, "sentid": sent + t}
                                      for t, c in enumerate(caps)]})
        sent += len(caps)
    ann = root / "dataset_flickr30k.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return ann


def write_tiny_clip(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """`tiny-clip.json` (an open_clip architecture) and `tiny-clip-random.pt` (its random weights)."""
    import open_clip
    import torch

    from csr.clip import TINY_CLIP_CONFIG
    cfg = out / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    weights = out / "tiny-clip-random.pt"
    torch.save(model.state_dict(), weights)
    return cfg, weights


def train_tiny_clip(fixtures: str | os.PathLike, steps: int = 300, batch_size: int = 128, lr: float = 1e-3,
                    workers: int = 1, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train the tiny CLIP from its random weights on the fixture shards with open_clip's contrastive loss.

    With no CLIP weights reachable, this gives the demo a CLIP whose towers agree (on templated captions), so
    retrieval numbers mean something. Writes `tiny-clip-fmnist.pt` beside the random weights; returns a summary.
    """
    import time

    import open_clip
    import torch
    from csr.progress import progress_bar

    from csr.io import atomic_path
    from csr.clip import load_clip
    from csr.webdata import ShardStream, expand_shards, shard_loader
    root = Path(fixtures)
    manifest = json.loads((root / "fixtures.json").read_text())
    clip = load_clip(str(root / "tiny-clip.json"), str(root / "tiny-clip-random.pt"), "cpu", "fp32", seed=seed)
    model = clip.model.train().requires_grad_(True)
    shards = expand_shards(str(root / "shards" / Path(manifest["train_data"]).name))
    stream = ShardStream(shards, clip.preprocess, clip.tokenizer, batch_size,
                         batches_per_worker=-(-steps // max(1, workers)), shuffle=True, seed=seed)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    torch.manual_seed(seed)
    t0, losses = time.time(), []
    bar = progress_bar(total=steps, desc="tiny CLIP", disable=not progress, leave=False)
    for images, tokens, _ in shard_loader(stream, workers, False):
        image_f, text_f, scale = model(images, tokens)
        loss = loss_fn(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if len(losses) >= steps:
            break
    bar.close()
    out = root / "tiny-clip-fmnist.pt"
    with atomic_path(out, suffix=".tmp.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    summary = {"weights": str(out), "steps": len(losses), "batch_size": batch_size, "lr": lr,
               "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
               "seconds": round(time.time() - t0, 1)}
    manifest["trained_clip"] = summary
    (root / "fixtures.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def build_fixtures(out: str | os.PathLike, n_train: int = 4096, per_shard: int = 256, n_eval: int = 200,
                   source: str | os.PathLike = DEFAULT_SOURCE, seed: int = 0,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write every fixture under `out` (atomically, as one directory); returns the paths (also in fixtures.json)."""
    out, source = check_output(out, overwrite, folder=True), Path(source)  # writable, not clobbered: before any reading
    if not source.is_dir():
        raise CSRError(f"--source {source}: not found (apt-get install dataset-fashion-mnist)")
    if n_train < 1 or n_eval < 1 or per_shard < 1:
        raise CSRError("--n-train, --n-eval and --per-shard must be >= 1")
    rng = np.random.default_rng(seed)
    tr_img, tr_lab = load_split(source, "train")
    te_img, te_lab = load_split(source, "val")
    tr = np.sort(rng.choice(len(tr_img), size=min(n_train, len(tr_img)), replace=False))
    te = np.sort(rng.choice(len(te_img), size=min(2 * n_eval + 4, len(te_img)), replace=False))
    coco_ids, flickr_ids = te[:n_eval], te[n_eval:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pattern = write_shards(tmp / "shards", tr_img[tr], tr_lab[tr], per_shard, seed)
        write_coco(tmp / "coco", te_img[coco_ids], te_lab[coco_ids], coco_ids)
        write_flickr30k(tmp / "flickr30k", te_img[flickr_ids], te_lab[flickr_ids], flickr_ids)
        write_tiny_clip(tmp, seed)
        manifest = {"note": NOTE, "source": str(source), "seed": seed,
                    "train_data": pattern.replace(str(tmp), str(out)), "n_train": int(len(tr)),
                    "per_shard": per_shard, "coco_root": str(out / "coco"), "n_coco": int(len(coco_ids)),
                    "flickr30k_root": str(out / "flickr30k"), "n_flickr30k_test": int(len(flickr_ids)) - 4,
                    "captions_per_image": len(TEMPLATES), "model": str(out / "tiny-clip.json"),
                    "pretrained": str(out / "tiny-clip-random.pt")}
        (tmp / "fixtures.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest
