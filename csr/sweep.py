"""The Table-4 experiment: 1-NN top-1 (and mAP@10) against active dimensions, CSR vs baselines.

Every (method, dims) result is a small JSON `<out>/parts/{key}.{digest}.json`, the digest covering everything
it depends on; a re-run reuses a part only when that digest matches (or recomputes all with `force`). The final table,
JSON and plot are rebuilt from the parts each time.
"""
from __future__ import annotations

import hashlib
import json
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from csr.baselines import PCA, MRLConfig, matryoshka_dims, mrl_transform, train_mrl, truncate
from csr.codes import SparseCodes
from csr.distributed import Runtime, broadcast_object
from csr.encode import dead_fraction, encode_array
from csr.io import CSRError, atomic_write_json, atomic_write_text, code_version, info
from csr.knn import search
from csr.metrics import markdown_table, retrieval_metrics
from csr.model import CSR, CSRConfig
from csr.provenance import code_digest, digest, machine
from csr.recipes import variant_configs, variant_row
from csr.text_eval import View, knn_accuracy, v_measure
from csr.train import AMP_DEVICE_TYPES, TrainConfig, TrainData, train

METHOD_NAMES = {"full": "full-dim", "trunc": "truncation", "pca": "PCA", "mrl": "MRL adaptor (labels)",
                "mrl_unsup": "MRL adaptor (no labels)", "csr": "CSR", "csr_rec": "CSR (recommended recipe)",
                "csr_rec_label": "CSR (recommended recipe + labels)", "csr_rec_v1": "CSR (recommended-v1 recipe)",
                "csr_rec_v1_label": "CSR (recommended-v1 recipe + labels)", "csr_one": "CSR (one model, k varied at inference)"}
STYLES = {"csr": "o-", "csr_rec": "P-", "csr_rec_label": "P--", "csr_rec_v1": "D-", "csr_rec_v1_label": "D--", "csr_one": "o--", "mrl": "s-", "mrl_unsup": "s--", "pca": "^-", "trunc": "v-"}  # table rows


def evaluate(db, queries, db_labels: np.ndarray, q_labels: np.ndarray, K: int = 10,
             text: bool = False) -> dict[str, float]:
    """Exact cosine kNN (sparse engine for codes, FAISS for dense) -> 1-NN top-1 and mAP@K, in %; with `text` also
    the text protocol's kNN-K classification accuracy and V-measure of k-means on the query rows (csr.text_eval)."""
    idx, _ = search(queries, db, K, backend="sparse" if isinstance(db, SparseCodes) else "faiss", progress=False)
    m = retrieval_metrics(idx, db_labels, q_labels, (K,))
    out = {"top1": m["top1"], f"mAP@{K}": m[f"mAP@{K}"]}
    if text:
        out[f"knn{K}_acc"] = knn_accuracy(idx, db_labels, q_labels, K)
        out["v_measure"] = v_measure(View("x", 0, db, queries).features("b"), q_labels)
    return out


def array_identity(*arrays: np.ndarray | None) -> str:
    """Content hash of in-memory arrays (used when a sweep is not given its files' identities)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(f"{a.shape}{a.dtype}".encode())
        for s in range(0, len(a), 65536):
            h.update(np.ascontiguousarray(a[s:s + 65536]).tobytes())
    return h.hexdigest()[:16]


def files_id(train_emb: str | Path, eval_emb: str | Path) -> dict[str, Any]:
    """What a sweep's parts depend on in its input files: both embeddings and the labels beside them."""
    from csr.io import labels_path_for
    from csr.provenance import file_identity
    return {f: file_identity(p) for f, p in (("train_emb", train_emb), ("eval_emb", eval_emb),
                                             ("train_labels", labels_path_for(train_emb)),
                                             ("eval_labels", labels_path_for(eval_emb)))}


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two JSON-like objects."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_fields(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


class Sweep:
    """Runs and caches the parts of one sweep in `out`.

    Each part is keyed by a digest of everything that determines it: the data (`data_id`: the files' identity,
    or a content hash of the arrays), the method's configuration, the seed, the runtime that trains CSR and
    the library code (`csr.provenance.code_digest`). A cached part is reused only when its digest matches;
    otherwise it is recomputed and the changed inputs are printed. Under DDP every rank trains the CSR models
    together; rank 0 alone runs the baselines, evaluates and writes.
    """

    def __init__(self, out: str | Path, xtr, ytr, xte, yte, force: bool = False, progress: bool = True,
                 data_id: Any = None, rt: Runtime | None = None, text: bool = False):
        self.out = Path(out)
        self.text = text  # also kNN-10 accuracy and V-measure (text data)
        self.parts = self.out / "parts"
        self.xtr, self.ytr, self.xte, self.yte = xtr, ytr, xte, yte
        self.force, self.progress = force, progress
        self.rt = rt or Runtime()
        self.data_id = data_id if data_id is not None else array_identity(xtr, ytr, xte, yte)
        self.commit = code_version()  # the checkout the run started from (the tree may change while it runs)
        self._pca: PCA | None = None
        self._mrl: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.computed: list[str] = []

    def inputs(self, **config: Any) -> dict[str, Any]:
        """What a part depends on, besides its own configuration."""
        return {"data": self.data_id, "code": code_digest(), **config,
                **({"text_metrics": True} if self.text else {})}

    def evaluate(self, db, queries) -> dict[str, float]:
        return evaluate(db, queries, self.ytr, self.yte, text=self.text)

    def _decide(self, key: str, digest_now: str) -> tuple[bool, dict | None]:
        """(reuse?, the cached part or, if none matches, the latest other version of `key`) as rank 0 sees it;
        the decision is broadcast so that every rank takes the same branch."""
        found = None
        if self.rt.is_main:
            path = self.parts / f"{key}.{digest_now}.json"
            versions = [path] if path.exists() else sorted(self.parts.glob(f"{key}.*.json"),
                                                           key=lambda p: p.stat().st_mtime_ns)[-1:]
            for p in versions:
                try:
                    found = json.loads(p.read_text())
                except json.JSONDecodeError:
                    found = None
        reuse = bool(found is not None and not self.force and found.get("digest") == digest_now)
        if self.rt.distributed:
            reuse = broadcast_object(reuse)
        return reuse, found

    def part(self, key: str, inputs: dict[str, Any], fn: Callable[[], dict[str, Any]],
             all_ranks: bool = False) -> dict[str, Any]:
        """The result of part `key`: the cached JSON whose digest matches `inputs`, else `fn()` (then cached as
        `parts/{key}.{digest}.json`, beside the versions of other configurations, which stay reusable).

        `fn` runs on rank 0 only unless `all_ranks` (CSR training); other ranks get `{}`.
        """
        d = digest(inputs)
        reuse, old = self._decide(key, d)
        if reuse:
            self.reused.append(key)
            if not self.rt.is_main:
                return {}
            return {**old, "cached": True}
        if self.rt.is_main:
            why = "--force" if self.force and old and old.get("digest") == d else "no cached part" if old is None \
                else "changed: " + ", ".join(changed_fields(old.get("inputs"), inputs)[:6])
            info(f"  computing {key} ({why})")
        if not (all_ranks or self.rt.is_main):
            return {}
        t0 = time.time()
        res = fn()
        if not self.rt.is_main:
            return {}
        if not np.isfinite(res.get("top1", np.nan)):
            raise CSRError(f"sweep part {key}: top-1 is {res.get('top1')} (not cached); check the inputs")
        res.update(seconds=round(time.time() - t0, 2), key=key, digest=d, inputs=inputs)
        atomic_write_json(self.parts / f"{key}.{d}.json", res)
        self.computed.append(key)
        info(f"  {key}: top1 {res['top1']:.2f}  ({res['seconds']:.1f}s)")
        return res

    # ------------------------------------------------------------------ dense baselines
    def full(self) -> dict:
        return self.part("full", self.inputs(method="full"), lambda: {
            "method": "full", "dims": self.xtr.shape[1], **self.evaluate(self.xtr, self.xte)})

    def trunc(self, d: int) -> dict:
        return self.part(f"trunc_{d}", self.inputs(method="trunc", dims=d), lambda: {
            "method": "trunc", "dims": d, **self.evaluate(truncate(self.xtr, d), truncate(self.xte, d))})

    def pca(self, d: int) -> dict:
        max_dim = min(self.xtr.shape[1], 2048)

        def run():
            if self._pca is None:
                self._pca = PCA(max_dim).fit(self.xtr)
            return {"method": "pca", "dims": d, **self.evaluate(self._pca.transform(self.xtr, d),
                                                                self._pca.transform(self.xte, d))}
        return self.part(f"pca_{d}", self.inputs(method="pca", dims=d, max_dim=max_dim), run)

    def mrl(self, d: int, cfg: MRLConfig, supervised: bool = True) -> dict:
        method = "mrl" if supervised else "mrl_unsup"
        dims = tuple(sorted(set(matryoshka_dims(self.xtr.shape[1])) | {d}))
        full_cfg = replace(cfg, dims=dims)

        def run():  # one head per (method, dims): a prefix's number never depends on which d was asked first
            if (method, dims) not in self._mrl:
                t0 = time.time()
                self._mrl[method, dims] = train_mrl(self.xtr, self.ytr if supervised else None, full_cfg,
                                                    progress=self.progress, device=str(self.rt.device))
                self.timings[f"{method}_train"] = self.timings.get(f"{method}_train", 0.0) + time.time() - t0
            head = self._mrl[method, dims]
            return {"method": method, "dims": d, "supervised": supervised, "config": asdict(cfg),
                    **self.evaluate(mrl_transform(head, self.xtr, d), mrl_transform(head, self.xte, d))}
        return self.part(f"{method}_{d}", self.inputs(method=method, dims=d, config=asdict(full_cfg)), run)

    # ------------------------------------------------------------------ CSR
    def runtime_id(self, train_cfg: TrainConfig) -> dict[str, Any]:
        """The part of the runtime that changes a trained model's numbers."""
        dev = self.rt.device.type
        return {"device": dev, "world_size": self.rt.world_size, "amp": bool(train_cfg.amp and dev in AMP_DEVICE_TYPES)}

    def csr_model(self, tag: str, model_cfg: CSRConfig, train_cfg: TrainConfig, model_digest: str) -> tuple[CSR, dict]:
        """Train (or load the finished) CSR model `tag` under out/models/tag; reused only if its digest matches."""
        from csr.checkpoint import load_model
        mdir = self.out / "models" / f"{tag}.{model_digest}"
        ckpt = mdir / "csr.pt"
        if ckpt.exists() and not self.force:
            model, saved = load_model(ckpt)
            if saved.get("sweep_digest") == model_digest and saved.get("complete"):
                return model, {"train_seconds": saved.get("train_seconds", 0.0), "steps": saved.get("step")}
        model = CSR.seeded(model_cfg, train_cfg.seed)  # never the global RNG: a part must not depend on what ran before
        t0 = time.time()
        labels = self.ytr if train_cfg.cl == "label" else None
        summary = train(model, TrainData(self.xtr, labels), train_cfg, mdir, rt=self.rt, progress=self.progress,
                        extra={"sweep_digest": model_digest})
        return model, {"train_seconds": time.time() - t0, "steps": summary["steps"]}

    def csr(self, k: int, model_cfg: CSRConfig, train_cfg: TrainConfig, tag: str | None = None,
            eval_k: int | None = None) -> dict:
        """CSR trained at k (`tag` defaults to csr_k{k}) and evaluated at `eval_k` (default k)."""
        tag = tag or f"csr_k{k}"
        ek = eval_k or k
        key = f"{tag}_at{ek}" if eval_k else tag
        mcfg = replace(model_cfg, topk=k)
        recipe = {k: v for k, v in asdict(train_cfg).items() if k != "amp"}  # the effective AMP is in runtime
        model_inputs = self.inputs(method="csr", model_config=mcfg.to_dict(), train_config=recipe,
                                   runtime=self.runtime_id(train_cfg))

        def run():
            model, info = self.csr_model(tag, mcfg, train_cfg, digest(model_inputs))
            if not self.rt.is_main:
                return {}
            t0 = time.time()
            db = encode_array(model, self.xtr, ek, progress=False, labels=self.ytr, device=self.rt.device)
            q = encode_array(model, self.xte, ek, progress=False, labels=self.yte, device=self.rt.device)
            t_enc = time.time() - t0
            t0 = time.time()
            res = self.evaluate(db, q)
            return {"method": "csr", "dims": ek, "trained_k": k, "tag": tag, **res,
                    "dead_fraction": dead_fraction(db), "train_seconds": info["train_seconds"],
                    "encode_seconds": t_enc, "knn_seconds": time.time() - t0, "steps": info["steps"],
                    "model_config": model.cfg.to_dict(), "train_config": asdict(train_cfg)}
        return self.part(key, {**model_inputs, "eval_k": ek}, run, all_ranks=True)

    def cell(self, row: str, k: int, model_cfg: CSRConfig, train_cfg: TrainConfig, mrl_cfg: MRLConfig,
             hidden_fixed: bool = False) -> dict:
        """The result of one (row, k) cell: a baseline by name (full, trunc, pca, mrl, mrl_unsup), `csr` (the flags'
        configs) or a CSR variant (`recommended`, `cl=none`, `recommended,encoder_init=pca`: csr.recipes' syntax)."""
        if row == "full":
            return self.full()
        if row == "trunc":
            return self.trunc(k)
        if row == "pca":
            return self.pca(k)
        if row in ("mrl", "mrl_unsup"):
            return self.mrl(k, mrl_cfg, supervised=row == "mrl")
        if row == "csr":
            return self.csr(k, model_cfg, train_cfg)
        mcfg, tcfg = variant_configs(row, replace(model_cfg, topk=k), train_cfg, self.xtr, hidden_fixed)
        key = variant_row(row)
        return {**self.csr(k, mcfg, tcfg, tag=f"{key}_k{k}"), "row": key, "spec": row}

    def summary(self) -> str:
        return (f"reused {len(self.reused)} cached parts" + (f" ({', '.join(self.reused)})" if self.reused else "")
                + f"; computed {len(self.computed)}" + (f" ({', '.join(self.computed)})" if self.computed else ""))


@dataclass
class Plan:
    """What a sweep runs: `methods` at every k (baselines, `csr` = the flags' recipe, `csr_one` = one model trained at
    `one_model_k` and encoded at every k), CSR `variants` at every k, and one-change `ablations` at `ablation_k`
    (variants in csr.recipes' syntax; a variant whose configs equal a row's at that k reuses the row's model)."""
    ks: list[int]
    methods: list[str]
    variants: list[str] = field(default_factory=list)
    ablation_k: int = 0
    ablations: list[str] = field(default_factory=list)
    one_model_k: int = 0
    mrl: MRLConfig = field(default_factory=MRLConfig)
    hidden_fixed: bool = False

    def check(self, model_cfg: CSRConfig, train_cfg: TrainConfig, x: np.ndarray) -> None:
        """Every variant's configs are valid at every k where it runs (a bad spec fails before any part runs)."""
        for v in self.variants:
            for k in self.ks:
                variant_configs(v, replace(model_cfg, topk=k), train_cfg, x, self.hidden_fixed, "--recipes")
        for v in self.ablations if self.ablation_k else []:
            variant_configs(v, replace(model_cfg, topk=self.ablation_k), train_cfg, x, self.hidden_fixed)


def run_plan(sw: Sweep, plan: Plan, model_cfg: CSRConfig, train_cfg: TrainConfig) -> tuple[list, list, dict]:
    """(parts, ablation parts, compute seconds per stage as each part recorded it) of every cell of `plan`, in order
    (under DDP all ranks step through it together)."""
    parts: list[dict] = []
    ablation: list[dict] = []
    seconds: dict[str, float] = {}

    def timed(stage: str, r: dict) -> dict:
        seconds[stage] = seconds.get(stage, 0.0) + float(r.get("seconds", 0.0))
        return r

    def cell(row: str, k: int) -> dict:
        return sw.cell(row, k, model_cfg, train_cfg, plan.mrl, plan.hidden_fixed)

    if "full" in plan.methods:
        parts.append(timed("full", cell("full", 0)))
    for k in plan.ks:
        for m in ("trunc", "pca", "mrl", "mrl_unsup", "csr"):
            if m in plan.methods:
                parts.append(timed(m, cell(m, k)))
        for v in plan.variants:
            parts.append(timed("csr", cell(v, k)))
        if "csr_one" in plan.methods and plan.one_model_k:
            r = sw.csr(plan.one_model_k, model_cfg, train_cfg, eval_k=k)
            parts.append(timed("csr_one", {**r, "row": "csr_one"}))
    if plan.ablation_k:
        k = plan.ablation_k
        at_k = replace(model_cfg, topk=k)  # a recipe may size the model by k
        trained = [((at_k, train_cfg), f"csr_k{k}")] + [
            (variant_configs(v, at_k, train_cfg, sw.xtr, plan.hidden_fixed), f"{variant_row(v)}_k{k}")
            for v in plan.variants]
        for v in plan.ablations:
            mcfg, tcfg = variant_configs(v, at_k, train_cfg, sw.xtr, plan.hidden_fixed)
            tag = f"ablation_k{k}_" + variant_row(v).removeprefix("csr_")
            tag = next((row_tag for configs, row_tag in trained if configs == (mcfg, tcfg)), tag)
            ablation.append({**timed("ablation", sw.csr(k, mcfg, tcfg, tag=tag)), "variant": v})
    return parts, ablation, seconds


# ---------------------------------------------------------------------- reporting

METRICS = {"top1": "1-NN top-1 accuracy (%)", "knn10_acc": "kNN-10 classification accuracy (%)",
           "v_measure": "V-measure of k-means on the queries (%)"}  # the last two: text data


def row_order(parts: list[dict]) -> list[str]:
    """Rows of a report: CSR rows first (the named ones in STYLES order, then other variants as they first
    appear), then the baselines in STYLES order."""
    present = list(dict.fromkeys(p.get("row", p["method"]) for p in parts if p["method"] != "full"))
    known = [m for m in STYLES if m in present]
    csr_rows = [m for m in known if m.startswith("csr")] + [m for m in present if m not in STYLES]
    return csr_rows + [m for m in known if not m.startswith("csr")]


def row_name(row: str, parts: list[dict]) -> str:
    spec = next((p.get("spec") for p in parts if p.get("row") == row and p.get("spec")), None)
    return METHOD_NAMES.get(row) or f"CSR ({spec or row})"


def results_table(parts: list[dict], dims: list[int], header: str, metrics: tuple[str, ...] | None = None) -> str:
    """One table per metric the parts hold (1-NN top-1; text also kNN-10 accuracy and V-measure; `metrics`: only
    these): rows = methods, columns = active dimensions; the 1-NN table also gives each CSR row's dead latents."""
    full = next((p for p in parts if p["method"] == "full"), None)
    lines = [header]
    for metric, title in METRICS.items():
        if not any(metric in p for p in parts) or (metrics is not None and metric not in metrics):
            continue
        rows = []
        for row in row_order(parts):
            by_d = {p["dims"]: p for p in parts if p.get("row", p["method"]) == row}
            rows.append({"method": row_name(row, parts),
                         **{str(d): f"{by_d[d][metric]:.2f}" if d in by_d else "–" for d in dims}})
            if metric == "top1" and row.startswith("csr") and row != "csr_one":
                rows.append({"method": f"{row_name(row, parts)} dead latents (%)",
                             **{str(d): f"{100 * by_d[d]['dead_fraction']:.1f}" if d in by_d else "–" for d in dims}})
        lines += ["", f"{title} against active dimensions (k for CSR, d for dense methods)", "",
                  markdown_table(rows, ["method"] + [str(d) for d in dims])]
        if full:
            lines += ["", f"Full {full['dims']}-d embedding: {full[metric]:.2f}"
                      + (f" (mAP@10 {full['mAP@10']:.2f})" if metric == "top1" else "")]
    return "\n".join(lines) + "\n"


def ablation_table(parts: list[dict]) -> str:
    rows = [{"variant": p["variant"], "k": p["dims"], "top-1": p["top1"], "mAP@10": p["mAP@10"],
             **({"V-measure": p["v_measure"]} if "v_measure" in p else {}),
             "dead (%)": 100 * p["dead_fraction"], "train s": p["train_seconds"]} for p in parts]
    return markdown_table(rows) + "\n"


def plot(parts: list[dict], path: str | Path, title: str) -> None:
    """Each metric the parts hold against active dimensions, one panel per metric (the report's figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in METRICS if any(m in p for p in parts)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.4), squeeze=False)
    full = next((p for p in parts if p["method"] == "full"), None)
    for ax, metric in zip(axes[0], metrics):
        for row in row_order(parts):
            pts = sorted((p["dims"], p[metric]) for p in parts if p.get("row", p["method"]) == row)
            if pts:
                ax.plot(*zip(*pts), STYLES.get(row, "x-"), label=row_name(row, parts))
        if full:
            ax.axhline(full[metric], color="gray", ls=":", label=f"full {full['dims']}-d")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("active dimensions")
        ax.set_ylabel(METRICS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 75 * len(metrics))), fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(".tmp_" + Path(path).name)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def sweep_report(sw: Sweep, plan: Plan, model_cfg: CSRConfig, train_cfg: TrainConfig, header: str,
                 meta: dict[str, Any], t_start: float) -> str:
    """Run every cell of `plan` and (rank 0) write the report under `sw.out`: table.md, results.json (with `meta`,
    compute seconds per stage and the wall time since `t_start`) and the plot; returns the table ("" elsewhere)."""
    parts, ablation, stage_seconds = run_plan(sw, plan, model_cfg, train_cfg)
    if not sw.rt.is_main:
        return ""
    meta = {**meta, "ks": plan.ks, "stage_seconds": stage_seconds, "wall_seconds": time.time() - t_start,
            "commit": sw.commit, "machine": machine()}
    table = write_report(sw.out, parts, ablation, plan.ks, header, meta)
    info("\n" + table)
    info("stage compute time (s, as each part recorded it): "
         + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
    info(sw.summary())
    return table


def report_text(parts: list[dict], ablation: list[dict], dims: list[int], header: str,
                metrics: tuple[str, ...] | None = None) -> str:
    """The report's text (table.md): the tables per metric (`metrics`: only these), then the one-change variants."""
    table = results_table(parts, dims, header, metrics)
    if ablation:
        table += (f"\nOne-change variants at k = {ablation[0]['dims']} (each a change to the flags' recipe):\n\n"
                  + ablation_table(ablation))
    return table


def write_report(out: Path, parts: list[dict], ablation: list[dict], dims: list[int], header: str,
                 meta: dict[str, Any]) -> str:
    """table.md, results.json (`meta` + parts + ablation) and accuracy_vs_dims.png under `out`."""
    table = report_text(parts, ablation, dims, header)
    atomic_write_json(out / "results.json", {**meta, "header": header, "parts": parts, "ablation": ablation})
    atomic_write_text(out / "table.md", table)
    plot(parts, out / "accuracy_vs_dims.png", header)
    return table
