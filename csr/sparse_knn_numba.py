"""The numba query kernels of the CPU sparse kNN engine: they search a `SparseIndex` (csr/sparse_knn.py).

- A query with few postings and no hot unit goes term-at-a-time through the posting lists, one block of
  `block` items at a time, into a per-thread accumulator (L2-sized): pass 1 scatters, pass 2 re-reads the same
  postings, reads each touched score once, resets it and keeps the best K in a heap; only when fewer than K items
  score > 0 are the scores rebuilt to take the zero-score items in index order (`search_postings`).
- A query with a hot unit (or many postings) touches most of the database anyway: the database is walked in
  tiles (sized so the tile of all hot rows stays in L2); per tile the query's hot rows are summed into a small
  accumulator (up to four rows per vectorised pass), its cold postings for that tile are scattered in (a
  cursor per unit advances through its item-sorted list), and a threshold-filtered scan in item order updates
  its top-K heap. Tiles are the outer loop over a thread's queries, so each tile of the dense block is read
  from memory once per query chunk and then from cache (`search_tiles`).

Float sums run in a fixed order per query, so identical database rows get identical scores (exact ties).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

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
def search_postings(sel, qi, qv, ql, bptr, doc, val, n_db, K, accs, out_i, out_s) -> None:
    """Top-K of the queries `sel` (rows of the canonical query batch qi/qv/ql) by the postings path."""
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
def query_work(qi, ql, hot_pos, ptr):
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
def search_tiles(sel, qi, qv, ql, hot_pos, hot, ptr, doc, val, n_db, K, T, nchunks, out_i, out_s) -> None:
    """Top-K of the queries `sel` by the tiled path (tiles of T items, `nchunks` query chunks in parallel)."""
    for c in prange(nchunks):
        _tiles_chunk(sel[c::nchunks].copy(), qi, qv, ql, hot_pos, hot, ptr, doc, val, n_db, K, T, out_i, out_s)

