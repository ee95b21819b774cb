"""ImageNet-scale dry run of the whole pipeline on one machine, every stage measured (the harness: bench/dry_run.py).

    nice -n 10 python bench/scale.py --work /work/scale-data --rows 100000      # a check at 100k rows
    nice -n 10 python bench/scale.py --work /work/scale-data                    # full size: 1,281,167 x 2048

Writes synthetic ImageNet-shaped embeddings (train [rows, 2048] float32 = 10.5 GB at full size, val
[50,000, 2048], labels; non-negative, large shared mean, 1000 class clusters) to WORK/emb through a memory map,
then runs the real stages on them, each in a fresh process: CSR training (paper recipe, hidden 8192, k 8 and
32, capped at --train-steps; samples/s and the projected 10-epoch time), the same under torchrun with 2 gloo
processes, encoding all rows, exact top-10 kNN (sparse engine; and with the database split over 2 torchrun
processes, checked bit for bit against one process), the sweep's baselines (streaming PCA fit, MRL adaptor,
truncation; FAISS kNN) and the metrics. Each stage: wall time, CPU time, peak RSS and peak RssAnon (anonymous
memory, i.e. without the page cache of memory-mapped inputs). Prints a Markdown table and writes it with a
JSON of every number to --results (default bench/results/scale_<rows>.{md,json}).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.cli import positive_int  # noqa: E402
from csr.io import atomic_write_json, atomic_write_text  # noqa: E402
from bench.dry_run import COLUMNS, IMAGENET_TRAIN, IMAGENET_VAL, DryRun, results_table, run_stage  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--work", required=True, help="folder for the generated data and every stage's output "
                                                 "(10.5 GB + ~1 GB at full size; delete it afterwards)")
    d.add_argument("--rows", type=positive_int, default=IMAGENET_TRAIN, help="train (database) rows (ImageNet-1k)")
    d.add_argument("--val-rows", type=positive_int, default=IMAGENET_VAL, help="val (query) rows (ImageNet-1k)")
    m = p.add_argument_group("stages")
    m.add_argument("--ks", type=positive_int, nargs="+", default=[8, 32], help="CSR models trained, one per k")
    m.add_argument("--hidden-size", type=positive_int, default=8192, help="CSR latent units (paper: 8192)")
    m.add_argument("--train-steps", type=positive_int, default=20, help="optimiser steps (batch 4096) per model")
    m.add_argument("--ddp-procs", type=int, default=2, help="torchrun processes for the DDP stages (0 = skip)")
    m.add_argument("--ddp-steps", type=positive_int, default=4, help="optimiser steps of the DDP training stage")
    m.add_argument("--baseline-dims", type=positive_int, default=32, help="dims of the PCA / MRL / truncation baselines")
    m.add_argument("--pca-sample", type=positive_int, default=200000, help="train rows the PCA covariance is fit on")
    m.add_argument("--mrl-steps", type=positive_int, default=200, help="MRL adaptor steps (batch 1024)")
    m.add_argument("--only", nargs="+", default=None, help="run only these stages (their inputs must exist)")
    m.add_argument("--skip", nargs="+", default=[], help="stages not to run (e.g. the FAISS kNN of the baselines)")
    p.add_argument("--results", default=None, help="output stem (default bench/results/scale_<rows>)")
    p.add_argument("--add-to-earlier", action="store_true",
                   help="keep the stages of an earlier run in the same --results files that this run does not redo")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    plan = DryRun(args.work, args.rows, args.val_rows, tuple(args.ks), args.hidden_size, args.train_steps,
                  args.ddp_procs, args.ddp_steps, args.baseline_dims, args.pca_sample, args.mrl_steps)
    stages = [s for s in plan.stages() if (not args.only or s.name in args.only) and s.name not in args.skip]
    stem = Path(args.results or Path(__file__).resolve().parent / "results" / f"scale_{args.rows}")
    results, t0 = [], time.time()
    for s in stages:
        print(f"== stage {s.name}: {s.note}", flush=True)
        r = run_stage(s, Path(args.work) / "stages" / f"{s.name}.json")
        print(f"== {s.name}: {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"peak RssAnon {r['peak_anon_gb']:.2f} GB", flush=True)
        results.append(r)
    if args.add_to_earlier and stem.with_suffix(".json").exists():
        done = {r["stage"] for r in results}
        earlier = [r for r in json.loads(stem.with_suffix(".json").read_text())["stages"] if r["stage"] not in done]
        order = {s.name: i for i, s in enumerate(plan.stages())}
        results = sorted(earlier + results, key=lambda r: order.get(r["stage"], len(order)))
    table = results_table(results)
    summary = "\n".join(f"- {r['stage']}: " + ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}"
                                                       for k, v in r.items() if k not in COLUMNS) for r in results
                        if set(r) - set(COLUMNS))
    header = (f"Dry run: {args.rows:,} train x {args.val_rows:,} val rows, d 2048, hidden {args.hidden_size}, "
              f"{platform.node()} ({len(os.sched_getaffinity(0))} CPUs), this run {time.time() - t0:.0f}s end to end"
              f"{'; stages of earlier runs kept (--add-to-earlier)' if args.add_to_earlier else ''}\n"
              f"command: {' '.join(['python'] + sys.argv)}")
    text = f"{header}\n\n{table}\n\n{summary}\n"
    print("\n" + text)
    atomic_write_text(stem.with_suffix(".md"), text)
    atomic_write_json(stem.with_suffix(".json"), {"argv": sys.argv, "config": vars(args), "stages": results})
    return results


if __name__ == "__main__":
    main()
