"""Extraction speed: inference/pretrained_embeddings.py's loop vs a plain loop calling the timm model, same batches.

    .venv/bin/python bench/extract_speed.py --per-class 50 --sizes 112 224
    .venv/bin/python bench/extract_speed.py --device cuda --per-class 500 --batch-size 256   # on a GPU (AMP)

Data: real Fashion-MNIST (Debian package) as an ImageFolder tree and an FFCV .beton (raw pixels), written under
--work (default .cache/bench_extract). Model: the ImageNet-pretrained EfficientNet-Lite0 (built-in weights).

Baselines, measured in the same run on batches decoded beforehand and held in RAM (no decoding is timed):
  plain       for x in batches: model.forward_head(model.forward_features(normalise(x)), pre_logits=True)
              with the model as timm creates it (contiguous memory format);
  plain+cl    the same loop in channels-last memory format (what the extraction uses by default), to show
              what is left of data loading once it overlaps compute.
Ours: `csr.extract.extract_split` end to end (decoding in DataLoader worker processes / FFCV threads, writing the
memory-mapped .npy), with the eager channels-last model and, on CPU, with the frozen TorchScript graph
(`Backbone.freeze`, the extraction script's CPU default: `--freeze`). Each variant runs --repeats times interleaved; the best run counts (the machine may be shared).
Lines: `<size> px  <variant>  <images/s>`, `ratio ours/plain` (>= 1: the extraction is not slower) and
`ratio frozen/eager` (what the frozen graph gains end to end).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.backbones import create_backbone  # noqa: E402
from csr.extract import ExtractConfig, extract_split  # noqa: E402
from csr.fashion_mnist import write_image_folder  # noqa: E402
from csr.images import FFCVSource, FolderSource, import_ffcv, write_beton  # noqa: E402


def plain_loop(backbone, batches, device, amp: bool) -> float:
    """Seconds for the plain timm loop over pre-decoded uint8 batches."""
    use_amp = amp and device.type == "cuda"
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            x = backbone.preprocess.normalize(x.to(device, non_blocking=True))
            if backbone.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                f = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
            f.float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=50, help="Fashion-MNIST images per class (train split)")
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224], help="input resolutions in px")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes / FFCV threads")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per variant (best counts)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--work", type=Path, default=Path(".cache/bench_extract"), help="scratch directory")
    p.add_argument("--tree", type=Path, default=None,
                   help="an ImageFolder tree to use instead of preparing Fashion-MNIST (reads TREE/train)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tree = args.tree or args.work / f"fmnist_{args.per_class}"
    if not tree.exists():
        write_image_folder(tree, subset=args.per_class, progress=False)
    try:
        import_ffcv()
        beton = args.work / f"{tree.name}_raw.beton"
        if not beton.exists():
            write_beton(tree / "train", beton, max_resolution=None, write_mode="raw", compress_probability=0.0,
                        jpeg_quality=90, workers=args.workers, chunk_size=100, verify=False)
    except ImportError:
        beton = None
        print("ffcv not installed: ImageFolder path only")
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"workers {args.workers}, tree {tree}")
    for size in args.sizes:
        bb = create_backbone(None, "efficientnet-lite0", size, device)
        frozen = create_backbone(None, "efficientnet-lite0", size, device, True).freeze() \
            if device.type == "cpu" else None
        folder = FolderSource(tree / "train", bb.preprocess)
        sources = [("ours imagefolder", folder)]
        if beton is not None:
            sources.append(("ours ffcv", FFCVSource(beton, bb.preprocess)))
        idx = np.arange(len(folder))
        batches = [b.images.clone() for b in folder.batches(idx, args.batch_size, args.workers)]
        n = len(idx)
        print(f"{size} px: {n} images")
        best: dict[str, float] = {}

        def record(name: str, secs: float) -> None:
            best[name] = max(best.get(name, 0.0), n / secs)

        cfg = ExtractConfig(batch_size=args.batch_size, workers=args.workers, device=str(device), overwrite=True,
                            progress=False)
        out = args.work / "out"
        for _ in range(args.repeats):
            bb.set_channels_last(False)
            record("plain", plain_loop(bb, batches, device, True))
            bb.set_channels_last(True)
            record("plain+cl", plain_loop(bb, batches, device, True))
            for name, src in sources:
                t0 = time.perf_counter()
                extract_split(src, bb, out, "bench", cfg)
                record(name, time.perf_counter() - t0)
                if frozen is not None:
                    t0 = time.perf_counter()
                    extract_split(src, frozen, out, "bench", cfg)
                    record(f"{name} frozen", time.perf_counter() - t0)
        for name, rate in best.items():
            print(f"{size} px  {name:<17} {rate:8.1f} images/s")
        for name, _ in sources:
            print(f"{size} px  ratio {name}/plain {best[name] / best['plain']:.2f}   "
                  f"{name}/plain+cl {best[name] / best['plain+cl']:.2f}")
            if frozen is not None:
                print(f"{size} px  ratio {name} frozen/eager {best[name + ' frozen'] / best[name]:.2f}")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
