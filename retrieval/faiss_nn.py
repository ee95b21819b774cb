"""Exact k-nearest-neighbour search (stage 5): queries against a database, by cosine similarity.

The paper's command (from retrieval/): the codes inference/csr_inference.py wrote at k 8 by default, found in
RUNS/*/codes_k8/ (RUNS = <repository>/runs; csr/paths.py); writes nn.npy there:
    cd retrieval; python faiss_nn.py --topk 8
Sparse codes (fast exact engine, no densifying):
    python retrieval/faiss_nn.py --database runs/fmnist_k32/codes_k32/train_codes.npz \
        --queries runs/fmnist_k32/codes_k32/val_codes.npz --out runs/fmnist_k32/nn.npy
Dense embeddings with FAISS (optionally truncated to the first D dims, as an MRL user would):
    python retrieval/faiss_nn.py --database .cache/fmnist/emb/train_emb.npy --queries .cache/fmnist/emb/val_emb.npy \
        --backend faiss --dims 32 --out runs/dense32/nn.npy

Past one machine's RAM, split the database across processes with torchrun (gloo on CPU, NCCL on GPU): each
rank searches its slice for every query and the top-K lists are merged exactly (the same output, bit for bit).
Each rank builds the search index of its slice only; a dense .npy database is memory-mapped and each rank reads
its rows, a codes .npz is read whole by every rank (1.28M codes at k 32 are 250 MB) and then sliced:
    torchrun --nproc_per_node 2 retrieval/faiss_nn.py --database train_codes.npz --queries val_codes.npz \
        --out nn.npy --use_ddp True

Both sides are L2-normalised; ties are broken by the lowest database index in every backend, so results are
reproducible and backends agree exactly: the same scores to float rounding and the same neighbours wherever
a score is not tied (tests/test_pipeline.py and tests/test_sparse_knn.py check this against FAISS).
Writes OUT (indices [Nq, K] int64), OUT with `_scores` (float32) and a JSON sidecar naming the inputs and
their labels (read by compute_metrics.py). K above the database size is clipped with a warning.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr import distributed, paths  # noqa: E402
from csr.cli import ArgumentParser, bool_flag, positive_int, run  # noqa: E402
from csr.codes import SparseCodes, load_codes  # noqa: E402
from csr.io import (CSRError, atomic_save_npy, check_dims, check_output, check_same_width,  # noqa: E402
                    labels_path_for, load_embeddings, same_file, write_sidecar)
from csr.knn import BACKENDS, clip_k, distributed_search, search  # noqa: E402


def load_side(path: str, dims: int | None):
    """Codes (.npz) or dense embeddings (.npy, memory-mapped, optionally truncated: the search makes the one
    normalised float32 copy); plus the path of its labels."""
    if path.endswith(".npz"):
        if dims:
            raise CSRError("--dims truncates dense embeddings; codes choose their size with --topk at encoding")
        return load_codes(path), path
    x = load_embeddings(path)
    if dims:
        check_dims([dims], x.shape[1], "--dims", path)
        x = x[:, :dims]
    return x, str(labels_path_for(path))


def scores_path(out: Path) -> Path:
    return out.with_name(out.stem + "_scores.npy")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--database", "--train", dest="database", help="database: codes .npz or embeddings .npy")
    d.add_argument("--queries", "--eval", dest="queries", help="queries: codes .npz or embeddings .npy")
    d.add_argument("--out", help="neighbour indices .npy (scores go to <out>_scores.npy)")
    d.add_argument("--topk", type=positive_int, default=None,
                   help="k of the codes (the paper's flag): without paths, search RUNS/*/codes_k<topk>/ "
                        "train_codes.npz (database) with its val_codes.npz (queries), write nn.npy there; with "
                        "paths, the codes must have this k")
    s = p.add_argument_group("search")
    s.add_argument("-K", "--K", "--k", dest="K", type=positive_int, default=100, help="neighbours per query (MRL metrics use 100)")
    s.add_argument("--backend", default=None, choices=BACKENDS,
                   help="sparse (codes, default for .npz), faiss (dense; default for .npy), scipy (codes, reference)")
    s.add_argument("--dims", type=positive_int, default=None,
                   help="truncate dense embeddings to their first DIMS dims (default: all)")
    r = p.add_argument_group("runtime")
    bool_flag(r, "--use_ddp", "--use-ddp", default=False,
              help="under torchrun: split the database across the processes, merge the top-K lists exactly")
    r.add_argument("--device", default="auto", help="with --use_ddp: cuda (NCCL) or cpu (gloo); auto = cuda if present")
    bool_flag(r, "--overwrite", default=False, help="replace existing outputs")
    return p


def default_paths(args: argparse.Namespace) -> None:
    """Fill --database/--queries/--out from the default layout at --topk (csr/paths.py)."""
    if args.database and args.queries and args.out:
        return
    if args.topk is None:
        raise CSRError("give --database, --queries and --out (or --topk k: the codes at the default place)")
    where = paths.codes_dir(args.topk)
    args.database = args.database or str(where / "train_codes.npz")
    args.queries = args.queries or str(where / "val_codes.npz")
    args.out = args.out or str(where / "nn.npy")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    default_paths(args)
    out = check_output(args.out, args.overwrite, also=[scores_path(Path(args.out))], sidecar=True,
                       inputs={"--database": args.database, "--queries": args.queries})
    db, db_labels = load_side(args.database, args.dims)
    same = same_file(args.database, args.queries)  # searched against itself: read (and warned about) once
    q, q_labels = (db, db_labels) if same else load_side(args.queries, args.dims)
    if isinstance(db, SparseCodes) != isinstance(q, SparseCodes):
        raise CSRError(f"--database {args.database} and --queries {args.queries} must both be codes (.npz) or "
                       f"both be embeddings (.npy)")
    if isinstance(db, np.ndarray):
        check_same_width(db, q, args.database, args.queries)
    else:
        if db.hidden_size != q.hidden_size:
            raise CSRError(f"--queries {args.queries}: codes over {q.hidden_size} units but --database {args.database} "
                           f"has {db.hidden_size} (encode both with the same checkpoint)")
        if args.topk is not None:
            for path, codes in ((args.database, db), (args.queries, q)):
                if codes.k != args.topk:
                    raise CSRError(f"--topk {args.topk}: {path} holds codes with k = {codes.k}")
    backend = args.backend or ("sparse" if args.database.endswith(".npz") else "faiss")
    K = clip_k(args.K, len(db) if isinstance(db, np.ndarray) else db.n)
    rt = distributed.setup(args.use_ddp, args.device)
    try:
        t0 = time.time()
        if rt.distributed:
            idx, scores = distributed_search(q, db, K, backend=backend)
        else:
            idx, scores = search(q, db, K, backend=backend)
        dt = time.time() - t0
    finally:
        distributed.cleanup()
    if not rt.is_main:
        return {"neighbors": str(out), "seconds": dt}
    atomic_save_npy(out, idx)
    atomic_save_npy(scores_path(out), scores)
    write_sidecar(out, database=args.database, queries=args.queries, database_labels=db_labels,
                  query_labels=q_labels, K=idx.shape[1], backend=backend, dims=args.dims, search_seconds=dt,
                  processes=rt.world_size)
    print(f"{len(idx)} queries x {idx.shape[1]} neighbours ({backend}, {rt.world_size} process(es)) in {dt:.2f}s "
          f"({len(idx) / max(dt, 1e-9):.0f} queries/s) -> {out}")
    return {"neighbors": str(out), "seconds": dt}


if __name__ == "__main__":
    run(main)
