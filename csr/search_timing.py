"""Retrieval time, the paper's protocol T: build each setting's data, search it in batches, time the rounds.

Sparse settings: k-sparse codes (from files or generated with skewed unit usage, csr/synthetic.py) searched by
the sparse kNN engine (csr/sparse_knn.py: numba on CPU, torch sparse CSR with `backend="torch"`). Dense
settings: random unit vectors of dimension d searched by FAISS `IndexFlatIP` (CPU) or a torch matmul + exact
top-K (torch). Every setting is timed the same way (`time_rounds`). retrieval/retrieval_time.py is the script.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from csr.codes import SparseCodes, load_codes
from csr.io import CSRError, info
from csr.topk import check_pair, topk_lowest_index


@dataclass
class RetrievalTimeConfig:
    """One protocol-T run; the fields are retrieval/retrieval_time.py's flags (see their help)."""
    database_codes: str | None  # database codes .npz; None: generate random skewed codes
    query_codes: str | None  # query codes .npz (with database_codes)
    n_database: int  # generated database size
    hidden: int  # units per generated code
    k: list[int]  # active units per generated code, one sparse setting each
    skew: str  # unit usage of generated codes (csr/synthetic.py)
    seed: int  # random seed of codes and dense vectors
    batch_size: int  # queries per batch
    query_batches: int  # distinct query batches, cycled
    K: int  # neighbours per query
    warmup_rounds: int  # untimed rounds first
    rounds: int  # timed rounds
    max_seconds: float  # time cap per setting (warm-up gets a quarter)
    dense_dims: list[int] | None  # dense dimensions to time; None: the k values; []: no dense baseline
    backend: str  # "numba" (CPU engine + FAISS flat) or "torch" (torch sparse CSR + torch matmul)
    device: str | None  # torch device (default: cuda if available)
    threads: int  # CPU threads for both sides


def time_rounds(search: Callable[[int], object], n_batches: int, warmup: int, rounds: int,
                max_seconds: float) -> dict:
    """Run `search(batch_number)` for warm-up then timed rounds; per-batch wall times in milliseconds."""
    start = time.perf_counter()
    done_warm = 0
    while done_warm < warmup and (done_warm == 0 or time.perf_counter() - start < 0.25 * max_seconds):
        search(done_warm % n_batches)
        done_warm += 1
    times = []
    while len(times) < rounds and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t = time.perf_counter()
        search(len(times) % n_batches)
        times.append(1e3 * (time.perf_counter() - t))
    times.sort()
    return dict(warmup_rounds=done_warm, rounds=len(times), median_ms=statistics.median(times),
                p90_ms=times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)])


def query_batches(codes: SparseCodes, batch_size: int) -> list[SparseCodes]:
    """Consecutive full batches of `batch_size` codes (a last partial batch is dropped)."""
    return [SparseCodes(codes.indices[s:s + batch_size], codes.values[s:s + batch_size], codes.hidden_size)
            for s in range(0, codes.n - batch_size + 1, batch_size)]


def sparse_setting(cfg: RetrievalTimeConfig, k: int | None) -> tuple[dict, Callable, int]:
    """Database and query batches for one k (generated or from files); returns (row, search, n_batches)."""
    from csr.synthetic import describe_skew, random_codes
    n_q = cfg.batch_size * cfg.query_batches
    if cfg.database_codes:
        db, q = load_codes(cfg.database_codes), load_codes(cfg.query_codes)
        if q.n < cfg.batch_size:
            raise CSRError(f"{cfg.query_codes}: {q.n} queries, fewer than one batch of {cfg.batch_size}")
        source = f"files {cfg.database_codes}, {cfg.query_codes}"
    else:
        db = random_codes(cfg.n_database, cfg.hidden, k, cfg.skew, seed=cfg.seed, unit_seed=cfg.seed)
        q = random_codes(n_q, cfg.hidden, k, cfg.skew, seed=cfg.seed + 1, unit_seed=cfg.seed)
        source = f"generated, skew {cfg.skew}"
    row = dict(k=db.k, hidden=db.hidden_size, n_database=db.n, source=source, **describe_skew(db))
    batches = query_batches(q, cfg.batch_size)[:cfg.query_batches]
    t = time.perf_counter()
    if cfg.backend == "torch":
        import torch

        from csr.sparse_knn_torch import TorchSparseIndex
        index = TorchSparseIndex(db, cfg.device)
        check_pair(q, db.hidden_size, db.n, cfg.K)
        dev = index.device
        qts = [index.query_tensor(b) for b in batches]  # queries already on the device, as for dense

        def search(b: int):
            index.search_tensor(qts[b], cfg.K)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    else:
        from csr.sparse_knn import build_index
        index = build_index(db, threads=cfg.threads)
        check_pair(q, db.hidden_size, db.n, cfg.K)
        row.update(n_hot_units=int(index.hot_units.size), index_gb=index.nbytes / 1e9)

        def search(b: int):
            index.search(batches[b], cfg.K, threads=cfg.threads, progress=False)
    row["build_seconds"] = time.perf_counter() - t
    del db
    return row, search, len(batches)


def dense_setting(cfg: RetrievalTimeConfig, d: int) -> tuple[Callable, int]:
    """Random unit vectors [N, d] and query batches, searched by FAISS flat IP (CPU) or torch matmul (GPU)."""
    if cfg.backend == "torch":
        import torch
        dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        X = torch.randn(cfg.n_database, d, device=dev, generator=gen)
        X /= X.norm(dim=1, keepdim=True)
        Q = torch.randn(cfg.query_batches, cfg.batch_size, d, device=dev, generator=gen)
        Q /= Q.norm(dim=2, keepdim=True)

        def search(b: int):
            topk_lowest_index(Q[b] @ X.T, cfg.K)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    else:
        import faiss
        rng = np.random.default_rng(cfg.seed)
        x = rng.standard_normal((cfg.n_database, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        qs = rng.standard_normal((cfg.query_batches, cfg.batch_size, d), dtype=np.float32)
        qs /= np.linalg.norm(qs, axis=2, keepdims=True)
        faiss.omp_set_num_threads(cfg.threads)
        index = faiss.IndexFlatIP(d)
        index.add(x)
        del x

        def search(b: int):
            index.search(qs[b], cfg.K)
    return search, cfg.query_batches


def backend_device(cfg: RetrievalTimeConfig) -> str:
    """Where the searches run, in words; the torch backend is set to `cfg.threads` CPU threads."""
    if cfg.backend == "torch":
        import torch
        torch.set_num_threads(cfg.threads)
        return str(torch.cuda.get_device_name() if (cfg.device or "cuda").startswith("cuda")
                   and torch.cuda.is_available() else "cpu")
    return f"CPU, {cfg.threads} threads"


def time_settings(cfg: RetrievalTimeConfig) -> tuple[list[dict], list[dict]]:
    """Time every sparse setting (each k, or the code files) then every dense dimension; one `info` line per
    setting as it finishes. Returns (sparse rows, dense rows) with `queries_per_s` = batch size / median."""
    ks = [None] if cfg.database_codes else cfg.k
    dims = cfg.dense_dims if cfg.dense_dims is not None else ([] if cfg.database_codes else cfg.k)
    protocol = (cfg.warmup_rounds, cfg.rounds, cfg.max_seconds)

    sparse_rows, dense_rows = [], []
    for k in ks:
        row, search, nb = sparse_setting(cfg, k)
        r = dict(row, **time_rounds(search, nb, *protocol))
        r["queries_per_s"] = 1e3 * cfg.batch_size / r["median_ms"]
        sparse_rows.append(r)
        info(f"sparse k {r['k']} of {r['hidden']} ({r['source']}; top 1 % of units carry "
             f"{100 * r['top1pct_share']:.0f} % of activations): median {r['median_ms']:.1f} ms, p90 "
             f"{r['p90_ms']:.1f} ms per batch, {r['queries_per_s']:,.0f} queries/s "
             f"({r['warmup_rounds']} warm-up + {r['rounds']} timed rounds)")
        del search
    if cfg.database_codes and cfg.dense_dims is None:
        dims = [sparse_rows[0]["k"]]
    for d in dims:
        search, nb = dense_setting(cfg, d)
        r = dict(d=d, **time_rounds(search, nb, *protocol))
        r["queries_per_s"] = 1e3 * cfg.batch_size / r["median_ms"]
        dense_rows.append(r)
        info(f"dense d {d}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms per batch, "
             f"{r['queries_per_s']:,.0f} queries/s ({r['warmup_rounds']} warm-up + {r['rounds']} timed rounds)")
        del search
    return sparse_rows, dense_rows
