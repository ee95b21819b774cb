"""The primitives every kNN backend shares: the input checks of a search and the exact top-K of a score block
with ties broken by the lowest column (database) index.

A leaf: it imports only the code file contract (csr/codes.py). The engines (csr/sparse_knn.py,
csr/sparse_knn_torch.py) and the dispatcher over them (csr/knn.py) import from here, never the other way.
"""
from __future__ import annotations

import numpy as np

from csr.codes import SparseCodes, validate_codes
from csr.io import CSRError


def require_codes(codes, name: str) -> None:
    """`codes` must be SparseCodes; `name` ("queries", "database") is what the error calls them."""
    if not isinstance(codes, SparseCodes):
        raise CSRError(f"{name} must be SparseCodes, got {type(codes).__name__}")


def check_hidden_size(queries: SparseCodes, hidden_size: int) -> None:
    """Query codes must use the database's `hidden_size` units."""
    if queries.hidden_size != hidden_size:
        raise CSRError(f"queries have hidden size {queries.hidden_size} but the database has {hidden_size}")


def check_k(K: int, n_db: int) -> None:
    """K must be an integer in [1, n_db] (the database size)."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= K <= n_db:
        raise CSRError(f"K must be an integer in [1, {n_db}] (the database size), got {K!r}")


def check_pair(queries: SparseCodes, hidden_size: int, n_db: int, K: int) -> None:
    """Validate queries against a database of `n_db` codes over `hidden_size` units, and K."""
    require_codes(queries, "queries")
    check_hidden_size(queries, hidden_size)
    validate_codes(queries.indices, queries.values, queries.hidden_size, "query codes")
    check_k(K, n_db)


def topk_lowest_index(scores, K: int):
    """Torch top-K along dim 1 with ties broken by lowest column index; returns (indices, scores) best first.

    `torch.topk` picks arbitrary columns among scores tied with the K-th; only rows where such a tie reaches
    past rank K are redone exactly (all columns above the K-th score, then the lowest tied columns)."""
    import torch
    vals, cols = torch.topk(scores, K, dim=1, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    tied_rows = ((scores >= kth).sum(dim=1) != K).nonzero()[:, 0]
    if tied_rows.numel():
        sub, kt = scores[tied_rows], kth[tied_rows]
        above = sub > kt
        tie = sub == kt
        need = K - above.sum(dim=1, keepdim=True)
        take = above | (tie & (torch.cumsum(tie, dim=1, dtype=torch.int32) <= need))
        cols[tied_rows] = take.nonzero()[:, 1].view(-1, K)  # row-major: columns ascending within a row
    cols = torch.sort(cols, dim=1).values
    vals = scores.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return cols.gather(1, order), vals.gather(1, order)


def topk_of_scores(scores: np.ndarray, K: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-K of each row of a dense numpy score block, sorted by (-score, column); columns shifted by `offset`.
    `topk_lowest_index` on the CPU; a K above the row length returns every column."""
    import torch
    if not scores.flags.writeable or min(scores.strides, default=0) < 0:
        scores = scores.copy()  # torch.from_numpy needs a writable array with non-negative strides
    idx, vals = topk_lowest_index(torch.from_numpy(scores), min(K, scores.shape[1]))
    return idx.numpy() + offset, vals.numpy().astype(np.float32)
