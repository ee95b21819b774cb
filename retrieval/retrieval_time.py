"""Retrieval time, the paper's protocol T (never released by the authors): sparse codes vs dense vectors.

    python retrieval/retrieval_time.py                                  # CPU: our engine vs FAISS flat, k 8..256
    python retrieval/retrieval_time.py --skew authors                   # codes as skewed as the authors' models
    python retrieval/retrieval_time.py --database-codes train_codes.npz --query-codes val_codes.npz
    python retrieval/retrieval_time.py --backend torch --dense-dims 32 64 128 256 512 1024 2048    # on a GPU

Batches of 512 queries search a 1.3M-item database (ImageNet-1k train size) for the exact top-K: first
warm-up rounds, then timed rounds, one batch per round; reported per batch: median and p90 milliseconds, and
queries/s (batch size / median). Sparse: k-sparse codes over `--hidden` units (default 16384, k 32 as in the
paper; the table sweeps k = 8..256) searched by csr/sparse_knn.py (numba on CPU, torch sparse CSR on GPU).
Dense: random unit vectors of the same active dimension d = k, searched by FAISS `IndexFlatIP` (CPU, the same
thread count) or a torch matmul + top-K (GPU): what an MRL user truncating to d dimensions would run.
Codes come from files (`--database-codes/--query-codes`) or are generated with Zipf-skewed unit usage
(csr/synthetic.py; `mild` = Zipf 0.5, `authors` = top 1 % of units carry half of the activations); the output
says which. The paper runs 100 warm-up and 100 timed rounds; on a small CPU `--max-seconds` caps each
setting (at least 1 warm-up and 3 timed rounds; the counts are reported).
Writes results/retrieval_time.json (+ sidecar) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.cli import positive_int, run  # noqa: E402
from csr.io import CSRError, SparseCodes, atomic_write_json, check_output, load_codes, write_sidecar  # noqa: E402


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


def _batches(codes: SparseCodes, batch_size: int) -> list[SparseCodes]:
    return [SparseCodes(codes.indices[s:s + batch_size], codes.values[s:s + batch_size], codes.hidden_size)
            for s in range(0, codes.n - batch_size + 1, batch_size)]


def sparse_setting(args, k: int | None) -> tuple[dict, Callable, int]:
    """Database and query batches for one k (generated or from files); returns (info, search, n_batches)."""
    from csr.synthetic import describe_skew, random_codes
    n_q = args.batch_size * args.query_batches
    if args.database_codes:
        db, q = load_codes(args.database_codes), load_codes(args.query_codes)
        if q.n < args.batch_size:
            raise CSRError(f"{args.query_codes}: {q.n} queries, fewer than one batch of {args.batch_size}")
        source = f"files {args.database_codes}, {args.query_codes}"
    else:
        db = random_codes(args.n_database, args.hidden, k, args.skew, seed=args.seed, unit_seed=args.seed)
        q = random_codes(n_q, args.hidden, k, args.skew, seed=args.seed + 1, unit_seed=args.seed)
        source = f"generated, skew {args.skew}"
    info = dict(k=db.k, hidden=db.hidden_size, n_database=db.n, source=source, **describe_skew(db))
    batches = _batches(q, args.batch_size)[:args.query_batches]
    t = time.perf_counter()
    if args.backend == "torch":
        import torch

        from csr.sparse_knn import TorchSparseIndex, check_pair
        index = TorchSparseIndex(db, args.device)
        check_pair(q, db.hidden_size, db.n, args.K)
        dev = index.device
        qts = [index.query_tensor(b) for b in batches]  # queries already on the device, as for dense

        def search(b: int):
            index.search_tensor(qts[b], args.K)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    else:
        from csr.sparse_knn import build_index, check_pair
        index = build_index(db, threads=args.threads)
        check_pair(q, db.hidden_size, db.n, args.K)
        info.update(n_hot_units=int(index.hot_units.size), index_gb=index.nbytes / 1e9)

        def search(b: int):
            index.search(batches[b], args.K, threads=args.threads, progress=False)
    info["build_seconds"] = time.perf_counter() - t
    del db
    return info, search, len(batches)


def dense_setting(args, d: int) -> tuple[Callable, int]:
    """Random unit vectors [N, d] and query batches, searched by FAISS flat IP (CPU) or torch matmul (GPU)."""
    if args.backend == "torch":
        import torch

        from csr.sparse_knn import topk_lowest_index
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        X = torch.randn(args.n_database, d, device=dev, generator=gen)
        X /= X.norm(dim=1, keepdim=True)
        Q = torch.randn(args.query_batches, args.batch_size, d, device=dev, generator=gen)
        Q /= Q.norm(dim=2, keepdim=True)

        def search(b: int):
            topk_lowest_index(Q[b] @ X.T, args.K)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    else:
        import faiss
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((args.n_database, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        qs = rng.standard_normal((args.query_batches, args.batch_size, d), dtype=np.float32)
        qs /= np.linalg.norm(qs, axis=2, keepdims=True)
        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatIP(d)
        index.add(x)
        del x

        def search(b: int):
            index.search(qs[b], args.K)
    return search, args.query_batches


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--database-codes", help="database codes .npz (default: generate random skewed codes)")
    g.add_argument("--query-codes", help="query codes .npz (with --database-codes)")
    g.add_argument("--n-database", type=positive_int, default=1281167, help="generated database size (ImageNet-1k train)")
    g.add_argument("--hidden", type=positive_int, default=16384, help="units per generated code (paper: 16384)")
    g.add_argument("--k", type=positive_int, nargs="+", default=[8, 16, 32, 64, 128, 256],
                   help="active units per generated code; the paper's headline is k 32")
    g.add_argument("--skew", default="mild", help="unit usage of generated codes: uniform, mild (Zipf 0.5), "
                   "authors (top 1 %% of units carry half the activations) or a Zipf exponent")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g = p.add_argument_group("protocol")
    g.add_argument("--batch-size", type=positive_int, default=512, help="queries per batch (paper: 512)")
    g.add_argument("--query-batches", type=positive_int, default=8, help="distinct query batches, cycled")
    g.add_argument("--K", type=positive_int, default=10, help="neighbours per query")
    g.add_argument("--warmup-rounds", type=int, default=100, help="untimed rounds first (paper: 100)")
    g.add_argument("--rounds", type=positive_int, default=100, help="timed rounds (paper: 100)")
    g.add_argument("--max-seconds", type=float, default=60.0,
                   help="time cap per setting (warm-up gets a quarter); at least 1 warm-up and 3 timed rounds")
    g.add_argument("--dense-dims", type=positive_int, nargs="*", default=None,
                   help="dense dimensions to time (default: the k values); none: skip the dense baseline")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", choices=["numba", "torch"], default="numba",
                   help="numba: CPU engine + FAISS flat; torch: torch sparse CSR + torch matmul (GPU if present)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    g.add_argument("--threads", type=positive_int, default=2, help="CPU threads for both sides")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results/retrieval_time.json", help="JSON results")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if bool(args.database_codes) != bool(args.query_codes):
        raise CSRError("--database-codes and --query-codes go together")
    check_output(args.out, args.overwrite)
    if args.backend == "torch":
        import torch
        torch.set_num_threads(args.threads)
        device = str(torch.cuda.get_device_name() if (args.device or "cuda").startswith("cuda")
                     and torch.cuda.is_available() else "cpu")
    else:
        device = f"CPU, {args.threads} threads"
    ks = [None] if args.database_codes else args.k
    dims = args.dense_dims if args.dense_dims is not None else ([] if args.database_codes else args.k)
    protocol = (args.warmup_rounds, args.rounds, args.max_seconds)

    sparse_rows, dense_rows = [], []
    for k in ks:
        info, search, nb = sparse_setting(args, k)
        r = dict(info, **time_rounds(search, nb, *protocol))
        r["queries_per_s"] = 1e3 * args.batch_size / r["median_ms"]
        sparse_rows.append(r)
        print(f"sparse k {r['k']} of {r['hidden']} ({r['source']}; top 1 % of units carry "
              f"{100 * r['top1pct_share']:.0f} % of activations): median {r['median_ms']:.1f} ms, p90 "
              f"{r['p90_ms']:.1f} ms per batch, {r['queries_per_s']:,.0f} queries/s "
              f"({r['warmup_rounds']} warm-up + {r['rounds']} timed rounds)", flush=True)
        del search
    if args.database_codes and args.dense_dims is None:
        dims = [sparse_rows[0]["k"]]
    for d in dims:
        search, nb = dense_setting(args, d)
        r = dict(d=d, **time_rounds(search, nb, *protocol))
        r["queries_per_s"] = 1e3 * args.batch_size / r["median_ms"]
        dense_rows.append(r)
        print(f"dense d {d}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms per batch, "
              f"{r['queries_per_s']:,.0f} queries/s ({r['warmup_rounds']} warm-up + {r['rounds']} timed rounds)",
              flush=True)
        del search

    engine = "torch sparse CSR" if args.backend == "torch" else "csr/sparse_knn.py (numba)"
    baseline = "torch matmul + top-K" if args.backend == "torch" else "FAISS IndexFlatIP"
    print(f"\nRetrieval time on {device}: batches of {args.batch_size} queries, top-{args.K}, database "
          f"{sparse_rows[0]['n_database']:,}; sparse = {engine}, dense = {baseline}; codes: {sparse_rows[0]['source']}")
    print("\n| k (sparse) / d (dense) | sparse median ms | sparse p90 ms | sparse q/s | dense median ms | "
          "dense p90 ms | dense q/s | sparse / dense q/s |")
    print("|---|---|---|---|---|---|---|---|")
    by_d = {r["d"]: r for r in dense_rows}
    by_k = {r["k"]: r for r in sparse_rows}
    for key in sorted(set(by_d) | set(by_k)):
        s, d = by_k.get(key), by_d.get(key)
        cells = [f"{s['median_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['queries_per_s']:,.0f}"] if s else ["-"] * 3
        cells += [f"{d['median_ms']:.1f}", f"{d['p90_ms']:.1f}", f"{d['queries_per_s']:,.0f}"] if d else ["-"] * 3
        cells.append(f"{s['queries_per_s'] / d['queries_per_s']:.2f}x" if s and d else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")
    result = dict(device=device, config=vars(args), sparse=sparse_rows, dense=dense_rows)
    atomic_write_json(args.out, result)
    write_sidecar(args.out, what="retrieval time, protocol T", device=device)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run(main)
