"""Recipe selection on a VALIDATION split carved from the training rows (never the eval split).

    python bench/recipe_val.py --emb-dir .cache/fmnist_full/emb --ks 8 64 --recipes paper recommended
    python bench/recipe_val.py --emb-dir .cache/text/bbc_128 --ks 8 32 --batch-size 256 --epochs 20 --cl none \
        --text-metrics --recipes paper recommended

A fixed permutation (--split-seed) of train_emb.npy puts --val-fraction of the rows aside as queries against the
rest as database; each (recipe, k) trains one CSR on the database rows with the flags' recipe (the paper's by
default) plus the named recipe's changes, and prints one JSON line: 1-NN top-1 (%), dead fraction of the
database codes (%), steps, training seconds; PCA and the full embedding on the same split come first. --text-metrics adds
the text evaluation's kNN accuracy (10 neighbours vote) and V-measure (k-means on the query rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.baselines import PCA  # noqa: E402
from csr.cli import add_train_args, configs_from_args, run  # noqa: E402
from csr.encode import dead_fraction, encode_array  # noqa: E402
from csr.io import load_embeddings, load_labels  # noqa: E402
from csr.model import CSR  # noqa: E402
from csr.sweep import evaluate  # noqa: E402
from csr.text_eval import View, knn_accuracy, v_measure  # noqa: E402
from csr.recipes import RECIPES, apply_recipe  # noqa: E402
from csr.train import TrainData, train  # noqa: E402


def val_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """(database x, y, query x, y): a fixed permutation's first `fraction` of rows are the queries."""
    perm = np.random.default_rng(seed).permutation(len(x))
    nq = int(round(fraction * len(x)))
    q, db = np.sort(perm[:nq]), np.sort(perm[nq:])
    return np.asarray(x[db], np.float32), y[db], np.asarray(x[q], np.float32), y[q]


def scores(db, q, ydb: np.ndarray, yq: np.ndarray, dims: int, text: bool) -> dict[str, float]:
    """1-NN top-1 (%), and with `text` the text protocol's kNN-10 accuracy and V-measure, of one representation."""
    out = {"top1": round(evaluate(db, q, ydb, yq)["top1"], 2)}
    if text:
        view = View("x", dims, db, q)
        out["knn10"] = round(knn_accuracy(view.neighbours(10), ydb, yq, 10), 2)
        out["v_measure"] = round(v_measure(view.features("b"), yq), 2)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb-dir", required=True, help="folder with train_emb.npy and train_labels.npy")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 64], help="k values to train")
    p.add_argument("--recipes", nargs="+", default=["paper", "recommended"], choices=list(RECIPES))
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train rows used as queries")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fixed permutation")
    p.add_argument("--runs", default="runs/recipe_val", help="where the models are written")
    p.add_argument("--text-metrics", action="store_true", help="also kNN-10 accuracy and V-measure (text protocol)")
    add_train_args(p)
    args = p.parse_args(argv)
    x = load_embeddings(Path(args.emb_dir) / "train_emb.npy")
    y = load_labels(Path(args.emb_dir) / "train_labels.npy", len(x))
    xdb, ydb, xq, yq = val_split(x, y, args.val_fraction, args.split_seed)
    pca = PCA(min(x.shape[1], 2048)).fit(xdb)
    rows = [{"method": "full", **scores(xdb, xq, ydb, yq, x.shape[1], args.text_metrics)}]
    rows += [{"method": f"pca{k}", **scores(pca.transform(xdb, k), pca.transform(xq, k), ydb, yq, k, args.text_metrics)}
             for k in args.ks]
    for r in rows:
        print(json.dumps(r), flush=True)
    for k in args.ks:
        for recipe in args.recipes:
            args.topk = k
            mcfg, tcfg = apply_recipe(recipe, *configs_from_args(args, x.shape[1]), xdb, args.hidden_size is not None)
            model = CSR.seeded(mcfg, tcfg.seed)
            t0 = time.time()
            summary = train(model, TrainData(xdb, ydb if tcfg.cl == "label" else None), tcfg,
                            Path(args.runs) / f"{recipe}_k{k}", progress=False)
            db = encode_array(model, xdb, k, progress=False, labels=ydb)
            q = encode_array(model, xq, k, progress=False, labels=yq)
            row = {"recipe": recipe, "k": k, **scores(db, q, ydb, yq, k, args.text_metrics),
                   "dead": round(100 * dead_fraction(db), 1), "steps": summary["steps"],
                   "train_s": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    run(main)
