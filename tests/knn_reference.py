"""The tie-aware reference comparison of exact kNN results with FAISS IndexFlatIP on densified codes.

FAISS does not order tied scores, so the reference is post-sorted by (-score, index) and compared with
`assert_same_as_faiss`: scores to float tolerance, every returned item's true score equal to the reference
score at its rank (the returned set IS a top-K), and indices equal wherever the reference score is not tied.
Shared by tests/test_sparse_knn.py and tests/test_pipeline.py (the backends' exactness claim).
"""
from __future__ import annotations

import faiss  # a hard requirement: a broken install must fail here, not skip
import numpy as np

from csr.codes import SparseCodes

TOL = 2e-5


def dense_normalized(codes: SparseCodes) -> np.ndarray:
    """Plain reference: scatter-add (duplicates summed), then L2-normalise rows."""
    x = np.zeros((codes.n, codes.hidden_size), dtype=np.float64)
    rows = np.repeat(np.arange(codes.n), codes.k)
    np.add.at(x, (rows, codes.indices.astype(np.int64).ravel()), codes.values.astype(np.float64).ravel())
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def faiss_topk(q: np.ndarray, d: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    s, i = index.search(q, K)
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1)


def assert_same_as_faiss(queries: SparseCodes, database: SparseCodes, K: int, ind: np.ndarray,
                         sc: np.ndarray) -> None:
    q, d = dense_normalized(queries), dense_normalized(database)
    ri, rs = faiss_topk(q, d, min(K + 1, database.n))  # one more rank: is the K-th score tied beyond K?
    after = rs[:, K] if K < database.n else np.full(queries.n, -np.inf, dtype=np.float32)
    ri, rs = ri[:, :K], rs[:, :K]
    assert ind.shape == sc.shape == (queries.n, K) and ind.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_allclose(sc, rs, atol=TOL)
    true = np.take_along_axis(q.astype(np.float64) @ d.T.astype(np.float64), ind, 1)
    np.testing.assert_allclose(true, rs, atol=TOL)  # each returned item really has the rank's score
    assert all(len(np.unique(r)) == K for r in ind)
    gap_prev = np.diff(rs, axis=1, prepend=np.inf) < -TOL
    gap_next = np.diff(rs, axis=1, append=after[:, None]) < -TOL
    clear = gap_prev & gap_next  # scores not tied with a neighbouring rank
    np.testing.assert_array_equal(ind[clear], ri[clear])
    assert (np.diff(sc, axis=1) <= 0).all()
    tied = np.diff(sc, axis=1) == 0  # exact ties: lowest database index first
    assert (np.diff(ind, axis=1)[tied] > 0).all()
