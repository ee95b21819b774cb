"""Embedding extraction: images -> frozen backbone -> `{split}_emb.npy` (+ labels, sidecar), or shards.

Rows are written in dataset order straight into a memory-mapped `.npy` (`csr.io.NpyWriter`), so RAM does not
grow with N. With `shard_size`, split `s` covers dataset indices `[s * shard_size, (s + 1) * shard_size)` and
is written to `{out}/{split}_shards/emb_{s:05d}.npy` + `labels_{s:05d}.npy` + `shard_{s:05d}.json`; the
embeddings file is renamed into place last, so its presence marks a finished shard and an interrupted run
resumes from the first unfinished one. `stack_shards` merges them into `{split}_emb.npy`.

Batches are always consecutive runs of `batch_size` entries of the indices still to do (a fixed grid when
`shard_size` is a multiple of `batch_size`), so a resumed run computes every row exactly as a fresh one.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from csr.backbones import Backbone
from csr.distributed import barrier
from csr.io import (CSRError, NpyWriter, atomic_path, atomic_save_npy, atomic_write_json, check_file, check_output,
                    info, labels_path_for, load_embeddings, load_labels, read_json, write_sidecar)

SHARD_RE = re.compile(r"^emb_(\d{5,})\.npy$")
MANIFEST = "manifest.json"
PROVENANCE = ("file", "command", "code_version")


@dataclass
class ExtractConfig:
    batch_size: int = 256
    workers: int = 2
    device: str = "cpu"
    amp: bool = True  # autocast (float16) on CUDA; ignored on CPU
    dtype: str = "float32"  # of the written embeddings
    shard_size: int = 0  # 0: one file per split
    overwrite: bool = False
    strict: bool = False  # fail on the first unreadable image instead of skipping it
    progress: bool = True
    rank: int = 0  # under torchrun: this process takes shards rank, rank + world_size, ... (needs shard_size)
    world_size: int = 1


@dataclass
class SplitResult:
    split: str
    emb_path: Path  # final file, or the shard directory
    rows: int
    dim: int
    skipped: list[str]
    seconds: float
    computed: int  # images run through the backbone in this call (resumed shards excluded)
    sharded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- one output block

class _Block:
    """Rows `[start, end)` of the dataset written into `emb_path`/`labels_path`; skipped rows are dropped."""

    def __init__(self, emb_path: Path, labels_path: Path, start: int, end: int, dim: int, dtype: np.dtype,
                 on_done: Callable[["_Block"], None]):
        self.emb_path, self.labels_path = emb_path, labels_path
        self.start, self.end = start, end
        self.writer = NpyWriter(emb_path, (end - start, dim), dtype)
        self.labels = np.full(end - start, -1, dtype=np.int64)
        self.valid = np.zeros(end - start, dtype=bool)
        self.seen = 0
        self.skipped: list[str] = []
        self.on_done = on_done

    def put(self, idx: np.ndarray, emb: np.ndarray, labels: np.ndarray) -> None:
        rel = idx - self.start
        lo, hi = int(rel[0]), int(rel[-1]) + 1
        if hi - lo == len(rel):  # contiguous (always, unless images were skipped)
            self.writer.write(lo, emb)
        else:
            self.writer.arr[rel] = emb
        self.labels[rel] = labels
        self.valid[rel] = True
        self.seen += len(rel)

    def skip(self, messages: list[str]) -> None:
        self.skipped += messages
        self.seen += len(messages)

    @property
    def done(self) -> bool:
        return self.seen == self.end - self.start

    def close(self) -> int:
        """Write labels, then the embeddings (renamed last). Returns the number of rows kept."""
        self.on_done(self)
        keep = int(self.valid.sum())
        atomic_save_npy(self.labels_path, self.labels[self.valid])
        if keep == len(self.valid):
            self.writer.close()
            return keep
        arr = self.writer.arr
        if keep == 0:  # every image of the block was unreadable
            atomic_save_npy(self.emb_path, np.zeros((0, arr.shape[1]), arr.dtype))
            self.writer.abort()
            return 0
        with atomic_path(self.emb_path) as tmp:  # drop skipped rows, chunk by chunk
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=arr.dtype, shape=(keep, arr.shape[1]))
            pos = 0
            for s in range(0, len(self.valid), 65536):
                rows = np.asarray(arr[s:s + 65536])[self.valid[s:s + 65536]]
                out[pos:pos + len(rows)] = rows
                pos += len(rows)
            out.flush()
            del out
        self.writer.abort()
        return keep

    def abort(self) -> None:
        self.writer.abort()


# ----------------------------------------------------------------------------- the loop

def _features_fn(backbone: Backbone, device: torch.device, amp: bool):
    use_amp = amp and device.type == "cuda"

    def run(images: torch.Tensor) -> np.ndarray:
        x = backbone.preprocess.normalize(images.to(device, non_blocking=True))
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            f = backbone.features(x)
        return f.float().cpu().numpy()

    return run


def run_blocks(source, backbone: Backbone, blocks: list[tuple[int, int, Callable[[], _Block]]],
               cfg: ExtractConfig, desc: str) -> tuple[int, list[str], float]:
    """Embed the dataset ranges of `blocks` (sorted, disjoint) in order; returns (images done, skipped, s)."""
    from csr.progress import progress_bar
    device = torch.device(cfg.device)
    features = _features_fn(backbone, device, cfg.amp)
    todo = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e, _ in blocks]) if blocks else \
        np.zeros(0, np.int64)
    skipped: list[str] = []
    t0 = time.perf_counter()
    if len(todo) == 0:
        return 0, skipped, 0.0
    bar = progress_bar(total=len(todo), unit="img", desc=desc, disable=not cfg.progress, dynamic_ncols=True,
                       smoothing=0.05)
    queue = list(blocks)
    current: _Block | None = None

    def block_for(i: int) -> _Block:
        nonlocal current
        while current is None or i >= current.end:
            s, e, make = queue.pop(0)
            if i < s:
                raise RuntimeError(f"index {i} outside the planned blocks")
            current = make()
        return current

    try:
        for batch in source.batches(todo, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda"):
            if batch.failures:
                if cfg.strict:
                    raise CSRError(batch.failures[0][1] + " (pass --strict False to skip unreadable images)")
                for i, msg in batch.failures:
                    bar.write(f"warning: skipping {msg}", file=sys.stderr)
            emb = features(batch.images) if len(batch.indices) else None
            labels = batch.labels.numpy()
            # Route rows and failures to blocks in dataset order.
            events = sorted([(int(i), k, None) for k, i in enumerate(batch.indices)] +
                            [(i, -1, m) for i, m in batch.failures])
            run_start = 0
            while run_start < len(events):
                blk = block_for(events[run_start][0])
                run_end = run_start
                while run_end < len(events) and events[run_end][0] < blk.end:
                    run_end += 1
                rows = [k for _, k, _ in events[run_start:run_end] if k >= 0]
                msgs = [m for _, k, m in events[run_start:run_end] if k < 0]
                if rows:
                    blk.put(batch.indices[rows], emb[rows].astype(blk.writer.arr.dtype), labels[rows])
                if msgs:
                    blk.skip(msgs)
                    skipped += msgs
                if blk.done:
                    blk.close()
                    current = None
                run_start = run_end
            bar.update(len(events))
            if skipped:
                bar.set_postfix(skipped=len(skipped))
    except BaseException:
        if current is not None:
            current.abort()
        raise
    finally:
        bar.close()
    if current is not None or queue:
        raise RuntimeError("extraction ended before all planned images were seen")
    return len(todo), skipped, time.perf_counter() - t0


# ----------------------------------------------------------------------------- splits

def _settings(source, backbone: Backbone, cfg: ExtractConfig) -> dict[str, Any]:
    return {"source": source.describe(), **backbone.describe(), "dtype": cfg.dtype}


def extract_split(source, backbone: Backbone, out_dir: str | Path, split: str, cfg: ExtractConfig) -> SplitResult:
    """Embed every image of `source` into `{out_dir}/{split}_emb.npy` (or its shard directory)."""
    out_dir = Path(out_dir)
    dtype = np.dtype(cfg.dtype)
    n, dim = len(source), backbone.dim
    settings = _settings(source, backbone, cfg)
    if cfg.shard_size:
        return _extract_sharded(source, backbone, out_dir, split, cfg, settings)
    if cfg.world_size > 1:
        raise CSRError("extraction splits its work across processes by shards: pass --shard-size")
    emb_path = check_output(out_dir / f"{split}_emb.npy", cfg.overwrite)
    labels_path = labels_path_for(emb_path)
    holder: dict[str, Any] = {}

    def make() -> _Block:
        holder["block"] = _Block(emb_path, labels_path, 0, n, dim, dtype, lambda b: None)
        return holder["block"]

    done, skipped, secs = run_blocks(source, backbone, [(0, n, make)], cfg, split)
    rows = n - len(skipped)
    write_sidecar(emb_path, split=split, n=rows, d=dim, emb_dtype=str(dtype), skipped=len(skipped),
                  skipped_files=skipped[:100], labels_file=labels_path.name, images_per_s=done / max(secs, 1e-9),
                  **settings)
    return SplitResult(split, emb_path, rows, dim, skipped, secs, done)


def shard_dir_for(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}_shards"


def _extract_sharded(source, backbone: Backbone, out_dir: Path, split: str, cfg: ExtractConfig,
                     settings: dict[str, Any]) -> SplitResult:
    n, dim, size = len(source), backbone.dim, cfg.shard_size
    sdir = shard_dir_for(out_dir, split)
    n_shards = (n + size - 1) // size
    manifest = json.loads(json.dumps({"split": split, "n": n, "shard_size": size, "num_shards": n_shards,
                                      "d": dim, **settings}))  # as it reads back from disk
    mpath = sdir / MANIFEST
    if cfg.rank == 0:  # one process checks, clears and creates the shard directory; the others wait for it
        _prepare_shard_dir(sdir, mpath, manifest, cfg.overwrite)
    barrier()
    finished = [s for s in range(n_shards) if _shard_complete(sdir, s, min(size, n - s * size))]
    dtype = np.dtype(cfg.dtype)

    def maker(s: int) -> Callable[[], _Block]:
        start, end = s * size, min(n, (s + 1) * size)

        def record(b: _Block) -> None:
            atomic_write_json(sdir / f"shard_{s:05d}.json",
                              {"shard": s, "start": start, "end": end, "rows": int(b.valid.sum()),
                               "skipped": b.skipped})
        return lambda: _Block(sdir / f"emb_{s:05d}.npy", sdir / f"labels_{s:05d}.npy", start, end, dim, dtype,
                              record)

    mine = [s for s in range(n_shards) if s % cfg.world_size == cfg.rank and s not in finished]
    todo = [(s * size, min(n, (s + 1) * size), maker(s)) for s in mine]
    if finished and cfg.rank == 0:
        info(f"{split}: resuming, {len(finished)} of {n_shards} shards already in {sdir}")
    done, _, secs = run_blocks(source, backbone, todo, cfg, split)
    barrier()  # every rank's shards are on disk before anyone reads them all
    skipped = [m for s in range(n_shards) for m in _shard_info(sdir, s)["skipped"]]
    rows = sum(_shard_info(sdir, s)["rows"] for s in range(n_shards))
    return SplitResult(split, sdir, rows, dim, skipped, secs, done, sharded=True,
                       extra={"num_shards": n_shards, "resumed_shards": len(finished)})


def _prepare_shard_dir(sdir: Path, mpath: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    if mpath.exists():
        old = json.loads(mpath.read_text())
        same = {k: v for k, v in old.items() if k not in PROVENANCE} == manifest
        if overwrite or not same:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(manifest)
                                 if k not in PROVENANCE and old.get(k) != manifest.get(k))
                raise CSRError(f"{sdir}: shards were made with other settings ({', '.join(changed)}); "
                               "pass --overwrite to start again")
            shutil.rmtree(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    if not mpath.exists():
        write_sidecar(mpath.with_suffix(".npy"), **manifest)  # -> manifest.json with command + code version


def _shard_info(sdir: Path, s: int) -> dict[str, Any]:
    """A shard's record (`rows`, `skipped`); a corrupt one is an error naming it."""
    path = sdir / f"shard_{s:05d}.json"
    rec = read_json(path, "shard record")
    if not isinstance(rec, dict) or not isinstance(rec.get("rows"), int) or not isinstance(rec.get("skipped"), list):
        raise CSRError(f"{path}: not a shard record (needs 'rows' and 'skipped')")
    return rec


def _manifest(sdir: Path) -> dict[str, Any]:
    """The shard directory's manifest.json ({} when there is none); a corrupt one is an error naming it."""
    path = sdir / MANIFEST
    if not path.exists():
        return {}
    man = read_json(path, "shard manifest")
    if not isinstance(man, dict):
        raise CSRError(f"{path}: expected a JSON object, got a list")
    return man


def _shard_complete(sdir: Path, s: int, expected: int) -> bool:
    """A shard is finished when its embeddings file (renamed last) and its labels agree with its record."""
    emb, lab, info = sdir / f"emb_{s:05d}.npy", sdir / f"labels_{s:05d}.npy", sdir / f"shard_{s:05d}.json"
    if not (emb.exists() and lab.exists() and info.exists()):
        return False
    try:
        rows = _shard_info(sdir, s)["rows"]
        e = np.load(emb, mmap_mode="r")
        lb = np.load(lab, mmap_mode="r")
    except (ValueError, OSError, CSRError):
        return False
    return e.shape[0] == lb.shape[0] == rows and rows + len(_shard_info(sdir, s)["skipped"]) == expected


# ----------------------------------------------------------------------------- stacking

def list_shards(shard_dir: str | Path) -> list[tuple[int, Path, Path]]:
    """`(index, emb, labels)` of every shard in `shard_dir`, in index order; gaps and stray files are errors."""
    sdir = Path(shard_dir)
    if not sdir.is_dir():
        raise CSRError(f"{sdir}: shard directory not found")
    found = sorted((int(m.group(1)), sdir / f) for f in (p.name for p in sdir.iterdir())
                   if (m := SHARD_RE.match(f)))
    if not found:
        raise CSRError(f"{sdir}: no shard files emb_NNNNN.npy")
    idx = [i for i, _ in found]
    expected = _manifest(sdir).get("num_shards")
    want = list(range(expected if expected is not None else idx[-1] + 1))
    missing = sorted(set(want) - set(idx))
    if missing:
        raise CSRError(f"{sdir}: shards {missing[:10]} missing ({len(idx)} of {len(want)} present); "
                       "rerun the extraction to finish them")
    out = []
    for i, emb in found:
        lab = sdir / f"labels_{i:05d}.npy"
        if not lab.exists():
            raise CSRError(f"{lab}: labels shard missing for {emb.name}")
        out.append((i, emb, lab))
    return out


def _load_shard(path: Path) -> np.ndarray:
    """A shard's embeddings, memory-mapped; zero rows are allowed (all of its images were unreadable)."""
    check_file(path, "embedding")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CSRError(f"{path}: not a readable .npy embedding file ({e})") from None
    if arr.ndim == 2 and arr.shape[0] == 0 and arr.shape[1] > 0:
        return arr
    return load_embeddings(path, mmap=True)


def stack_shards(shard_dir: str | Path, out_path: str | Path, overwrite: bool = False, chunk: int = 65536
                 ) -> tuple[Path, int, int]:
    """Merge `emb_*.npy`/`labels_*.npy` shards into `out_path` + labels + sidecar (memory-mapped, atomic)."""
    lab_out = labels_path_for(out_path)
    out_path = check_output(out_path, overwrite, also=[lab_out], sidecar=True)
    shards = list_shards(shard_dir)
    arrays = []
    dim = dtype = None
    for i, emb, lab in shards:
        e = _load_shard(emb)
        lb = load_labels(lab, n=e.shape[0])
        if dim is None:
            dim, dtype = e.shape[1], e.dtype
        elif e.shape[1] != dim:
            raise CSRError(f"{emb}: {e.shape[1]} dims but earlier shards have {dim}")
        elif e.dtype != dtype:
            raise CSRError(f"{emb}: dtype {e.dtype} but earlier shards have {dtype}")
        arrays.append((e, lb))
    sdir = Path(shard_dir)  # every record is read before anything is written
    meta = {k: v for k, v in _manifest(sdir).items() if k not in PROVENANCE + ("n", "d")}
    skipped = [m for i, _, _ in shards if (sdir / f"shard_{i:05d}.json").exists()
               for m in _shard_info(sdir, i)["skipped"]]
    n = sum(e.shape[0] for e, _ in arrays)
    with NpyWriter(out_path, (n, dim), dtype) as w:
        pos = 0
        for e, _ in arrays:
            for s in range(0, e.shape[0], chunk):
                w.write(pos + s, np.asarray(e[s:s + chunk]))
            pos += e.shape[0]
    atomic_save_npy(lab_out, np.concatenate([lb for _, lb in arrays]))
    write_sidecar(out_path, n=n, d=dim, emb_dtype=str(dtype), shards=len(shards), shard_dir=str(sdir.resolve()),
                  labels_file=lab_out.name, skipped=len(skipped), skipped_files=skipped[:100], **meta)
    return out_path, n, dim
