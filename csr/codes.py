"""Sparse code files (`*_codes.npz`): the `[N, k]` (indices, values) of top-k codes with their hidden size and
optional labels, validated on load and written atomically (the file contract between stages; csr/io.py holds the rest of it)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csr.io import CSRError, atomic_path, check_file, warn, write_sidecar

def index_dtype(hidden_size: int) -> np.dtype:
    return np.dtype(np.int16) if hidden_size <= 32767 else np.dtype(np.int32)


@dataclass
class SparseCodes:
    """k-sparse codes: row i has `values[i, j]` at unit `indices[i, j]`; zero values are padding."""
    indices: np.ndarray  # [N, k] int16/int32
    values: np.ndarray  # [N, k] float16/float32
    hidden_size: int
    labels: np.ndarray | None = None  # [N] int64

    def __post_init__(self) -> None:
        validate_codes(self.indices, self.values, self.hidden_size, "codes")

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def to_scipy(self, normalize: bool = False):
        """CSR matrix `[N, hidden]` (float32); duplicates summed; optionally rows L2-normalised."""
        import scipy.sparse as sp
        indptr = np.arange(0, self.n * self.k + 1, self.k, dtype=np.int64)
        m = sp.csr_matrix((self.values.astype(np.float32).ravel(), self.indices.astype(np.int64).ravel(), indptr),
                          shape=(self.n, self.hidden_size))
        m.sum_duplicates()  # before normalising: a repeated index is one coordinate, as in the sparse engine
        m.eliminate_zeros()
        if normalize:
            rows = np.repeat(np.arange(self.n), np.diff(m.indptr))
            norms = np.sqrt(np.bincount(rows, weights=m.data.astype(np.float64) ** 2, minlength=self.n))
            m.data /= np.maximum(norms, 1e-12).astype(np.float32)[rows]
        return m

    def to_dense(self, normalize: bool = False) -> np.ndarray:
        return self.to_scipy(normalize).toarray()


def validate_codes(indices: np.ndarray, values: np.ndarray, hidden_size: int, name: str) -> None:
    if indices.ndim != 2 or values.shape != indices.shape:
        raise CSRError(f"{name}: indices {indices.shape} and values {values.shape} must both be [N, k]")
    if not np.issubdtype(indices.dtype, np.integer):
        raise CSRError(f"{name}: indices must be integers, got {indices.dtype}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= hidden_size:
            raise CSRError(f"{name}: unit indices must lie in [0, {hidden_size}), found range [{lo}, {hi}]")
    if not np.isfinite(values).all():
        raise CSRError(f"{name}: NaN or Inf in code values")


def save_codes(path: str | os.PathLike, codes: SparseCodes, **meta: Any) -> None:
    """Atomically write codes to `.npz` (indices, values, hidden_size, labels) plus a JSON sidecar."""
    arrays = dict(indices=codes.indices, values=codes.values, hidden_size=np.int64(codes.hidden_size))
    if codes.labels is not None:
        arrays["labels"] = codes.labels.astype(np.int64)
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    write_sidecar(path, n=codes.n, k=codes.k, hidden_size=codes.hidden_size,
                  indices_dtype=str(codes.indices.dtype), values_dtype=str(codes.values.dtype), **meta)


def load_codes(path: str | os.PathLike) -> SparseCodes:
    """Read codes written by `save_codes`; all-zero codes are an error, signed values and repeated units in a
    row (legal for the kNN engines, never produced by CSR) a warning."""
    path = Path(path)
    check_file(path, "sparse code")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise CSRError("not an .npz archive")
            missing = {"indices", "values", "hidden_size"} - set(z.files)
            if missing:
                raise CSRError(f"{path}: not a sparse code file (missing {sorted(missing)})")
            labels = z["labels"] if "labels" in z.files else None
            codes = SparseCodes(z["indices"], z["values"], int(z["hidden_size"]), labels)
    except CSRError as e:
        raise CSRError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CSRError(f"{path}: not a readable .npz code file (truncated or corrupt: {e})") from None
    check_code_values(codes, path)
    return codes


def check_code_values(codes: SparseCodes, path: Any) -> None:
    nonzero = codes.values != 0
    if codes.n and not nonzero.any():
        raise CSRError(f"{path}: all code values are zero (every cosine similarity would be 0)")
    if (codes.values < 0).any():
        warn(f"{path}: {int((codes.values < 0).sum())} negative code values (CSR codes are >= 0)")
    srt = np.sort(np.where(nonzero, codes.indices.astype(np.int64), -1 - np.arange(codes.k)), axis=1)
    dup = (np.diff(srt, axis=1) == 0).any(axis=1)
    if dup.any():
        warn(f"{path}: {int(dup.sum())} codes repeat a unit (first at row {int(np.flatnonzero(dup)[0])}); "
             f"repeated units are summed")
