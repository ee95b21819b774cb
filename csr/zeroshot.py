"""Zero-shot image-text retrieval: COCO / Flickr30k caption sets read from their standard layouts, and
image->text / text->image recall@k with several captions per image (an image->text hit when ANY of the image's
captions is in its top k), by exact search through `csr.knn.search` (the sparse engine for CSR codes, FAISS for
dense features), ties broken by the lowest index."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from csr.io import CSRError, read_json
from csr.model import CSR

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
    data = read_json(ann, flag="--annotation")
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
