"""The sparse kNN engine (csr/sparse_knn.py) against FAISS IndexFlatIP on the densified normalised codes.

FAISS does not order tied scores, so the reference is post-sorted by (-score, index) and compared with
`assert_same_as_faiss`: scores to float tolerance, every returned item's true score equal to the reference
score at its rank (the returned set IS a top-K), and indices equal wherever the reference score is not tied.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csr.codes import SparseCodes
from csr.io import CSRError
from csr.knn import search
from csr.sparse_knn import build_index, sparse_topk
from csr.sparse_knn_torch import sparse_topk_torch
from csr.synthetic import authors_exponent, describe_skew, random_codes
from knn_reference import TOL, assert_same_as_faiss, dense_normalized

def both_paths(queries: SparseCodes, database: SparseCodes, K: int):
    """Results of the postings path (no dense block) and of the tiled path (many hot units), tiny blocks."""
    post = build_index(database, hot_fraction=2.0, block=257).search(queries, K, progress=False,
                                                                      tiled_postings_per_item=np.inf)
    tiled = build_index(database, hot_fraction=0.02, block=257).search(queries, K, progress=False, tile=300,
                                                                       tiled_postings_per_item=0.0)
    return post, tiled


@pytest.mark.parametrize("skew", ["uniform", "mild", "authors"])
@pytest.mark.parametrize("K", [1, 10, 257])
def test_random_codes_match_faiss(skew, K):
    db = random_codes(2000, 1024, 12, skew, seed=1)
    q = random_codes(150, 1024, 12, skew, seed=2)
    ind, sc = sparse_topk(q, db, K, progress=False)
    assert_same_as_faiss(q, db, K, ind, sc)
    for i, s in both_paths(q, db, K):
        assert_same_as_faiss(q, db, K, i, s)


@pytest.fixture(scope="module")
def trained_codes() -> tuple[SparseCodes, SparseCodes]:
    """Codes of a CSR model trained briefly on real data (sklearn's bundled 8x8 digits, 64-d)."""
    from sklearn.datasets import load_digits

    from csr.encode import encode_array
    from csr.model import CSR, CSRConfig
    x = load_digits().data.astype(np.float32) / 16.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contend on a busy machine)
    torch.manual_seed(0)
    model = CSR(CSRConfig(input_dim=64, hidden_size=256, topk=8, auxk=32))
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    xt = torch.from_numpy(x)
    for _ in range(100):
        out = model(xt, k=8, multi_k=8)
        loss = torch.nn.functional.mse_loss(out["recon_k"], xt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = encode_array(model, x, k=8, progress=False)
    torch.set_num_threads(threads)
    return SparseCodes(codes.indices[:1500], codes.values[:1500], 256), \
        SparseCodes(codes.indices[1500:], codes.values[1500:], 256)


@pytest.mark.parametrize("K", [1, 25, 1500])
def test_trained_model_codes_match_faiss(trained_codes, K):
    db, q = trained_codes
    assert describe_skew(db)["max_usage"] > 0.2  # real codes are skewed: some units fire in many codes
    ind, sc = sparse_topk(q, db, K, progress=False)
    assert_same_as_faiss(q, db, K, ind, sc)
    for i, s in both_paths(q, db, K):
        assert_same_as_faiss(q, db, K, i, s)


def test_no_overlap_and_few_overlaps_rank_zeros_by_index():
    rng = np.random.default_rng(0)
    db = SparseCodes(rng.integers(0, 50, (400, 6)).astype(np.int16), rng.uniform(0.1, 1, (400, 6)).astype(np.float32),
                     100)
    # query 0 shares nothing with the database; query 1 shares one rare unit; query 2 is all padding
    qi = np.array([[60, 70, 80], [7, 90, 91], [0, 0, 0]], dtype=np.int16)
    qv = np.array([[1, 2, 3], [1, 1, 1], [0, 0, 0]], dtype=np.float32)
    q = SparseCodes(qi, qv, 100)
    for K in (5, 40, 400):
        for ind, sc in [sparse_topk(q, db, K, progress=False), *both_paths(q, db, K)]:
            assert_same_as_faiss(q, db, K, ind, sc)
            np.testing.assert_array_equal(ind[0], np.arange(K))
            np.testing.assert_array_equal(ind[2], np.arange(K))
            assert (sc[0] == 0).all()
            n_pos = int((dense_normalized(db)[:, 7] > 0).sum())
            assert (sc[1, :min(K, n_pos)] > 0).all() and (sc[1, n_pos:] == 0).all()
            zeros = ind[1, n_pos:]
            np.testing.assert_array_equal(zeros, np.sort(zeros))


def test_duplicate_database_rows_tie_by_lowest_index():
    base = random_codes(50, 256, 5, "mild", seed=3)
    order = np.random.default_rng(1).integers(0, 50, 600)  # each row repeated ~12 times, scattered
    db = SparseCodes(base.indices[order], base.values[order], 256)
    q = random_codes(40, 256, 5, "mild", seed=4)
    for K in (1, 30, 600):
        for ind, sc in [sparse_topk(q, db, K, progress=False), *both_paths(q, db, K)]:
            assert_same_as_faiss(q, db, K, ind, sc)
            for r in range(q.n):  # copies of one row have identical scores, listed by increasing index
                for s in np.unique(sc[r]):
                    same = ind[r][sc[r] == s]
                    np.testing.assert_array_equal(same, np.sort(same))
            top_rows = order[ind[:, 0]]
            np.testing.assert_array_equal(ind[:, 0], [np.flatnonzero(order == t)[0] for t in top_rows])


def test_padding_duplicates_negative_and_float16_values():
    rng = np.random.default_rng(5)
    n, k, h = 800, 10, 300
    idx = rng.integers(0, 40, (n, k)).astype(np.int16)  # many repeated units within rows: summed
    val = rng.normal(0, 1, (n, k)).astype(np.float16)  # signed values: negative scores rank below zeros
    val[rng.random((n, k)) < 0.3] = 0  # rows with fewer non-zeros (zero values are padding)
    val[7] = 0  # an empty row
    db = SparseCodes(idx[:600], val[:600], h)
    q = SparseCodes(idx[600:], val[600:], h)
    for K in (3, 64, 600):
        for ind, sc in [sparse_topk(q, db, K, progress=False), *both_paths(q, db, K)]:
            assert_same_as_faiss(q, db, K, ind, sc)


def test_k_equals_database_size_and_threads():
    db = random_codes(500, 512, 16, "mild", seed=6)
    q = random_codes(30, 512, 16, "mild", seed=7)
    a = sparse_topk(q, db, 500, threads=1, progress=False, batch_size=7)
    b = sparse_topk(q, db, 500, progress=False)
    assert_same_as_faiss(q, db, 500, *a)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert sorted(a[0][0]) == list(range(500))


def test_torch_path_matches_numba_path():
    db = random_codes(1500, 1024, 12, "authors", seed=8)
    q = random_codes(70, 1024, 12, "authors", seed=9)
    for K in (1, 50, 1500):
        ti, ts = sparse_topk_torch(q, db, K, batch_size=32, device="cpu", progress=False)
        assert_same_as_faiss(q, db, K, ti, ts)
        ni, ns = sparse_topk(q, db, K, progress=False)
        np.testing.assert_allclose(ts, ns, atol=TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_path_on_cuda_matches_numba_path():
    db = random_codes(20000, 4096, 32, "authors", seed=10)
    q = random_codes(1000, 4096, 32, "authors", seed=11)
    for K in (1, 20, 2048):
        ti, ts = sparse_topk_torch(q, db, K, progress=False, device="cuda", batch_size=256)
        ni, ns = sparse_topk(q, db, K, progress=False)
        np.testing.assert_allclose(ts, ns, atol=TOL)
        gaps = np.abs(np.diff(ns, axis=1)) > TOL
        clear = np.zeros_like(gaps[:, :1])
        untied = np.concatenate([clear | True, gaps], 1) & np.concatenate([gaps, clear], 1)
        np.testing.assert_array_equal(ti[untied], ni[untied])


def _codes(indices, values, hidden=64):
    return SparseCodes(np.asarray(indices, dtype=np.int16), np.asarray(values, dtype=np.float32), hidden)


def test_bad_input_gives_clear_errors():
    db = _codes([[1, 2], [3, 4]], [[1, 1], [1, 1]])
    q = _codes([[1, 2]], [[1, 1]])
    with pytest.raises(CSRError, match="hidden size 32 but the database has 64"):
        sparse_topk(_codes([[1, 2]], [[1, 1]], hidden=32), db, 1, progress=False)
    for fn in (sparse_topk, sparse_topk_torch):
        with pytest.raises(CSRError, match=r"K must be an integer in \[1, 2\]"):
            fn(q, db, 3, progress=False)
        with pytest.raises(CSRError, match=r"K must be"):
            fn(q, db, 0, progress=False)
    bad = _codes([[1, 2]], [[1, 1]])
    bad.indices[0, 0] = -3  # codes edited after validation must still be rejected
    with pytest.raises(CSRError, match=r"query codes: unit indices must lie in \[0, 64\)"):
        sparse_topk(bad, db, 1, progress=False)
    bad.indices[0, 0] = 64
    with pytest.raises(CSRError, match=r"found range \[2, 64\]"):
        sparse_topk(bad, db, 1, progress=False)
    bad_db = _codes([[1, 2], [3, 4]], [[1, 1], [1, 1]])
    bad_db.values[1, 1] = np.nan
    with pytest.raises(CSRError, match="database codes: NaN or Inf"):
        sparse_topk(q, bad_db, 1, progress=False)
    with pytest.raises(CSRError, match="queries must be SparseCodes"):
        sparse_topk(np.zeros((1, 64)), db, 1, progress=False)


def test_synthetic_skew_regimes():
    authors = random_codes(20000, 4096, 16, "authors", seed=0)
    assert abs(describe_skew(authors)["top1pct_share"] - 0.5) < 0.03
    mild = random_codes(20000, 4096, 16, "mild", seed=0)
    assert describe_skew(mild)["top1pct_share"] < 0.2
    assert authors_exponent(4096, 16) > 0.8
    again = random_codes(20000, 4096, 16, "authors", seed=0)
    np.testing.assert_array_equal(authors.indices, again.indices)
    assert all(len(set(r)) == 16 for r in authors.indices[:500])  # distinct units within a row
    with pytest.raises(CSRError, match="impossible"):
        random_codes(10, 256, 64, "authors")


def test_scipy_reference_sums_repeated_units_before_normalising():
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 12, (300, 8))  # repeated units within rows
    val = rng.random((300, 8)).astype(np.float32)
    codes = SparseCodes(idx, val, 50)
    np.testing.assert_allclose(codes.to_dense(normalize=True), dense_normalized(codes), atol=1e-6)
    db, q = SparseCodes(idx[:250], val[:250], 50), SparseCodes(idx[250:], val[250:], 50)
    ref = search(q, db, 5, backend="scipy", progress=False)
    fast = sparse_topk(q, db, 5, progress=False)
    np.testing.assert_allclose(ref[1], fast[1], atol=TOL)
    assert_same_as_faiss(q, db, 5, *ref)
