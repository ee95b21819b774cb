"""The bad-input contract of every stage script, table-driven (issues 12 §4/§7 and 16).

Each bad input must end in exactly ONE line `error: ...` naming the file, flag or shape at fault, exit code 2,
no traceback, and nothing new left on disk; a legal but suspicious input gives one `warning: ...` line and
succeeds. Cases run in-process through `csr.cli.run` (the scripts' `__main__` path); only the kill -9 case
starts a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import export_csr
import main_multimodal
import main_text
import main_visual
import stack_emb
from csr.checkpoint import load_model, read_checkpoint, save_checkpoint
from csr.cli import run
from csr.codes import SparseCodes, save_codes
from csr.model import CSR, CSRConfig
from inference import csr_inference
from retrieval import compute_metrics, faiss_nn, sweep

ROOT = Path(__file__).resolve().parent.parent
D = 16
TRAIN = ["--topk", "4", "--hidden-size", "32", "--auxk", "8", "--batch-size", "50", "--epochs", "1"]


def rows(n: int, seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d), dtype=np.float32) + 0.1


def save_split(folder: Path, split: str, x: np.ndarray, labels: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_emb.npy", x)
    np.save(folder / f"{split}_labels.npy", np.arange(len(x)) % 3 if labels is None else labels)
    return folder / f"{split}_emb.npy"


def save_text_folder(folder: Path, test: np.ndarray | None = None) -> Path:
    """A text embedding folder in main_text.py embed's layout: train / test splits and corpus.json."""
    save_split(folder, "train", rows(200, 0))
    save_split(folder, "test", rows(60, 1) if test is None else test)
    (folder / "corpus.json").write_text(json.dumps({"name": folder.name, "task": "labelled"}))
    return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A small world: good embeddings and labels, a finished run, a killed run, codes, neighbours, shards,
    a text embedding folder and a minimal webdataset shard; plus every kind of broken file."""
    d = tmp_path_factory.mktemp("bad")
    f = {"dir": d, "emb": save_split(d, "train", rows(200, 0)), "val": save_split(d, "val", rows(60, 1))}
    f["other"] = save_split(d / "other", "train", rows(200, 2))  # same width, different data
    f["wide"] = save_split(d / "wide", "val", rows(60, 3, 24))
    f["zero"] = save_split(d / "zero", "train", np.zeros((20, D), np.float32))
    nan = rows(20, 4)
    nan[5, 2] = np.nan
    f["nan"] = save_split(d / "nan", "train", nan)
    f["huge"] = save_split(d / "huge", "train", rows(100, 5) * np.float32(1e25))  # squares overflow float32
    f["neglab"] = save_split(d / "neglab", "val", rows(60, 1), np.full(60, -1))
    f["run"] = d / "run"
    main_visual.main(["--pretrained_emb", str(f["emb"]), *TRAIN, "--epochs", "2", "--out", str(f["run"])])
    f["killed"] = d / "killed"  # what kill -9 leaves: last.pt and log.jsonl, no csr.pt
    f["killed"].mkdir()
    for name in ("last.pt", "log.jsonl"):
        shutil.copy(f["run"] / name, f["killed"] / name)
    nanw = CSR(CSRConfig(D, 32, 4, 8))
    with torch.no_grad():
        nanw.encoder.weight[0, 0] = float("nan")
    f["nanckpt"] = d / "nanw.pt"
    save_checkpoint(f["nanckpt"], nanw, complete=True)
    f["corrupt"] = d / "corrupt.pt"
    f["corrupt"].write_bytes((f["run"] / "csr.pt").read_bytes()[:3000])
    # codes and neighbours
    csr_inference.main(["--train_emb_path", str(f["emb"]), "--eval_emb_path", str(f["val"]),
                        "--csr_ckpt", str(f["run"] / "csr.pt"), "--out", str(d / "codes")])
    f["db"], f["q"] = d / "codes" / "train_codes.npz", d / "codes" / "val_codes.npz"
    f["trunc_npz"] = d / "trunc_codes.npz"
    f["trunc_npz"].write_bytes(f["db"].read_bytes()[:500])
    zero = SparseCodes(np.tile(np.arange(4, dtype=np.int16), (10, 1)), np.zeros((10, 4), np.float32), 32)
    f["zero_codes"] = d / "zero_codes.npz"
    save_codes(f["zero_codes"], zero)
    signed = SparseCodes(np.array([[1, 1, 2, 3]] * 10, np.int16), -np.ones((10, 4), np.float32), 32)
    f["signed_codes"] = d / "signed_codes.npz"
    save_codes(f["signed_codes"], signed)
    faiss_nn.main(["--database", str(f["emb"]), "--queries", str(f["val"]), "--out", str(d / "nn.npy"), "-K", "20"])
    f["nn"] = d / "nn.npy"
    bad = d / "nnbad"
    bad.mkdir()
    (bad / "zero.npy").write_bytes(b"")
    (bad / "trunc.npy").write_bytes(f["nn"].read_bytes()[:200])
    for name, arr in {"float": np.ones((60, 5)), "three": np.zeros((60, 5, 2), np.int64),
                      "nocol": np.zeros((60, 0), np.int64), "flat": np.arange(60)}.items():
        np.save(bad / f"{name}.npy", arr)
    np.save(bad / "object.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    for name in ("float", "three", "nocol", "flat", "object", "zero", "trunc"):  # the sidecar names the labels
        shutil.copy(d / "nn.json", bad / f"{name}.json")
    f["nnbad"] = bad
    # shards for stack_emb
    for name, shards in {"nan_shards": [rows(10, 6), nan], "mixed_shards": [rows(10, 6), rows(10, 7, 8)],
                         "short_shards": [rows(10, 6)]}.items():
        sd = d / name
        sd.mkdir()
        for i, x in enumerate(shards):
            np.save(sd / f"emb_{i:05d}.npy", x)
            np.save(sd / f"labels_{i:05d}.npy", np.zeros(len(x) - (name == "short_shards"), np.int64))
    (d / "empty_shards").mkdir()
    (d / "empty_shards" / "emb_00000.npy").write_bytes(b"")
    np.save(d / "empty_shards" / "labels_00000.npy", np.zeros(3, np.int64))
    # a text embedding folder (main_text.py embed's layout) with a mismatched twin
    for name, test in (("text", rows(60, 1)), ("text_wide", rows(60, 1, 24))):
        save_text_folder(d / name, test)
    # one webdataset shard (the trainer checks names before loading CLIP)
    with tarfile.open(d / "shard-0000.tar", "w") as tar:
        for n in ("0.jpg", "0.txt"):
            (d / n).write_bytes(b"x")
            tar.add(d / n, arcname=n)
    f["shard"] = d / "shard-0000.tar"
    (d / "regular_file").write_text("x")
    # issue 23 §3: an unfinished run's last.pt (of 3 epochs, killed after 2), a NaN-weight one to resume from
    ck = read_checkpoint(f["run"] / "last.pt")
    f["unfinished"] = d / "unfinished.pt"
    torch.save({**ck, "train_config": {**ck["train_config"], "epochs": 3}}, f["unfinished"])
    f["nanrun"] = d / "nanrun"
    f["nanrun"].mkdir()
    shutil.copy(f["run"] / "log.jsonl", f["nanrun"] / "log.jsonl")
    ck["state_dict"]["encoder.weight"][0, 0] = float("nan")
    torch.save({**ck, "train_config": {**ck["train_config"], "epochs": 3}}, f["nanrun"] / "last.pt")
    # codes over another number of units; neighbours repeating an id, or outside the database
    wide = SparseCodes(np.tile(np.arange(4, dtype=np.int16), (10, 1)), np.ones((10, 4), np.float32), 64)
    f["codes64"] = d / "codes64.npz"
    save_codes(f["codes64"], wide)
    nn = np.load(f["nn"])
    dup, far = nn.copy(), nn.copy()
    dup[7, 3] = dup[7, 1]
    far[4, 2] = 250
    for name, arr in (("dup", dup), ("far", far)):
        np.save(bad / f"{name}.npy", arr)
        shutil.copy(d / "nn.json", bad / f"{name}.json")
    # an output's companion already there (faiss_nn.py's scores, its sidecar)
    shutil.copy(d / "nn_scores.npy", d / "lone_scores.npy")
    (d / "lone2.json").write_text(json.dumps({"file": "lone2.npy", "command": "faiss_nn.py, an earlier run"}))
    # shard folders with a corrupt manifest or shard record
    for name, broken in (("badman_shards", "manifest.json"), ("badrec_shards", "shard_00000.json")):
        sd = d / name
        sd.mkdir()
        np.save(sd / "emb_00000.npy", rows(10, 6))
        np.save(sd / "labels_00000.npy", np.zeros(10, np.int64))
        (sd / broken).write_text('{"rows": 10, "skipped": [')
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    # the tiny open_clip architecture (random init is fast) and a feature cache of garbage
    from csr.clip import TINY_CLIP_CONFIG
    (d / "tiny-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    (d / "fcache").mkdir()
    for name in ("image_emb.npy", "text_emb.npy"):
        (d / "fcache" / name).write_bytes(b"garbage, not an array\n" * 20)
    return f


def snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def expect_error(main, argv, needle: str, capsys, root: Path) -> str:
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, (argv, err[-800:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (argv, err[-800:])
    assert needle in lines[0], (argv, needle, lines[0])
    assert snapshot(root) == before, (argv, snapshot(root) ^ before)  # nothing partial left on disk
    return lines[0]


def cases(f):
    """(script main, argv, text the one error line must contain)."""
    d, nb = f["dir"], f["nnbad"]
    run_ck = f["run"] / "csr.pt"
    new = d / "new"  # never exists: outputs of cases that must fail
    mv = [main_visual.main, "--pretrained_emb"]
    inf = [csr_inference.main, "--eval_emb_path", f["val"], "--out", new]
    knn = [faiss_nn.main, "--database", f["db"], "--queries", f["q"], "--out", new / "nn.npy"]
    met = [compute_metrics.main, "--out", new / "m.json", "--neighbors"]
    sw = [sweep.main, "--train-emb", f["emb"], "--out", new, *TRAIN, "--methods", "trunc", "--ablation-k", "0",
          "--ks", "8"]
    te = [main_text.main, "eval", "--emb-dir", d / "text", "--methods", "truncation", "--out", new / "r.json"]
    mm = [main_multimodal.main, "--train-data", f["shard"], "--model", "RN50", "--pretrained", "none"]
    mme = [main_multimodal.main, "eval", "--dataset", "flickr30k", "--dataset_root", d, "--csr", "false"]
    ex = [export_csr.main, "save-pretrained", "--out", new, "--ckpt"]
    return [
        # --- main_visual.py / the shared trainer (issue 16: 1, 3, 4, 5, 9, 11, 12, 16)
        (*mv, f["emb"], *TRAIN, "--out", f["killed"], "killed or unfinished run); pass --resume"),
        (*mv, f["emb"], *TRAIN, "--out", f["run"], "finished run); pass --resume"),
        (*mv, f["emb"], *TRAIN, "--temperature", "0", "--out", new, "--temperature: must be a finite number > 0"),
        (*mv, f["emb"], *TRAIN, "--lr=-1e-3", "--out", new, "argument --lr: must be a finite number > 0"),
        (*mv, f["emb"], *TRAIN, "--lr", "nan", "--out", new, "argument --lr: must be a finite number > 0, got nan"),
        (*mv, f["emb"], *TRAIN, "--max-steps", "-5", "--out", new, "--max_steps: must be >= 0, got -5"),
        (*mv, f["emb"], *TRAIN, "--auxk", "-5", "--out", new, "argument --auxk: must be >= 0"),
        (*mv, f["emb"], *TRAIN, "--device", "tpu", "--out", new, "--device tpu: expected auto, cpu, cuda"),
        (*mv, f["other"], *TRAIN, "--resume", "--out", f["killed"], f"not on {f['other'].resolve()}"),
        (*mv, f["emb"], *TRAIN[:2], "--hidden-size", "64", *TRAIN[4:], "--resume", "--out", f["killed"],
         "hidden_size 32 there, 64 now"),
        (*mv, f["wide"], *TRAIN, "--resume", "--out", f["killed"], "input_dim 16 there, 24 now"),
        (*mv, f["zero"], *TRAIN, "--out", new, "zero/train_emb.npy: all embeddings are zero"),
        (*mv, f["huge"], *TRAIN, "--out", new, "non-finite training loss at step 1"),
        (*mv, f["emb"], *TRAIN, "--out", d / "regular_file" / "run", "regular_file is not a directory"),
        (*mv, f["emb"], *TRAIN, "--out", "/proc/csr_run", "cannot write under /proc"),
        # --- inference/csr_inference.py (6, 8, 10, 11, 16)
        (*inf, "--csr_ckpt", run_ck, "--topk", "0", "argument --topk: must be >= 1, got 0"),
        (*inf, "--csr_ckpt", run_ck, "--batch-size", "0", "argument --batch-size: must be >= 1"),
        (*inf, "--csr_ckpt", f["nanckpt"], "nanw.pt: NaN or Inf in the weights ("),
        (csr_inference.main, "--eval_emb_path", f["val"], "--csr_ckpt", run_ck, "--out", d / "regular_file" / "c",
         "regular_file is not a directory"),
        # --- retrieval/faiss_nn.py (8, 9, 15, 16)
        (faiss_nn.main, "--database", f["trunc_npz"], "--queries", f["q"], "--out", new / "nn.npy",
         "trunc_codes.npz: not a readable .npz code file (truncated or corrupt"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["val"], "--dims", "0", "--out", new / "nn.npy",
         "argument --dims: must be >= 1"),
        (faiss_nn.main, "--database", f["zero_codes"], "--queries", f["q"], "--out", new / "nn.npy",
         "zero_codes.npz: all code values are zero"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["wide"], "--out", new / "nn.npy",
         "wide/val_emb.npy: embeddings have d=24 but"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["q"], "--out", new / "nn.npy",
         "must both be codes (.npz) or both be embeddings"),
        (*knn[:-1], "/proc/nn.npy", "cannot write under /proc"),
        # --- retrieval/compute_metrics.py (7, 14, 16)
        (*met, nb, "nnbad: is a directory, expected a neighbours file"),
        (*met, nb / "zero.npy", "zero.npy: empty neighbours file (0 bytes)"),
        (*met, nb / "trunc.npy", "trunc.npy: not a readable .npy neighbours file"),
        (*met, nb / "float.npy", "float.npy: neighbours must be integer database indices, got float64"),
        (*met, nb / "three.npy", "three.npy: neighbours must be 2-D [queries, K], got shape (60, 5, 2)"),
        (*met, nb / "flat.npy", "flat.npy: neighbours must be 2-D [queries, K], got shape (60,)"),
        (*met, nb / "object.npy", "object.npy: not a readable .npy neighbours file"),
        (*met, nb / "nocol.npy", "nocol.npy: empty neighbour lists, shape (60, 0)"),
        (*met, f["nn"], "--ks", "0", "argument --ks: must be >= 1, got 0"),
        (*met, f["nn"], "--ks", "10", "200", "--ks 200: " + str(f["nn"]) + " has only 20 neighbours"),
        (*met, f["nn"], "--query_labels", d / "neglab" / "val_labels.npy", "val_labels.npy: labels must be >= 0"),
        (compute_metrics.main, "--neighbors", f["nn"], "--out", d / "regular_file" / "m.json", "not a directory"),
        # --- retrieval/sweep.py (8, 13, §4 overwrite, §7)
        (*sw, "--eval-emb", f["wide"], "wide/val_emb.npy: embeddings have d=24 but"),
        (*sw, "--eval-emb", f["val"], "--ks", "0", "argument --ks: must be >= 1, got 0"),
        (*sw, "--eval-emb", f["val"], "--ks", "8", "64", f"--ks 64: larger than the width d=16 of {f['emb']}"),
        (*sw, "--eval-emb", f["nan"], "NaN or Inf in embeddings (first at row 5)"),
        (*sw, "--eval-emb", d / "missing_emb.npy", "missing_emb.npy: embedding file not found"),
        (*sw, "--eval-emb", f["neglab"], "val_labels.npy: labels must be >= 0"),
        (sweep.main, "--train-emb", f["emb"], "--eval-emb", f["val"], "--out", d / "report", *TRAIN, "--methods",
         "trunc", "--ablation-k", "0", "--ks", "8", "table.md exists; pass --overwrite"),
        (*sw, "--eval-emb", f["val"], "--ks", "40", "--methods", "csr", "--ks 40 is larger than --hidden-size 32"),
        # --- main_text.py (8, 13, §4 demo overwrite, §7)
        (*te, "--dims", "8", "64", "--dims 64: larger than the width d=16"),
        (main_text.main, "eval", "--emb-dir", d / "text_wide", "--methods", "truncation", "--dims", "8",
         "test_emb.npy: embeddings have d=24 but"),
        (main_text.main, "eval", "--emb-dir", d / "text", "--methods", "truncation", "--out", f["nn"],
         "nn.npy exists; pass --overwrite"),
        (main_text.main, "eval", "--emb-dir", d / "nnbad", "--methods", "truncation", "corpus.json: not found"),
        (main_text.main, "train", "--emb-dir", d / "text", *TRAIN, "--out", f["killed"], "--resume"),
        (main_text.main, "train", "--emb-dir", d / "text", *TRAIN, "--lr", "0", "--out", new, "argument --lr"),
        (main_text.main, "demo", "--datasets", "bbc", "--out", d / "report", "--emb-root", new,
         "report/results.json exists; pass --overwrite"),
        (main_text.main, "demo", "--datasets", "bbc", "--out", new, "--runs", new, "--runs: the demo keeps its models"),
        # --- main_multimodal.py (1, 3, 4, 11, §4 eval overwrite, §7)
        (*mm, "--out", f["killed"], "killed or unfinished run); pass --resume"),
        (*mm, "--out", f["run"], "finished run); pass --resume"),
        (*mm, "--lr", "nan", "argument --lr: must be a finite number > 0"),
        (*mm, "--csr-auxk", "-5", "argument --csr-auxk: must be >= 0"),
        (*mm, "--max-steps", "-5", "--max_steps: must be >= 0"),
        (main_multimodal.main, "--train-data", d / "missing-{0000..0001}.tar", "2 of 2 shards do not exist"),
        (*mme, "--output", f["nn"], "nn.npy exists; pass --overwrite"),
        (*mme, "--output", new / "r.json", "--recall_k", "0", "--recall-k: must be >= 1"),
        # --- export_csr.py (6, 10, §7)
        (*ex, f["unfinished"], "unfinished.pt: checkpoint of an unfinished run"),
        (*ex, f["nanckpt"], "nanw.pt: NaN or Inf in the weights"),
        (export_csr.main, "export-st", "--out", new, "--ckpt", f["nanckpt"], "nanw.pt: NaN or Inf in the weights"),
        (*ex, f["corrupt"], "corrupt.pt: not a readable checkpoint (truncated or corrupt"),
        (*ex, d / "missing.pt", "missing.pt: checkpoint not found"),
        (export_csr.main, "save-pretrained", "--out", f["run"], "--ckpt", run_ck, "run exists; pass --overwrite"),
        (export_csr.main, "import", "--folder", d / "missing", "--out", new / "x.pt", "missing"),
        # --- stack_emb.py (10, §7)
        (stack_emb.main, "--shard_dir", d / "nan_shards", "--out", new / "x_emb.npy",
         "emb_00001.npy: NaN or Inf in embeddings (first at row 5)"),
        (stack_emb.main, "--shard_dir", d / "mixed_shards", "--out", new / "x_emb.npy",
         "emb_00001.npy: 8 dims but earlier shards have 16"),
        (stack_emb.main, "--shard_dir", d / "short_shards", "--out", new / "x_emb.npy",
         "labels_00000.npy: 9 labels but the embeddings have 10 rows"),
        (stack_emb.main, "--shard_dir", d / "empty_shards", "--out", new / "x_emb.npy",
         "emb_00000.npy: empty embedding file (0 bytes)"),
        (stack_emb.main, "--shard_dir", d / "missing_shards", "--out", new / "x_emb.npy", "shard directory not found"),
        (stack_emb.main, "--shard_dir", d / "nan_shards", "--out", f["emb"], "train_emb.npy exists; pass --overwrite"),
        *issue23_cases(f),
    ]


def issue23_cases(f):
    """Issue 23 §3: the last bad inputs (loses work, passes silently, raw tracebacks, culprit not named)."""
    d, nb, new = f["dir"], f["nnbad"], f["dir"] / "new"
    mv = [main_visual.main, "--pretrained_emb", f["emb"], *TRAIN]
    mmt = [main_multimodal.main, "--train-data", f["shard"], "--model", d / "tiny-clip.json", "--out", new]
    fx = [main_multimodal.main, "fixtures", "--n-train", "8", "--n-eval", "4"]
    emb = [main_text.main, "embed", "--train", d / "binary.jsonl"]
    regular, proc = d / "regular_file" / "x", "/proc/csr_x"
    return [
        # loses work: every file a stage writes is checked, not only --out
        (faiss_nn.main, "--database", f["emb"], "--queries", f["val"], "--out", d / "lone.npy",
         "lone_scores.npy exists; pass --overwrite"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["val"], "--out", d / "lone2.npy",
         "lone2.json exists; pass --overwrite"),
        (export_csr.main, "export-st", "--out", d / "nn", "--ckpt", f["run"] / "csr.pt",
         f"nn.json is the sidecar of {d / 'nn.npy'}, which {d / 'nn'} would replace"),
        (export_csr.main, "save-pretrained", "--overwrite", "--out", d / "nn", "--ckpt", f["run"] / "csr.pt",
         "nn.json is the sidecar of"),
        # passes silently
        (*mv, "--epochs", "2", "--resume", "--out", f["run"], "last.pt: nothing to resume, the run finished (2 of 2 "
         "epochs, step 8); pass a larger --epochs"),
        (compute_metrics.main, "--neighbors", nb / "dup.npy", "dup.npy: row 7 lists database id"),
        (*fx, "--out", new, "--train-clip-steps", "-5", "argument --train-clip-steps: must be >= 0, got -5"),
        (*mv, "--labels", d / "missing.npy", "--cl", "self", "--out", new, "missing.npy: labels file not found"),
        # raw tracebacks
        (stack_emb.main, "--shard_dir", d / "badman_shards", "--out", new / "x_emb.npy",
         "manifest.json: not valid JSON"),
        (stack_emb.main, "--shard_dir", d / "badrec_shards", "shard_00000.json: not valid JSON"),
        (export_csr.main, "export-st", "--out", regular, "--ckpt", f["run"] / "csr.pt", "regular_file is not a "
         "directory"),
        (export_csr.main, "export-st", "--out", proc, "--ckpt", f["run"] / "csr.pt", "cannot write under /proc"),
        (export_csr.main, "save-pretrained", "--out", regular, "--ckpt", f["run"] / "csr.pt", "is not a directory"),
        (export_csr.main, "save-pretrained", "--out", proc, "--ckpt", f["run"] / "csr.pt", "cannot write under"),
        (export_csr.main, "import", "--folder", d / "missing", "--out", regular, "is not a directory"),
        (export_csr.main, "import", "--folder", d / "missing", "--out", proc, "cannot write under /proc"),
        (*emb, "--out", regular, "regular_file is not a directory"),
        (*emb, "--out", proc, "cannot write under /proc"),
        (*fx, "--out", regular, "regular_file is not a directory"),
        (*fx, "--out", proc, "cannot write under /proc"),
        (*emb, "--out", new, "binary.jsonl: not UTF-8 text (byte 128"),
        (*mmt, "--beta1", "1.5", "argument --beta1: must be in [0, 1), got '1.5'"),
        (*mmt, "--beta2", "-1", "argument --beta2: must be in [0, 1), got '-1'"),
        (*mmt, "--pretrained", "none", "--feature-cache", d / "fcache", "fcache/image_emb.npy: not a readable .npy embedding file (not an "
         "array"),
        (*mmt, "--pretrained", "none", "--feature-cache", d / "regular_file", "regular_file: cannot write here"),
        (*mmt, "--pretrained", d / "regular_file", "regular_file: not a CLIP weights file for tiny-clip"),
        # errors that name the culprit
        (compute_metrics.main, "--neighbors", nb / "far.npy", "far.npy: neighbour id 250 (row 4) is outside the "
         "database of 200 rows labelled by"),
        (faiss_nn.main, "--database", f["db"], "--queries", f["codes64"], "--out", new / "nn.npy",
         f"--queries {f['codes64']}: codes over 64 units but --database {f['db']} has 32"),
        (main_visual.main, "--pretrained_emb", f["emb"], *TRAIN, "--epochs", "3", "--resume", "--out", f["nanrun"],
         "--resume " + str(f["nanrun"] / "last.pt") + ": NaN or Inf in the weights (encoder.weight)"),
        (csr_inference.main, "--eval_emb_path", f["val"], "--out", new, "--csr_ckpt", f["unfinished"],
         "unfinished.pt: checkpoint of an unfinished run (epoch 1, step 8)"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_leaves_nothing(w, capsys):
    (w["dir"] / "report").mkdir(exist_ok=True)
    for name in ("table.md", "results.json"):
        (w["dir"] / "report" / name).write_text("an earlier report\n")
    table = cases(w)
    assert len(table) >= 100
    for main, *argv, needle in table:
        expect_error(main, argv, needle, capsys, w["dir"])
    assert not (w["dir"] / "new").exists() and not (w["dir"] / "huge" / "csr.pt").exists()
    assert (w["dir"] / "report" / "table.md").read_text() == "an earlier report\n"


def test_unfinished_epoch_checkpoint_is_only_a_warning_for_eval(w, capsys):
    """main_multimodal.py eval may evaluate an epoch_E.pt (no `complete` flag): warned, not refused."""
    from csr.io import warn  # the one helper every warning goes through
    _, ckpt = load_model(w["unfinished"], unfinished="warn")
    assert ckpt["epoch"] == 1 and not ckpt.get("complete")
    warn("x")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"warning: {w['unfinished']}: checkpoint of an unfinished run (epoch 1, step 8), not a " \
                     f"finished model" and err[1] == "warning: x"


def test_suspicious_inputs_warn_in_one_line_and_succeed(w, capsys, tmp_path):
    """Signed values / repeated units in codes, K clipped to the database, --ks beyond K by default, k_start
    clamped, multi_k raised: each one `warning:` line, and the run completes."""
    capsys.readouterr()
    faiss_nn.main(["--database", str(w["signed_codes"]), "--queries", str(w["signed_codes"]), "-K", "50",
                   "--out", str(tmp_path / "nn.npy")])
    err = capsys.readouterr().err.splitlines()
    assert f"warning: {w['signed_codes']}: 40 negative code values (CSR codes are >= 0)" in err
    assert f"warning: {w['signed_codes']}: 10 codes repeat a unit (first at row 0); repeated units are summed" in err
    assert "warning: -K 50 clipped to the database size 10" in err
    assert np.load(tmp_path / "nn.npy").shape == (10, 10)
    compute_metrics.main(["--neighbors", str(w["nn"]), "--out", str(tmp_path / "m.json")])
    assert f"warning: {w['nn']} has 20 neighbours per query: @k metrics only for k in [10]" in capsys.readouterr().err
    assert set(json.loads((tmp_path / "m.json").read_text())["metrics"]) == {
        "top1", "mAP@10", "precision@10", "recall@10", "top10"}
    main_visual.main(["--pretrained_emb", str(w["emb"]), *TRAIN, "--k-start", "64", "--max-steps", "2",
                      "--out", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert err == ["warning: --k-start 64 clamped to hidden_size/4 = 8", "warning: multi_k 16 raised to 4·k = 32 "
                   "while k = 8"]
    small = tmp_path / "text45"  # issue 23 §3: more kNN voters than training rows
    save_split(small, "train", rows(45, 0))
    save_split(small, "test", rows(20, 1))
    (small / "corpus.json").write_text(json.dumps({"name": "text45", "task": "labelled"}))
    res = main_text.main(["eval", "--emb-dir", str(small), "--methods", "truncation", "--dims", "8",
                          "--knn-k", "100"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert err == ["warning: --knn-k 100 clipped to the database size 45"]
    assert all("knn100_acc" in r for r in res["rows"])  # all 45 rows voted, under the name asked for


def test_scipy_fallback_warns(monkeypatch, capsys):
    import csr.knn as knn
    monkeypatch.setitem(sys.modules, "csr.sparse_knn", None)  # the compiled engine cannot be imported
    codes = SparseCodes(np.array([[0, 1], [1, 2], [2, 3]], np.int16), np.ones((3, 2), np.float32), 8)
    idx, _ = knn.search(codes, codes, 2, backend="sparse", progress=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the compiled sparse engine cannot load")
    assert idx[:, 0].tolist() == [0, 1, 2]


def test_overwrite_removes_the_old_run_before_training(w, tmp_path):
    """--overwrite never leaves the old csr.pt beside a new, unrelated last.pt (issue 16 item 6)."""
    out = tmp_path / "run"
    shutil.copytree(w["run"], out)
    old = read_checkpoint(out / "csr.pt")["state_dict"]["encoder.weight"]

    class Killed(Exception):
        pass

    import csr.train as T
    orig = T.save_checkpoint

    def die_on_last(path, *a, **k):
        orig(path, *a, **k)
        raise Killed()
    T.save_checkpoint = die_on_last
    try:
        with pytest.raises(Killed):
            main_visual.main(["--pretrained_emb", str(w["other"]), *TRAIN, "--epochs", "2", "--overwrite",
                              "--out", str(out)])
    finally:
        T.save_checkpoint = orig
    assert not (out / "csr.pt").exists() and not (out / "csr.json").exists()
    assert not torch.equal(read_checkpoint(out / "last.pt")["state_dict"]["encoder.weight"], old)


def test_resume_records_and_checks_the_data_identity(w):
    from csr.provenance import content_sample
    ck = read_checkpoint(w["run"] / "last.pt")
    st = w["emb"].stat()
    assert ck["data"] == {"path": str(w["emb"].resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                          "sample": content_sample(w["emb"], st.st_size), "shape": [200, D], "dtype": "float32"}


def test_file_identity_sees_a_same_size_file_copied_with_its_mtime(tmp_path):
    """Issue 23 §3: `cp -p` of other rows of the same shape keeps size and mtime; the sweep's cache key (the
    file identity) must still change, for a change anywhere in a large file as in a small one."""
    from csr.provenance import file_identity
    for n in (20, 20000):
        path = save_split(tmp_path / str(n), "train", rows(n, 0))
        before = file_identity(path)
        st = path.stat()
        x = rows(n, 0)
        x[n // 2 + 1] += 1  # one row in the middle (a large file's sample does not read it whole)
        np.save(path, x)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = file_identity(path)
        assert {k: v for k, v in after.items() if k != "sample"} == {k: v for k, v in before.items() if k != "sample"}
        if n == 20:
            assert after["sample"] != before["sample"]
        np.save(path, rows(n, 1))  # other rows throughout
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file_identity(path)["sample"] != before["sample"]
        assert file_identity(path) == file_identity(path)  # and the key is stable


def test_finished_runs_last_pt_is_a_finished_model_and_more_epochs_resume(w, tmp_path, capsys):
    """Issue 23 §3: the last.pt of a run's last epoch holds the finished model (inference accepts it); --resume
    with more --epochs than the run had continues it, and csr.json keeps every loss term."""
    written = csr_inference.main(["--eval_emb_path", str(w["val"]), "--csr_ckpt", str(w["run"] / "last.pt"),
                                  "--out", str(tmp_path / "codes")])
    assert set(written) == {"val"} and "unfinished" not in capsys.readouterr().err
    run_dir = tmp_path / "run"
    shutil.copytree(w["run"], run_dir)
    argv = ["--pretrained_emb", str(w["emb"]), *TRAIN, "--epochs", "3", "--resume", "--out", str(run_dir)]
    summary = main_visual.main(argv)
    ck = read_checkpoint(run_dir / "csr.pt")
    assert ck["complete"] and ck["epoch"] == 2 and ck["step"] == 12 and summary["steps"] == 12
    assert [json.loads(ln)["epoch"] for ln in (run_dir / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    stats = json.loads((run_dir / "csr.json").read_text())["final_stats"]
    assert stats["epoch"] == 2 and {"loss_total", "loss_recon_k", "loss_cl"} <= set(stats)


def test_resume_after_the_last_epoch_only_writes_the_missing_csr_pt(w, tmp_path):
    """Killed between the last epoch's last.pt and csr.pt: --resume trains nothing and writes csr.pt with the
    last epoch's stats (not 'final loss nan')."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("last.pt", "log.jsonl"):
        shutil.copy(w["run"] / name, run_dir / name)
    summary = main_visual.main(["--pretrained_emb", str(w["emb"]), *TRAIN, "--epochs", "2", "--resume",
                                "--out", str(run_dir)])
    last = json.loads((w["run"] / "log.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 8 and summary["loss_total"] == last["loss_total"]
    ck = read_checkpoint(run_dir / "csr.pt")
    assert ck["complete"] and ck["epoch"] == 1 and torch.equal(
        ck["state_dict"]["encoder.weight"], read_checkpoint(w["run"] / "csr.pt")["state_dict"]["encoder.weight"])


def test_killed_run_is_refused_then_resumes(w, tmp_path, capsys):
    """kill -9 mid-run; a plain re-run is refused (nothing replaced), --resume finishes the run."""
    emb = save_split(tmp_path, "train", rows(20000, 9))
    out = tmp_path / "run"
    argv = ["--pretrained_emb", str(emb), "--topk", "4", "--hidden-size", "32", "--auxk", "8", "--batch-size", "50",
            "--epochs", "4", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "main_visual.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert (out / "last.pt").exists() and not (out / "csr.pt").exists(), "the run finished before the kill"
    log = (out / "log.jsonl").read_text()
    expect_error(main_visual.main, argv, "killed or unfinished run); pass --resume", capsys, tmp_path)
    assert (out / "log.jsonl").read_text() == log
    main_visual.main(argv + ["--resume"])
    ck = read_checkpoint(out / "csr.pt")
    assert ck["complete"] and ck["step"] == 4 * 400
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
