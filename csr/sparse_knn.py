"""Exact top-K cosine search between k-sparse codes, without densifying (the `sparse` kNN backend).

Both sides are L2-normalised per row (duplicate units in a row are summed first, zero values are padding).
The result equals FAISS `IndexFlatIP` on the densified normalised codes: scores to float rounding, ties broken
by the lowest database index, scores sorted descending. Items that share no unit with a query score 0 and are
ranked like any other item (lowest index first among equal scores), so K may be anything up to the database size.

How (CPU, numba): the database is stored as an inverted index (for each unit, the ids and values of the items
using it, in item order). Units used by at least `hot_fraction` of the database ("hot" units: with trained CSR
codes a few units fire in almost every code) are stored instead as a small dense block `[n_hot, N]`.

- A query with few postings and no hot unit goes term-at-a-time through the posting lists, one block of
  `block` items at a time, into a per-thread accumulator (L2-sized): pass 1 scatters, pass 2 re-reads the same
  postings, reads each touched score once, resets it and keeps the best K in a heap; only when fewer than K items
  score > 0 are the scores rebuilt to take the zero-score items in index order.
- A query with a hot unit (or many postings) touches most of the database anyway: the database is walked in
  tiles (sized so the tile of all hot rows stays in L2); per tile the query's hot rows are summed into a small
  accumulator (up to four rows per vectorised pass), its cold postings for that tile are scattered in (a
  cursor per unit advances through its item-sorted list), and a threshold-filtered scan in item order updates
  its top-K heap. Tiles are the outer loop over a thread's queries, so each tile of the dense block is read
  from memory once per query chunk and then from cache.

Float sums run in a fixed order per query, so identical database rows get identical scores (exact ties).
Memory: postings (8 bytes per cold non-zero) + the dense block (4 bytes x N per hot unit, at most
`MAX_HOT` units each used by >= `hot_fraction` of the database, i.e. at most 4/hot_fraction bytes per hot
non-zero) + one accumulator block per thread. `sparse_topk_torch` is the torch sparse CSR path (CUDA or CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange
from tqdm import tqdm

from csr.io import CSRError, SparseCodes, validate_codes

HOT_FRACTION = 0.05  # a unit used by >= 5 % of the database goes into the dense block
MAX_HOT = 256  # at most this many dense rows
# items per tile in the tiled path: the tile of all hot rows should stay in L2 (about 1 MB), 4096..32768 items
TILE_BYTES, TILE_MIN, TILE_MAX = 1 << 20, 4096, 32768
BLOCK = 65536  # items per accumulator block in the postings path (the accumulator stays in L2)
# A query without hot units takes the tiled path when its postings exceed this many per database item: one
# pass over its postings plus a scan of every item then costs less than two passes over its postings.
TILED_POSTINGS_PER_ITEM = 0.05


# ----------------------------------------------------------------------------- row canonicalisation

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
    ss = np.float32(0.0)
    for j in range(m):
        v = out_val[j]
        if v != 0:
            out_idx[n] = out_idx[j]
            out_val[n] = v
            ss += v * v
            n += 1
    norm = max(np.float32(math.sqrt(ss)), np.float32(1e-12))
    for j in range(n):
        out_val[j] = out_val[j] / norm
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
    values = codes.values if codes.values.dtype == np.float32 else codes.values.astype(np.float32)
    return _canonical(codes.indices, values, codes.hidden_size, max(1, numba.get_num_threads() * 4))


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
            for b0 in tqdm(starts, desc="sparse kNN", unit="batch", disable=not progress, mininterval=1.0):
                sl = slice(b0, min(queries.n, b0 + batch_size))
                qi, qv, ql = normalized_rows(_rows(queries, sl.start, sl.stop))
                n_hot, n_post = _query_work(qi, ql, self.hot_pos, self.ptr)
                tiled = (n_hot > 0) | (n_post > tiled_postings_per_item * self.n)
                post_q, tile_q = np.flatnonzero(~tiled), np.flatnonzero(tiled)
                bi, bs = out_i[sl], out_s[sl]
                if post_q.size:
                    _search_postings(post_q, qi, qv, ql, self.bptr, self.doc, self.val, self.n, K, accs, bi, bs)
                if tile_q.size:
                    _search_tiles(tile_q, qi, qv, ql, self.hot_pos, self.hot, self.ptr, self.doc, self.val,
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
    if not isinstance(database, SparseCodes):
        raise CSRError(f"database must be SparseCodes, got {type(database).__name__}")
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


# ----------------------------------------------------------------------------- top-K heap
# A min-heap of the K best (score, item) so far; the root is the worst: lowest score, then highest item id.

@njit(cache=True, nogil=True, inline="always")
def _worse(s1, i1, s2, i2) -> bool:
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(cache=True, nogil=True)
def _heap_push(hs, hi, n, s, d) -> int:
    j = n
    while j > 0:
        p = (j - 1) >> 1
        if _worse(s, d, hs[p], hi[p]):
            hs[j] = hs[p]
            hi[j] = hi[p]
            j = p
        else:
            break
    hs[j] = s
    hi[j] = d
    return n + 1


@njit(cache=True, nogil=True)
def _heap_replace_top(hs, hi, n, s, d) -> None:
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hs[c + 1], hi[c + 1], hs[c], hi[c]):
            c += 1
        if _worse(hs[c], hi[c], s, d):
            hs[j] = hs[c]
            hi[j] = hi[c]
            j = c
        else:
            break
    hs[j] = s
    hi[j] = d


@njit(cache=True, nogil=True)
def _offer(hs, hi, n, K, s, d) -> int:
    """Insert (s, d) if it beats the worst of the heap (any order of arrival)."""
    if n < K:
        return _heap_push(hs, hi, n, s, d)
    if _worse(hs[0], hi[0], s, d):
        _heap_replace_top(hs, hi, n, s, d)
    return n


@njit(cache=True, nogil=True)
def _heap_drain(hs, hi, n, out_s, out_i) -> None:
    """Write the heap's items best first into out[0:n] (destroys the heap)."""
    for m in range(n, 0, -1):
        out_s[m - 1] = hs[0]
        out_i[m - 1] = hi[0]
        if m > 1:
            _heap_replace_top(hs, hi, m - 1, hs[m - 1], hi[m - 1])


# ----------------------------------------------------------------------------- queries without hot units

@njit(cache=True, nogil=True)
def _scatter_block(qi, qv, m, bptr, b, doc, val, acc, off) -> None:
    """Pass 1 over block b (items [off, off+len(acc))): acc[item - off] += w * value for the query's postings."""
    for t in range(m):
        u = qi[t]
        w = qv[t]
        ds = doc[bptr[u, b]:bptr[u, b + 1]]
        vs = val[bptr[u, b]:bptr[u, b + 1]]
        for j in range(ds.shape[0]):
            acc[ds[j] - off] += w * vs[j]


@njit(cache=True, nogil=True)
def _collect_block(qi, m, bptr, b, doc, acc, off, K, hs, hi, n) -> int:
    """Pass 2: each touched item once (its score is read and reset); keep the best K scores > 0."""
    for t in range(m):
        u = qi[t]
        ds = doc[bptr[u, b]:bptr[u, b + 1]]
        for j in range(ds.shape[0]):
            d = ds[j] - off
            s = acc[d]
            if s != 0:
                acc[d] = 0
                if s > 0:
                    if n < K:
                        n = _heap_push(hs, hi, n, s, d + off)
                    elif s > hs[0] or (s == hs[0] and d + off < hi[0]):
                        _heap_replace_top(hs, hi, n, s, d + off)
    return n


@njit(cache=True, nogil=True)
def _reset_block(qi, m, bptr, b, doc, acc, off) -> None:
    for t in range(m):
        u = qi[t]
        ds = doc[bptr[u, b]:bptr[u, b + 1]]
        for j in range(ds.shape[0]):
            acc[ds[j] - off] = 0


@njit(cache=True, nogil=True)
def _fill_block(a, off, need, hs, hi, n) -> int:
    """Offer the items of a block with score <= 0 in index order (untouched items score 0); returns the heap
    size, negated when the heap holds `need` zeros (no later item can enter: larger ids, scores <= 0)."""
    for d in range(a.shape[0]):
        s = a[d]
        if s > 0:
            continue
        if n < need:
            n = _heap_push(hs, hi, n, s, d + off)
        elif s > hs[0]:
            _heap_replace_top(hs, hi, n, s, d + off)
        if n == need and hs[0] == 0:
            return -n
    return n


@njit(cache=True, nogil=True)
def _one_postings(qi, qv, m, bptr, doc, val, acc, n_db, K, hs, hi, hs2, hi2, out_i, out_s) -> None:
    block = acc.shape[0]
    nb = bptr.shape[1] - 1
    n = 0
    for b in range(nb):
        _scatter_block(qi, qv, m, bptr, b, doc, val, acc, b * block)
        n = _collect_block(qi, m, bptr, b, doc, acc, b * block, K, hs, hi, n)
    _heap_drain(hs, hi, n, out_s, out_i)
    if n < K:  # rare: fewer than K items score > 0; rebuild the scores block by block to rank the rest
        n2 = 0
        for b in range(nb):
            off = b * block
            _scatter_block(qi, qv, m, bptr, b, doc, val, acc, off)
            n2 = _fill_block(acc[:min(block, n_db - off)], off, K - n, hs2, hi2, n2)
            _reset_block(qi, m, bptr, b, doc, acc, off)
            if n2 < 0:
                n2 = -n2
                break
        _heap_drain(hs2, hi2, n2, out_s[n:], out_i[n:])


@njit(parallel=True, cache=True)
def _search_postings(sel, qi, qv, ql, bptr, doc, val, n_db, K, accs, out_i, out_s) -> None:
    nt = accs.shape[0]
    for c in prange(nt):
        hs = np.empty(K, dtype=np.float32)
        hi = np.empty(K, dtype=np.int64)
        hs2 = np.empty(K, dtype=np.float32)
        hi2 = np.empty(K, dtype=np.int64)
        for r in range(c, sel.shape[0], nt):
            q = sel[r]
            _one_postings(qi[q], qv[q], ql[q], bptr, doc, val, accs[c], n_db, K, hs, hi, hs2, hi2, out_i[q],
                          out_s[q])


# ----------------------------------------------------------------------------- queries with hot units

@njit(cache=True)
def _query_work(qi, ql, hot_pos, ptr):
    """Per query: number of hot units, and number of postings of its cold units."""
    n_hot = np.zeros(qi.shape[0], dtype=np.int64)
    n_post = np.zeros(qi.shape[0], dtype=np.int64)
    for q in range(qi.shape[0]):
        for t in range(ql[q]):
            u = qi[q, t]
            if hot_pos[u] >= 0:
                n_hot[q] += 1
            else:
                n_post[q] += ptr[u + 1] - ptr[u]
    return n_hot, n_post


@njit(cache=True, nogil=True)
def _hot_rows(a, hot, hh, hw, g, m, t0, t1, init) -> None:
    """a (+)= sum of the m <= 4 weighted hot rows hh[g:g+m] over items [t0, t1) (one vectorised pass)."""
    r0 = hot[hh[g], t0:t1]
    w0 = hw[g]
    if m == 1:
        if init:
            for i in range(a.shape[0]):
                a[i] = w0 * r0[i]
        else:
            for i in range(a.shape[0]):
                a[i] += w0 * r0[i]
        return
    r1 = hot[hh[g + 1], t0:t1]
    w1 = hw[g + 1]
    if m == 2:
        if init:
            for i in range(a.shape[0]):
                a[i] = w0 * r0[i] + w1 * r1[i]
        else:
            for i in range(a.shape[0]):
                a[i] += w0 * r0[i] + w1 * r1[i]
        return
    r2 = hot[hh[g + 2], t0:t1]
    w2 = hw[g + 2]
    if m == 3:
        if init:
            for i in range(a.shape[0]):
                a[i] = (w0 * r0[i] + w1 * r1[i]) + w2 * r2[i]
        else:
            for i in range(a.shape[0]):
                a[i] += (w0 * r0[i] + w1 * r1[i]) + w2 * r2[i]
        return
    r3 = hot[hh[g + 3], t0:t1]
    w3 = hw[g + 3]
    if init:
        for i in range(a.shape[0]):
            a[i] = (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i])
    else:
        for i in range(a.shape[0]):
            a[i] += (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i])


@njit(cache=True, nogil=True)
def _hot_tile(hot, hh, hw, nh, t0, tl, a) -> None:
    """Sum the query's hot rows into the tile accumulator `a`, four rows per pass over the tile."""
    for g in range(0, nh, 4):
        _hot_rows(a, hot, hh, hw, g, min(4, nh - g), t0, t0 + tl, g == 0)


@njit(cache=True, nogil=True)
def _cold_tile(doc, val, p, end, w, t0, tl, a) -> int:
    """Scatter one cold unit's postings that fall in the tile [t0, t0+tl); returns the new cursor."""
    t1 = t0 + tl
    while p < end:
        d = doc[p]
        if d >= t1:
            break
        a[d - t0] += w * val[p]
        p += 1
    return p


@njit(cache=True, nogil=True)
def _count_above(a, thr) -> int:
    c = 0
    for i in range(a.shape[0]):
        c += a[i] > thr
    return c


@njit(cache=True, nogil=True)
def _scan_tile(a, t0, K, hs, hi, n) -> int:
    """Offer the tile's items in index order: a later item must beat the worst strictly."""
    tl = a.shape[0]
    i = 0
    while n < K and i < tl:
        n = _offer(hs, hi, n, K, a[i], t0 + i)
        i += 1
    B = 256
    while i < tl:
        e = min(tl, i + B)
        if _count_above(a[i:e], hs[0]) > 0:
            for j in range(i, e):
                if a[j] > hs[0]:
                    _heap_replace_top(hs, hi, n, a[j], t0 + j)
        i = e
    return n


@njit(cache=True, nogil=True)
def _tiles_chunk(qs, qi, qv, ql, hot_pos, hot, ptr, doc, val, n_db, K, T, out_i, out_s) -> None:
    nq = qs.shape[0]
    k = qi.shape[1]
    hh = np.empty((nq, k), dtype=np.int64)
    hw = np.empty((nq, k), dtype=np.float32)
    nh = np.zeros(nq, dtype=np.int64)
    cur = np.empty((nq, k), dtype=np.int64)
    end = np.empty((nq, k), dtype=np.int64)
    cw = np.empty((nq, k), dtype=np.float32)
    nc = np.zeros(nq, dtype=np.int64)
    for j in range(nq):
        q = qs[j]
        for t in range(ql[q]):
            u = qi[q, t]
            h = hot_pos[u]
            if h >= 0:
                hh[j, nh[j]] = h
                hw[j, nh[j]] = qv[q, t]
                nh[j] += 1
            else:
                cur[j, nc[j]] = ptr[u]
                end[j, nc[j]] = ptr[u + 1]
                cw[j, nc[j]] = qv[q, t]
                nc[j] += 1
    hs = np.empty((nq, K), dtype=np.float32)
    hi = np.empty((nq, K), dtype=np.int64)
    hn = np.zeros(nq, dtype=np.int64)
    acc = np.empty(T, dtype=np.float32)
    for t0 in range(0, n_db, T):
        tl = min(T, n_db - t0)
        a = acc[:tl]
        for j in range(nq):
            if nh[j] == 0:
                a[:] = 0
            else:
                _hot_tile(hot, hh[j], hw[j], nh[j], t0, tl, a)
            for c in range(nc[j]):
                cur[j, c] = _cold_tile(doc, val, cur[j, c], end[j, c], cw[j, c], t0, tl, a)
            hn[j] = _scan_tile(a, t0, K, hs[j], hi[j], hn[j])
    for j in range(nq):
        _heap_drain(hs[j], hi[j], hn[j], out_s[qs[j]], out_i[qs[j]])


@njit(parallel=True, cache=True)
def _search_tiles(sel, qi, qv, ql, hot_pos, hot, ptr, doc, val, n_db, K, T, nchunks, out_i, out_s) -> None:
    for c in prange(nchunks):
        _tiles_chunk(sel[c::nchunks].copy(), qi, qv, ql, hot_pos, hot, ptr, doc, val, n_db, K, T, out_i, out_s)


# ----------------------------------------------------------------------------- public API

def check_pair(queries: SparseCodes, hidden_size: int, n_db: int, K: int) -> None:
    """Validate queries against a database of `n_db` codes over `hidden_size` units, and K."""
    if not isinstance(queries, SparseCodes):
        raise CSRError(f"queries must be SparseCodes, got {type(queries).__name__}")
    if queries.hidden_size != hidden_size:
        raise CSRError(f"queries have hidden size {queries.hidden_size} but the database has {hidden_size}")
    validate_codes(queries.indices, queries.values, queries.hidden_size, "query codes")
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= K <= n_db:
        raise CSRError(f"K must be an integer in [1, {n_db}] (the database size), got {K!r}")


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


def sparse_topk(queries: SparseCodes, database: SparseCodes, K: int, *, batch_size: int = 512,
                threads: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K cosine neighbours of each query in the database: `(indices int64, scores float32)`,
    both `[Nq, K]`, best first, ties by lowest database index (= FAISS IndexFlatIP on normalised dense codes)."""
    if not isinstance(database, SparseCodes):
        raise CSRError(f"database must be SparseCodes, got {type(database).__name__}")
    check_pair(queries, database.hidden_size, database.n, K)
    index = build_index(database, threads=threads)
    return index.search(queries, K, batch_size=batch_size, threads=threads, progress=progress)


# ----------------------------------------------------------------------------- torch sparse path (GPU)

def normalized_csr(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised codes as CSR (crow int64, col int64, val float32) with columns sorted within rows."""
    idx, val, ln = normalized_rows(codes)
    valid = np.arange(idx.shape[1])[None, :] < ln[:, None]
    order = np.argsort(np.where(valid, idx, codes.hidden_size), axis=1)  # padding sorts last
    idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
    crow = np.zeros(codes.n + 1, dtype=np.int64)
    np.cumsum(ln, out=crow[1:])
    return crow, idx[valid].astype(np.int64), val[valid]


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


class TorchSparseIndex:
    """Normalised database codes as a torch sparse CSR tensor on `device`; `search` scores one dense query batch
    at a time with `D @ Q^T` (cuSPARSE SpMM on CUDA) and selects the exact top-K with lowest-index ties."""

    def __init__(self, database: SparseCodes, device: str | None = None):
        import torch
        if not isinstance(database, SparseCodes):
            raise CSRError(f"database must be SparseCodes, got {type(database).__name__}")
        validate_codes(database.indices, database.values, database.hidden_size, "database codes")
        self.n, self.hidden_size = database.n, database.hidden_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        crow, col, val = normalized_csr(database)
        self.matrix = _torch_csr(crow, col, val, (database.n, database.hidden_size)).to(self.device)

    def query_tensor(self, queries: SparseCodes):
        """Normalised query codes as a dense `[B, hidden]` float32 tensor on the device."""
        qcrow, qcol, qval = normalized_csr(queries)
        return _torch_csr(qcrow, qcol, qval, (queries.n, queries.hidden_size)).to_dense().to(self.device)

    def search_tensor(self, Q, K: int):
        """Top-K for a dense normalised query block on the device: `(indices [B, K], scores [B, K])` tensors."""
        return topk_lowest_index((self.matrix @ Q.T.contiguous()).T, K)

    def search_batch(self, queries: SparseCodes, K: int):
        return self.search_tensor(self.query_tensor(queries), K)

    def search(self, queries: SparseCodes, K: int, *, batch_size: int = 512,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        check_pair(queries, self.hidden_size, self.n, K)
        out_i = np.empty((queries.n, K), dtype=np.int64)
        out_s = np.empty((queries.n, K), dtype=np.float32)
        for b0 in tqdm(range(0, queries.n, batch_size), desc="sparse kNN (torch)", unit="batch",
                       disable=not progress, mininterval=1.0):
            b1 = min(queries.n, b0 + batch_size)
            ind, sc = self.search_batch(_rows(queries, b0, b1), K)
            out_i[b0:b1] = ind.cpu().numpy()
            out_s[b0:b1] = sc.cpu().numpy()
        return out_i, out_s


def sparse_topk_torch(queries: SparseCodes, database: SparseCodes, K: int, *, batch_size: int = 512,
                      device: str | None = None, threads: int | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as `sparse_topk`, computed with torch (see `TorchSparseIndex`). Default device: CUDA if
    available, else CPU (which holds a dense [batch, N] score block: keep batch_size small there)."""
    import torch
    if not isinstance(database, SparseCodes):
        raise CSRError(f"database must be SparseCodes, got {type(database).__name__}")
    check_pair(queries, database.hidden_size, database.n, K)
    if threads is not None:
        torch.set_num_threads(threads)
    return TorchSparseIndex(database, device).search(queries, K, batch_size=batch_size, progress=progress)


def _torch_csr(crow: np.ndarray, col: np.ndarray, val: np.ndarray, shape: tuple[int, int]):
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(val),
                                       size=shape, check_invariants=False)


def _rows(codes: SparseCodes, start: int, stop: int) -> SparseCodes:
    """Row slice of validated codes, without re-validating."""
    part = SparseCodes.__new__(SparseCodes)
    part.indices, part.values = codes.indices[start:stop], codes.values[start:stop]
    part.hidden_size, part.labels = codes.hidden_size, None
    return part
