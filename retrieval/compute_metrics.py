"""Retrieval metrics from neighbour lists (stage 6): 1-NN top-1, mAP@k, precision@k, recall@k, top-k hit rate.

    python retrieval/compute_metrics.py --neighbors runs/fmnist_k32/nn.npy   # writes runs/fmnist_k32/nn_metrics.json
    cd retrieval; python compute_metrics.py --topk 8    # the paper's command: what `faiss_nn.py --topk 8` wrote

Labels default to the ones named in the neighbours' sidecar (written by faiss_nn.py): database labels for
the neighbours, query labels for the rows. k in {10, 25, 50, 100} as MRL reports (definitions in
csr/metrics.py). Writes the JSON and prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr import paths  # noqa: E402
from csr.cli import ArgumentParser, bool_flag, positive_int, run  # noqa: E402
from csr.codes import load_codes  # noqa: E402
from csr.io import (CSRError, atomic_write_json, check_neighbor_ids, check_output, load_labels,  # noqa: E402
                    load_neighbors, read_sidecar, sidecar_path, warn)
from csr.metrics import DEFAULT_KS, markdown_table, retrieval_metrics  # noqa: E402


def label_source(given: str | None, side: dict, key: str, nn_path: Path) -> str:
    """The labels file named by the flag (`given`), else by the neighbours' sidecar under `key`."""
    if given:
        return given
    path = side.get(key)
    if path is None:
        raise CSRError(f"{nn_path}: no sidecar naming the labels; pass --db_labels and --query_labels")
    if not isinstance(path, str) or not path:
        raise CSRError(f"{sidecar_path(nn_path)}: `{key}` must name a labels file, got {path!r}")
    return path


def labels_from(path: str) -> np.ndarray:
    """Labels from a labels .npy, or from the `labels` array stored in a codes .npz (validated on load)."""
    if path.endswith(".npz"):
        labels = load_codes(path).labels
        if labels is None:
            raise CSRError(f"{path}: code file has no labels")
        return labels
    return load_labels(path)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neighbors", default=None, help="neighbour indices .npy from faiss_nn.py")
    p.add_argument("--topk", type=positive_int, default=None,
                   help="k of the codes (the paper's flag): without --neighbors, read what faiss_nn.py --topk k "
                        "wrote by default (RUNS/*/codes_k<topk>/nn.npy; csr/paths.py)")
    p.add_argument("--db_labels", "--db-labels", default=None, help="database labels (default: from the sidecar)")
    p.add_argument("--query_labels", "--query-labels", default=None, help="query labels (default: from the sidecar)")
    p.add_argument("--ks", type=positive_int, nargs="+", default=None,
                   help=f"cut-offs for the @k metrics (default {' '.join(map(str, DEFAULT_KS))}, those within K)")
    p.add_argument("--out", default=None, help="metrics .json (default: <neighbors>_metrics.json)")
    bool_flag(p, "--overwrite", default=False, help="replace an existing metrics file")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.neighbors is None and args.topk is None:
        raise CSRError("give --neighbors (or --topk k: the neighbours of faiss_nn.py --topk k at the default place)")
    nn_path = Path(args.neighbors) if args.neighbors else paths.neighbours_file(args.topk)
    neighbors = load_neighbors(nn_path)
    side = read_sidecar(nn_path)
    db_lab = label_source(args.db_labels, side, "database_labels", nn_path)
    q_lab = label_source(args.query_labels, side, "query_labels", nn_path)
    out = check_output(Path(args.out) if args.out else nn_path.with_name(nn_path.stem + "_metrics.json"),
                       args.overwrite, inputs={"--neighbors": nn_path, "--db_labels": db_lab,
                                               "--query_labels": q_lab})
    K = neighbors.shape[1]
    if args.ks is None:
        ks = [k for k in DEFAULT_KS if k <= K]
        if len(ks) < len(DEFAULT_KS):
            warn(f"{nn_path} has {K} neighbours per query: @k metrics only for k in {ks or 'none'}")
    elif max(args.ks) > K:
        raise CSRError(f"--ks {max(args.ks)}: {nn_path} has only {K} neighbours per query")
    else:
        ks = args.ks
    db_labels = labels_from(db_lab)
    check_neighbor_ids(neighbors, nn_path, len(db_labels), db_lab)
    q_labels = labels_from(q_lab)
    if len(q_labels) != len(neighbors):
        raise CSRError(f"{q_lab}: {len(q_labels)} query labels but {nn_path} has {len(neighbors)} queries")
    metrics = retrieval_metrics(neighbors, db_labels, q_labels, tuple(ks))
    atomic_write_json(out, {"neighbors": str(nn_path), "n_queries": len(neighbors), "metrics": metrics})
    print(markdown_table([{"metric": k, "value": v} for k, v in metrics.items()]))
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    run(main)
