"""Exact top-K cosine search between k-sparse codes, without densifying (the `sparse` kNN backend).

Both sides are L2-normalised per row (duplicate units in a row are summed first, zero values are padding;
csr/sparse_rows.py). The result equals FAISS `IndexFlatIP` on the densified normalised codes: scores to float
rounding, ties broken by the lowest database index, scores sorted descending. Items that share no unit with a
query score 0 and are ranked like any other item (lowest index first among equal scores), so K may be anything
up to the database size.

Two engines, one entry point each: `sparse_topk` here (CPU, numba) and `sparse_topk_torch` in
csr/sparse_knn_torch.py (torch sparse CSR, CUDA or CPU). This module owns the CPU engine's index and its entry
point; its query kernels are in csr/sparse_knn_numba.py, the input checks shared with the other backends in
csr/topk.py. The dispatcher over the backends, csr/knn.py, sits above both engines.

The CPU index: the database is stored as an inverted index (for each unit, the ids and values of the items
using it, in item order). Units used by at least `hot_fraction` of the database ("hot" units: with trained CSR
codes a few units fire in almost every code) are stored instead as a small dense block `[n_hot, N]`. A query
with no hot unit and few postings is answered from the posting lists, one block of `block` items at a time; a
query with a hot unit (or many postings) walks the database in tiles (csr/sparse_knn_numba.py).

Memory: postings (8 bytes per cold non-zero) + the dense block (4 bytes x N per hot unit, at most
`MAX_HOT` units each used by >= `hot_fraction` of the database, i.e. at most 4/hot_fraction bytes per hot
non-zero) + one accumulator block per thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from csr.codes import SparseCodes, validate_codes
from csr.io import CSRError
from csr.progress import progress_bar
from csr.sparse_knn_numba import query_work, search_postings, search_tiles
from csr.sparse_rows import normalized_rows, row_slice
from csr.topk import check_pair, require_codes

HOT_FRACTION = 0.05  # a unit used by >= 5 % of the database goes into the dense block
MAX_HOT = 256  # at most this many dense rows
# items per tile in the tiled path: the tile of all hot rows should stay in L2 (about 1 MB), 4096..32768 items
TILE_BYTES, TILE_MIN, TILE_MAX = 1 << 20, 4096, 32768
BLOCK = 65536  # items per accumulator block in the postings path (the accumulator stays in L2)
# A query without hot units takes the tiled path when its postings exceed this many per database item: one
# pass over its postings plus a scan of every item then costs less than two passes over its postings.
TILED_POSTINGS_PER_ITEM = 0.05


class _num_threads:
    """Context manager: run numba kernels on `threads` threads (default: all), restoring the previous count."""

    def __init__(self, threads: int | None):
        limit = numba.config.NUMBA_NUM_THREADS
        if threads is not None and threads < 1:
            raise CSRError(f"threads must be >= 1, got {threads}")
        self.n = limit if threads is None else min(int(threads), limit)

    def __enter__(self) -> int:
        self.prev = numba.get_num_threads()
        numba.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        numba.set_num_threads(self.prev)


# ----------------------------------------------------------------------------- index build

@njit(cache=True)
def _unit_counts(idx, ln, hidden):
    df = np.zeros(hidden, dtype=np.int64)
    for i in range(idx.shape[0]):
        for j in range(ln[i]):
            df[idx[i, j]] += 1
    return df


@njit(cache=True)
def _fill_index(idx, val, ln, hot_pos, ptr, doc, pval, hot):
    fill = ptr[:-1].copy()
    for i in range(idx.shape[0]):
        for j in range(ln[i]):
            u = idx[i, j]
            h = hot_pos[u]
            if h >= 0:
                hot[h, i] = val[i, j]
            else:
                p = fill[u]
                doc[p] = i
                pval[p] = val[i, j]
                fill[u] = p + 1


@njit(cache=True)
def _block_pointers(ptr, doc, block, nb):
    hidden = ptr.shape[0] - 1
    bptr = np.empty((hidden, nb + 1), dtype=np.int64)
    for u in range(hidden):
        ds = doc[ptr[u]:ptr[u + 1]]
        for b in range(nb + 1):
            bptr[u, b] = ptr[u] + np.searchsorted(ds, b * block)
    return bptr


@dataclass
class SparseIndex:
    """Inverted index of normalised database codes plus the dense block of hot units (see module docstring)."""
    n: int
    hidden_size: int
    ptr: np.ndarray  # [hidden+1] int64: postings of unit u are doc/val[ptr[u]:ptr[u+1]] (empty for hot units)
    doc: np.ndarray  # [nnz_cold] int32 item ids, increasing within a unit
    val: np.ndarray  # [nnz_cold] float32
    hot_units: np.ndarray  # [n_hot] int64
    hot_pos: np.ndarray  # [hidden] int64: row of unit u in `hot`, or -1
    hot: np.ndarray  # [n_hot, n] float32 dense block (zeros where a hot unit is inactive)
    bptr: np.ndarray  # [hidden, n_blocks+1] int64: postings of unit u in item block b start at bptr[u, b]
    block: int  # items per block (the postings path's accumulator size)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ptr, self.doc, self.val, self.hot_units, self.hot_pos, self.hot,
                                      self.bptr))

    def search(self, queries: SparseCodes, K: int, *, batch_size: int = 512, threads: int | None = None,
               progress: bool = True, tile: int | None = None,
               tiled_postings_per_item: float = TILED_POSTINGS_PER_ITEM) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-K of `queries` against this index: `(indices int64 [Nq,K], scores float32 [Nq,K])`.

        `tile` and `tiled_postings_per_item` (see the module constants) only change speed, never the result."""
        check_pair(queries, self.hidden_size, self.n, K)
        if tile is None:
            fit = TILE_BYTES // (4 * max(1, self.hot_units.size))
            tile = min(TILE_MAX, max(TILE_MIN, 1 << (fit.bit_length() - 1)))
        if batch_size < 1:
            raise CSRError(f"batch_size must be >= 1, got {batch_size}")
        with _num_threads(threads) as nt:
            out_i = np.empty((queries.n, K), dtype=np.int64)
            out_s = np.empty((queries.n, K), dtype=np.float32)
            accs = np.zeros((nt, min(self.block, self.n)), dtype=np.float32)
            starts = range(0, queries.n, batch_size)
            for b0 in progress_bar(starts, desc="sparse kNN", unit="batch", disable=not progress, mininterval=1.0):
                sl = slice(b0, min(queries.n, b0 + batch_size))
                qi, qv, ql = normalized_rows(row_slice(queries, sl.start, sl.stop))
                n_hot, n_post = query_work(qi, ql, self.hot_pos, self.ptr)
                tiled = (n_hot > 0) | (n_post > tiled_postings_per_item * self.n)
                post_q, tile_q = np.flatnonzero(~tiled), np.flatnonzero(tiled)
                bi, bs = out_i[sl], out_s[sl]
                if post_q.size:
                    search_postings(post_q, qi, qv, ql, self.bptr, self.doc, self.val, self.n, K, accs, bi, bs)
                if tile_q.size:
                    search_tiles(tile_q, qi, qv, ql, self.hot_pos, self.hot, self.ptr, self.doc, self.val,
                                  self.n, K, tile, min(nt, tile_q.size), bi, bs)
        return out_i, out_s


def unit_counts(codes: SparseCodes, threads: int | None = None) -> np.ndarray:
    """`[hidden]` int64: in how many codes each unit is non-zero (after merging duplicates)."""
    with _num_threads(threads):
        idx, _, ln = normalized_rows(codes)
        return _unit_counts(idx, ln, codes.hidden_size)


def choose_hot_units(df: np.ndarray, n: int, hot_fraction: float = HOT_FRACTION, max_hot: int = MAX_HOT) -> np.ndarray:
    """Units stored densely: the `max_hot` most used units among those used by >= `hot_fraction` of `n` codes."""
    order = np.argsort(-df, kind="stable")[:max_hot]
    return order[df[order] >= max(1.0, hot_fraction * n)].astype(np.int64)


def build_index(database: SparseCodes, *, hot_fraction: float = HOT_FRACTION, max_hot: int = MAX_HOT,
                block: int = BLOCK, threads: int | None = None, hot_units: np.ndarray | None = None) -> SparseIndex:
    """Normalise the database codes and build the inverted index + dense hot block.

    `hot_units` overrides the choice of dense units (a slice of a database split across processes uses the
    whole database's choice, so every score is summed in the same order as in one process)."""
    require_codes(database, "database")
    validate_codes(database.indices, database.values, database.hidden_size, "database codes")
    if database.n == 0:
        raise CSRError("database codes: empty (0 rows)")
    with _num_threads(threads):
        idx, val, ln = normalized_rows(database)
        df = _unit_counts(idx, ln, database.hidden_size)
        if hot_units is None:
            hot_units = choose_hot_units(df, database.n, hot_fraction, max_hot)
        hot_units = np.asarray(hot_units, dtype=np.int64)
        hot_pos = np.full(database.hidden_size, -1, dtype=np.int64)
        hot_pos[hot_units] = np.arange(hot_units.size)
        cold_df = df.copy()
        cold_df[hot_units] = 0
        ptr = np.zeros(database.hidden_size + 1, dtype=np.int64)
        np.cumsum(cold_df, out=ptr[1:])
        doc = np.empty(int(ptr[-1]), dtype=np.int32)
        pval = np.empty(int(ptr[-1]), dtype=np.float32)
        hot = np.zeros((hot_units.size, database.n), dtype=np.float32)
        _fill_index(idx, val, ln, hot_pos, ptr, doc, pval, hot)
        del idx, val, ln
        bptr = _block_pointers(ptr, doc, block, -(-database.n // block))
    return SparseIndex(database.n, database.hidden_size, ptr, doc, pval, hot_units, hot_pos, hot, bptr, block)


# ----------------------------------------------------------------------------- public API

def sparse_topk(queries: SparseCodes, database: SparseCodes, K: int, *, batch_size: int = 512,
                threads: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K cosine neighbours of each query in the database: `(indices int64, scores float32)`,
    both `[Nq, K]`, best first, ties by lowest database index (= FAISS IndexFlatIP on normalised dense codes)."""
    require_codes(database, "database")
    check_pair(queries, database.hidden_size, database.n, K)
    index = build_index(database, threads=threads)
    return index.search(queries, K, batch_size=batch_size, threads=threads, progress=progress)

