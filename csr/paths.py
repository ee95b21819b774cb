"""Where the stages write, and find each other's files, when a command names no path.

The paper's commands name no paths after training (`python stack_emb.py`, `cd retrieval; python faiss_nn.py
--topk 8`, `python compute_metrics.py --topk 8`), so every default lies in one folder, RUNS = `<repository>/runs`
(or `$CSR_RUNS`), whatever the working directory:

    RUNS/emb/{split}_emb.npy or RUNS/emb/{split}_shards/   inference/pretrained_embeddings.py without --out
    RUNS/emb/{split}_emb.npy                               stack_emb.py without --shard_dir (every RUNS/emb/*_shards)
    RUNS/<embeddings stem>_k<k>/csr.pt                     main_visual.py without --out
    <checkpoint folder>/codes_k<k>/{split}_codes.npz       inference/csr_inference.py without --out
    RUNS/*/codes_k<k>/nn.npy (+ _scores, sidecar)          retrieval/faiss_nn.py --topk k without paths
    RUNS/*/codes_k<k>/nn_metrics.json                      retrieval/compute_metrics.py --topk k without paths

Explicit paths always win; a default that finds nothing, or more than one candidate, is a one-line error.
"""
from __future__ import annotations

import os
from pathlib import Path

from csr.io import CSRError

REPOSITORY = Path(__file__).resolve().parent.parent


def runs_dir() -> Path:
    """RUNS: `$CSR_RUNS` when set, else `<repository>/runs`."""
    return Path(os.environ.get("CSR_RUNS") or REPOSITORY / "runs")


def embeddings_dir() -> Path:
    """Where extraction writes by default (`{split}_emb.npy` or `{split}_shards/`)."""
    return runs_dir() / "emb"


def shard_dirs() -> list[Path]:
    """The shard folders extraction wrote by default (`RUNS/emb/*_shards`), sorted."""
    return sorted(p for p in embeddings_dir().glob("*_shards") if p.is_dir())


def training_dir(emb_path: str | os.PathLike, k: int) -> Path:
    """main_visual.py's default run folder: `RUNS/<embeddings stem>_k<k>`."""
    return runs_dir() / f"{Path(emb_path).stem}_k{k}"


def codes_dir(k: int) -> Path:
    """The one `RUNS/*/codes_k<k>` folder holding `train_codes.npz` and `val_codes.npz` (what csr_inference.py
    wrote by default beside a checkpoint trained at the default place)."""
    found = sorted(p.parent for p in runs_dir().glob(f"*/codes_k{k}/train_codes.npz")
                   if (p.parent / "val_codes.npz").exists())
    if len(found) != 1:
        what = "none" if not found else ", ".join(map(str, found))
        raise CSRError(f"--topk {k}: looked for {runs_dir()}/*/codes_k{k}/ with train_codes.npz and val_codes.npz "
                       f"(inference/csr_inference.py's default output) and found {what}; pass the paths")
    return found[0]


def neighbours_file(k: int) -> Path:
    """Where faiss_nn.py --topk k writes by default, and compute_metrics.py --topk k reads."""
    return codes_dir(k) / "nn.npy"
