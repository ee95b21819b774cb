"""Random k-sparse codes with the skewed unit usage that trained CSR models show.

Unit usage follows a Zipf law over unit ranks, `p(rank r) ∝ r^-s`, and each row draws k distinct units
(successive sampling without replacement). Named regimes:

- `uniform`: s = 0.
- `mild`: s = 0.5.
- `authors`: s chosen (per hidden size and k) so that the top 1 % of units carry half of all activations,
  as measured on the authors' recipe (most units dead, a few hot units in almost every code).

The rank-to-unit map is a fixed random permutation (`unit_seed`), shared by database and queries, so hot units
are spread over the unit range as in a trained model. Values are positive (codes are ReLU outputs).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import njit, prange

from csr.codes import SparseCodes, index_dtype
from csr.io import CSRError

SKEWS = ("uniform", "mild", "authors")
_HOT_FRACTION = 0.01  # "top 1 % of units ...
_HOT_SHARE = 0.5  # ... carry half of all activations"


def zipf_cdf(hidden: int, exponent: float) -> np.ndarray:
    """Cumulative unit-rank probabilities `p(r) ∝ r^-exponent`, r = 1..hidden (float64, last entry 1)."""
    p = np.arange(1, hidden + 1, dtype=np.float64) ** -float(exponent)
    c = np.cumsum(p)
    return c / c[-1]


@njit(cache=True)
def _draw_row(cdf: np.ndarray, k: int, taken: np.ndarray, stamp: int, out: np.ndarray) -> None:
    """Draw k distinct ranks from `cdf` by rejection; `taken[r] == stamp` marks ranks used in this row."""
    m = 0
    while m < k:
        r = np.searchsorted(cdf, np.random.random(), side="right")
        if r >= cdf.shape[0]:
            r = cdf.shape[0] - 1
        if taken[r] != stamp:
            taken[r] = stamp
            out[m] = r
            m += 1


@njit(parallel=True, cache=True)
def _draw_codes(cdf: np.ndarray, rank_to_unit: np.ndarray, seed: int, chunk: int, indices: np.ndarray,
                values: np.ndarray) -> None:
    """Fill `indices` (unit ids, distinct per row) and `values` (uniform in [0.05, 1)); each chunk of rows has
    its own seed, so the output does not depend on the thread count."""
    n, k = indices.shape
    nchunks = (n + chunk - 1) // chunk
    for c in prange(nchunks):
        np.random.seed(seed + c)
        taken = np.full(cdf.shape[0], -1, dtype=np.int64)
        ranks = np.empty(k, dtype=np.int64)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            _draw_row(cdf, k, taken, i, ranks)
            for j in range(k):
                indices[i, j] = rank_to_unit[ranks[j]]
                values[i, j] = 0.05 + 0.95 * np.random.random()


def draw_ranks(n: int, hidden: int, k: int, exponent: float, seed: int) -> np.ndarray:
    """`[n, k]` int32 unit ranks (0 = most used), distinct within each row."""
    if not 1 <= k <= hidden:
        raise CSRError(f"k must lie in [1, hidden={hidden}], got {k}")
    ranks = np.empty((n, k), dtype=np.int32)
    _draw_codes(zipf_cdf(hidden, exponent), np.arange(hidden, dtype=np.int32), seed, 4096, ranks,
                np.empty((n, k), dtype=np.float32))
    return ranks


def top_share(ranks: np.ndarray, hidden: int, fraction: float = _HOT_FRACTION) -> float:
    """Share of all activations that fall on the `fraction` most used units (ranks are usage order)."""
    n_top = max(1, int(round(fraction * hidden)))
    return float((ranks < n_top).mean())


@lru_cache(maxsize=None)
def authors_exponent(hidden: int, k: int, sample: int = 20000) -> float:
    """Zipf exponent at which the top 1 % of units carry half of all activations for this (hidden, k).

    Found by bisection on a fixed random sample of rows (the share grows monotonically with the exponent).
    """
    n_top = max(1, int(round(_HOT_FRACTION * hidden)))
    if n_top < _HOT_SHARE * k:
        raise CSRError(f"the authors' skew needs the top 1 % of units ({n_top}) to hold half of k={k} "
                       f"activations: impossible at hidden {hidden}")
    lo, hi = 0.0, 4.0
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        if top_share(draw_ranks(sample, hidden, k, mid, seed=12345), hidden) < _HOT_SHARE:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def skew_exponent(skew: str | float, hidden: int, k: int) -> float:
    """Zipf exponent for a named regime (`uniform`, `mild`, `authors`) or a number given directly."""
    if isinstance(skew, (int, float)) or (isinstance(skew, str) and _is_number(skew)):
        return float(skew)
    if skew == "uniform":
        return 0.0
    if skew == "mild":
        return 0.5
    if skew == "authors":
        return authors_exponent(hidden, k)
    raise CSRError(f"unknown skew {skew!r}: use one of {SKEWS} or a Zipf exponent")


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def random_codes(n: int, hidden: int, k: int, skew: str | float = "mild", seed: int = 0, unit_seed: int = 0,
                 value_dtype: np.dtype = np.float32) -> SparseCodes:
    """`n` random k-sparse codes over `hidden` units with Zipf-skewed unit usage (see module docstring).

    Rows with the same `seed` are identical whatever the thread count; `unit_seed` fixes which unit ids are hot,
    so draw database and queries with different `seed` and the same `unit_seed`.
    """
    if not 1 <= k <= hidden:
        raise CSRError(f"k must lie in [1, hidden={hidden}], got {k}")
    rank_to_unit = np.random.default_rng(unit_seed).permutation(hidden).astype(index_dtype(hidden))
    indices = np.empty((n, k), dtype=rank_to_unit.dtype)
    values = np.empty((n, k), dtype=np.float32)
    _draw_codes(zipf_cdf(hidden, skew_exponent(skew, hidden, k)), rank_to_unit, seed, 4096, indices, values)
    return SparseCodes(indices, values.astype(value_dtype, copy=False), hidden)


def describe_skew(codes: SparseCodes) -> dict:
    """Summary of unit usage: share of activations on the top 1 % of units, dead units, max usage."""
    active = codes.values != 0
    usage = np.bincount(codes.indices[active].astype(np.int64), minlength=codes.hidden_size) / max(1, codes.n)
    order = np.sort(usage)[::-1]
    n_top = max(1, int(round(_HOT_FRACTION * codes.hidden_size)))
    total = usage.sum()
    return dict(top1pct_share=float(order[:n_top].sum() / total) if total else 0.0,
                dead_fraction=float((usage == 0).mean()), max_usage=float(order[0]))

