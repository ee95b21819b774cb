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
Writes results/retrieval_time.json (+ sidecar) and prints a markdown table. The harness is csr/search_timing.py.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.cli import positive_int, run  # noqa: E402
from csr.io import CSRError, atomic_write_json, check_output, write_sidecar  # noqa: E402
from csr.search_timing import RetrievalTimeConfig, backend_device, time_settings  # noqa: E402


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
    check_output(args.out, args.overwrite, sidecar=True)
    cfg = RetrievalTimeConfig(**{f.name: getattr(args, f.name) for f in fields(RetrievalTimeConfig)})
    device = backend_device(cfg)
    sparse_rows, dense_rows = time_settings(cfg)

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
