"""ImageFolder split -> FFCV .beton (fields `image`: RGBImageField, `label`: IntField), as in FFCV's ImageNet recipe.

Usually run through write_imagenet.sh, which writes both splits:

    IMAGENET_DIR=/data/imagenet WRITE_DIR=/data/ffcv ./write_imagenet.sh 500 0.50 90

One split by hand (built-in data, after prepare_fashion_mnist.py):

    .venv/bin/python train/write_imagenet.py --data_dir .cache/fmnist/images/train \
        --write_path .cache/fmnist/ffcv/train_500_0.50_90.beton --max_resolution 500 --compress_probability 0.50 \
        --jpeg_quality 90 --write_mode raw

Images larger than --max_resolution (longest side) are downscaled (OpenCV INTER_AREA); with --write_mode
proportion a random --compress_probability share is stored as JPEG of --jpeg_quality, the rest as raw pixels.
Labels are the ImageFolder class indices (sorted folder names); the class list goes into the sidecar
`<write_path stem>.json`. FFCV's flag spellings (`--cfg.max_resolution=500`) are accepted too.
Every image is decoded once before writing (--verify_images): unreadable files are skipped with a warning,
or stop the run with --strict.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from csr.cli import bool_flag, run  # noqa: E402
from csr.images import write_beton  # noqa: E402
from csr.io import CSRError, check_output, write_sidecar  # noqa: E402

WRITE_MODES = ("raw", "jpg", "smart", "proportion")


def _names(name: str) -> list[str]:
    """`--max_resolution`, `--max-resolution` and FFCV's `--cfg.max_resolution`."""
    return sorted({f"--{name}", f"--{name.replace('_', '-')}", f"--cfg.{name}"}, key=len)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(*_names("data_dir"), dest="data_dir", type=Path, required=True,
                      help="ImageFolder split to write (DIR/<class>/<image>)")
    data.add_argument(*_names("write_path"), dest="write_path", type=Path, required=True,
                      help="output .beton file")
    data.add_argument(*_names("split"), dest="split", default=None,
                      help="split name recorded in the sidecar (train/val; default: the data_dir folder name)")
    data.add_argument(*_names("dataset"), dest="dataset", default="imagenet",
                      help="dataset name recorded in the sidecar (FFCV recipe compatibility)")
    data.add_argument(*_names("subset"), dest="subset", type=int, default=-1,
                      help="write only this many images, spread evenly over the sorted file list so every "
                           "class keeps its share (default -1 = all)")
    enc = p.add_argument_group("encoding (defaults: the paper's `write_imagenet.sh 500 0.50 90`)")
    enc.add_argument(*_names("max_resolution"), dest="max_resolution", type=int, default=500,
                     help="longest image side in px after downscaling (default 500)")
    enc.add_argument(*_names("write_mode"), dest="write_mode", choices=WRITE_MODES, default="proportion",
                     help="raw pixels, jpg, smart (JPEG when raw is larger than --smart_threshold) or "
                          "proportion (a random --compress_probability share as JPEG; default)")
    enc.add_argument(*_names("compress_probability"), dest="compress_probability", type=float, default=0.50,
                     help="share of images stored as JPEG with --write_mode proportion (default 0.50)")
    enc.add_argument(*_names("jpeg_quality"), dest="jpeg_quality", type=int, default=90,
                     help="JPEG quality 1-100 (default 90)")
    enc.add_argument(*_names("smart_threshold"), dest="smart_threshold", type=int, default=None,
                     help="bytes of raw pixels above which --write_mode smart stores JPEG")
    enc.add_argument(*_names("seed"), dest="seed", type=int, default=0,
                     help="random seed for which images --write_mode proportion compresses (default 0)")
    rt = p.add_argument_group("runtime")
    rt.add_argument(*_names("num_workers"), "--workers", dest="num_workers", type=int,
                    default=os.cpu_count() or 1, help="writer processes (default: all CPUs)")
    rt.add_argument(*_names("chunk_size"), dest="chunk_size", type=int, default=100,
                    help="images per work unit of a writer process (default 100)")
    bool_flag(rt, "--verify_images", "--verify-images", default=True,
              help="decode every image once before writing and skip unreadable ones")
    bool_flag(rt, "--strict", default=False, help="stop at the first unreadable image instead of skipping it")
    bool_flag(rt, "--overwrite", default=False, help="replace an existing output file")
    return p


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if not 1 <= args.jpeg_quality <= 100:
        raise CSRError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.compress_probability <= 1.0:
        raise CSRError(f"--compress_probability must be in [0, 1], got {args.compress_probability}")
    if args.max_resolution is not None and args.max_resolution < 1:
        raise CSRError(f"--max_resolution must be >= 1, got {args.max_resolution}")
    if args.num_workers < 1 or args.chunk_size < 1:
        raise CSRError("--num_workers and --chunk_size must be >= 1")
    check_output(args.write_path, args.overwrite, sidecar=True)
    split = args.split or args.data_dir.name
    print(f"writing {split}: {args.data_dir} -> {args.write_path} (max side {args.max_resolution}px, "
          f"{args.write_mode}, JPEG share {args.compress_probability}, quality {args.jpeg_quality})", file=sys.stderr)
    stats = write_beton(args.data_dir, args.write_path, max_resolution=args.max_resolution,
                        write_mode=args.write_mode, compress_probability=args.compress_probability,
                        jpeg_quality=args.jpeg_quality, workers=args.num_workers, chunk_size=args.chunk_size,
                        subset=args.subset, verify=args.verify_images, strict=args.strict, seed=args.seed,
                        smart_threshold=args.smart_threshold)
    write_sidecar(args.write_path, dataset=args.dataset, split=split, data_dir=str(args.data_dir.resolve()),
                  images=stats.written, skipped=len(stats.skipped), skipped_files=stats.skipped[:100],
                  classes=stats.classes, max_resolution=args.max_resolution, write_mode=args.write_mode,
                  compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                  fields={"image": "RGBImageField", "label": "IntField"}, bytes=stats.bytes)
    print(f"wrote {stats.written} images ({len(stats.classes)} classes, {stats.bytes / 2**20:.1f} MiB) to "
          f"{args.write_path}; skipped {len(stats.skipped)} unreadable", file=sys.stderr)
    return stats


if __name__ == "__main__":
    run(main)
