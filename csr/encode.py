"""Batched inference: embeddings -> k-sparse codes, and unit-usage statistics of codes."""
from __future__ import annotations

import numpy as np
import torch

from csr.codes import SparseCodes, index_dtype
from csr.io import CSRError
from csr.model import CSR
from csr.progress import progress_bar


@torch.no_grad()
def encode_array(model: CSR, emb: np.ndarray, k: int | None = None, batch_size: int = 4096,
                 device: str | torch.device = "cpu", values_dtype=np.float32, labels: np.ndarray | None = None,
                 progress: bool = True, desc: str = "encode") -> SparseCodes:
    """Encode `[N, d]` embeddings (memmap is fine) into top-k codes without ever holding `[N, hidden]`."""
    k = model.cfg.topk if k is None else k
    if not 1 <= k <= model.cfg.hidden_size:
        raise CSRError(f"--topk must be in [1, hidden_size={model.cfg.hidden_size}], got {k}")
    n = emb.shape[0]
    idx_out = np.empty((n, k), dtype=index_dtype(model.cfg.hidden_size))
    val_out = np.empty((n, k), dtype=values_dtype)
    model = model.to(device).eval()
    for s in progress_bar(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = torch.from_numpy(np.array(emb[s:s + batch_size], dtype=np.float32)).to(device)
        idx, vals = model.encode(x, k)
        idx_out[s:s + len(x)] = idx.cpu().numpy()
        val_out[s:s + len(x)] = vals.float().cpu().numpy()
    return SparseCodes(idx_out, val_out, model.cfg.hidden_size, labels)


def unit_usage(codes: SparseCodes) -> np.ndarray:
    """How many codes each unit is active (non-zero) in: `[hidden]` int64."""
    active = codes.values != 0
    return np.bincount(codes.indices[active].astype(np.int64), minlength=codes.hidden_size)


def dead_fraction(codes: SparseCodes) -> float:
    """Fraction of units that never fire in any code (the paper's "dead latents" on a dataset)."""
    return float((unit_usage(codes) == 0).mean())


@torch.no_grad()
def dead_fraction_on_rows(model: CSR, x: np.ndarray, k: int | None = None, max_rows: int = 200_000,
                          batch_size: int = 4096, seed: int = 0) -> tuple[float, int]:
    """(fraction of units with a non-zero value in no top-k code of `x`, rows used): the dataset rule of
    `dead_fraction`, without storing codes. Above `max_rows` rows a fixed random sample of that many is used."""
    n = x.shape[0]
    rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    device = next(model.parameters()).device
    fired = torch.zeros(model.cfg.hidden_size, dtype=torch.bool, device=device)
    for s in range(0, len(rows), batch_size):
        xb = torch.from_numpy(np.array(x[rows[s:s + batch_size]], dtype=np.float32)).to(device)
        idx, vals = model.encode(xb, k)
        fired[idx[vals != 0]] = True
    return 1.0 - float(fired.float().mean()), len(rows)
