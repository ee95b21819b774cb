"""Throughput of multimodal CSR training on fixture shards (samples/s), AMP against fp32 measured in the same run.

GPU check (paper architecture ViT-B-16 with random weights, paper CSR shape and batch):
    python main_multimodal.py fixtures --out .cache/mm_gpu --n-train 4096 --per-shard 256
    python bench/multimodal_throughput.py --fixtures .cache/mm_gpu --model ViT-B-16 --workers 8
CPU smoke run (tiny CLIP):
    python bench/multimodal_throughput.py --fixtures .cache/mm --model .cache/mm/tiny-clip.json \
        --batch-size 64 --train-num-samples 256 --csr-hidden-size 128 --csr-topk 8 --csr-auxk 32 --workers 1

Three runs of the `main_multimodal.py` command a user types (a subprocess each): online features with
--precision fp32 (the baseline), online with --precision amp, and training from a feature cache (extracted once
with AMP). Each reports the samples/s of its LAST epoch from the run's log.jsonl (workers and CUDA warmed up);
the summary prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from csr.cli import run  # noqa: E402
from csr.io import CSRError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fixtures", default=".cache/mm_gpu", help="output of `main_multimodal.py fixtures`")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture or .json config (random weights)")
    p.add_argument("--batch-size", type=int, default=1024, help="pairs per step (paper: 1024)")
    p.add_argument("--train-num-samples", type=int, default=8192, help="pairs per epoch (shards are re-read)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    p.add_argument("--csr-hidden-size", type=int, default=2048, help="CSR latent units (paper: 2048)")
    p.add_argument("--csr-topk", type=int, default=64, help="CSR k (paper: 64)")
    p.add_argument("--csr-auxk", type=int, default=1024, help="AuxK units (paper: 1024)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    fx = json.loads((Path(args.fixtures) / "fixtures.json").read_text())
    data = str(Path(args.fixtures) / "shards" / Path(fx["train_data"]).name)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--train-data", data, "--train-num-samples", str(args.train_num_samples), "--dataset-type",
                  "webdataset", "--workers", str(args.workers), "--model", args.model, "--pretrained", "none",
                  "--epochs", str(args.epochs), "--csr-topk", str(args.csr_topk), "--csr-auxk", str(args.csr_auxk),
                  "--csr-cl_coef", "1", "--csr-hidden-size", str(args.csr_hidden_size), "--batch-size",
                  str(args.batch_size), "--lr", "4e-4", "--wd", "1e-4", "--grad-clip-norm", "1.0",
                  "--save-frequency", "1", "--device", args.device, "--progress", "False"]
        for name, extra in (("online_fp32", ["--precision", "fp32"]), ("online_amp", ["--precision", "amp"]),
                            ("cached_amp", ["--precision", "amp", "--feature-cache", f"{tmp}/cache"])):
            t0 = time.time()
            cmd = [sys.executable, str(ROOT / "main_multimodal.py"), *common, *extra, "--out", f"{tmp}/{name}"]
            if subprocess.run(cmd, cwd=ROOT).returncode:
                raise CSRError(f"{name}: main_multimodal.py failed: {' '.join(cmd)}")
            s = json.loads((Path(tmp) / name / "log.jsonl").read_text().splitlines()[-1])
            out[name] = s["samples_per_s"]
            print(f"{name}: {s['samples_per_s']:.1f} samples/s (last epoch; run {time.time() - t0:.1f}s incl. "
                  f"start-up{', feature extraction' if 'cached' in name else ''})", flush=True)
    print(f"summary: online fp32 {out['online_fp32']:.1f}, online amp {out['online_amp']:.1f} samples/s "
          f"({out['online_amp'] / out['online_fp32']:.2f}x fp32); cached amp {out['cached_amp']:.1f} samples/s "
          f"({out['cached_amp'] / out['online_amp']:.1f}x online amp); model {args.model}, batch {args.batch_size}, "
          f"CSR h={args.csr_hidden_size} k={args.csr_topk}")
    return out


if __name__ == "__main__":
    run(main)
