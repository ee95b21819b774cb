"""Exact k-nearest-neighbour search by cosine similarity, with ties broken by the lowest database index.

Backends: `faiss` (dense vectors: raw embeddings, truncations, PCA, or densified codes that fit in RAM),
`sparse` (codes: the fast engine of csr/sparse_knn.py) and `scipy` (codes: a plain sparse-matmul reference).
Every backend returns the same `(indices int64 [Nq, K], scores float32 [Nq, K])` for the same inputs.
The input checks and the exact top-K selection they share are in csr/topk.py; `distributed_search` splits the
database across torch.distributed processes (through csr/distributed.py) and merges the top-K lists exactly.
"""
from __future__ import annotations

import numpy as np

from csr.codes import SparseCodes
from csr.io import CSRError, warn
from csr.progress import progress_bar
from csr.topk import check_hidden_size, check_k, topk_of_scores

BACKENDS = ("faiss", "sparse", "scipy")


def l2_normalize(x: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Rows `[N, d]` scaled to unit L2 norm, as float32; all-zero rows stay zero. Rows whose float32 norm is
    out of range (huge or tiny values: their squares overflow or underflow) are divided by their largest
    magnitude and normalised in float64, so they keep the direction of the unscaled row."""
    out = np.empty(np.shape(x), dtype=np.float32)
    narrow = np.dtype(getattr(x, "dtype", np.float64)).itemsize <= 4
    for s in range(0, out.shape[0], chunk):
        block = x[s:s + chunk]
        if narrow:
            b = np.asarray(block, dtype=np.float32)
            with np.errstate(over="ignore", under="ignore"):
                norm = np.linalg.norm(b, axis=1, keepdims=True)
            ok = ((norm >= 1e-18) & (norm <= 1e18))[:, 0]
            out[s:s + chunk] = b / np.where(ok[:, None], norm, 1)
            wide = np.flatnonzero(~ok)
        else:
            wide = np.arange(len(block))
        if wide.size:
            out[s + wide] = _l2_normalize_wide(np.asarray(block)[wide])
    return out


def _l2_normalize_wide(b: np.ndarray) -> np.ndarray:
    """`l2_normalize` in float64 after dividing each row by its largest magnitude (any finite floats)."""
    b = np.array(b, dtype=np.float64)
    scale = np.abs(b).max(axis=1, keepdims=True) if b.shape[1] else np.ones((len(b), 1))
    b /= np.where(scale > 0, scale, 1.0)
    norm = np.sqrt(np.einsum("ij,ij->i", b, b))[:, None]
    return (b / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def clip_k(K: int, n_db: int, flag: str = "-K") -> int:
    """K neighbours from a database of `n_db` items: more than it holds is clipped, with a warning."""
    if K > n_db:
        warn(f"{flag} {K} clipped to the database size {n_db}")
    return min(K, n_db)


def merge_topk(indices: np.ndarray, scores: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K of candidate lists `[Nq, M]` (e.g. the top-K of every database slice side by side, with
    global indices), sorted by (-score, index): ties go to the lowest index, as in one search over the whole
    database. Padding entries have score -inf."""
    order = np.lexsort((indices, -scores), axis=-1)[:, :K]
    return np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1)


def slice_bounds(n: int, parts: int, part: int) -> tuple[int, int]:
    """Rows `[lo, hi)` of part `part` of `n` rows split into `parts` contiguous, near-equal slices."""
    return n * part // parts, n * (part + 1) // parts


def dense_search(queries: np.ndarray, database: np.ndarray, K: int, batch_size: int = 1024,
                 progress: bool = True, margin: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-K with FAISS `IndexFlatIP`; ties at the cut are resolved by lowest index.

    FAISS is asked for K + `margin` neighbours; rows whose tie group reaches past that are redone exactly.
    """
    import faiss
    if queries.shape[1] != database.shape[1]:
        raise CSRError(f"queries have d={queries.shape[1]} but the database has d={database.shape[1]}")
    check_k(K, database.shape[0])
    db = l2_normalize(database)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    Kq = min(K + margin, db.shape[0])
    out_i = np.empty((len(queries), K), dtype=np.int64)
    out_s = np.empty((len(queries), K), dtype=np.float32)
    for s in progress_bar(range(0, len(queries), batch_size), desc="faiss kNN", disable=not progress, leave=False):
        q = l2_normalize(queries[s:s + batch_size])
        sc, ix = index.search(q, Kq)
        o = np.argsort(ix, axis=1, kind="stable")
        ix, sc = np.take_along_axis(ix, o, 1), np.take_along_axis(sc, o, 1)
        o = np.argsort(-sc, axis=1, kind="stable")
        ix, sc = np.take_along_axis(ix, o, 1), np.take_along_axis(sc, o, 1)
        if Kq < db.shape[0]:
            redo = np.flatnonzero(sc[:, K - 1] == sc[:, -1])
            if len(redo):
                exact = topk_of_scores(q[redo] @ db.T, K)
                ix[redo, :K], sc[redo, :K] = exact
        out_i[s:s + len(q)], out_s[s:s + len(q)] = ix[:, :K], sc[:, :K]
    return out_i, out_s


def scipy_sparse_search(queries: SparseCodes, database: SparseCodes, K: int, batch_size: int = 256,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact search for codes: normalised sparse matmul per query block, dense top-K selection."""
    check_hidden_size(queries, database.hidden_size)
    check_k(K, database.n)
    dbt = database.to_scipy(normalize=True).T.tocsr()
    q = queries.to_scipy(normalize=True)
    out_i = np.empty((queries.n, K), dtype=np.int64)
    out_s = np.empty((queries.n, K), dtype=np.float32)
    for s in progress_bar(range(0, queries.n, batch_size), desc="scipy kNN", disable=not progress, leave=False):
        block = (q[s:s + batch_size] @ dbt).toarray().astype(np.float32)
        out_i[s:s + len(block)], out_s[s:s + len(block)] = topk_of_scores(block, K)
    return out_i, out_s


def search(queries, database, K: int, backend: str = "sparse", progress: bool = True, batch_size: int | None = None,
           threads: int | None = None, dense_limit_bytes: float = 8e9):
    """Dispatch to a backend; codes may be searched with `faiss` after densifying (when it fits in RAM).
    `batch_size` (queries per block) applies to every backend, `threads` to the sparse engine only."""
    if backend not in BACKENDS:
        raise CSRError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    codes = isinstance(queries, SparseCodes)
    if codes != isinstance(database, SparseCodes):
        raise CSRError("queries and database must both be codes or both be dense vectors")
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if backend == "faiss":
        if codes:
            check_hidden_size(queries, database.hidden_size)
            need = 4 * database.n * database.hidden_size
            if need > dense_limit_bytes:
                raise CSRError(f"densified database would need {need / 1e9:.1f} GB; use --backend sparse")
            queries, database = queries.to_dense(True), database.to_dense(True)
        return dense_search(queries, database, K, progress=progress, **kw)
    if not codes:
        raise CSRError(f"--backend {backend} searches sparse codes (.npz); use --backend faiss for dense vectors")
    if backend == "scipy":
        return scipy_sparse_search(queries, database, K, progress=progress, **kw)
    try:
        from csr.sparse_knn import sparse_topk
    except ImportError as e:  # the fast engine is optional at import time; the reference is always exact
        warn(f"the compiled sparse engine cannot load ({e}); using the slower scipy reference (same results)")
        return scipy_sparse_search(queries, database, K, progress=progress, **kw)
    return sparse_topk(queries, database, K, progress=progress, threads=threads, **kw)


def distributed_search(queries, database, K: int, backend: str = "sparse", progress: bool = True,
                       batch_size: int | None = None, threads: int | None = None):
    """Exact top-K under torch.distributed: rank r searches its contiguous slice of the database (a memory
    map stays unread outside the slice) for all queries; the per-rank top-K lists are all-gathered and merged
    (`merge_topk`). Every rank returns the same `(indices, scores)` as `search` over the whole database, bit
    for bit: the sparse engine's dense units are chosen from the whole database's unit counts."""
    import torch

    from csr import distributed
    world, rank, device = distributed.group()
    n = database.n if isinstance(database, SparseCodes) else database.shape[0]
    check_k(K, n)
    lo, hi = slice_bounds(n, world, rank)
    nq = queries.n if isinstance(queries, SparseCodes) else queries.shape[0]
    codes = isinstance(database, SparseCodes)
    part = SparseCodes(database.indices[lo:hi], database.values[lo:hi], database.hidden_size) if codes \
        else database[lo:hi]
    hot = None
    if codes and backend == "sparse":  # the whole database's dense units, so scores sum in the same order
        from csr.sparse_knn import build_index, choose_hot_units, unit_counts
        df = distributed.all_reduce_(torch.from_numpy(unit_counts(part, threads)).to(device))
        hot = choose_hot_units(df.cpu().numpy(), n)
    idx = np.zeros((nq, K), dtype=np.int64)
    sc = np.full((nq, K), -np.inf, dtype=np.float32)  # padding when a slice holds fewer than K rows
    kr = min(K, hi - lo)
    if kr > 0 and hot is not None:
        kb = {} if batch_size is None else {"batch_size": batch_size}
        i, s = build_index(part, threads=threads, hot_units=hot).search(queries, kr, threads=threads,
                                                                        progress=progress and rank == 0, **kb)
        idx[:, :kr], sc[:, :kr] = i + lo, s
    elif kr > 0:
        i, s = search(queries, part, kr, backend, progress=progress and rank == 0, batch_size=batch_size,
                      threads=threads)
        idx[:, :kr], sc[:, :kr] = i + lo, s
    # every rank's [nq, K] lists side by side: [nq, world * K] candidates (merge_topk ignores their order)
    gathered_i = distributed.gather_rows(torch.from_numpy(idx).to(device))[0].view(world, nq, K)
    gathered_s = distributed.gather_rows(torch.from_numpy(sc).to(device))[0].view(world, nq, K)
    return merge_topk(gathered_i.permute(1, 0, 2).reshape(nq, -1).cpu().numpy(),
                      gathered_s.permute(1, 0, 2).reshape(nq, -1).cpu().numpy(), K)
