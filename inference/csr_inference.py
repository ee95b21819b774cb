"""Encode embeddings into k-sparse CSR codes (stage 4 of the pipeline).

Built-in data:
    python inference/csr_inference.py --train_emb_path .cache/fmnist/emb/train_emb.npy \
        --eval_emb_path .cache/fmnist/emb/val_emb.npy --csr_ckpt runs/fmnist_k32/csr.pt --topk 32
The paper's README command runs as written (`--cse_ckpt`; `--model_name` and `--hidden-size` are checked
against the checkpoint):
    python inference/csr_inference.py --train_emb_path train_emb.npy --eval_emb_path val_emb.npy \
        --model_name resnet50d.ra4_e3600_r224_in1k --topk 8 --hidden-size 8192 --cse_ckpt ckpt.pt

Shapes (input_dim, hidden_size) come from the checkpoint; `--topk` defaults to the trained k and may be any
k <= hidden_size. Without --out the codes go beside the checkpoint, in codes_k<topk>/, where
`retrieval/faiss_nn.py --topk k` finds them for a checkpoint trained at the default place (csr/paths.py). Writes OUT/{split}_codes.npz (indices [N,k] int16/int32, values [N,k], hidden_size,
labels) + a JSON sidecar each, for every embedding file given. Nothing dense [N, hidden] is ever built.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.checkpoint import check_input_dim, load_model  # noqa: E402
from csr.cli import ArgumentParser, add_precision_arg, bool_flag, positive_int, precision_from_args, run  # noqa: E402
from csr.codes import save_codes  # noqa: E402
from csr.distributed import pick_device  # noqa: E402
from csr.encode import dead_fraction, encode_array  # noqa: E402
from csr.io import (CSRError, check_output, labels_path_for, load_embeddings, load_labels, same_file,  # noqa: E402
                    warn)


def split_name(emb_path: str) -> str:
    name = Path(emb_path).name
    return name[: -len("_emb.npy")] if name.endswith("_emb.npy") else Path(emb_path).stem


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train_emb_path", "--train-emb-path", help="database split embeddings .npy")
    d.add_argument("--eval_emb_path", "--eval-emb-path", help="query split embeddings .npy")
    d.add_argument("--csr_ckpt", "--cse_ckpt", "--csr-ckpt", dest="csr_ckpt", required=True,
                   help="CSR checkpoint (.pt from main_visual.py); --cse_ckpt is the paper README's spelling")
    d.add_argument("--out", default=None, help="output directory (default: <checkpoint dir>/codes_k<topk>)")
    d.add_argument("--model_name", "--model-name", default=None,
                   help="backbone of the embeddings (the paper's flag): a warning when the checkpoint names another")
    m = p.add_argument_group("codes")
    m.add_argument("--topk", type=positive_int, default=None, help="active units per code (default: the trained k)")
    m.add_argument("--hidden-size", "--hidden_size", dest="hidden_size", type=positive_int, default=None,
                   help="the checkpoint's number of units (the paper's flag): an error when it differs; the "
                        "shape always comes from the checkpoint")
    m.add_argument("--values-dtype", default="float32", choices=["float32", "float16"], help="dtype of code values")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=positive_int, default=4096, help="rows per encoder batch")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add_precision_arg(r, default=None, help="encoder matmul that selects the codes: fp32, bf16 or auto (default: the "
                                            "checkpoint's, the precision it was trained with, so codes are the "
                                            "training codes)")
    bool_flag(r, "--overwrite", default=False, help="replace existing code files")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    inputs = [p for p in (args.train_emb_path, args.eval_emb_path) if p]
    if not inputs:
        raise CSRError("give --train_emb_path and/or --eval_emb_path")
    model, ckpt = load_model(args.csr_ckpt)
    if args.hidden_size is not None and args.hidden_size != model.cfg.hidden_size:
        raise CSRError(f"--hidden-size {args.hidden_size}: {args.csr_ckpt} has hidden_size {model.cfg.hidden_size}")
    trained_on = (ckpt.get("args") or {}).get("model_name")
    if args.model_name and trained_on and args.model_name != trained_on:
        warn(f"--model_name {args.model_name}: {args.csr_ckpt} was trained on {trained_on} embeddings")
    k = args.topk or model.cfg.topk
    if not 1 <= k <= model.cfg.hidden_size:
        raise CSRError(f"--topk must be in [1, hidden_size={model.cfg.hidden_size}] of {args.csr_ckpt}, got {k}")
    out = Path(args.out) if args.out else Path(args.csr_ckpt).parent / f"codes_k{k}"
    device = pick_device(args.device)
    if args.precision is not None:
        model.cfg.precision = precision_from_args(args.precision, device.type)
    else:
        print(f"precision: {model.cfg.precision} (the checkpoint's)")
    if args.topk is None:
        print(f"--topk not given: encoding at the trained k = {k}")
    if len(inputs) == 2 and split_name(inputs[0]) == split_name(inputs[1]):
        if not same_file(inputs[0], inputs[1]):  # the query codes would replace the database codes
            raise CSRError(f"--train_emb_path {inputs[0]} and --eval_emb_path {inputs[1]} would both be written to "
                           f"{out / (split_name(inputs[0]) + '_codes.npz')}; give the files distinct split names")
        inputs = inputs[:1]  # one file as database and queries: its codes serve both
    embs = []
    for path in inputs:  # validate everything before writing anything
        x = load_embeddings(path)
        check_input_dim(model, x.shape[1], path)
        target = check_output(out / f"{split_name(path)}_codes.npz", args.overwrite, sidecar=True,
                              inputs={"--train_emb_path": args.train_emb_path, "--eval_emb_path": args.eval_emb_path})
        embs.append((path, x, load_labels(labels_path_for(path), x.shape[0], required=False), target))
    written = {}
    for path, x, labels, target in embs:
        t0 = time.time()
        codes = encode_array(model, x, k, args.batch_size, device, np.dtype(args.values_dtype), labels,
                             desc=f"encode {split_name(path)}")
        save_codes(target, codes, source=str(path), checkpoint=str(args.csr_ckpt), topk=k,
                   trained_topk=model.cfg.topk)
        written[split_name(path)] = str(target)
        print(f"{path}: {codes.n} codes, k={k} of {codes.hidden_size}, {codes.n / (time.time() - t0):.0f} rows/s, "
              f"units never active: {dead_fraction(codes):.1%} -> {target}")
    return written


if __name__ == "__main__":
    run(main)
