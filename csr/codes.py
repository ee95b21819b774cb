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
        validate_labels(self.labels, self.indices.shape[0], "codes")

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
        data = np.array(float32_values(self.values), dtype=np.float32).ravel()  # a copy: sum_duplicates sorts it
        m = sp.csr_matrix((data, self.indices.astype(np.int64).ravel(), indptr), shape=(self.n, self.hidden_size))
        m.sum_duplicates()  # before normalising: a repeated index is one coordinate, as in the sparse engine
        m.eliminate_zeros()
        if normalize:  # in float64: squares of float32 values can neither overflow nor underflow there
            rows = np.repeat(np.arange(self.n), np.diff(m.indptr))
            data = m.data.astype(np.float64)
            norms = np.sqrt(np.bincount(rows, weights=data ** 2, minlength=self.n))
            m.data = (data / np.where(norms > 0, norms, 1.0)[rows]).astype(np.float32)
        return m

    def to_dense(self, normalize: bool = False) -> np.ndarray:
        return self.to_scipy(normalize).toarray()


def float32_values(values: np.ndarray) -> np.ndarray:
    """Code values as float32. Rows of wider floats beyond float32's range (or below its normal range) are
    first divided by their largest magnitude, which leaves their cosine similarities unchanged."""
    if values.dtype == np.float32:
        return values
    if values.dtype.itemsize > 4 and values.size:
        mag = np.abs(values)
        if mag.max() > 1e37 or ((mag > 0) & (mag < 1e-37)).any():
            scale = mag.max(axis=1, keepdims=True)
            return (values / np.where(scale > 0, scale, 1)).astype(np.float32)
    return values.astype(np.float32)


def validate_codes(indices: np.ndarray, values: np.ndarray, hidden_size: int, name: str) -> None:
    if indices.ndim != 2 or values.shape != indices.shape:
        raise CSRError(f"{name}: indices {indices.shape} and values {values.shape} must both be [N, k]")
    if not np.issubdtype(indices.dtype, np.integer):
        raise CSRError(f"{name}: indices must be integers, got {indices.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        raise CSRError(f"{name}: code values must be real floats (float16/float32), got {values.dtype}")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
        raise CSRError(f"{name}: hidden_size must be an integer >= 1, got {hidden_size!r}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= hidden_size:
            raise CSRError(f"{name}: unit indices must lie in [0, {hidden_size}), found range [{lo}, {hi}]")
    if not np.isfinite(values).all():
        raise CSRError(f"{name}: NaN or Inf in code values")


def validate_labels(labels: np.ndarray | None, n: int, name: str) -> None:
    """Labels of `n` codes: None, or 1-D non-negative integers, one per code."""
    if labels is None:
        return
    if not isinstance(labels, np.ndarray):
        raise CSRError(f"{name}: labels must be an array, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise CSRError(f"{name}: labels must be 1-D [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CSRError(f"{name}: labels must be integers, got {labels.dtype}")
    if labels.shape[0] != n:
        raise CSRError(f"{name}: {labels.shape[0]} labels but {n} codes")
    if labels.size and labels.min() < 0:
        raise CSRError(f"{name}: labels must be >= 0, found {int(labels.min())} at row {int(np.argmin(labels))}")


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
    """Read codes written by `save_codes`, validated (shapes, dtypes, hidden_size, labels; at least one row).
    All-zero codes are an error; all-zero rows, signed values and repeated units in a row (legal for the kNN
    engines, never produced by CSR) a warning."""
    path = Path(path)
    check_file(path, "sparse code")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CSRError(f"{path}: not an .npz archive (a .npy array?)")
        with z:
            missing = {"indices", "values", "hidden_size"} - set(z.files)
            if missing:
                raise CSRError(f"{path}: not a sparse code file (missing {sorted(missing)})")
            arrays = {key: _member(z, key, path) for key in ("indices", "values", "hidden_size", "labels")
                      if key in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CSRError(f"{path}: not a readable .npz code file (truncated or corrupt: {e})") from None
    hidden = arrays["hidden_size"]
    if hidden.ndim != 0 or not np.issubdtype(hidden.dtype, np.integer):
        raise CSRError(f"{path}: hidden_size must be one integer, got a {hidden.dtype} array of shape "
                       f"{hidden.shape}")
    name = str(path)
    validate_codes(arrays["indices"], arrays["values"], int(hidden), name)
    if arrays["indices"].shape[0] == 0:
        raise CSRError(f"{path}: no codes (0 rows)")
    labels = arrays.get("labels")
    validate_labels(labels, arrays["indices"].shape[0], name)
    codes = SparseCodes.__new__(SparseCodes)  # validated above, with the file's name in every message
    codes.indices, codes.values = arrays["indices"], arrays["values"]
    codes.hidden_size, codes.labels = int(hidden), labels
    check_code_values(codes, path)
    return codes


def _member(z: Any, key: str, path: Path) -> np.ndarray:
    """One array of an open .npz; an object array (a pickle) is a CSRError naming it."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CSRError(f"{path}: `{key}` is an object array (a pickle); expected numbers") from None
        raise


def check_code_values(codes: SparseCodes, path: Any) -> None:
    nonzero = codes.values != 0
    if codes.n and not nonzero.any():
        raise CSRError(f"{path}: all code values are zero (every cosine similarity would be 0)")
    zero = ~nonzero.any(axis=1)
    if zero.any():
        first = int(np.flatnonzero(zero)[0])
        warn(f"{path}: {int(zero.sum())} of {codes.n} codes are all zero (first at row {first}); they have cosine 0 "
             f"to everything")
    if (codes.values < 0).any():
        warn(f"{path}: {int((codes.values < 0).sum())} negative code values (CSR codes are >= 0)")
    srt = np.sort(np.where(nonzero, codes.indices.astype(np.int64), -1 - np.arange(codes.k)), axis=1)
    dup = (np.diff(srt, axis=1) == 0).any(axis=1)
    if dup.any():
        warn(f"{path}: {int(dup.sum())} codes repeat a unit (first at row {int(np.flatnonzero(dup)[0])}); "
             f"repeated units are summed")
