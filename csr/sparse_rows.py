"""Canonical rows of sparse codes, shared by both sparse kNN engines (csr/sparse_knn_numba.py, csr/sparse_knn_torch.py).

A canonical row has its duplicate units summed, its zero values (padding) dropped and is L2-normalised, so
every engine scores the same normalised vectors. Also: the same rows as CSR arrays, and row slices of codes.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from csr.codes import SparseCodes, float32_values


@njit(cache=True, nogil=True)
def _canonical_row(idx, val, stamp, pos, tag, out_idx, out_val) -> int:
    """Merge duplicate units (summed), drop zeros, L2-normalise; returns the row's non-zero count."""
    m = 0
    for j in range(idx.shape[0]):
        v = np.float32(val[j])
        if v == 0:
            continue
        u = idx[j]
        if stamp[u] == tag:
            out_val[pos[u]] += v
        else:
            stamp[u] = tag
            pos[u] = m
            out_idx[m] = u
            out_val[m] = v
            m += 1
    n = 0
    ss = 0.0  # float64: squares of float32 values neither overflow nor underflow there
    for j in range(m):
        v = out_val[j]
        if v != 0:
            out_idx[n] = out_idx[j]
            out_val[n] = v
            ss += np.float64(v) * np.float64(v)
            n += 1
    if n:
        inv = 1.0 / math.sqrt(ss)
        if 1e-30 < inv < 1e30:  # the usual rows: float32 arithmetic vectorises wider
            inv32 = np.float32(inv)
            for j in range(n):
                out_val[j] = out_val[j] * inv32
        else:
            for j in range(n):
                out_val[j] = np.float32(np.float64(out_val[j]) * inv)
    return n


@njit(parallel=True, cache=True)
def _canonical(indices, values, hidden, nchunks):
    n, k = indices.shape
    out_idx = np.zeros((n, k), dtype=np.int32)
    out_val = np.zeros((n, k), dtype=np.float32)
    out_len = np.zeros(n, dtype=np.int64)
    chunk = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        stamp = np.full(hidden, -1, dtype=np.int64)
        pos = np.zeros(hidden, dtype=np.int64)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            out_len[i] = _canonical_row(indices[i], values[i], stamp, pos, i, out_idx[i], out_val[i])
    return out_idx, out_val, out_len


def normalized_rows(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical rows: `idx [N,k] int32`, `val [N,k] float32` (first `len[i]` entries valid, L2-normalised,
    duplicates summed, zeros dropped) and `len [N] int64`."""
    return _canonical(codes.indices, float32_values(codes.values), codes.hidden_size,
                      max(1, numba.get_num_threads() * 4))


def normalized_csr(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised codes as CSR (crow int64, col int64, val float32) with columns sorted within rows."""
    idx, val, ln = normalized_rows(codes)
    valid = np.arange(idx.shape[1])[None, :] < ln[:, None]
    order = np.argsort(np.where(valid, idx, codes.hidden_size), axis=1)  # padding sorts last
    idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
    crow = np.zeros(codes.n + 1, dtype=np.int64)
    np.cumsum(ln, out=crow[1:])
    return crow, idx[valid].astype(np.int64), val[valid]


def row_slice(codes: SparseCodes, start: int, stop: int) -> SparseCodes:
    """Row slice of validated codes, without re-validating."""
    part = SparseCodes.__new__(SparseCodes)
    part.indices, part.values = codes.indices[start:stop], codes.values[start:stop]
    part.hidden_size, part.labels = codes.hidden_size, None
    return part
