"""One training run from parsed flags: load data, build the model, train, print a summary (`train_from_args`).

The entry point of main_visual.py and main_text.py; the flags themselves (`add_train_args`) and their mapping to
configs (`configs_from_args`) are csr/cli.py's. Torch and the training loop are imported when a run starts, so
that a script's --help and its flag errors stay fast.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from csr.cli import configs_from_args
from csr.io import CSRError, info, labels_path_for, load_embeddings, load_labels


def train_from_args(args: argparse.Namespace, emb_path: str, out_dir: str, pair_path: str | None = None,
                    labels_path: str | None = None) -> dict:
    """Load embeddings (and labels / paired rows), build the model from the flags, train, print a summary."""
    from csr import distributed
    from csr.checkpoint import clear_run_dir, prepare_run_dir
    from csr.model import CSR
    from csr.provenance import file_identity
    from csr.train import TrainData, train

    out = prepare_run_dir(out_dir, args.overwrite, args.resume)
    x = load_embeddings(emb_path)
    lab_path = Path(labels_path) if labels_path else labels_path_for(emb_path)
    need_labels = bool(labels_path) or (args.use_CL and args.cl == "label")  # a path given must exist
    labels = load_labels(lab_path, x.shape[0], required=need_labels)
    x_pair = None
    if pair_path:
        x_pair = load_embeddings(pair_path)
        if x_pair.shape != x.shape:
            raise CSRError(f"{pair_path}: paired embeddings have shape {x_pair.shape}, expected {x.shape}")
    model_cfg, train_cfg = configs_from_args(args, x.shape[1], x)
    rt = distributed.setup(args.use_ddp, args.device, args.gpu)
    # --overwrite: the old run goes only when the new one writes its first file (an input that fails at the first
    # step, e.g. squares that overflow float32, leaves the old run as it was)
    replace_old = (lambda: clear_run_dir(out)) if args.overwrite and not args.resume and rt.is_main else None
    try:
        model = CSR.seeded(model_cfg, train_cfg.seed)
        if rt.is_main:
            info(f"data: {emb_path} {tuple(x.shape)} {x.dtype}" + (f", labels {lab_path}" if labels is not None else ""))
            info(f"model: {model_cfg}")
            info(f"train: {train_cfg}")
            info(f"runtime: device {rt.device}, world size {rt.world_size}")
        t0 = time.time()
        data = TrainData(x, labels, x_pair, identity=file_identity(emb_path))
        summary = train(model, data, train_cfg, out, rt, args=vars(args), resume=args.resume,
                        replace_old=replace_old)
        if rt.is_main:
            info(f"done in {time.time() - t0:.1f}s: {summary['steps']} steps, final loss "
                 f"{summary.get('loss_total', float('nan')):.5g}, dead latents {summary.get('dead_fraction', 0):.1%} "
                 f"(not fired in {model_cfg.dead_threshold} steps), "
                 f"{summary.get('dead_fraction_rows', float('nan')):.1%} in no code of "
                 f"{summary.get('dead_rows_checked', 0):,} training rows")
            info(f"wrote {out / 'csr.pt'} (+ last.pt, log.jsonl, csr.json)")
        return summary
    finally:
        distributed.cleanup()
