"""Retrieval metrics from neighbour lists, as Matryoshka Representation Learning (MRL) reports them.

For a query with label y and its ranked neighbours n_1..n_K (rel_i = [label(n_i) == y]):
- top-1: rel_1 (the paper's 1-NN accuracy);
- precision@k: sum_{i<=k} rel_i / k;
- recall@k: sum_{i<=k} rel_i / (number of database items with label y);
- top-k hit rate: 1 if any rel_i, i <= k;
- mAP@k: sum_{i<=k} precision@i * rel_i / sum_{i<=k} rel_i (0 when nothing relevant is retrieved),
  MRL's definition (normalised by the relevant items retrieved, not by all relevant items).
All averaged over queries.
"""
from __future__ import annotations

import numpy as np

from csr.io import CSRError

DEFAULT_KS = (10, 25, 50, 100)


def relevance(neighbors: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    if neighbors.shape[0] != query_labels.shape[0]:
        raise CSRError(f"neighbours have {neighbors.shape[0]} rows but there are {query_labels.shape[0]} query labels")
    if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= len(db_labels)):
        raise CSRError(f"neighbour indices outside the database of {len(db_labels)} labels")
    return db_labels[neighbors] == query_labels[:, None]


def retrieval_metrics(neighbors: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray,
                      ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """All metrics as percentages; k values larger than the neighbour lists are skipped."""
    rel = relevance(neighbors, db_labels, query_labels).astype(np.float64)
    K = rel.shape[1]
    class_sizes = np.bincount(db_labels.astype(np.int64), minlength=int(max(db_labels.max(), query_labels.max())) + 1)
    n_relevant = np.maximum(class_sizes[query_labels], 1)
    out = {"top1": 100.0 * rel[:, 0].mean()}
    cum = np.cumsum(rel, axis=1)
    prec_at_i = cum / np.arange(1, K + 1)
    for k in ks:
        if k > K:
            continue
        hits = cum[:, k - 1]
        out[f"mAP@{k}"] = 100.0 * np.mean(np.where(hits > 0, (prec_at_i[:, :k] * rel[:, :k]).sum(1) / np.maximum(hits, 1), 0))
        out[f"precision@{k}"] = 100.0 * np.mean(hits / k)
        out[f"recall@{k}"] = 100.0 * np.mean(hits / n_relevant)
        out[f"top{k}"] = 100.0 * np.mean(hits > 0)
    return out


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.2f}") -> str:
    """A markdown table from a list of dicts (columns default to the union of keys in order)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]
    fmt = lambda v: floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
