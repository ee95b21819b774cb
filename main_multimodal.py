"""CSR on frozen CLIP features (open_clip + webdataset), and zero-shot image-text retrieval evaluation.

Three forms (the training form has no sub-command word, as in the paper's README).

1. Train one CSR shared by the image and text towers of a frozen open_clip model. The paper's README command
   runs as written (given CC3M shards and the DFN2B weights on disk; nothing is downloaded here, so
   `--pretrained dfn2b` works only when the weights are already in the local cache, else pass the file,
   e.g. `--pretrained /path/open_clip_pytorch_model.bin --force-quick-gelu`):
    torchrun --nproc_per_node=1 ./main_multimodal.py --train-data "shards-{0000..0575}.tar" \
        --train-num-samples 2905954 --dataset-type webdataset --precision amp --workers 8 --model ViT-B-16 \
        --pretrained dfn2b --epochs 5 --csr-topk 64 --csr-auxk 1024 --csr-cl_coef 1 --csr-hidden-size 2048 \
        --csr-input-dim 512 --batch-size 1024 --lr 4e-4 --wd 1e-4 --grad-clip-norm 1.0 --save-frequency 1
   Built-in data (after form 3; the tiny CLIP trained on the fixture shards, features cached once):
    python main_multimodal.py --train-data ".cache/mm/shards/shards-{0000..0015}.tar" \
        --model .cache/mm/tiny-clip.json --pretrained .cache/mm/tiny-clip-fmnist.pt --csr-input-dim 32 \
        --csr-hidden-size 128 --csr-topk 8 --csr-auxk 32 --batch-size 256 --epochs 30 --workers 1 \
        --feature-cache .cache/mm/features --save-frequency 10 --out runs/mm/demo
   Without `--feature-cache` every step decodes shard samples and runs the frozen CLIP (online features).
   Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) training is DistributedDataParallel (NCCL on CUDA,
   gloo on CPU); `--batch-size` is the global batch, as in every trainer here (open_clip's is per process: the
   same number on one process, as in the paper's command).
   The training flags are csr/cli.py's, shared with main_visual.py and main_text.py (`--topk`, `--warmup-steps`,
   `--schedule`, `--adam-eps`, `--resume`, k annealing `--k-start`, resampling `--resample-every`, ...), with
   the paper's image-text defaults; the paper's spellings (`--csr-topk`, `--warmup`, `--lr-scheduler const`,
   `--eps`, `--resume latest`, ...) are aliases of them.
   Writes OUT/epoch_{E}.pt every --save-frequency epochs (and at the end), last.pt (for --resume), csr.pt
   (final; readable by `eval` and inference/csr_inference.py) + csr.json, log.jsonl.

2. Zero-shot retrieval (image->text and text->image recall@k; a hit when any caption of the image is in the
   top k), exact search (sparse engine for CSR codes, FAISS for dense CLIP features):
    python main_multimodal.py eval --dataset mscoco_captions --dataset_root .cache/mm/coco \
        --task zeroshot_retrieval --model .cache/mm/tiny-clip.json --pretrained .cache/mm/tiny-clip-fmnist.pt \
        --output runs/mm/coco_csr.json --batch_size 64 --recall_k 1 5 10 --csr true \
        --csr_ckpt runs/mm/demo/csr.pt --topk 2 4 8 16 32
   Paper data: --dataset mscoco_captions --dataset_root DIR (DIR/coco_test_karpathy.json or dataset_coco.json
   + DIR/val2014/) or --dataset flickr30k (DIR/dataset_flickr30k.json + DIR/flickr30k-images/), --model
   ViT-B-16 --pretrained /path/weights. `--csr false` evaluates the plain CLIP features.
   Writes the JSON (results + provenance: command, code version, CLIP, data) and prints a markdown table.

3. Fixtures: real Fashion-MNIST images with TEMPLATED captions as webdataset shards, COCO- and Flickr30k-style
   retrieval sets (5 captions per image), a tiny open_clip architecture with random weights and, with
   --train-clip-steps, those weights trained on the shards (no CLIP weights are reachable here):
    python main_multimodal.py fixtures --out .cache/mm --train-clip-steps 300
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from csr.cli import (ArgumentParser, adam_beta, add_aliases, add_train_args, bool_flag, nonneg_float, nonneg_int,
                     positive_int, reject_unused, run, seed_int, str2bool)
from csr.io import CSRError, warn

PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "fp32")
# Defaults here are the paper's image-text hyper-parameters (its multimodal README command); every other
# training flag is csr/cli.py's, shared with main_visual.py and main_text.py.
PAPER_DEFAULTS = dict(topk=64, auxk=1024, hidden_size=2048, epochs=5, batch_size=1024, wd=1e-4, adam_eps=1e-6,
                      grad_clip=1.0, seed=0)
# The paper's multimodal spellings of the shared training flags (--grad-clip-norm is one of csr/cli.py's own)
PAPER_ALIASES = {"topk": ["--csr-topk"], "auxk": ["--csr-auxk"], "hidden_size": ["--csr-hidden-size"],
                 "dead_threshold": ["--csr-dead-threshold"], "tied": ["--csr-tied"],
                 "cl_coef": ["--csr-cl_coef", "--csr-cl-coef"], "auxk_coef": ["--csr-auxk-coef"],
                 "multi_k_coef": ["--csr-multi-k-coef"], "recon_loss": ["--csr-recon-loss"], "adam_eps": ["--eps"],
                 "schedule": ["--lr-scheduler"], "warmup_steps": ["--warmup"]}
# shared flags that mean nothing for image-text training, and what to use instead
UNUSED = {"use_ddp": "DDP follows torchrun (WORLD_SIZE > 1)", "gpu": "use --device cuda:N",
          "amp": "--precision sets autocast", "temperature": "the InfoNCE scale is --csr-logit-scale",
          "recipe": "the recipes are chosen for image and text rows; pass their flags one by one"}


def _clip_args(g: argparse._ArgumentGroup, underscore: bool = False) -> None:
    g.add_argument("--model", default="ViT-B-16",
                   help="open_clip architecture (paper: ViT-B-16) or a .json open_clip model config file")
    g.add_argument("--pretrained", default="dfn2b",
                   help="local CLIP weights file; 'none' = random init (tests); an open_clip tag (paper: dfn2b) "
                        "only when its weights are already in the local cache (nothing downloads)")
    g.add_argument("--force-quick-gelu", "--force_quick_gelu", dest="force_quick_gelu", action="store_true",
                   help="QuickGELU activations (needed for OpenAI and DFN2B weights loaded from a file)")
    g.add_argument("--precision", default="amp", choices=PRECISIONS,
                   help="frozen CLIP autocast on CUDA: amp = float16, amp_bf16 = bfloat16, fp32 (CPU: fp32)")


def build_train_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="main_multimodal.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Training defaults here (the paper's image-text recipe): " + " ".join(
                                    f"{k}={v}" for k, v in PAPER_DEFAULTS.items()) + ", cl=pair, cl_coef=1. "
                                "Sub-commands: `main_multimodal.py eval ...`, `main_multimodal.py fixtures ...`")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True,
                   help="webdataset shards, brace notation, '::' joins sources (e.g. 'cc3m/{0000..0575}.tar')")
    d.add_argument("--train-num-samples", type=positive_int, default=None,
                   help="image-text pairs per epoch (open_clip's meaning; with --feature-cache: pairs cached). "
                        "Default: one pass, counted from the shards")
    d.add_argument("--dataset-type", default="webdataset", choices=["webdataset", "auto"],
                   help="only webdataset shards (jpg/png/webp + txt per sample) are read")
    bool_flag(d, "--dataset-resampled", default=False, help="sample shards with replacement (open_clip's flag)")
    d.add_argument("--workers", type=nonneg_int, default=4, help="DataLoader workers per process (decode + preprocess)")
    d.add_argument("--shuffle-buffer", type=positive_int, default=1000, help="webdataset sample shuffle buffer")
    d.add_argument("--feature-cache", default=None,
                   help="directory for cached CLIP features (image_emb.npy, text_emb.npy): extract once, "
                        "then train from the cache (far faster for several epochs)")
    c = p.add_argument_group("CLIP (frozen)")
    _clip_args(c)
    add_train_args(p, cl_coef=1.0, cl="pair", precision_flag="--csr-precision")  # --precision: the frozen CLIP's
    p.set_defaults(**PAPER_DEFAULTS)
    m = p.add_argument_group("image-text (one CSR shared by both towers)")
    m.add_argument("--csr-input-dim", type=positive_int, default=None,
                   help="CLIP embedding width (paper: 512 for ViT-B-16); checked against the model")
    m.add_argument("--csr-cl-on", default="recon", choices=["recon", "codes"],
                   help="InfoNCE on the L2-normalised top-k reconstructions (reference) or on the sparse codes")
    m.add_argument("--csr-logit-scale", type=nonneg_float, default=0.0,
                   help="InfoNCE logit scale (0 = the frozen CLIP's own, exp(logit_scale), 100 for trained CLIPs)")
    m.add_argument("--beta1", type=adam_beta, default=0.9, help="AdamW beta1 in [0, 1) (open_clip default)")
    m.add_argument("--beta2", type=adam_beta, default=0.98, help="AdamW beta2 in [0, 1) (open_clip default for ViTs)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="run directory (default runs/csr_<model>_k<topk>_h<hidden>); not open_clip's --logs, "
                          "which torchrun would take for its own --logs-specs")
    out.add_argument("--save-frequency", type=positive_int, default=1, help="checkpoint every N epochs (paper: 1)")
    bool_flag(out, "--progress", default=True, help="tqdm progress bars")
    add_aliases(p, PAPER_ALIASES, "the paper's spellings",
                "the multimodal README's names of the training flags above; both spellings work")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="main_multimodal.py eval", description="Zero-shot image-text retrieval")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, choices=["mscoco_captions", "flickr30k"], help="retrieval set")
    d.add_argument("--dataset_root", "--dataset-root", required=True,
                   help="COCO: images + coco_test_karpathy.json/dataset_coco.json; Flickr30k: images + "
                        "dataset_flickr30k.json")
    d.add_argument("--annotation", default=None, help="captions JSON (default: found in --dataset_root)")
    d.add_argument("--split", default="test", help="split of a Karpathy file (default test)")
    d.add_argument("--task", default="zeroshot_retrieval", choices=["zeroshot_retrieval"], help="evaluation task")
    c = p.add_argument_group("CLIP (frozen)")
    _clip_args(c)
    s = p.add_argument_group("CSR")
    s.add_argument("--csr", type=str2bool, default=True, metavar="BOOL",
                   help="pass features through CSR (true) or evaluate plain CLIP features (false)")
    s.add_argument("--csr_ckpt", "--csr-ckpt", default=None, help="CSR checkpoint (.pt from training)")
    s.add_argument("--topk", "--rep_dim", "--rep-dim", dest="topk", type=positive_int, nargs="+", default=None,
                   help="active units k; several values sweep k in one run (default: the trained k)")
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, help="result JSON")
    o.add_argument("--recall_k", "--recall-k", type=positive_int, nargs="+", default=[1, 5, 10], help="k of recall@k")
    bool_flag(o, "--overwrite", default=False, help="replace an existing --output")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch_size", "--batch-size", type=positive_int, default=64, help="images/captions per batch")
    r.add_argument("--workers", "--num_workers", type=nonneg_int, default=0, help="image loading workers")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    r.add_argument("--seed", type=seed_int, default=0, help="seed of a random-init CLIP (--pretrained none)")
    return p


def build_fixtures_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="main_multimodal.py fixtures",
                                description="Fashion-MNIST image-text fixtures (real images, TEMPLATED captions)")
    p.add_argument("--out", default=".cache/mm", help="output directory")
    p.add_argument("--n-train", type=positive_int, default=4096, help="image-text pairs in the webdataset shards")
    p.add_argument("--per-shard", type=positive_int, default=256, help="pairs per shard")
    p.add_argument("--n-eval", type=positive_int, default=200, help="images in each retrieval set (5 captions each)")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX directory")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling and caption-template seed")
    p.add_argument("--train-clip-steps", type=nonneg_int, default=0,
                   help="also train the tiny CLIP on the shards for this many steps (open_clip's ClipLoss) and "
                        "write OUT/tiny-clip-fmnist.pt, for a demo above chance (e.g. 300 steps)")
    p.add_argument("--train-clip-batch", type=positive_int, default=128, help="tiny CLIP training batch")
    bool_flag(p, "--overwrite", default=False, help="start over in an existing --out: the old run is removed only "
                                                     "when the new one writes its first checkpoint")
    return p


# ----------------------------------------------------------------------------- train

def train_main(args: argparse.Namespace) -> dict:
    import torch

    from csr import clip as clip_
    from csr import distributed
    from csr import multimodal as mm
    from csr import webdata as wd
    from csr.checkpoint import clear_run_dir, prepare_run_dir
    from csr.cli import configs_from_args
    from csr.io import check_writable
    from csr.model import CSR

    shards = wd.expand_shards(args.train_data)
    wd.check_shard(shards[0])
    ckpt_dir = Path(args.out or f"runs/csr_{Path(args.model).stem}_k{args.topk}_h{args.hidden_size}")
    resume = args.resume
    prepare_run_dir(ckpt_dir, args.overwrite, resume)
    if args.feature_cache:
        check_writable(args.feature_cache)  # a file or read-only place fails now, not after the extraction
    rt = distributed.setup(True, args.device)  # DDP exactly when torchrun starts several processes
    try:
        if args.batch_size % rt.world_size:
            raise CSRError(f"--batch-size {args.batch_size} (global) must be divisible by the number of processes "
                           f"({rt.world_size})")
        per_rank, global_batch = args.batch_size // rt.world_size, args.batch_size
        clip = clip_.load_clip(args.model, args.pretrained, rt.device, args.precision, args.force_quick_gelu, args.seed)
        if args.csr_input_dim is not None and args.csr_input_dim != clip.embed_dim:
            raise CSRError(f"--csr-input-dim {args.csr_input_dim} does not match the embedding width "
                           f"{clip.embed_dim} of {clip.name}")
        model_cfg, train_cfg = configs_from_args(args, clip.embed_dim)
        # the image-text InfoNCE is added by csr.multimodal (the shared step's own contrastive term is off);
        # --cl none or --use_CL False turn it off
        train_cfg = replace(train_cfg, cl="none", cl_coef=train_cfg.cl_coef if train_cfg.cl == "pair" else 0.0,
                            amp=args.precision.startswith("amp"))
        logit_scale = args.csr_logit_scale or clip.logit_scale
        if args.feature_cache:
            img, txt = wd.build_feature_cache(args.feature_cache, clip, shards, args.train_data, per_rank,
                                              args.workers, args.train_num_samples, rt, args.progress)
            if len(img) < global_batch:
                raise CSRError(f"--feature-cache holds {len(img)} pairs, fewer than one global batch of {global_batch}")
            source = mm.CachedFeatures(img, txt, global_batch, args.seed, rt)
            data_desc = f"feature cache {args.feature_cache} ({len(img)} pairs)"
        else:
            wd.check_readers(len(shards), rt.world_size, args.workers, args.dataset_resampled)
            n = args.train_num_samples or wd.count_pairs(shards)
            batches = max(1, -(-n // global_batch))
            stream = wd.ShardStream(shards, clip.preprocess, clip.tokenizer, per_rank, rt.rank,
                                    rt.world_size, batches_per_worker=-(-batches // max(1, args.workers)),
                                    shuffle=True, resampled=args.dataset_resampled, buffer=args.shuffle_buffer,
                                    seed=args.seed)
            source = mm.OnlineFeatures(clip, stream, args.workers)
            data_desc = f"{len(shards)} shards, {n} pairs/epoch, online CLIP features"
        model = CSR.seeded(model_cfg, args.seed)
        if rt.is_main:
            print(f"data: {args.train_data}: {data_desc}")
            print(f"CLIP: {clip.name} ({clip.pretrained}), width {clip.embed_dim}, logit scale {clip.logit_scale:.4g}, "
                  f"precision {args.precision} on {rt.device}"
                  + ("" if rt.device.type == "cuda" else " (autocast is CUDA-only: fp32 here)"))
            print(f"model: {model_cfg}")
            print(f"train: {train_cfg}, InfoNCE on {args.csr_cl_on} with scale {logit_scale:.4g}")
            print(f"runtime: device {rt.device}, world size {rt.world_size}, {global_batch} pairs per step")
        extra = {"clip": clip.describe(), "args": vars(args)}
        t0 = time.time()
        summary = mm.train_multimodal(model, source, train_cfg, ckpt_dir, rt, logit_scale, args.csr_cl_on,
                                      args.save_frequency, (args.beta1, args.beta2), args.adam_eps, extra, resume,
                                      args.progress, replace_old=(lambda: clear_run_dir(ckpt_dir))
                                      if args.overwrite and not resume and rt.is_main else None)
        if rt.is_main:
            print(f"done in {time.time() - t0:.1f}s: {summary['steps']} steps, final loss "
                  f"{summary.get('loss_total', float('nan')):.5g}, dead latents {summary.get('dead_fraction', 0):.1%}, "
                  f"{summary.get('samples_per_s', 0):.1f} samples/s (last epoch, "
                  f"{'from the feature cache' if args.feature_cache else 'decoding and CLIP included'})")
            print(f"wrote {summary['checkpoint']} (+ {', '.join(Path(s).name for s in summary['saved'])}, last.pt, "
                  f"log.jsonl, csr.json)")
        return summary
    finally:
        distributed.cleanup()


# ----------------------------------------------------------------------------- eval

def check_image_text_checkpoint(ckpt: dict, path: str) -> None:
    """A checkpoint of another trainer (main_visual.py, main_text.py: a training run with no CLIP recorded) was
    fitted to one kind of embedding, not to CLIP's image and text features under the image-text InfoNCE: its
    recall would be a number about other data, so it is refused."""
    if ckpt.get("clip") or not ckpt.get("train_config"):
        return
    args = ckpt.get("args") or {}
    data = (ckpt.get("data") or {}).get("path") or args.get("pretrained_emb") or args.get("emb_dir")
    script = ("main_visual.py" if "pretrained_emb" in args else "main_text.py" if {"emb_dir", "emb_root"} & set(args)
              else "a trainer other than main_multimodal.py")
    raise CSRError(f"--csr_ckpt {path}: trained by {script}" + (f" on {data}" if data else "")
                   + ", not on CLIP image-text features (no CLIP recorded); train one with main_multimodal.py "
                     "or pass --csr false")


def eval_main(args: argparse.Namespace) -> dict:
    from csr import clip as clip_
    from csr import zeroshot as zs
    from csr.checkpoint import check_input_dim, load_model
    from csr.distributed import pick_device
    from csr.io import atomic_write_json, check_output, code_version, command_line
    from csr.metrics import markdown_table

    check_output(args.output, args.overwrite)
    if args.csr and not args.csr_ckpt:
        raise CSRError("--csr true needs --csr_ckpt (or pass --csr false for plain CLIP features)")
    device = pick_device(args.device)
    model = ckpt = None
    if args.csr:  # read the checkpoint first: a wrong file fails before any embedding work
        model, ckpt = load_model(args.csr_ckpt, device, unfinished="warn")  # epoch_E.pt may be evaluated
        check_image_text_checkpoint(ckpt, args.csr_ckpt)
    ds = zs.load_caption_set(args.dataset, args.dataset_root, args.annotation, args.split)
    clip = clip_.load_clip(args.model, args.pretrained, device, args.precision, args.force_quick_gelu, args.seed)
    if model is not None:
        check_input_dim(model, clip.embed_dim, f"--csr_ckpt {args.csr_ckpt} with CLIP {clip.name}")
        trained = (ckpt.get("clip") or {}).get("model")
        if trained and trained != clip.name:
            warn(f"{args.csr_ckpt} was trained on {trained} features, evaluating with {clip.name}")
        elif not trained:
            warn(f"{args.csr_ckpt} records no training run (saved outside main_multimodal.py or imported): "
                 f"nothing says it was trained on {clip.name} features")
    t0 = time.time()
    img = clip_.embed_images(clip, ds.image_paths, args.batch_size, args.workers)
    txt = clip_.embed_texts(clip, ds.captions, args.batch_size)
    t_embed = time.time() - t0
    topks = (args.topk or [model.cfg.topk]) if model is not None else []
    for k in topks:
        if k > model.cfg.hidden_size:
            raise CSRError(f"--topk {k} is larger than the checkpoint's hidden_size {model.cfg.hidden_size}")
    rows = zs.zero_shot_retrieval(img, txt, ds.text_to_image, args.recall_k, model, topks, device)
    result = {"dataset": args.dataset, "task": args.task, "model": clip.name, "pretrained": clip.pretrained,
              "csr": bool(args.csr), "csr_ckpt": args.csr_ckpt, "annotation": ds.annotation,
              "n_images": ds.n_images, "n_captions": len(ds.captions), "recall_k": args.recall_k,
              "units": "percent", "metrics": rows[0] if len(rows) == 1 else None, "results": rows,
              "embed_seconds": round(t_embed, 2)}
    result.update(clip=clip.describe(), dataset_root=args.dataset_root, command=command_line(),
                  code_version=code_version())  # a .json output is its own sidecar
    atomic_write_json(args.output, result)
    cols = ["representation", "active_dims"] + [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                                                for k in args.recall_k]
    print(f"{args.dataset}: {ds.n_images} images, {len(ds.captions)} captions ({ds.annotation}); "
          f"CLIP {clip.name} ({clip.pretrained}); recall in %")
    print(markdown_table(rows, cols))
    print(f"wrote {args.output}")
    return result


# ----------------------------------------------------------------------------- fixtures

def fixtures_main(args: argparse.Namespace) -> dict:
    from csr.fmnist_captions import NOTE, build_fixtures, train_tiny_clip
    t0 = time.time()
    m = build_fixtures(args.out, args.n_train, args.per_shard, args.n_eval, args.source, args.seed, args.overwrite)
    if args.train_clip_steps > 0:
        m["trained_clip"] = train_tiny_clip(args.out, args.train_clip_steps, args.train_clip_batch, seed=args.seed)
        print(f"tiny CLIP trained for {m['trained_clip']['steps']} steps in {m['trained_clip']['seconds']}s: "
              f"loss {m['trained_clip']['first_loss']:.3f} -> {m['trained_clip']['last_loss']:.3f}, wrote "
              f"{m['trained_clip']['weights']}")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s: {m['n_train']} training pairs in {m['train_data']}, "
          f"{m['n_coco']} COCO-style images in {m['coco_root']}, {m['n_flickr30k_test']} Flickr30k-style test "
          f"images in {m['flickr30k_root']} ({m['captions_per_image']} captions each), tiny CLIP {m['model']} + "
          f"{m['pretrained']}")
    print(f"note: {NOTE}")
    print(json.dumps(m, indent=2))
    return m


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        return eval_main(build_eval_parser().parse_args(argv[1:]))
    if argv and argv[0] == "fixtures":
        return fixtures_main(build_fixtures_parser().parse_args(argv[1:]))
    p = build_train_parser()
    args = p.parse_args(argv)
    reject_unused(p, args, UNUSED)
    if args.cl not in ("pair", "none"):
        raise CSRError(f"--cl {args.cl}: image-text training pairs each image with its caption (--cl pair, the "
                       f"default) or has no contrastive term (--cl none)")
    return train_main(args)


if __name__ == "__main__":
    run(main)
