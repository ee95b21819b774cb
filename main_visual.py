"""Train CSR on frozen visual embeddings (stage 3 of the pipeline).

Built-in data (after `make demo` has extracted Fashion-MNIST embeddings):
    python main_visual.py --pretrained_emb .cache/fmnist/emb/train_emb.npy --topk 32 --out runs/fmnist_k32

The paper's README command (ImageNet-1k, ResNet-50 embeddings) runs as written:
    python main_visual.py --pretrained_emb /path/to/train_emb.npy --model_name resnet50d.ra4_e3600_r224_in1k \
        --use_ddp False --gpu 1 --batch-size 4096 --lr 4e-4 --use_CL True --topk 8 --auxk 512 --hidden-size 8192
Multi-GPU:
    torchrun --nproc_per_node=4 main_visual.py --pretrained_emb train_emb.npy --use_ddp True --topk 8

Reads `{split}_emb.npy` (+ `{split}_labels.npy` beside it, needed by `--cl label`); writes OUT/csr.pt
(config, weights, optimiser state, arguments), OUT/last.pt after every epoch (for --resume), OUT/log.jsonl
(one line per epoch: each loss term, dead-latent fraction, samples/s) and OUT/csr.json.
Defaults are the paper's hyper-parameters (Adam lr 4e-4, eps 6.25e-10, batch 4096, 10 epochs, k 8,
auxk 512, beta 1/32, gamma 0.1, hidden 4·d).
"""
from __future__ import annotations

import argparse

from csr.cli import ArgumentParser, add_train_args, run
from csr.paths import training_dir
from csr.train_run import train_from_args


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--pretrained_emb", "--pretrained-emb", required=True, help="train split embeddings [N, d] .npy")
    d.add_argument("--labels", default=None, help="labels .npy (default: {split}_labels.npy beside the embeddings)")
    d.add_argument("--model_name", "--model-name", default=None,
                   help="backbone that produced the embeddings (recorded in the checkpoint only)")
    d.add_argument("--out", default=None, help="output directory (default RUNS/<embeddings stem>_k<topk>, RUNS = "
                                               "<repository>/runs or $CSR_RUNS: csr/paths.py)")
    add_train_args(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = args.out or str(training_dir(args.pretrained_emb, args.topk))
    return train_from_args(args, args.pretrained_emb, out, labels_path=args.labels)


if __name__ == "__main__":
    run(main)
