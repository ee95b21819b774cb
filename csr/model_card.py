"""The model card (README.md) of an exported CSR folder: architecture, the training command and data from the
checkpoint's sidecar, k, an evaluation table (markdown, metrics JSON or rows) and usage."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from csr.io import CSRError, code_version, read_json, read_sidecar
from csr.metrics import markdown_table
from csr.model import CSRConfig


def data_files(args: dict[str, Any]) -> list[str]:
    """Embedding files named by a checkpoint's training arguments (`.npy` paths, or a folder's train split)."""
    out = []
    for v in args.values():
        if isinstance(v, str) and v.endswith(".npy"):
            out.append(v)
        elif isinstance(v, str) and v and (Path(v) / "train_emb.npy").is_file():
            out.append(str(Path(v) / "train_emb.npy"))
    return out


EVAL_SOURCES = ("a metrics .json (retrieval/compute_metrics.py, retrieval/sweep.py, main_text.py eval, "
                "main_multimodal.py eval) or a markdown .md table")


def eval_markdown(eval_table: Any) -> str:
    """The evaluation section's table from: markdown text, a `.md`/`.json` path (a metrics JSON from
    retrieval/compute_metrics.py, retrieval/sweep.py, main_text.py or main_multimodal.py eval, a list of row
    dicts, or {name: value}), a list of such paths (one row per metrics file), a list of row dicts, or a dict
    of metrics. A file that is none of these is a one-line error naming it."""
    if eval_table is None:
        return ""
    if isinstance(eval_table, (list, tuple)) and eval_table and all(isinstance(p, (str, Path)) for p in eval_table):
        parts = [eval_file(Path(p)) for p in eval_table]
        rows = [r for p in parts if isinstance(p, list) for r in p]
        texts = [p for p in parts if isinstance(p, str)]
        return "\n\n".join(([markdown_table(rows)] if rows else []) + texts)
    if isinstance(eval_table, Path) or (isinstance(eval_table, str) and "\n" not in eval_table
                                        and eval_table.endswith((".md", ".json", ".txt"))):
        part = eval_file(Path(eval_table))
        return part if isinstance(part, str) else markdown_table(part)
    if isinstance(eval_table, str):
        return eval_table.strip()
    return markdown_table(_rows(eval_table, "eval table"))


def _is_metric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _row(r: Any, where: str) -> dict:
    """One table row: the scalar fields of `r` (nested values are provenance, not columns); at least one
    number, else `r` is not a row of metrics."""
    if not isinstance(r, dict):
        raise CSRError(f"{where}: expected rows of metrics (JSON objects), got {type(r).__name__}")
    row = {k: v for k, v in r.items() if v is None or isinstance(v, (str, int, float, bool))}
    if not any(_is_metric(v) for v in row.values()):
        raise CSRError(f"{where}: a row without any numeric metric (fields: {', '.join(map(str, r)) or 'none'})")
    return row


def _rows(obj: Any, run: str, where: str | None = None) -> list[dict]:
    """Table rows from a metrics JSON: compute_metrics' {"metrics": {...}} (one row named `run`), the sweep's
    {"parts": [...]}, main_text.py's {"results": [{"rows": [...]}]}, main_multimodal.py's {"results": [...]},
    {name: value}, {run: {metric: value}} or a list of rows. `where` names the source in errors."""
    where = where or run
    if isinstance(obj, dict) and isinstance(obj.get("metrics"), dict):
        return [{"run": run, **_row(obj["metrics"], where)}]
    if isinstance(obj, dict) and isinstance(obj.get("parts"), list) and obj["parts"]:
        return [_row(r, where) for r in obj["parts"]]
    if isinstance(obj, dict) and isinstance(obj.get("results"), list) and obj["results"]:
        res = obj["results"]
        if all(isinstance(r, dict) and isinstance(r.get("rows"), list) for r in res):
            res = [row for r in res for row in r["rows"]]
        return [_row(r, where) for r in res]
    if isinstance(obj, dict) and obj and all(_is_metric(v) for v in obj.values()):
        return [{"run": run, **obj}]
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        return [_row({"run": k, **v}, where) for k, v in obj.items()]
    if isinstance(obj, list) and obj:
        return [_row(r, where) for r in obj]
    raise CSRError(f"{where}: not an evaluation table (expected {EVAL_SOURCES})")


def eval_file(path: Path) -> str | list[dict]:
    """The rows of a metrics `.json` or the text of a `.md` holding a markdown table; anything else (another
    suffix, binary bytes, a JSON of another shape, a .md without a table) is a one-line error naming `path`."""
    if not path.exists():
        raise CSRError(f"--eval {path}: evaluation file not found")
    if not path.is_file():
        raise CSRError(f"--eval {path}: not a file (expected {EVAL_SOURCES})")
    if path.suffix == ".json":
        return _rows(read_json(path, "evaluation JSON", flag="--eval"), path.stem, f"--eval {path}")
    if path.suffix != ".md":
        raise CSRError(f"--eval {path}: expected {EVAL_SOURCES}, got a {path.suffix or 'suffix-less'} file")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise CSRError(f"--eval {path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                       f"expected {EVAL_SOURCES}") from None
    if not _has_markdown_table(text):
        raise CSRError(f"--eval {path}: no markdown table (a | header | row and a |---| line); expected "
                       f"{EVAL_SOURCES}")
    return text


def _has_markdown_table(text: str) -> bool:
    """A `| header |` line followed by a `|---|` separator line."""
    lines = [ln.strip() for ln in text.splitlines()]
    return any(head.startswith("|") and "|" in sep and "---" in sep and re.fullmatch(r"[|:\-\s]+", sep)
               for head, sep in zip(lines, lines[1:]))


def _data_lines(ckpt: dict[str, Any]) -> list[str]:
    lines = []
    for f in data_files(ckpt.get("args") or {}):
        side = read_sidecar(f) if Path(f).exists() else {}
        desc = ", ".join(f"{k} {side[k]}" for k in ("backbone", "model_path", "n", "d", "source") if side.get(k) not in (None, ""))
        lines.append(f"- `{f}`" + (f" ({desc})" if desc else ""))
    return lines


def model_card(cfg: CSRConfig, ckpt: dict[str, Any], ckpt_path: str | os.PathLike, eval_table: Any = None,
               encoder_backbone: str | None = None, k: int | None = None) -> str:
    """README.md for a model folder: architecture, training command and data, k, evaluation, usage."""
    side = read_sidecar(ckpt_path)
    args, tcfg = ckpt.get("args") or {}, ckpt.get("train_config") or {}
    k = cfg.topk if k is None else k
    front = ["---", "tags:", "- csr", "- sparse-autoencoder", "- contrastive-sparse-representation"]
    if encoder_backbone:
        front += ["- sparse-encoder", "- sentence-transformers", "library_name: sentence-transformers"]
    front += ["---", ""]
    title = "CSR sparse encoder" if encoder_backbone else "CSR model"
    out = front + [f"# {title}: k = {k} of {cfg.hidden_size} units over {cfg.input_dim}-d embeddings", "",
                   "Contrastive Sparse Representation (Wen, Wang et al., \"Beyond Matryoshka: Revisiting Sparse "
                   "Coding for Adaptive Representation\", ICML 2025, arXiv 2503.01776): a top-k sparse autoencoder "
                   "over frozen embeddings. Codes are `ReLU(TopK_k(W (x - b_pre) + b_lat))`; k can be chosen at "
                   "inference time.", "", "## Model", "",
                   markdown_table([{"input_dim": cfg.input_dim, "hidden_size": cfg.hidden_size, "k (training)": cfg.topk,
                                    "k (default here)": k, "auxk": cfg.auxk, "tied decoder": cfg.tied,
                                    "input normalisation": cfg.normalize}]), ""]
    if encoder_backbone:
        out += [f"A sentence-transformers `SparseEncoder`: the backbone `{encoder_backbone}` (the model whose "
                "embeddings this CSR was trained on) followed by a `SparseAutoEncoder` module holding these weights. "
                "`encode` returns sparse `[N, hidden]` tensors; `max_active_dims` sets k.", ""]
    out += ["## Training", ""]
    if "imported_from" in args:
        out += [f"Imported from `{args['imported_from']}` (trained outside this code base).", ""]
    elif side.get("command"):
        out += ["```", side["command"], "```", ""]
    else:
        out += ["Training command not recorded (no sidecar beside the checkpoint).", ""]
    data = _data_lines(ckpt)
    if data:
        out += ["Data:", "", *data, ""]
    stats = side.get("final_stats") or {}
    if "loss_total" in stats:
        out += [f"Final epoch: loss {stats['loss_total']:.5g}, reconstruction MSE {stats.get('loss_recon_k', float('nan')):.4g}, "
                f"dead latents {stats.get('dead_fraction', float('nan')):.1%} (not fired in {cfg.dead_threshold} steps).", ""]
    if tcfg:
        keys = ("lr", "batch_size", "epochs", "cl", "cl_coef", "temperature", "auxk_coef", "recon_loss", "seed")
        out += [markdown_table([{key: tcfg[key] for key in keys if key in tcfg} | {"steps": ckpt.get("step")}],
                               floatfmt="{:g}"), ""]
    out += ["## Evaluation", "", eval_markdown(eval_table) or "No evaluation table was supplied.", "", "## Usage", ""]
    if encoder_backbone:
        out += ["```python", "from sentence_transformers import SparseEncoder", "model = SparseEncoder(\"PATH\")",
                f"codes = model.encode([\"a sentence\"], max_active_dims={k})  # sparse [N, {cfg.hidden_size}]",
                "```", ""]
    else:
        out += ["```python", "from csr.interop import from_pretrained", "model = from_pretrained(\"PATH\")",
                f"indices, values = model.encode(embeddings, k={k})  # embeddings: float tensor [N, {cfg.input_dim}]",
                "```", ""]
    out += ["## Provenance", "", f"- checkpoint: `{Path(ckpt_path).name}`, trained with code version "
            f"`{ckpt.get('code_version', 'unknown')}`", f"- exported with code version `{code_version()}`", ""]
    return "\n".join(out)

