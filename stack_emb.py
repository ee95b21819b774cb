"""Merge embedding shards (pretrained_embeddings.py --shard-size) into one `{split}_emb.npy` + labels + sidecar.

    .venv/bin/python stack_emb.py --shard_dir .cache/fmnist/emb/train_shards   # after pretrained_embeddings.py --shard-size
    python stack_emb.py --shard_dir embeddings/imagenet_resnet50d/train_shards \
        --out embeddings/imagenet_resnet50d/train_emb.npy

Shards `emb_NNNNN.npy` / `labels_NNNNN.npy` are concatenated in shard-number order, memory-mapped (RAM does not
grow with N); every shard must be present and have matching rows (embeddings vs labels), width and dtype.
The default output is `<shard_dir>/../<split>_emb.npy` (`train_shards` -> `train_emb.npy`), written
atomically with `<split>_labels.npy` and a `<split>_meta.json` sidecar carrying the extraction settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from csr.cli import ArgumentParser, bool_flag, run
from csr.extract import stack_shards
from csr.io import CSRError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input/output")
    io.add_argument("--shard_dir", "--shard-dir", type=Path, required=True,
                    help="directory of emb_NNNNN.npy + labels_NNNNN.npy shards (e.g. OUT/train_shards)")
    io.add_argument("--out", type=Path, default=None,
                    help="merged embeddings file (default: beside the shard directory, <split>_emb.npy)")
    rt = p.add_argument_group("runtime")
    bool_flag(rt, "--overwrite", default=False, help="replace an existing merged file")
    return p


def default_output(shard_dir: Path) -> Path:
    name = shard_dir.resolve().name
    if not name.endswith("_shards"):
        raise CSRError(f"--shard_dir {shard_dir}: name does not end in _shards; pass --out")
    return shard_dir.resolve().parent / f"{name[: -len('_shards')]}_emb.npy"


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = args.out or default_output(args.shard_dir)
    if not out.name.endswith("_emb.npy"):
        raise CSRError(f"--out {out}: name must end in _emb.npy (labels and sidecar are named after it)")
    path, n, d = stack_shards(args.shard_dir, out, overwrite=args.overwrite)
    print(f"merged {args.shard_dir} -> {path} [{n} x {d}] + {path.name.replace('_emb.npy', '_labels.npy')} "
          f"+ {path.name.replace('_emb.npy', '_meta.json')}", file=sys.stderr)
    return path


if __name__ == "__main__":
    run(main)
