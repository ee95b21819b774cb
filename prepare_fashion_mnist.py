"""Fashion-MNIST (Debian package dataset-fashion-mnist) -> ImageFolder tree of PNGs, the project's built-in data.

    .venv/bin/python prepare_fashion_mnist.py --out .cache/fmnist/images --subset 3000   # `make demo`: 30k train + 10k val
    .venv/bin/python prepare_fashion_mnist.py --out .cache/fmnist_full/images            # `make demo-full`: 60k + 10k

Writes OUT/train/<class>/NNNNN.png (from the 60k training file) and OUT/val/<class>/NNNNN.png (the 10k test
file), classes t-shirt_top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle_boot; NNNNN is
the image's index in the IDX file. --subset N keeps the first N images of each class in file order. The
tree appears atomically (written beside OUT, then renamed). Next: train/write_imagenet.sh (FFCV, as `make demo`)
or inference/pretrained_embeddings.py --train_dir OUT/train --eval_dir OUT/val.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from csr.cli import bool_flag, run
from csr.fashion_mnist import DEFAULT_SOURCE, write_image_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                      help=f"directory with the Fashion-MNIST IDX files (default {DEFAULT_SOURCE})")
    data.add_argument("--out", type=Path, default=Path(".cache/fmnist/images"),
                      help="output ImageFolder root (default .cache/fmnist/images, as `make demo`)")
    data.add_argument("--subset", type=int, default=0,
                      help="images per class and split, first N in file order (default 0 = all)")
    rt = p.add_argument_group("runtime")
    bool_flag(rt, "--overwrite", default=False, help="replace an existing output tree")
    bool_flag(rt, "--progress", default=True, help="show progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    args = build_parser().parse_args(argv)
    counts = write_image_folder(args.out, args.source, args.subset, args.overwrite, args.progress)
    print(f"wrote Fashion-MNIST ImageFolder to {args.out}: "
          + ", ".join(f"{split}/ {n} images" for split, n in counts.items()) + " (10 classes)", file=sys.stderr)
    return counts


if __name__ == "__main__":
    run(main)
