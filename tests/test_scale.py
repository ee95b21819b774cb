"""Scale: streaming baselines, the per-stage memory readings of the dry run, and torchrun (2 gloo processes)
for the distributed kNN and the sharded extraction, compared bit for bit with one process."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csr.baselines import PCA, MRLConfig, train_mrl
from csr.codes import SparseCodes, save_codes
from csr.io import read_rows
from csr.knn import merge_topk, search
from csr.topk import topk_of_scores
from bench.dry_run import DryRun, Stage, run_stage

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def torchrun(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------- streaming baselines

def eigh_pca(x, max_dim):
    """The in-memory reference: float64 copy, np.cov, eigh."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    order = np.argsort(evals)[::-1][:max_dim]
    return mean, evecs[:, order], evals[order] / evals.sum()


@pytest.mark.parametrize("sample", [10**6, 700])
def test_streaming_pca_equals_in_memory_eigh(tmp_path, sample):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2000, 24)) * np.linspace(3, 0.1, 24) + 5).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    pca = PCA(8).fit(mm, sample=sample, block=128)  # many blocks, from a memory map
    rows = np.arange(len(x)) if sample >= len(x) else \
        np.sort(np.random.default_rng(0).choice(len(x), sample, replace=False))
    mean, comps, explained = eigh_pca(x[rows], 8)
    np.testing.assert_allclose(pca.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(pca.explained, explained, rtol=1e-9)
    np.testing.assert_allclose(np.abs((pca.components * comps).sum(0)), 1, atol=1e-5)  # same axes up to sign


def test_mrl_reads_batches_from_a_memory_map_and_stops_at_max_steps(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    np.save(tmp_path / "x.npy", x)
    cfg = MRLConfig(dims=(4, 16), epochs=2, batch_size=64)
    a = train_mrl(x, y, cfg, progress=False)
    b = train_mrl(np.load(tmp_path / "x.npy", mmap_mode="r"), y, cfg, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    import csr.baselines
    reads = []
    monkeypatch.setattr(csr.baselines, "read_rows", lambda a, r: reads.append(len(r)) or read_rows(a, r))
    train_mrl(x, y, cfg, progress=False, max_steps=7)  # 5 batches per epoch: stops inside the second epoch
    assert reads == [64] * 4 + [44] + [64] * 2
    rows = np.array([5, 1, 250, 1])
    np.testing.assert_array_equal(read_rows(np.load(tmp_path / "x.npy", mmap_mode="r"), rows), x[rows])


# ----------------------------------------------------------------------------- exact merge of top-K lists

def test_merge_of_slice_topk_lists_equals_one_search_with_ties():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, (50, 40)).astype(np.float32)  # many exact ties
    ref_i, ref_s = topk_of_scores(scores, 7)
    parts = [(0, 13), (13, 14), (14, 40)]  # one slice shorter than K: padded with -inf
    cand_i, cand_s = [], []
    for lo, hi in parts:
        i, s = topk_of_scores(scores[:, lo:hi], min(7, hi - lo), offset=lo)
        pad = 7 - i.shape[1]
        cand_i.append(np.pad(i, ((0, 0), (0, pad))))
        cand_s.append(np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf))
    i, s = merge_topk(np.concatenate(cand_i[::-1], 1), np.concatenate(cand_s[::-1], 1), 7)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s)


# ----------------------------------------------------------------------------- distributed kNN

def skewed_codes(n, hidden, k, rng):
    """Codes with hot units (in most rows) and exact duplicates (ties), values in float32."""
    hot = rng.integers(0, 4, (n, 2))
    cold = rng.integers(4, hidden, (n, k - 2))
    idx = np.concatenate([hot, cold], 1).astype(np.int16)
    val = rng.integers(1, 4, (n, k)).astype(np.float32)
    idx[1::7], val[1::7] = idx[0], val[0]  # every 7th row repeats row 0 (ties across the slice boundary)
    return SparseCodes(idx, val, hidden, rng.integers(0, 5, n))


WORKER = '''
import sys, numpy as np, torch.distributed as dist
from csr.codes import load_codes
from csr.knn import distributed_search
dist.init_process_group("gloo")
db, q = load_codes(sys.argv[1]), load_codes(sys.argv[2])
dense_db, dense_q = np.load(sys.argv[3], mmap_mode="r"), np.load(sys.argv[4])
out = {}
for K in (1, 5, 40):  # 40 > half the database of 60: one slice pads
    out[f"sparse_i{K}"], out[f"sparse_s{K}"] = distributed_search(q, db, K, progress=False)
    out[f"scipy_i{K}"], out[f"scipy_s{K}"] = distributed_search(q, db, K, backend="scipy", progress=False)
    out[f"dense_i{K}"], out[f"dense_s{K}"] = distributed_search(dense_q, dense_db, K, backend="faiss", progress=False)
np.savez(sys.argv[5] + f"_{dist.get_rank()}.npz", **out)
dist.destroy_process_group()
'''


def test_distributed_knn_two_processes_equals_one_process_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    db, q = skewed_codes(60, 64, 6, rng), skewed_codes(25, 64, 6, rng)
    save_codes(tmp_path / "db.npz", db)
    save_codes(tmp_path / "q.npz", q)
    dense_db = rng.integers(0, 3, (60, 8)).astype(np.float32) + 0.5
    dense_db[1::5] = dense_db[0]
    dense_q = rng.integers(0, 3, (25, 8)).astype(np.float32)
    np.save(tmp_path / "ddb.npy", dense_db)
    np.save(tmp_path / "dq.npy", dense_q)
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(tmp_path / "worker.py", tmp_path / "db.npz", tmp_path / "q.npz", tmp_path / "ddb.npy",
             tmp_path / "dq.npy", tmp_path / "out")
    r0, r1 = np.load(tmp_path / "out_0.npz"), np.load(tmp_path / "out_1.npz")
    for K in (1, 5, 40):
        for name, (qq, dd, backend) in {"sparse": (q, db, "sparse"), "scipy": (q, db, "scipy"),
                                        "dense": (dense_q, dense_db, "faiss")}.items():
            ref_i, ref_s = search(qq, dd, K, backend=backend, progress=False)
            for r in (r0, r1):  # every rank holds the merged result
                np.testing.assert_array_equal(r[f"{name}_i{K}"], ref_i, err_msg=f"{name} K={K}")
                np.testing.assert_array_equal(r[f"{name}_s{K}"], ref_s, err_msg=f"{name} K={K}")
    assert (np.diff(r0["sparse_s40"], axis=1) <= 0).all()


def test_faiss_nn_under_torchrun_writes_the_same_neighbours(tmp_path):
    from retrieval import faiss_nn
    rng = np.random.default_rng(4)
    save_codes(tmp_path / "db.npz", skewed_codes(3000, 256, 8, rng))
    save_codes(tmp_path / "q.npz", skewed_codes(200, 256, 8, rng))
    args = ["--database", tmp_path / "db.npz", "--queries", tmp_path / "q.npz", "-K", "10"]
    faiss_nn.main(list(map(str, args + ["--out", tmp_path / "one.npy"])))
    torchrun("retrieval/faiss_nn.py", *args, "--out", tmp_path / "two.npy", "--use_ddp", "True")
    for a, b in (("one.npy", "two.npy"), ("one_scores.npy", "two_scores.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / a), np.load(tmp_path / b))
    assert '"processes": 2' in (tmp_path / "two.json").read_text()


# ----------------------------------------------------------------------------- sharded extraction

def test_extraction_two_processes_writes_the_same_shards(tmp_path):
    import prepare_fashion_mnist
    import stack_emb
    prepare_fashion_mnist.main(["--out", str(tmp_path / "fm"), "--subset", "9", "--progress", "False"])
    common = ["inference/pretrained_embeddings.py", "--train_dir", tmp_path / "fm" / "train", "--weights",
              "efficientnet-lite0", "--img-size", "64", "--batch-size", "15", "--shard-size", "15", "--workers", "0",
              "--device", "cpu", "--progress", "False"]
    one = subprocess.run([sys.executable, *map(str, common), "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(*common, "--out", tmp_path / "two", "--use_ddp", "True")
    a, b = tmp_path / "one" / "train_shards", tmp_path / "two" / "train_shards"
    names = sorted(p.name for p in a.glob("*_0*.npy"))
    assert len(names) == 12 and names == sorted(p.name for p in b.glob("*_0*.npy"))  # 6 shards x (emb, labels)
    for name in names:
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name), err_msg=name)
    merged = [np.load(stack_emb.main(["--shard_dir", str(d)])) for d in (a, b)]
    np.testing.assert_array_equal(*merged)


def test_extraction_split_across_processes_needs_shards(tmp_path):
    from csr.extract import ExtractConfig, extract_split
    from csr.io import CSRError

    class Source:
        def __len__(self):
            return 4

        def describe(self):
            return {}

    class Bb:
        dim = 3

        def describe(self):
            return {}
    with pytest.raises(CSRError, match="--shard-size"):
        extract_split(Source(), Bb(), tmp_path, "train", ExtractConfig(world_size=2, rank=1))


# ----------------------------------------------------------------------------- per-stage measurements

STAGE_FUNCTIONS = '''
import numpy as np


def scan_memmap(path):
    """Read a whole .npy through a memory map (file pages, not anonymous memory)."""
    x = np.load(path, mmap_mode="r")
    return {"total": float(sum(float(x[s:s + 4096].sum()) for s in range(0, len(x), 4096)))}


def allocate(mb):
    return {"total": float(np.ones(mb * 2**20 // 8).sum())}
'''


def test_stage_memory_readings_separate_mapped_file_from_anonymous_memory(tmp_path, monkeypatch):
    (tmp_path / "stage_functions.py").write_text(STAGE_FUNCTIONS)  # light: the stage process imports no torch
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned stage processes inherit sys.path
    np.save(tmp_path / "big.npy", np.ones((40000, 1024), np.float32))  # 164 MB
    mapped = run_stage(Stage("scan", function="stage_functions:scan_memmap", kwargs={"path": str(tmp_path / "big.npy")}),
                       tmp_path / "scan.json")
    alloc = run_stage(Stage("alloc", function="stage_functions:allocate", kwargs={"mb": 300}), tmp_path / "alloc.json")
    assert mapped["total"] == 40000 * 1024 and alloc["total"] == 300 * 2**20 // 8
    for r in (mapped, alloc):
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_gb"] > 0 and r["peak_anon_gb"] > 0
    assert mapped["peak_rss_gb"] > 0.16 and mapped["peak_anon_gb"] < mapped["peak_rss_gb"] - 0.12
    assert alloc["peak_anon_gb"] > 0.3  # anonymous memory is seen
    assert mapped["peak_anon_gb"] < 0.1  # a fresh process per stage: no peak carried over from "alloc"


def test_dry_run_plan_names_every_stage_once():
    names = [s.name for s in DryRun("/tmp/x").stages()]
    assert len(names) == len(set(names))
    assert {"data", "train_k8", "train_k32", "train_ddp2_k8", "encode_k8", "encode_k32", "knn_k8", "knn_k32",
            "knn_ddp2_k8", "pca", "mrl", "knn_trunc32", "knn_pca32", "knn_mrl32", "metrics"} == set(names)
