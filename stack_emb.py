"""Merge embedding shards (pretrained_embeddings.py --shard-size) into one `{split}_emb.npy` + labels + sidecar.

    python stack_emb.py                  # the paper's command: every RUNS/emb/{split}_shards that extraction wrote
                                         # without --out (RUNS = <repository>/runs; csr/paths.py)
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
from csr.paths import embeddings_dir, shard_dirs


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input/output")
    io.add_argument("--shard_dir", "--shard-dir", type=Path, default=None,
                    help="directory of emb_NNNNN.npy + labels_NNNNN.npy shards (e.g. OUT/train_shards; default: "
                         "every RUNS/emb/*_shards, where pretrained_embeddings.py writes without --out)")
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


def merge(shard_dir: Path, out: Path | None, overwrite: bool) -> Path:
    out = out or default_output(shard_dir)
    if not out.name.endswith("_emb.npy"):
        raise CSRError(f"--out {out}: name must end in _emb.npy (labels and sidecar are named after it)")
    path, n, d = stack_shards(shard_dir, out, overwrite=overwrite)
    print(f"merged {shard_dir} -> {path} [{n} x {d}] + {path.name.replace('_emb.npy', '_labels.npy')} "
          f"+ {path.name.replace('_emb.npy', '_meta.json')}", file=sys.stderr)
    return path


def main(argv: Sequence[str] | None = None) -> Path | list[Path]:
    """The merged file of --shard_dir; without it, the list of files merged from the default layout."""
    args = build_parser().parse_args(argv)
    if args.shard_dir is not None:
        return merge(args.shard_dir, args.out, args.overwrite)
    dirs = shard_dirs()
    if not dirs:
        raise CSRError(f"no --shard_dir given and no shards in {embeddings_dir()} (where "
                       f"inference/pretrained_embeddings.py --shard-size writes without --out)")
    if args.out is not None and len(dirs) > 1:
        raise CSRError(f"--out names one file but {embeddings_dir()} holds {len(dirs)} shard folders; pass --shard_dir")
    return [merge(d, args.out, args.overwrite) for d in dirs]


if __name__ == "__main__":
    run(main)
