"""Interop: CSR checkpoints <-> sentence-transformers `SparseAutoEncoder` / `SparseEncoder` folders, and
Hugging Face-style model folders (`save_pretrained` / `from_pretrained`).

sentence-transformers (>= 5) ships CSR as `SparseAutoEncoder`: the same tied architecture and parameter
names as `csr.model.CSR` (pre_bias, bias-free `encoder` Linear, latent_bias, decoder = encoder^T). Its config
keys map onto `CSRConfig` as

    input_dim -> input_dim, hidden_dim -> hidden_size, k -> topk, k_aux -> auxk,
    normalize -> normalize, dead_threshold -> dead_threshold.

At inference both compute `ReLU(TopK_k(W (LN?(x) - b_pre) + b_lat))` with the same LayerNorm-like input
standardisation (`(x - mean) / (std + 1e-5)`, unbiased std) and no output normalisation, so exported codes are
ours exactly; `SparseEncoder.encode(..., max_active_dims=m)` re-runs the top-k with k = m (like our
`encode(x, k=m)`) and returns a dense-shaped (by default sparse COO) `[N, hidden]` tensor, from which zero
values (units clipped by ReLU) are absent. Differences, training-only: their decoder un-normalises with `std`
instead of `std + 1e-5`, their AuxK reconstruction adds `pre_bias`, and their deadness counter advances per
top-k call (twice per training forward) rather than per optimiser step. Untied CSR models have no
counterpart there and are refused.

Folders written here (all atomically: built in a temp dir beside the target, then renamed into place):
- `export_st_module`: `config.json` + `model.safetensors`, the module layout sentence-transformers saves;
- `export_sparse_encoder`: a full `SparseEncoder` folder = a local sentence-transformers backbone + the module;
- `save_pretrained`: `config.json` (ours), `model.safetensors`, `README.md` (`csr.model_card`): exactly what a hub
  push uploads. `import_folder` reads any of the three back into a CSR checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from csr.checkpoint import first_line, load_model, save_checkpoint
from csr.io import CSRError, atomic_dir, code_version, read_json, read_sidecar, write_sidecar
from csr.model import CSR, CSRConfig
from csr.model_card import data_files, model_card
from csr.text_embed import default_text_backbone

PRETRAINED_FORMAT = "csr-pretrained-v1"
ST_CONFIG_KEYS = ("input_dim", "hidden_dim", "k", "k_aux", "normalize", "dead_threshold")
ST_MODULE_TYPE = "SparseAutoEncoder"
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "pytorch_model.bin"  # sentence-transformers still reads these


# ----------------------------------------------------------------------------- config mapping

def st_config(cfg: CSRConfig, k: int | None = None) -> dict[str, Any]:
    """`CSRConfig` -> sentence-transformers `SparseAutoEncoder` config (k: default active units)."""
    k = cfg.topk if k is None else k
    if not 1 <= k <= cfg.hidden_size:
        raise CSRError(f"--topk must be in [1, hidden_size={cfg.hidden_size}], got {k}")
    # their training forward takes top-k_aux over all units, so k_aux may not exceed hidden (ours clamps it)
    return {"input_dim": cfg.input_dim, "hidden_dim": cfg.hidden_size, "k": k, "k_aux": min(cfg.auxk, cfg.hidden_size),
            "normalize": cfg.normalize, "dead_threshold": cfg.dead_threshold}


def config_from_st(conf: dict[str, Any], where: Path) -> CSRConfig:
    """sentence-transformers `SparseAutoEncoder` config -> `CSRConfig` (tied)."""
    if "input_dim" not in conf:
        raise CSRError(f"{where}: not a SparseAutoEncoder config (no 'input_dim')")
    bad = [k for k in ("input_dim", "hidden_dim", "k", "k_aux", "dead_threshold")
           if k in conf and (isinstance(conf[k], bool) or not isinstance(conf[k], int))]
    if bad:
        raise CSRError(f"{where}: config keys {bad} must be integers")
    try:  # absent keys take SparseAutoEncoder's own defaults
        return CSRConfig(input_dim=conf["input_dim"], hidden_size=conf.get("hidden_dim", 512), topk=conf.get("k", 8),
                         auxk=conf.get("k_aux", 512), dead_threshold=conf.get("dead_threshold", 30), tied=True,
                         normalize=bool(conf.get("normalize", False)))
    except ValueError as e:
        raise CSRError(f"{where}: {e}") from None


def _st_module(model: CSR, k: int | None):
    """A sentence-transformers `SparseAutoEncoder` holding `model`'s weights (the library's own class)."""
    if not model.cfg.tied:
        raise CSRError("untied CSR checkpoint: sentence-transformers' SparseAutoEncoder has a tied decoder "
                       "(decoder = encoder^T), so an untied model cannot be exported to it; use save-pretrained")
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder
    module = SparseAutoEncoder(**st_config(model.cfg, k))
    with torch.no_grad():
        module.pre_bias.copy_(model.pre_bias)
        module.encoder.weight.copy_(model.encoder.weight)
        module.latent_bias.copy_(model.latent_bias)
        module.stats_last_nonzero.copy_(model.stats_last_nonzero)
    return module.eval()


# ----------------------------------------------------------------------------- reading folders

def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """`model.safetensors` (or `pytorch_model.bin`) of a folder as a dict of CPU tensors."""
    st_path, bin_path = folder / WEIGHTS, folder / LEGACY_WEIGHTS
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st_path, device="cpu"), st_path
        except (SafetensorError, OSError, ValueError) as e:
            raise CSRError(f"{st_path}: not a readable safetensors file ({first_line(e)})") from None
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True), bin_path
        except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt pickle
            raise CSRError(f"{bin_path}: not a readable weights file ({first_line(e)})") from None
    raise CSRError(f"{folder}: no {WEIGHTS} (or {LEGACY_WEIGHTS}) weights file")


def _model_from_weights(cfg: CSRConfig, weights: dict[str, torch.Tensor], path: Path,
                        aliases: dict[str, str]) -> CSR:
    """Build `CSR(cfg)` from `weights`, checking that keys and shapes are exactly the model's."""
    weights = {aliases.get(k, k): v for k, v in weights.items()}
    model = CSR(cfg)
    expected = model.state_dict()
    if "stats_last_nonzero" not in weights:  # an inference-only export may omit the training statistic
        weights["stats_last_nonzero"] = torch.zeros_like(expected["stats_last_nonzero"])
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CSRError(f"{path}: weights do not match a CSR model (missing {missing}, unexpected {unexpected})")
    for name, ref in expected.items():
        t = weights[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CSRError(f"{path}: '{name}' has shape {list(t.shape)} but the config (input_dim={cfg.input_dim}, "
                           f"hidden={cfg.hidden_size}) needs {list(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise CSRError(f"{path}: '{name}' has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CSRError(f"{path}: NaN or Inf in '{name}'")
    model.load_state_dict({k: weights[k].to(expected[k].dtype) for k in expected})
    return model.eval()


def read_st_module(folder: str | os.PathLike) -> CSR:
    """A sentence-transformers `SparseAutoEncoder` module folder -> tied `CSR` (exact weights)."""
    folder = Path(folder)
    conf = read_json(folder / "config.json", "SparseAutoEncoder config")
    if not isinstance(conf, dict):
        raise CSRError(f"{folder / 'config.json'}: expected a JSON object")
    cfg = config_from_st(conf, folder / "config.json")
    weights, path = _read_weights(folder)
    # safetensors stores the tied weight once, under either alias
    return _model_from_weights(cfg, weights, path, {"decoder.linear.weight": "encoder.weight"})


def _st_module_dir(folder: Path) -> Path:
    """The SparseAutoEncoder sub-folder named in a SparseEncoder's `modules.json`."""
    modules = read_json(folder / "modules.json", "modules.json")
    if not isinstance(modules, list):
        raise CSRError(f"{folder / 'modules.json'}: expected a list of modules")
    hits = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(ST_MODULE_TYPE)]
    if len(hits) != 1:
        raise CSRError(f"{folder}: a SparseEncoder folder must hold exactly one {ST_MODULE_TYPE} module in "
                       f"modules.json, found {len(hits)}")
    return folder / str(hits[0].get("path", ""))


def folder_kind(folder: str | os.PathLike) -> str:
    """'encoder' (full SparseEncoder), 'module' (SparseAutoEncoder) or 'pretrained' (save_pretrained)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CSRError(f"{folder}: model folder not found")
    if (folder / "modules.json").is_file():
        return "encoder"
    if not (folder / "config.json").is_file():
        raise CSRError(f"{folder}: not a CSR, SparseAutoEncoder or SparseEncoder folder (no config.json or modules.json)")
    conf = read_json(folder / "config.json", "config.json")
    if isinstance(conf, dict) and conf.get("format") == PRETRAINED_FORMAT:
        return "pretrained"
    if isinstance(conf, dict) and set(conf) <= set(ST_CONFIG_KEYS) and "input_dim" in conf:
        return "module"
    raise CSRError(f"{folder / 'config.json'}: not a CSR, SparseAutoEncoder or SparseEncoder config "
                   f"(keys {sorted(conf) if isinstance(conf, dict) else type(conf).__name__})")


# ----------------------------------------------------------------------------- export

def _load_ckpt_model(ckpt_path: str | os.PathLike) -> tuple[CSR, dict[str, Any]]:
    model, ckpt = load_model(ckpt_path, "cpu")
    return model.float(), ckpt


def export_st_module(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, k: int | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Checkpoint -> a folder sentence-transformers loads as a `SparseAutoEncoder` module."""
    model, _ = _load_ckpt_model(ckpt_path)
    module = _st_module(model, k)
    with atomic_dir(out_dir, overwrite) as tmp:
        module.save(str(tmp))
    info = {"kind": "module", "checkpoint": str(ckpt_path), "st_config": st_config(model.cfg, k)}
    write_sidecar(out_dir, **info)
    return info


def _is_st_folder(p: Any) -> bool:
    return isinstance(p, str) and bool(p) and (Path(p) / "modules.json").is_file()


def _str_or_none(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _recorded_backbones(ckpt: dict[str, Any]) -> list[str]:
    """Backbone names or paths recorded in a checkpoint's arguments and its embeddings' sidecars."""
    args = ckpt.get("args") or {}
    found = [v for k, v in args.items() if "backbone" in k or "model" in k]
    for emb in data_files(args):
        side = read_sidecar(emb) if Path(emb).exists() else {}
        found += [side.get(k) for k in ("backbone_path", "backbone", "model_path", "model_name", "model")]
    return [v for v in found if isinstance(v, str) and v]


def recorded_backbone(ckpt: dict[str, Any]) -> Path | None:
    """The local sentence-transformers folder a checkpoint was trained on, when its arguments or its
    embeddings' sidecar name one that exists."""
    return next((Path(c) for c in _recorded_backbones(ckpt) if _is_st_folder(c)), None)


def resolve_backbone(ckpt: dict[str, Any], ckpt_path: str | os.PathLike, backbone_dir: str | os.PathLike | None) -> Path:
    """`backbone_dir`, else the recorded sentence-transformers folder, else the default text backbone when the
    checkpoint records no other backbone (a 384-d image model must not silently get a text backbone)."""
    if backbone_dir:
        return Path(backbone_dir)
    found = recorded_backbone(ckpt)
    if found is not None:
        return found
    if "imported_from" in (ckpt.get("args") or {}):
        raise CSRError(f"{ckpt_path}: imported checkpoint with no recorded backbone; pass --backbone DIR")
    others = _recorded_backbones(ckpt)
    if others:
        raise CSRError(f"{ckpt_path}: trained on embeddings of {others[0]!r}, not a local sentence-transformers "
                       "folder; pass --backbone DIR")
    return default_text_backbone("--backbone DIR")


def export_sparse_encoder(ckpt_path: str | os.PathLike, backbone_dir: str | os.PathLike | None,
                          out_dir: str | os.PathLike, k: int | None = None, overwrite: bool = False,
                          eval_table: Any = None) -> dict[str, Any]:
    """Checkpoint + the local sentence-transformers backbone it was trained on -> a full `SparseEncoder`
    folder, so `SparseEncoder(out_dir).encode(texts)` returns this model's codes.

    `backbone_dir` None: see `resolve_backbone`.
    """
    model, ckpt = _load_ckpt_model(ckpt_path)
    module = _st_module(model, k)  # refuses untied models before any heavy loading
    backbone = resolve_backbone(ckpt, ckpt_path, backbone_dir)
    if not _is_st_folder(str(backbone)):
        raise CSRError(f"{backbone}: not a sentence-transformers model folder (no modules.json)")
    from sentence_transformers import SentenceTransformer, SparseEncoder
    try:
        st = SentenceTransformer(str(backbone), device="cpu", local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CSRError(f"{backbone}: cannot load the sentence-transformers backbone ({first_line(e)})") from None
    dim = st.get_embedding_dimension() if hasattr(st, "get_embedding_dimension") else st.get_sentence_embedding_dimension()
    if dim != model.cfg.input_dim:
        raise CSRError(f"{backbone}: backbone gives {dim}-d embeddings but the checkpoint expects "
                       f"input_dim={model.cfg.input_dim}")
    encoder = SparseEncoder(modules=[*st, module], device="cpu", similarity_fn_name="cosine")
    card = model_card(model.cfg, ckpt, ckpt_path, eval_table, encoder_backbone=str(backbone), k=k)
    with atomic_dir(out_dir, overwrite) as tmp:
        encoder.save(str(tmp), create_model_card=False)  # ours instead: training command, data, evaluation
        (tmp / "README.md").write_text(card)
    info = {"kind": "encoder", "checkpoint": str(ckpt_path), "backbone": str(backbone),
            "st_config": st_config(model.cfg, k), "modules": [type(m).__name__ for m in encoder]}
    write_sidecar(out_dir, **info)
    return info


# ----------------------------------------------------------------------------- save / load pretrained

def save_pretrained(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, eval_table: Any = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Checkpoint -> `config.json` + `model.safetensors` + `README.md` (model card): a hub-ready folder."""
    from safetensors.torch import save_file
    model, ckpt = _load_ckpt_model(ckpt_path)
    side = read_sidecar(ckpt_path)
    config = {"format": PRETRAINED_FORMAT, "model_type": "csr", "architectures": ["CSR"], **model.cfg.to_dict(),
              "train_config": ckpt.get("train_config"), "steps": ckpt.get("step"),
              "training_command": side.get("command"), "data": data_files(ckpt.get("args") or {}),
              "backbone": _str_or_none(recorded_backbone(ckpt)),
              "code_version": ckpt.get("code_version"), "export_code_version": code_version()}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    card = model_card(model.cfg, ckpt, ckpt_path, eval_table)
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "README.md").write_text(card)
    info = {"kind": "pretrained", "checkpoint": str(ckpt_path), "config": model.cfg.to_dict()}
    write_sidecar(out_dir, **info)
    return info


def _read_pretrained(folder: Path) -> tuple[CSR, dict[str, Any]]:
    conf = read_json(folder / "config.json", "config.json")
    if not isinstance(conf, dict) or conf.get("format") != PRETRAINED_FORMAT:
        raise CSRError(f"{folder / 'config.json'}: not a CSR model folder (no '{PRETRAINED_FORMAT}' format)")
    try:
        cfg = CSRConfig.from_dict(conf)
    except (TypeError, ValueError) as e:
        raise CSRError(f"{folder / 'config.json'}: bad CSR config ({e})") from None
    weights, path = _read_weights(folder)
    return _model_from_weights(cfg, weights, path, {}), conf


def from_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> CSR:
    """A `save_pretrained` folder, a `SparseAutoEncoder` module folder or a `SparseEncoder` folder -> `CSR`."""
    return read_folder(folder)[0].to(device)


def read_folder(folder: str | os.PathLike) -> tuple[CSR, dict[str, Any]]:
    """Any supported folder -> `(CSR in eval mode, {"kind", "module_dir", "config"})`."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind == "pretrained":
        model, conf = _read_pretrained(folder)
        return model, {"kind": kind, "module_dir": str(folder), "config": conf}
    module_dir = _st_module_dir(folder) if kind == "encoder" else folder
    if not module_dir.is_dir():
        raise CSRError(f"{module_dir}: SparseAutoEncoder folder named in {folder / 'modules.json'} not found")
    model = read_st_module(module_dir)
    return model, {"kind": kind, "module_dir": str(module_dir), "config": st_config(model.cfg)}


def import_folder(folder: str | os.PathLike, out_ckpt: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """A module / SparseEncoder / save_pretrained folder -> our checkpoint (for inference, kNN, metrics)."""
    out_ckpt = Path(out_ckpt)
    if out_ckpt.exists() and not overwrite:
        raise CSRError(f"{out_ckpt} exists; pass --overwrite to replace it")
    model, info = read_folder(folder)
    args = {"imported_from": str(Path(folder).resolve()), "folder_kind": info["kind"]}
    if info["kind"] == "encoder":
        args["sparse_encoder"] = str(Path(folder).resolve())
    save_checkpoint(out_ckpt, model, args=args, complete=True, source_config=info["config"])
    write_sidecar(out_ckpt, model_config=model.cfg.to_dict(), **args)
    return {**info, "checkpoint": str(out_ckpt), "model_config": model.cfg.to_dict()}
