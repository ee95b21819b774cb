"""CSR checkpoints: one `.pt` with config, state_dict, optimiser state, epoch/step and training arguments."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csr.io import CSRError, atomic_path, check_writable, code_version, warn
from csr.model import CSR, CSRConfig

FORMAT = "csr-checkpoint-v1"


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as only what `torch.load(weights_only=True)` accepts: tensors, numbers, strings, None and
    dicts/lists/tuples of them. Paths become strings and numpy scalars numbers; anything else is an error, so
    no checkpoint we write needs code to be unpickled."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CSRError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (only tensors, numbers, "
                   f"strings and containers of them load safely)")


def save_checkpoint(path: str | os.PathLike, model: CSR, **extra: Any) -> None:
    """Atomically write a checkpoint (`extra`: optimizer, scheduler, epoch, step, args, complete...) holding
    plain types only (see `plain`), so `read_checkpoint` can load it without running any code."""
    state = plain({"format": FORMAT, "config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                   "code_version": code_version(), **extra})
    with atomic_path(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)


def first_line(e: BaseException) -> str:
    """An exception's first message line, or its type when it has no message (torch raises some bare)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# the keys a checkpoint may hold besides config and state_dict, and the types the code reading them expects
KEY_TYPES: dict[str, tuple[type, ...]] = {"train_config": (dict,), "optimizer": (dict,), "scheduler": (dict,),
                                          "epoch": (int,), "step": (int,), "data": (dict, type(None)),
                                          "rng": (dict,)}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint dict; empty, truncated or foreign files give a one-line CSRError.

    Loaded with `weights_only=True`: a file whose pickle would build any other object (and so could run code,
    e.g. a downloaded `csr.pt`) is refused before anything in it is created."""
    path = Path(path)
    if not path.exists():
        raise CSRError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CSRError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CSRError(f"{path}: empty checkpoint file (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            what = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
            raise CSRError(f"{path}: refused: the checkpoint holds objects other than tensors and plain types, "
                           f"and loading it could run code ({what or 'not a weights-only file'})") from None
        raise CSRError(f"{path}: not a readable checkpoint (truncated or corrupt: {first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        raise CSRError(f"{path}: not a readable checkpoint (truncated or corrupt: {first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "config" not in ckpt:
        raise CSRError(f"{path}: not a CSR checkpoint (no '{FORMAT}' config)")
    for key, types in {"config": (dict,), "state_dict": (dict,), **KEY_TYPES}.items():
        if (key in ckpt or key == "state_dict") and (not isinstance(ckpt.get(key), types)
                                                     or isinstance(ckpt.get(key), bool)):
            wanted = " or ".join({dict: "a dict", int: "an int"}.get(t, "None") for t in types)
            raise CSRError(f"{path}: not a CSR checkpoint ('{key}' is a {type(ckpt.get(key)).__name__}, expected "
                           f"{wanted})")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               unfinished: str = "error") -> tuple[CSR, dict[str, Any]]:
    """Rebuild the model from a checkpoint's own config (shapes are never repeated on the command line).

    A checkpoint of an unfinished run (`last.pt`, an epoch checkpoint: training progress but no `complete` flag,
    and not of the run's last epoch or step; a model saved outside a training loop has neither) is an error, or
    a warning with `unfinished="warn"`; weights with NaN/Inf are always an error naming the checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        model = CSR(CSRConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CSRError(f"{path}: checkpoint weights do not match its config ({first_line(e)})") from None
    check_finite_weights(model, path)
    tc = ckpt.get("train_config") or {}
    finished = ckpt.get("complete") or run_finished(ckpt, tc.get("epochs"), tc.get("max_steps", 0))
    if "epoch" in ckpt and not finished:  # written by a training loop that did not finish
        what = (f"{path}: checkpoint of an unfinished run (epoch {ckpt['epoch']}, step {ckpt.get('step')}), "
                f"not a finished model")
        if unfinished == "error":
            raise CSRError(f"{what}; finish the run with --resume or pass its csr.pt")
        warn(what)
    return model.to(device).eval(), ckpt


def run_finished(ckpt: dict[str, Any], epochs: int | None, max_steps: int = 0) -> bool:
    """Whether a training checkpoint (`last.pt`, an epoch checkpoint) holds the last epoch of a run of `epochs`
    epochs (or its `max_steps`-th step): its weights are then the finished model's."""
    if "epoch" not in ckpt or not epochs:
        return False
    return ckpt["epoch"] + 1 >= epochs or bool(max_steps and ckpt.get("step", 0) >= max_steps)


def check_finite_weights(model: torch.nn.Module, path: Any) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CSRError(f"{path}: NaN or Inf in the weights ({name}); the run that wrote it diverged")


RUN_FILES = ("csr.pt", "csr.json", "last.pt", "log.jsonl")


def prepare_run_dir(out: str | os.PathLike, overwrite: bool, resume: bool | str | None) -> Path:
    """Check a training run's folder before any work: writable; an existing run (finished, or killed: its
    last.pt / log.jsonl) is continued only with --resume and replaced only with --overwrite. Never deletes."""
    out = Path(out)
    check_writable(out, out / "csr.pt")
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not (overwrite or resume):
        what = "a finished run" if "csr.pt" in found else "a killed or unfinished run"
        raise CSRError(f"{out / found[0]} exists ({what}); pass --resume to continue it or --overwrite to "
                       f"start over")
    return out


def clear_run_dir(out: str | os.PathLike, extra: tuple[str, ...] = ("epoch*.pt", "epoch_*.pt")) -> None:
    """--overwrite, once the inputs are validated: remove the old run's outputs so a new run killed midway
    never leaves the old csr.pt beside its own last.pt."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in extra:
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


# training settings --resume may change: how long the run goes on, and which epoch files it keeps
RESUME_MAY_CHANGE = ("epochs", "max_steps", "keep_epochs")


def check_resume(ckpt: dict[str, Any], path: Any, config: dict[str, Any], data: dict[str, Any] | None,
                 train_config: dict[str, Any] | None = None) -> None:
    """--resume continues only the same model on the same data with the same training settings: a different
    config (input width, hidden size, k, ...), training file, or training setting (batch size, seed, lr, ...:
    any but `RESUME_MAY_CHANGE`) is an error naming what differs."""
    diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
    if diff:
        raise CSRError(f"--resume {path}: the run was trained with a different model ("
                       + ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items()) + ")")
    was = ckpt.get("data")
    if was and data:
        ddiff = [k for k in ("path", "shape", "dtype", "size", "mtime_ns") if was.get(k) != data.get(k)]
        if ddiff:
            raise CSRError(f"--resume {path}: the run was trained on {was.get('path')} {was.get('shape')}, not on "
                           f"{data.get('path')} {data.get('shape')} (differs in {', '.join(ddiff)})")
    before = ckpt.get("train_config")
    if before and train_config:
        tdiff = {k: (before.get(k), v) for k, v in train_config.items()
                 if k not in RESUME_MAY_CHANGE and k in before and before[k] != v}
        if tdiff:
            raise CSRError(f"--resume {path}: the run was started with other training settings ("
                           + ", ".join(f"--{k.replace('_', '-')} {a} there, {b} now" for k, (a, b) in tdiff.items())
                           + "); resume with the run's own (only --epochs and --max-steps may change)")


def check_input_dim(model: CSR, dim: int, what: str) -> None:
    if dim != model.cfg.input_dim:
        raise CSRError(f"{what}: embeddings have d={dim} but the checkpoint expects input_dim={model.cfg.input_dim}")
