"""CSR vs Matryoshka-style baselines across sparsity levels: the paper's Table-4 experiment on any embeddings.

Built-in data (what `make demo` runs after extracting Fashion-MNIST EfficientNet-Lite0 embeddings):
    python retrieval/sweep.py --train-emb .cache/fmnist/emb/train_emb.npy --eval-emb .cache/fmnist/emb/val_emb.npy \
        --name fmnist --ks 2 8 32 --ablation-k 0
ImageNet-1k (embeddings from inference/pretrained_embeddings.py; CSR trains on the GPU with bf16 AMP when
CUDA is present, --device/--gpu/--amp as in main_visual.py), on one GPU or several:
    python retrieval/sweep.py --train-emb embeddings/imagenet_resnet50d/train_emb.npy \
        --eval-emb embeddings/imagenet_resnet50d/val_emb.npy --name in1k_resnet50d --hidden-size 8192
    torchrun --nproc_per_node=4 retrieval/sweep.py --train-emb embeddings/imagenet_resnet50d/train_emb.npy \
        --eval-emb embeddings/imagenet_resnet50d/val_emb.npy --name in1k_resnet50d --hidden-size 8192 --use_ddp True

For each k in --ks it trains one CSR model (as the paper does) and evaluates exact 1-NN top-1 and mAP@10 with
the sparse engine (text embeddings, --text: also kNN-10 accuracy and V-measure); every baseline runs at the same
dims: truncation, PCA (fit on train), the MRL adaptor (Matryoshka loss on the frozen embeddings: `mrl` with labels,
as MRL is trained; `mrl_unsup` without, the like-for-like match of CSR's label-free recipes) and the full embedding.
The main CSR row uses the flags (the paper's recipe by default); --recipes adds a CSR row per variant at every k
(default: recommended and recommended+labels). `--ablation-k` adds one-change variants at one k (`--ablations`
picks them; default: each contrastive term, recon_loss=nmse, bpre_init=geometric_median, tied=False,
encoder_init=data, dead-unit resampling, k annealing, and the named recipes; a variant equal to a row already
trained reuses it). A variant is `RECIPE[,FIELD=VALUE...]` or `FIELD=VALUE[,FIELD=VALUE...]` with fields of
CSRConfig / TrainConfig, the syntax of bench/recipe_val.py's candidate too.
Writes results/<name>/{table.md, results.json, accuracy_vs_dims.png}, models under results/<name>/models and
one JSON per finished part under results/<name>/parts. A re-run reuses a part only when the digest of all it
depends on matches (data files' path/size/mtime/shape and a hash of a fixed sample of their bytes, method and
training configs, seed, runtime, the csr/ library's source hash), recomputes the others, and prints which parts were reused (--force: recompute all).
An existing report (table.md, results.json, the plot) is replaced only with --overwrite; bad input fails before
any part runs.
CSR flags (--epochs, --batch-size, --lr, --cl, ...) default to the paper's recipe; --topk is ignored (use --ks).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr import distributed  # noqa: E402
from csr.baselines import MRLConfig  # noqa: E402
from csr.cli import ArgumentParser, add_train_args, bool_flag, configs_from_args, nonneg_int, positive_int, run  # noqa: E402
from csr.io import (CSRError, check_dims, check_output, check_same_width, labels_path_for,  # noqa: E402
                    load_embeddings, load_labels, read_sidecar)
from csr.recipes import RECIPE_ROWS, canonical_variant  # noqa: E402
from csr.sweep import Plan, Sweep, files_id, sweep_report  # noqa: E402

# one-change variants at --ablation-k (csr.recipes' syntax: RECIPE[,FIELD=VALUE...] or FIELD=VALUE[,...])
ABLATIONS = ["cl=none", "cl=self", "cl=label", "recon_loss=nmse", "bpre_init=geometric_median", "tied=False",
             "encoder_init=data", "resample_every=14,resample_until=0.9", "k_start=64,k_anneal_fraction=0.7",
             *RECIPE_ROWS]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train-emb", "--train_emb", required=True, help="database split embeddings .npy (+ labels beside)")
    d.add_argument("--eval-emb", "--eval_emb", required=True, help="query split embeddings .npy (+ labels beside)")
    d.add_argument("--name", default=None, help="results/<name> (default: the embeddings' folder name)")
    d.add_argument("--out", default=None, help="output directory (default results/<name>)")
    d.add_argument("--header", default=None, help="table title (default: built from the embeddings' sidecar)")
    s = p.add_argument_group("sweep")
    s.add_argument("--ks", type=positive_int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256],
                   help="active dims to compare")
    s.add_argument("--methods", nargs="+", default=["csr", "mrl", "mrl_unsup", "pca", "trunc", "full"],
                   choices=["csr", "csr_one", "mrl", "mrl_unsup", "pca", "trunc", "full"], help="methods to run")
    s.add_argument("--one-model-k", type=nonneg_int, default=0,
                   help="with method csr_one: train ONE CSR at this k and evaluate it at every k in --ks")
    s.add_argument("--recipes", nargs="*", default=["recommended", "recommended+labels"], metavar="VARIANT",
                   help="extra CSR rows at every k, each a variant on top of the flags: a named recipe (default: "
                        "recommended and recommended+labels; none: `--recipes` alone) or RECIPE,FIELD=VALUE / "
                        "FIELD=VALUE. The main CSR row is the flags' recipe: the paper's by default")
    s.add_argument("--ablation-k", type=nonneg_int, default=32, help="k of the ablation (0 = no ablation)")
    s.add_argument("--ablations", nargs="+", default=ABLATIONS, metavar="VARIANT",
                   help="one-change variants at --ablation-k (default: " + " ".join(ABLATIONS) + ")")
    s.add_argument("--mrl-epochs", type=positive_int, default=20, help="MRL adaptor epochs")
    s.add_argument("--mrl-heads", default="separate", choices=["separate", "shared"], help="MRL (separate) or MRL-E")
    bool_flag(s, "--text", default=False, help="text embeddings: also kNN-10 accuracy and V-measure")
    bool_flag(s, "--force", default=False, help="recompute finished parts")
    add_train_args(p)
    return p


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    args.recipes = list(dict.fromkeys(canonical_variant(r, "--recipes") for r in args.recipes))
    args.ablations = list(dict.fromkeys(canonical_variant(v, "--ablations") for v in args.ablations))
    t_start = time.time()
    xtr, xte = load_embeddings(args.train_emb), load_embeddings(args.eval_emb)
    check_same_width(xtr, xte, args.train_emb, args.eval_emb)
    if set(args.methods) & {"trunc", "pca", "mrl", "mrl_unsup"}:
        check_dims(args.ks, xtr.shape[1], "--ks", args.train_emb)
    if "csr_one" in args.methods and not args.one_model_k:
        raise CSRError("--methods csr_one needs --one-model-k K (the k of the one model)")
    ytr = load_labels(labels_path_for(args.train_emb), len(xtr))
    yte = load_labels(labels_path_for(args.eval_emb), len(xte))
    name = args.name or Path(args.train_emb).resolve().parent.name
    out = Path(args.out or Path("results") / name)
    for report in ("table.md", "results.json", "accuracy_vs_dims.png"):  # finished parts are reused regardless
        check_output(out / report, args.overwrite, "--overwrite (finished parts are reused; --force recomputes them)")
    meta = read_sidecar(args.train_emb)
    backbone = meta.get("backbone") or meta.get("model_name") or meta.get("model") or "embeddings"
    size = (meta.get("preprocessing") or {}).get("size")
    header = args.header or (f"{name}: {backbone}{f' @ {size} px' if size else ''}, d={xtr.shape[1]}, "
                             f"database {len(xtr)} (train split) / queries {len(xte)} (eval split)")
    model_cfg, train_cfg = configs_from_args(args, xtr.shape[1], xtr)
    for flag, k in (("--ks", max(args.ks)), ("--ablation-k", args.ablation_k), ("--one-model-k", args.one_model_k)):
        if k > model_cfg.hidden_size:
            raise CSRError(f"{flag} {k} is larger than --hidden-size {model_cfg.hidden_size}")
    plan = Plan(ks=args.ks, methods=args.methods, variants=args.recipes, ablation_k=args.ablation_k,
                ablations=args.ablations, one_model_k=args.one_model_k, hidden_fixed=args.hidden_size is not None,
                mrl=MRLConfig(epochs=args.mrl_epochs, heads=args.mrl_heads, seed=args.seed))
    plan.check(model_cfg, train_cfg, xtr)
    rt = distributed.setup(args.use_ddp, args.device, args.gpu)
    try:
        return run_sweep(args, rt, plan, xtr, ytr, xte, yte, name, out, meta, header, model_cfg, train_cfg, t_start)
    finally:
        distributed.cleanup()


def run_sweep(args, rt, plan, xtr, ytr, xte, yte, name, out, meta, header, model_cfg, train_cfg, t_start) -> str:
    """Every part in order (all ranks step through it together under DDP); rank 0 writes the report."""
    if rt.is_main:
        print(f"sweep {name}: ks {args.ks}, methods {args.methods}\n  CSR {model_cfg}\n  {train_cfg}\n"
              f"  runtime: device {rt.device}, world size {rt.world_size}, amp {train_cfg.amp}, precision {model_cfg.precision}")
    sw = Sweep(out, xtr, ytr, xte, yte, force=args.force, data_id=files_id(args.train_emb, args.eval_emb), rt=rt, progress=rt.is_main, text=args.text)
    meta_out = {"name": name, "train_emb": args.train_emb, "eval_emb": args.eval_emb, "embedding_meta": meta,
                "command": " ".join(sys.argv)}
    table = sweep_report(sw, plan, model_cfg, train_cfg, header, meta_out, t_start)
    if rt.is_main:
        print(f"sweep done in {time.time() - t_start:.0f}s wall; wrote {out / 'table.md'}, {out / 'results.json'}, "
              f"{out / 'accuracy_vs_dims.png'}")
    return table


if __name__ == "__main__":
    run(main)
