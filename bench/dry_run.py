"""ImageNet-scale dry run: synthetic ImageNet-shaped embeddings on disk, then the real stages, each measured.

The harness of bench/scale.py (a benchmark, not library code: it runs the stage scripts).

- `write_imagenet_like` writes `{split}_emb.npy` (float32 `[N, d]`, memory-mapped, block by block: RAM does not
  grow with N) and `{split}_labels.npy`: non-negative rows (post-ReLU, as pooled CNN features) with a large
  shared mean, 1000 class clusters in a low-dimensional subspace and isotropic noise (`SyntheticSpec`).
  Block b of rows always comes from the same seed, so the file does not depend on
  the block size used to write it.
- A `Stage` is either a stage script run in-process through its `main(argv)` (main_visual.py,
  inference/csr_inference.py, retrieval/faiss_nn.py, retrieval/compute_metrics.py: the code users run), a
  command (torchrun), or a function of this module (the baselines, which have no script of their own).
- `run_stage` runs one stage in a fresh interpreter (multiprocessing "spawn"), so its numbers are its own:
  wall time, CPU time (user + system of the stage process and its children), peak RSS and peak `RssAnon`
  (anonymous memory: what the process allocated itself, not the page cache of memory-mapped inputs).
  Peaks are sampled from /proc every `interval` seconds over the stage process and all its descendants (summed),
  plus the kernel's exact high-water mark `VmHWM` of the stage process; a spike shorter than the interval
  can be missed by the anonymous-memory sampler.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import resource
import runpy
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csr.io import NpyWriter, atomic_save_npy, atomic_write_json, write_sidecar
from csr.progress import progress_bar

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_DIM, IMAGENET_CLASSES = 1_281_167, 50_000, 2048, 1000
BLOCK = 16384  # rows per generated block (fixed: it defines the random streams)
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- memory readings

def proc_status(pid: int | str = "self") -> dict[str, int]:
    """`VmRSS`, `VmHWM`, `RssAnon`, `RssFile` of a process in bytes (0 when the process is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/<pid>/task/*/children)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return seen


class PeakMemory:
    """Context manager: samples the summed RSS and RssAnon of this process and its descendants every
    `interval` s in a thread; `peak_rss` also covers this process's exact `VmHWM`."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()

    def sample(self) -> None:
        rss = anon = 0
        for p in process_tree(os.getpid()):
            s = proc_status(p)
            rss += s["VmRSS"]
            anon += s["RssAnon"]
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.peak_rss = max(self.peak_rss, proc_status()["VmHWM"])


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


# ----------------------------------------------------------------------------- synthetic ImageNet-shaped data

@dataclass
class SyntheticSpec:
    """Shape and statistics of the synthetic embeddings (defaults: ImageNet-1k ResNet-50 features). Classes
    differ in a `latent_dim`-dimensional subspace spread over all coordinates (as in real features, where a
    few dozen principal directions carry the class information); `class_scale` sets how separable they are
    (0.6: 1-NN top-1 of the full 2048-d rows ~ 0.7 at 60 rows per class)."""
    n_train: int = IMAGENET_TRAIN
    n_val: int = IMAGENET_VAL
    dim: int = IMAGENET_DIM
    n_classes: int = IMAGENET_CLASSES
    latent_dim: int = 128
    class_scale: float = 0.6  # class centres in the latent space, relative to the within-class spread (1)
    latent_gain: float = 0.35  # scale of the latent-to-feature map
    noise_scale: float = 0.3  # isotropic per-coordinate noise
    seed: int = 0


@dataclass
class SyntheticModel:
    mean: np.ndarray  # [dim] shared positive mean
    basis: np.ndarray  # [latent_dim, dim] latent-to-feature map
    centres: np.ndarray  # [n_classes, latent_dim]


def synthetic_model(spec: SyntheticSpec) -> SyntheticModel:
    """Shared mean (Gamma(2, 0.25): positive, mean 0.5), latent map and class centres, from `spec.seed`."""
    rng = np.random.default_rng([spec.seed, 0])
    mean = rng.gamma(2.0, 0.25, spec.dim).astype(np.float32)
    basis = (spec.latent_gain / np.sqrt(spec.latent_dim)) * rng.standard_normal((spec.latent_dim, spec.dim))
    centres = spec.class_scale * rng.standard_normal((spec.n_classes, spec.latent_dim))
    return SyntheticModel(mean, basis.astype(np.float32), centres.astype(np.float32))


def synthetic_block(spec: SyntheticSpec, model: SyntheticModel, split_id: int, b: int, rows: int):
    """Rows of block `b` of a split: `(x [rows, dim] float32 >= 0, labels [rows] int64)`:
    `x = max(0, mean + (centre_y + u) @ basis + noise_scale * e)`, u and e standard normal."""
    rng = np.random.default_rng([spec.seed, split_id, b])
    y = rng.integers(0, spec.n_classes, rows)
    z = rng.standard_normal((rows, spec.latent_dim), dtype=np.float32)
    z += model.centres[y]
    x = rng.standard_normal((rows, spec.dim), dtype=np.float32)
    x *= np.float32(spec.noise_scale)
    x += model.mean
    x += z @ model.basis
    np.maximum(x, 0, out=x)
    return x, y


def write_imagenet_like(out_dir: str | Path, spec: SyntheticSpec, progress: bool = True) -> dict[str, Any]:
    """Write `train_emb.npy`/`val_emb.npy` (+ labels, sidecars) into `out_dir`; returns sizes and rate."""
    out_dir = Path(out_dir)
    model = synthetic_model(spec)
    info: dict[str, Any] = {}
    t0 = time.time()
    for split_id, (split, n) in enumerate((("train", spec.n_train), ("val", spec.n_val)), start=1):
        labels = np.empty(n, dtype=np.int64)
        path = out_dir / f"{split}_emb.npy"
        with NpyWriter(path, (n, spec.dim), np.float32) as w:
            for b in progress_bar(range(-(-n // BLOCK)), desc=f"write {split}", unit="block", disable=not progress):
                x, y = synthetic_block(spec, model, split_id, b, min(BLOCK, n - b * BLOCK))
                w.write(b * BLOCK, x)
                labels[b * BLOCK:b * BLOCK + len(y)] = y
        atomic_save_npy(out_dir / f"{split}_labels.npy", labels)
        write_sidecar(path, split=split, n=n, d=spec.dim, emb_dtype="float32", synthetic=spec.__dict__,
                      labels_file=f"{split}_labels.npy")
        info[f"{split}_gb"] = round(n * spec.dim * 4 / 1e9, 2)
    info["write_gb_per_s"] = round((info["train_gb"] + info["val_gb"]) / max(time.time() - t0, 1e-9), 3)
    return info


# ----------------------------------------------------------------------------- stages

@dataclass
class Stage:
    """One measured step: scripts' `main(argv)` (`calls`, run in order in one process), a command, and/or a
    function (`function`: a name in this module or "module:name", called with `kwargs`, returning numbers to
    report)."""
    name: str
    calls: list[tuple[str, list[str]]] = field(default_factory=list)  # (script path relative to ROOT, argv)
    command: list[str] | None = None
    function: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    keep: tuple[str, ...] = ()  # numbers of the scripts' return values to report


def run_script(script: str, argv: list[str]) -> Any:
    """Run a stage script's `main(argv)` in this process, as `python script argv` would (minus argparse exit)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = runpy.run_path(str(ROOT / script), run_name="__scale__")
    return module["main"](argv)


def _stage_body(stage: Stage) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for script, argv in stage.calls:
        res = run_script(script, argv)
        if isinstance(res, dict):
            extra.update({k: v for k, v in res.items() if k in stage.keep})
    if stage.command:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(stage.command, cwd=ROOT, check=True, env=env)
    if stage.function:
        module, _, name = stage.function.rpartition(":")
        fn = getattr(importlib.import_module(module), name) if module else globals()[name]
        extra.update(fn(**stage.kwargs) or {})
    return extra


def _stage_child(stage: Stage, result_path: str) -> None:
    """Body of the fresh stage process: measure, run, write the result JSON."""
    cpu0, t0 = cpu_seconds(), time.time()
    with PeakMemory() as mem:
        extra = _stage_body(stage)
    atomic_write_json(result_path, {"stage": stage.name, "wall_s": time.time() - t0, "cpu_s": cpu_seconds() - cpu0,
                                    "peak_rss_gb": mem.peak_rss / 1e9, "peak_anon_gb": mem.peak_anon / 1e9,
                                    "note": stage.note, **extra})


def run_stage(stage: Stage, result_path: str | Path) -> dict[str, Any]:
    """Run `stage` in a fresh interpreter; returns its measurements (raises if the stage failed)."""
    result_path = Path(result_path)
    if result_path.exists():
        result_path.unlink()
    proc = mp.get_context("spawn").Process(target=_stage_child, args=(stage, str(result_path)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_path.exists():
        raise RuntimeError(f"stage {stage.name} failed (exit code {proc.exitcode})")
    return json.loads(result_path.read_text())


# ----------------------------------------------------------------------------- baseline stages

def pca_stage(train: str, val: str, out_dir: str, dims: int, sample: int) -> dict[str, Any]:
    """Fit PCA on (a documented sample of) the train rows by streaming, write both splits projected to `dims`."""
    from csr.baselines import PCA
    from csr.io import load_embeddings
    x = load_embeddings(train, finite=False)
    t0 = time.time()
    pca = PCA(dims).fit(x, sample=sample)
    fit_s = time.time() - t0
    _write_projection(out_dir, {"train": (train, x), "val": (val, None)}, lambda a: pca.transform(a, dims))
    return {"fit_s": round(fit_s, 1), "fit_rows": min(sample, len(x)), "explained": round(float(pca.explained.sum()), 4)}


def mrl_stage(train: str, val: str, out_dir: str, dims: int, steps: int, batch_size: int) -> dict[str, Any]:
    """Train the supervised MRL adaptor for `steps` batches read from the memory map; project both splits."""
    from csr.baselines import MRLConfig, matryoshka_dims, mrl_transform, train_mrl
    from csr.io import labels_path_for, load_embeddings, load_labels
    x = load_embeddings(train, finite=False)
    y = load_labels(labels_path_for(train), len(x))
    cfg = MRLConfig(dims=tuple(sorted(set(matryoshka_dims(x.shape[1])) | {dims})), batch_size=batch_size)
    t0 = time.time()
    head = train_mrl(x, y, cfg, max_steps=steps)
    rate = steps * batch_size / max(time.time() - t0, 1e-9)
    _write_projection(out_dir, {"train": (train, x), "val": (val, None)}, lambda a: mrl_transform(head, a, dims))
    return {"samples_per_s": round(rate, 1),
            "projected_full_h": round(cfg.epochs * len(x) / rate / 3600, 2)}


def _write_projection(out_dir: str, splits: dict[str, tuple[str, np.ndarray | None]], project) -> None:
    """`project` each split (its open memory map, or the file opened now: one mapping per file) to
    OUT/{split}_emb.npy, with a link to its labels."""
    from csr.io import labels_path_for, load_embeddings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, (path, x) in splits.items():
        atomic_save_npy(out / f"{split}_emb.npy", project(x if x is not None else load_embeddings(path, finite=False)))
        link = out / f"{split}_labels.npy"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(labels_path_for(path).resolve())


def data_stage(out_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    return write_imagenet_like(out_dir, SyntheticSpec(**spec))


def training_stats(out_dir: str, n_rows: int, epochs: int = 10) -> dict[str, Any]:
    """Samples/s of a capped training run (from its log) and the projected time of `epochs` full epochs."""
    log = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    rate = log[-1]["samples_per_s"]
    return {"steps": log[-1]["step"], "samples_per_s": round(rate, 1),
            "projected_10ep_h": round(epochs * n_rows / rate / 3600, 2), "dead_fraction": log[-1]["dead_fraction"]}


# ----------------------------------------------------------------------------- the table

COLUMNS = ("stage", "wall_s", "cpu_s", "peak_rss_gb", "peak_anon_gb", "note")


def results_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of stage measurements (plus a total row of wall and CPU time)."""
    from csr.metrics import markdown_table
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in results]
    rows.append({"stage": "**total**", "wall_s": sum(r["wall_s"] for r in results),
                 "cpu_s": sum(r["cpu_s"] for r in results),
                 "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
                 "peak_anon_gb": max(r["peak_anon_gb"] for r in results), "note": "max over stages"})
    return markdown_table(rows, list(COLUMNS))


def metrics_stage(neighbours: dict[str, str]) -> dict[str, Any]:
    """compute_metrics.py on every neighbour file present (stages may be skipped); returns
    `{top1_method: %, mAP@10_method: %}`."""
    out: dict[str, Any] = {}
    for name, path in neighbours.items():
        if not Path(path).exists():
            continue
        m = run_script("retrieval/compute_metrics.py", ["--neighbors", path, "--ks", "10", "--overwrite"])
        out[f"top1_{name}"], out[f"mAP@10_{name}"] = round(m["top1"], 2), round(m["mAP@10"], 2)
    return out


def same_neighbours(a: str, b: str) -> dict[str, Any]:
    """Whether two neighbour files (and their scores) are identical, bit for bit."""
    same = all(np.array_equal(np.load(p), np.load(q)) for p, q in
               ((a, b), (a.replace(".npy", "_scores.npy"), b.replace(".npy", "_scores.npy"))))
    return {"identical_to_one_process": bool(same)}


@dataclass
class DryRun:
    """What `bench/scale.py` runs (defaults: the paper's ImageNet-1k setting, training capped)."""
    work: str
    rows: int = IMAGENET_TRAIN
    val_rows: int = IMAGENET_VAL
    ks: tuple[int, ...] = (8, 32)
    hidden: int = 8192
    train_steps: int = 20  # optimiser steps of batch 4096 per model (10 epochs would be ~3,100)
    ddp_procs: int = 2  # torchrun processes for the distributed training and kNN stages (0 = skip them)
    ddp_steps: int = 4
    baseline_dims: int = 32
    pca_sample: int = 200000  # PCA's covariance is estimated on this many train rows (csr.baselines.PCA)
    mrl_steps: int = 200
    mrl_batch: int = 1024
    K: int = 10

    def torchrun(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ddp_procs}",
                *argv]

    def stages(self) -> list[Stage]:
        w = Path(self.work)
        emb = w / "emb"
        train, val = str(emb / "train_emb.npy"), str(emb / "val_emb.npy")
        spec = SyntheticSpec(n_train=self.rows, n_val=self.val_rows).__dict__
        st = [Stage("data", function="data_stage", kwargs=dict(out_dir=str(emb), spec=spec),
                    note=f"write {self.rows:,} + {self.val_rows:,} rows x {IMAGENET_DIM}")]
        nn: dict[str, str] = {}
        model = ["--hidden-size", str(self.hidden), "--overwrite", "True"]
        for k in self.ks:
            ck = w / f"csr_k{k}"
            st.append(Stage(f"train_k{k}", [("main_visual.py", ["--pretrained_emb", train, "--topk", str(k), *model,
                                                                "--max-steps", str(self.train_steps), "--out", str(ck)])],
                            function="training_stats", kwargs=dict(out_dir=str(ck), n_rows=self.rows),
                            note=f"{self.train_steps} steps of 4096, hidden {self.hidden}"))
        if self.ddp_procs > 1:
            ck = w / "csr_ddp"
            st.append(Stage(f"train_ddp{self.ddp_procs}_k{self.ks[0]}", command=self.torchrun(
                "main_visual.py", "--pretrained_emb", train, "--topk", str(self.ks[0]), *model, "--use_ddp", "True",
                "--max-steps", str(self.ddp_steps), "--out", str(ck)),
                function="training_stats", kwargs=dict(out_dir=str(ck), n_rows=self.rows),
                note=f"torchrun, {self.ddp_procs} gloo processes, {self.ddp_steps} steps"))
        for k in self.ks:
            codes = w / f"codes_k{k}"
            st.append(Stage(f"encode_k{k}", [("inference/csr_inference.py", [
                "--train_emb_path", train, "--eval_emb_path", val, "--csr_ckpt", str(w / f"csr_k{k}" / "csr.pt"),
                "--out", str(codes), "--overwrite", "True"])], note="all train + val rows"))
            nn[f"csr_k{k}"] = str(w / f"nn_csr_k{k}.npy")
            st.append(Stage(f"knn_k{k}", [("retrieval/faiss_nn.py", [
                "--database", str(codes / "train_codes.npz"), "--queries", str(codes / "val_codes.npz"),
                "-K", str(self.K), "--out", nn[f"csr_k{k}"], "--overwrite", "True"])],
                note=f"exact top-{self.K}, sparse engine", keep=("seconds",)))
        if self.ddp_procs > 1:
            k = self.ks[0]
            codes, out = w / f"codes_k{k}", str(w / f"nn_ddp_csr_k{k}.npy")
            st.append(Stage(f"knn_ddp{self.ddp_procs}_k{k}", command=self.torchrun(
                "retrieval/faiss_nn.py", "--database", str(codes / "train_codes.npz"),
                "--queries", str(codes / "val_codes.npz"), "-K", str(self.K), "--out", out, "--overwrite", "True",
                "--use_ddp", "True"), function="same_neighbours", kwargs=dict(a=nn[f"csr_k{k}"], b=out),
                note=f"database split over {self.ddp_procs} gloo processes"))
        d = self.baseline_dims
        st.append(Stage("pca", function="pca_stage", kwargs=dict(
            train=train, val=val, out_dir=str(w / f"pca{d}"), dims=d, sample=self.pca_sample),
            note=f"streaming fit on {min(self.pca_sample, self.rows):,} rows, project to {d}"))
        st.append(Stage("mrl", function="mrl_stage", kwargs=dict(
            train=train, val=val, out_dir=str(w / f"mrl{d}"), dims=d, steps=self.mrl_steps, batch_size=self.mrl_batch),
            note=f"{self.mrl_steps} steps of {self.mrl_batch} from the memmap, project to {d}"))
        for name, db, q, dims in ((f"trunc{d}", train, val, ["--dims", str(d)]),
                                  (f"pca{d}", str(w / f"pca{d}" / "train_emb.npy"), str(w / f"pca{d}" / "val_emb.npy"), []),
                                  (f"mrl{d}", str(w / f"mrl{d}" / "train_emb.npy"), str(w / f"mrl{d}" / "val_emb.npy"), [])):
            nn[name] = str(w / f"nn_{name}.npy")
            st.append(Stage(f"knn_{name}", [("retrieval/faiss_nn.py", [
                "--database", db, "--queries", q, "--backend", "faiss", *dims, "-K", str(self.K),
                "--out", nn[name], "--overwrite", "True"])], note=f"exact top-{self.K}, FAISS flat",
                keep=("seconds",)))
        st.append(Stage("metrics", function="metrics_stage", kwargs=dict(neighbours=nn), note="top-1, mAP@10"))
        return st
