"""CSR checkpoints: one `.pt` with config, state_dict, optimiser state, epoch/step and training arguments."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from csr.io import CSRError, atomic_path, code_version
from csr.model import CSR, CSRConfig

FORMAT = "csr-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, model: CSR, **extra: Any) -> None:
    """Atomically write a checkpoint (`extra`: optimizer, scheduler, epoch, step, args, complete...)."""
    state = {"format": FORMAT, "config": model.cfg.to_dict(), "state_dict": model.state_dict(),
             "code_version": code_version(), **extra}
    with atomic_path(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint dict; truncated or foreign files give a one-line CSRError."""
    path = Path(path)
    if not path.exists():
        raise CSRError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CSRError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "config" not in ckpt:
        raise CSRError(f"{path}: not a CSR checkpoint (no '{FORMAT}' config)")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CSR, dict[str, Any]]:
    """Rebuild the model from a checkpoint's own config (shapes are never repeated on the command line)."""
    ckpt = read_checkpoint(path)
    try:
        model = CSR(CSRConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CSRError(f"{path}: checkpoint weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt


def check_input_dim(model: CSR, dim: int, what: str) -> None:
    if dim != model.cfg.input_dim:
        raise CSRError(f"{what}: embeddings have d={dim} but the checkpoint expects input_dim={model.cfg.input_dim}")
