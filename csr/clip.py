"""Frozen open_clip towers: build a CLIP from a local weights file (never downloading), and L2-normalised image
and text features of batches, image files and caption lists."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from csr.io import CSRError, read_json
from csr.progress import progress_bar

# A tiny open_clip architecture for tests and the CPU demo (random initialisation; ~3M parameters, most of
# them the 49408-token embedding the standard tokenizer needs).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


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


def _resolve_model_name(model: str) -> str:
    """A built-in open_clip name, or a `.json` architecture file (registered under its stem)."""
    import open_clip
    if model.endswith(".json"):
        path = Path(model)
        cfg = read_json(path, flag="--model")
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
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CSRError(f"--pretrained {pretrained}: weights do not fit {name} ({why})") from None
    except Exception as e:  # noqa: BLE001 - open_clip fails on a foreign file in many ways (EOFError,
        if weights is None:  # IndexError, StopIteration, AttributeError, UnpicklingError): each names the file
            raise
        why = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
        raise CSRError(f"--pretrained {pretrained}: not a CLIP weights file for {name} "
                       f"({type(e).__name__}{': ' + why if why else ''})") from None
    device = torch.device(device)
    clip = clip.to(device).eval().requires_grad_(False)
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    scale = float(clip.logit_scale.exp().clamp(max=100)) if hasattr(clip, "logit_scale") else 100.0
    return FrozenCLIP(clip, preprocess, open_clip.get_tokenizer(name), name, label, embed_dim, scale, device,
                      precision)


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
           for b in progress_bar(loader, desc="image features", disable=not progress, leave=False)]
    return np.concatenate(out)


@torch.no_grad()
def embed_texts(clip: FrozenCLIP, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    out = [clip.text_features(clip.tokenizer(list(texts[s:s + batch_size]))).cpu().numpy()
           for s in progress_bar(range(0, len(texts), batch_size), desc="text features", disable=not progress, leave=False)]
    return np.concatenate(out)

