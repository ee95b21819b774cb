"""The Table-4 experiment: 1-NN top-1 (and mAP@10) against active dimensions, CSR vs baselines.

Every (method, dims) result is a small JSON under `<out>/parts/`; a re-run skips the parts that exist
unless `force`. The final table, JSON and plot are rebuilt from the parts each time.
"""
from __future__ import annotations

import json
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from csr.baselines import PCA, MRLConfig, matryoshka_dims, mrl_transform, train_mrl, truncate
from csr.encode import dead_fraction, encode_array
from csr.io import SparseCodes, atomic_write_json, atomic_write_text
from csr.knn import search
from csr.metrics import markdown_table, retrieval_metrics
from csr.model import CSR, CSRConfig
from csr.train import TrainConfig, TrainData, train

METHOD_NAMES = {"full": "full-dim", "trunc": "truncation", "pca": "PCA", "mrl": "MRL adaptor (labels)",
                "mrl_unsup": "MRL adaptor (no labels)", "csr": "CSR", "csr_one": "CSR (one model, k varied at inference)"}
STYLES = {"csr": "o-", "csr_one": "o--", "mrl": "s-", "mrl_unsup": "s--", "pca": "^-", "trunc": "v-"}  # table rows


def evaluate(db, queries, db_labels: np.ndarray, q_labels: np.ndarray, K: int = 10) -> dict[str, float]:
    """Exact cosine kNN (sparse engine for codes, FAISS for dense) -> top-1 and mAP@K, in %."""
    idx, _ = search(queries, db, K, backend="sparse" if isinstance(db, SparseCodes) else "faiss", progress=False)
    m = retrieval_metrics(idx, db_labels, q_labels, (K,))
    return {"top1": m["top1"], f"mAP@{K}": m[f"mAP@{K}"]}


class Sweep:
    """Runs and caches the parts of one sweep in `out`."""

    def __init__(self, out: str | Path, xtr, ytr, xte, yte, force: bool = False, progress: bool = True):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.xtr, self.ytr, self.xte, self.yte = xtr, ytr, xte, yte
        self.force, self.progress = force, progress
        self._pca: PCA | None = None
        self._mrl: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    def part(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.parts / f"{key}.json"
        if path.exists() and not self.force:
            res = json.loads(path.read_text())
            res["cached"] = True
            return res
        t0 = time.time()
        res = fn()
        res["seconds"] = round(time.time() - t0, 2)
        res["key"] = key
        atomic_write_json(path, res)
        print(f"  {key}: top1 {res['top1']:.2f}  ({res['seconds']:.1f}s)", flush=True)
        return res

    # ------------------------------------------------------------------ dense baselines
    def full(self) -> dict:
        return self.part("full", lambda: {"method": "full", "dims": self.xtr.shape[1],
                                          **evaluate(self.xtr, self.xte, self.ytr, self.yte)})

    def trunc(self, d: int) -> dict:
        return self.part(f"trunc_{d}", lambda: {"method": "trunc", "dims": d, **evaluate(
            truncate(self.xtr, d), truncate(self.xte, d), self.ytr, self.yte)})

    def pca(self, d: int) -> dict:
        def run():
            if self._pca is None:
                self._pca = PCA(min(self.xtr.shape[1], 2048)).fit(self.xtr)
            return {"method": "pca", "dims": d, **evaluate(self._pca.transform(self.xtr, d),
                                                           self._pca.transform(self.xte, d), self.ytr, self.yte)}
        return self.part(f"pca_{d}", run)

    def mrl(self, d: int, cfg: MRLConfig, supervised: bool = True) -> dict:
        method = "mrl" if supervised else "mrl_unsup"

        def run():
            if method not in self._mrl:
                t0 = time.time()
                dims = tuple(sorted(set(matryoshka_dims(self.xtr.shape[1])) | {d}))
                self._mrl[method] = train_mrl(self.xtr, self.ytr if supervised else None, replace(cfg, dims=dims),
                                              progress=self.progress)
                self.timings[f"{method}_train"] = time.time() - t0
            head = self._mrl[method]
            if d not in head.dims:
                raise ValueError(f"MRL adaptor has no prefix {d}")
            return {"method": method, "dims": d, "supervised": supervised, "config": asdict(cfg),
                    **evaluate(mrl_transform(head, self.xtr, d), mrl_transform(head, self.xte, d),
                               self.ytr, self.yte)}
        return self.part(f"{method}_{d}", run)

    # ------------------------------------------------------------------ CSR
    def csr_model(self, tag: str, model_cfg: CSRConfig, train_cfg: TrainConfig) -> tuple[CSR, dict]:
        """Train (or load the finished) CSR model `tag` under out/models/tag."""
        from csr.checkpoint import load_model
        mdir = self.out / "models" / tag
        ckpt = mdir / "csr.pt"
        if ckpt.exists() and not self.force:
            model, saved = load_model(ckpt)
            return model, {"train_seconds": saved.get("train_seconds", 0.0), "steps": saved.get("step")}
        model = CSR(model_cfg)
        t0 = time.time()
        labels = self.ytr if train_cfg.cl == "label" else None
        summary = train(model, TrainData(self.xtr, labels), train_cfg, mdir, progress=self.progress)
        return model, {"train_seconds": time.time() - t0, "steps": summary["steps"]}

    def csr(self, k: int, model_cfg: CSRConfig, train_cfg: TrainConfig, tag: str | None = None,
            eval_k: int | None = None) -> dict:
        """CSR trained at k (`tag` defaults to csr_k{k}) and evaluated at `eval_k` (default k)."""
        tag = tag or f"csr_k{k}"
        ek = eval_k or k
        key = f"{tag}_at{ek}" if eval_k else tag

        def run():
            model, info = self.csr_model(tag, replace(model_cfg, topk=k), train_cfg)
            t0 = time.time()
            db = encode_array(model, self.xtr, ek, progress=False, labels=self.ytr)
            q = encode_array(model, self.xte, ek, progress=False, labels=self.yte)
            t_enc = time.time() - t0
            t0 = time.time()
            res = evaluate(db, q, self.ytr, self.yte)
            return {"method": "csr", "dims": ek, "trained_k": k, "tag": tag, **res,
                    "dead_fraction": dead_fraction(db), "train_seconds": info["train_seconds"],
                    "encode_seconds": t_enc, "knn_seconds": time.time() - t0, "steps": info["steps"],
                    "model_config": model.cfg.to_dict(), "train_config": asdict(train_cfg)}
        return self.part(key, run)


# ---------------------------------------------------------------------- reporting

def results_table(parts: list[dict], dims: list[int], header: str) -> str:
    """Rows = methods, columns = active dims (1-NN top-1 %), plus dead latents of CSR models."""
    rows = []
    full = next((p for p in parts if p["method"] == "full"), None)
    for method in STYLES:
        by_d = {p["dims"]: p for p in parts if p.get("row", p["method"]) == method}
        if not by_d:
            continue
        row = {"method": METHOD_NAMES[method]}
        for d in dims:
            row[str(d)] = f"{by_d[d]['top1']:.2f}" if d in by_d else "–"
        rows.append(row)
        if method == "csr":
            rows.append({"method": "CSR dead latents (%)",
                         **{str(d): f"{100 * by_d[d]['dead_fraction']:.1f}" if d in by_d else "–" for d in dims}})
    table = markdown_table(rows, ["method"] + [str(d) for d in dims])
    lines = [header, "", "1-NN top-1 accuracy (%) against active dimensions (k for CSR, d for dense methods)", "",
             table]
    if full:
        lines += ["", f"Full {full['dims']}-d embedding: {full['top1']:.2f} (mAP@10 {full['mAP@10']:.2f})"]
    return "\n".join(lines) + "\n"


def ablation_table(parts: list[dict]) -> str:
    rows = [{"variant": p["variant"], "k": p["dims"], "top-1": p["top1"], "mAP@10": p["mAP@10"],
             "dead (%)": 100 * p["dead_fraction"], "train s": p["train_seconds"]} for p in parts]
    return markdown_table(rows) + "\n"


def plot(parts: list[dict], path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in STYLES.items():
        pts = sorted((p["dims"], p["top1"]) for p in parts if p.get("row", p["method"]) == method)
        if pts:
            ax.plot(*zip(*pts), style, label=METHOD_NAMES[method])
    full = next((p for p in parts if p["method"] == "full"), None)
    if full:
        ax.axhline(full["top1"], color="gray", ls=":", label=f"full {full['dims']}-d")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active dimensions")
    ax.set_ylabel("1-NN top-1 accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(".tmp_" + Path(path).name)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, parts: list[dict], ablation: list[dict], dims: list[int], header: str,
                 meta: dict[str, Any]) -> str:
    table = results_table(parts, dims, header)
    if ablation:
        table += "\nAblation at one k (contrastive term, reconstruction loss scale, dead-latent fixes):\n\n" + ablation_table(ablation)
    atomic_write_text(out / "table.md", table)
    atomic_write_json(out / "results.json", {**meta, "parts": parts, "ablation": ablation})
    plot(parts, out / "accuracy_vs_dims.png", header)
    return table
