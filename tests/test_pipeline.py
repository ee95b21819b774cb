"""End-to-end on real data (Fashion-MNIST pixels from the Debian package): train -> encode -> kNN -> metrics,
through the stage scripts' `main(argv)`, plus bad input, resume and a 2-process DDP run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main_visual
from csr.checkpoint import load_model
from csr.codes import load_codes
from csr.distributed import Runtime
from csr.fashion_mnist import DEFAULT_SOURCE, load_split
from csr.io import CSRError
from csr.knn import search
from csr.metrics import retrieval_metrics
from csr.model import CSR, CSRConfig
from csr.train import Batches, TrainConfig, TrainData, train
from knn_reference import assert_same_as_faiss
from inference import csr_inference
from retrieval import compute_metrics, faiss_nn

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 3000, 1000


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """Real Fashion-MNIST pixels as 784-d 'embeddings' in the file contract's layout."""
    d = tmp_path_factory.mktemp("fmnist")
    for split, n in (("train", N_TRAIN), ("val", N_TEST)):
        x, y = load_split(DEFAULT_SOURCE, split)
        np.save(d / f"{split}_emb.npy", (x[:n].reshape(n, -1) / 255.0).astype(np.float32))
        np.save(d / f"{split}_labels.npy", y[:n])
    return d


@pytest.fixture(scope="module")
def trained(fmnist):
    out = fmnist / "run"
    main_visual.main(["--pretrained_emb", str(fmnist / "train_emb.npy"), "--topk", "32", "--hidden-size", "1024",
                      "--batch-size", "256", "--epochs", "5", "--out", str(out)])
    return out


def test_end_to_end_codes_near_full_dim_and_beat_truncation(fmnist, trained):
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and log[-1]["loss_recon_k"] < log[0]["loss_recon_k"]
    csr_inference.main(["--train_emb_path", str(fmnist / "train_emb.npy"), "--eval_emb_path",
                        str(fmnist / "val_emb.npy"), "--cse_ckpt", str(trained / "csr.pt")])
    codes_dir = trained / "codes_k32"
    db, q = load_codes(codes_dir / "train_codes.npz"), load_codes(codes_dir / "val_codes.npz")
    assert db.indices.dtype == np.int16 and db.k == 32 and ((db.values != 0).sum(1) <= 32).all()
    acc = {}
    for name, args in {
        "csr": ["--database", str(codes_dir / "train_codes.npz"), "--queries", str(codes_dir / "val_codes.npz")],
        "csr_faiss": ["--database", str(codes_dir / "train_codes.npz"), "--queries", str(codes_dir / "val_codes.npz"),
                      "--backend", "faiss"],
        "full": ["--database", str(fmnist / "train_emb.npy"), "--queries", str(fmnist / "val_emb.npy")],
        "trunc32": ["--database", str(fmnist / "train_emb.npy"), "--queries", str(fmnist / "val_emb.npy"),
                    "--dims", "32"],
    }.items():
        out = fmnist / f"nn_{name}.npy"
        faiss_nn.main(args + ["--out", str(out), "-K", "100"])
        acc[name] = compute_metrics.main(["--neighbors", str(out)])
    # both backends return exactly FAISS's neighbours on the densified codes (tie-aware: same scores, same
    # indices wherever a score is not tied, ties by lowest index), the claim faiss_nn.py and knn.py make
    for name in ("csr", "csr_faiss"):
        assert_same_as_faiss(q, db, 100, np.load(fmnist / f"nn_{name}.npy"), np.load(fmnist / f"nn_{name}_scores.npy"))
    # measured: csr@32 77.2, full 784-d 79.9, first 32 pixels 33.3 (1-NN top-1, %)
    assert acc["csr"]["top1"] >= acc["full"]["top1"] - 4.0
    assert acc["csr"]["top1"] > acc["trunc32"]["top1"] + 20
    nn, ytr, yte = np.load(fmnist / "nn_csr.npy"), db.labels, q.labels  # mAP@10 by a plain loop (MRL's definition)
    ap = []
    for i in range(len(nn)):
        rel = ytr[nn[i, :10]] == yte[i]
        ap.append(sum(rel[:j + 1].mean() for j in range(10) if rel[j]) / max(rel.sum(), 1))
    assert acc["csr"]["mAP@10"] == pytest.approx(100 * np.mean(ap), abs=1e-9)
    assert acc["csr"]["recall@100"] < acc["csr"]["top100"]


def test_inference_at_other_k_and_shapes_from_checkpoint(fmnist, trained):
    out = fmnist / "codes8"
    csr_inference.main(["--eval_emb_path", str(fmnist / "val_emb.npy"), "--csr_ckpt", str(trained / "csr.pt"),
                        "--topk", "8", "--out", str(out), "--values-dtype", "float16"])
    csr_inference.main(["--eval_emb_path", str(fmnist / "val_emb.npy"), "--csr_ckpt", str(trained / "csr.pt"),
                        "--out", str(fmnist / "codes32")])
    c8, c32 = load_codes(out / "val_codes.npz"), load_codes(fmnist / "codes32" / "val_codes.npz")
    assert c8.k == 8 and c8.values.dtype == np.float16 and c8.hidden_size == 1024 and c32.k == 32
    assert (c8.indices == c32.indices[:, :8]).mean() > 0.99  # the k=8 code is the top 8 of the k=32 code


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_paper_readme_flags_parse():
    a = main_visual.build_parser().parse_args(
        "--pretrained_emb x_emb.npy --model_name resnet50d.ra4_e3600_r224_in1k --use_ddp False --gpu 1 "
        "--batch-size 4096 --lr 4e-4 --use_CL True --topk 8 --auxk 512 --hidden-size 8192 --auxk_coef 1/32".split())
    assert a.use_ddp is False and a.use_CL is True and a.gpu == 1 and a.hidden_size == 8192
    assert a.auxk_coef == 1 / 32 and a.cl_coef == 0.1 and a.epochs == 10 and a.batch_size == 4096


def test_bad_inputs_give_one_line_errors(fmnist, trained, tmp_path):
    emb = fmnist / "train_emb.npy"
    nan = tmp_path / "nan_emb.npy"
    x = np.load(emb)[:50].copy()
    np.save(tmp_path / "short_emb.npy", x[:10])
    x[7, 3] = np.nan
    np.save(nan, x)
    np.save(tmp_path / "short_labels.npy", np.zeros(3, dtype=np.int64))
    np.save(tmp_path / "empty_emb.npy", np.zeros((0, 784), np.float32))
    np.save(tmp_path / "narrow_emb.npy", np.ones((5, 16), np.float32))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((trained / "csr.pt").read_bytes()[:5000])
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    cases = [
        (["main_visual.py", "--pretrained_emb", tmp_path / "missing_emb.npy"], "not found"),
        (["main_visual.py", "--pretrained_emb", nan, "--out", tmp_path / "r1"], "row 7"),
        (["main_visual.py", "--pretrained_emb", tmp_path / "short_emb.npy", "--cl", "label", "--out", tmp_path / "r2"],
         "3 labels"),
        (["main_visual.py", "--pretrained_emb", tmp_path / "empty_emb.npy"], "empty"),
        (["main_visual.py", "--pretrained_emb", emb, "--topk", "5000", "--hidden-size", "1024"], "--topk"),
        (["main_visual.py", "--pretrained_emb", emb, "--out", trained], "exists"),
        (["inference/csr_inference.py", "--eval_emb_path", tmp_path / "narrow_emb.npy", "--csr_ckpt", trained / "csr.pt"],
         "input_dim=784"),
        (["inference/csr_inference.py", "--eval_emb_path", emb, "--csr_ckpt", trunc], "truncated"),
        (["inference/csr_inference.py", "--eval_emb_path", emb, "--csr_ckpt", tmp_path / "foreign.pt"],
         "not a CSR checkpoint"),
        (["inference/csr_inference.py", "--eval_emb_path", emb, "--csr_ckpt", trained / "csr.pt", "--topk", "2000"],
         "--topk"),
    ]
    for argv, needle in cases:
        r = run_cli(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.stderr[-500:])
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (argv, r.stderr)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2" / "csr.pt").exists()


def test_resume_after_crash_mid_epoch_gives_identical_model(fmnist, tmp_path):
    x = np.load(fmnist / "train_emb.npy")[:800]
    cfg = TrainConfig(batch_size=100, epochs=3, cl="self", seed=3)
    make = lambda: (torch.manual_seed(0), CSR(CSRConfig(784, 256, 8, 64)))[1]  # noqa: E731
    ref = make()
    train(ref, TrainData(x), cfg, tmp_path / "ref", progress=False)

    class Crash(Exception):
        pass

    class CrashingBatches(Batches):  # asked for a 14th batch: a crash after 13 steps, mid second epoch (8 per epoch)
        served = 0

        def epoch(self, epoch):
            for batch in super().epoch(epoch):
                if self.served == 13:
                    raise Crash()
                self.served += 1
                yield batch

    with pytest.raises(Crash):
        train(make(), CrashingBatches(TrainData(x), cfg, Runtime()), cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "csr.pt").exists()
    resumed = make()
    train(resumed, TrainData(x), cfg, tmp_path / "run", progress=False, resume=True)
    for (n, p), (_, q) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("cl", ["self"])
def test_ddp_two_processes_match_single_process(fmnist, tmp_path, cl):
    """torchrun, 2 CPU processes, gloo: the global batch is split, contrastive negatives are all-gathered."""
    emb = fmnist / "train_emb.npy"
    np.save(tmp_path / "small_emb.npy", np.load(emb)[:512])
    common = ["--pretrained_emb", tmp_path / "small_emb.npy", "--topk", "8", "--hidden-size", "256", "--batch-size",
              "128", "--epochs", "2", "--cl", cl, "--auxk", "64"]
    single = run_cli("main_visual.py", *common, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "main_visual.py", *map(str, common), "--use_ddp", "True", "--out", str(tmp_path / "ddp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    for ea, eb in zip(a, b):
        assert ea["step"] == eb["step"] and ea["dead_fraction"] == eb["dead_fraction"]
        for term in ("loss_total", "loss_recon_k", "loss_cl", "loss_auxk"):
            assert abs(ea[term] - eb[term]) <= 1e-3 * abs(ea[term]) + 1e-7, term
    ma, _ = load_model(tmp_path / "single" / "csr.pt")
    mb, _ = load_model(tmp_path / "ddp" / "csr.pt")
    assert torch.allclose(ma.encoder.weight, mb.encoder.weight, atol=2e-4)


def test_paper_commands_run_in_order_as_written(tmp_path):
    """The paper's README, stage by stage, on 60 + 60 real Fashion-MNIST images: every command as the paper
    writes it (extraction from ImageFolder trees and sharded, as tiny data needs; the default layout under
    $CSR_RUNS instead of <repository>/runs), the retrieval commands from retrieval/ with nothing but --topk."""
    import prepare_fashion_mnist
    prepare_fashion_mnist.main(["--out", str(tmp_path / "fm"), "--subset", "6", "--progress", "False"])
    runs = tmp_path / "runs"
    env = dict(os.environ, CSR_RUNS=str(runs), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")

    def paper(command: str, cwd=ROOT):
        r = subprocess.run([sys.executable, *command.split()], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
        return r

    emb = runs / "emb"
    paper(f"inference/pretrained_embeddings.py --train_dir {tmp_path / 'fm' / 'train'} --eval_dir "
          f"{tmp_path / 'fm' / 'val'} --model_name tf_efficientnet_lite0 --weights efficientnet-lite0 --img-size 64 "
          f"--shard-size 25 --workers 0 --device cpu --progress False")
    assert sorted(p.name for p in emb.iterdir()) == ["train_shards", "val_shards"]
    paper("stack_emb.py")
    paper(f"main_visual.py --pretrained_emb {emb / 'train_emb.npy'} --model_name tf_efficientnet_lite0 --use_ddp False "
          f"--gpu 1 --batch-size 4096 --lr 4e-4 --use_CL True --topk 8 --auxk 512 --hidden-size 8192")
    ckpt = runs / "train_emb_k8" / "csr.pt"
    paper(f"inference/csr_inference.py --train_emb_path {emb / 'train_emb.npy'} --eval_emb_path {emb / 'val_emb.npy'} "
          f"--model_name tf_efficientnet_lite0 --topk 8 --hidden-size 8192 --cse_ckpt {ckpt}")
    paper("faiss_nn.py --topk 8", cwd=ROOT / "retrieval")
    paper("compute_metrics.py --topk 8", cwd=ROOT / "retrieval")
    codes = load_codes(runs / "train_emb_k8" / "codes_k8" / "val_codes.npz")
    assert (codes.n, codes.k, codes.hidden_size) == (60, 8, 8192)
    assert np.load(runs / "train_emb_k8" / "codes_k8" / "nn.npy").shape == (60, 60)
    metrics = json.loads((runs / "train_emb_k8" / "codes_k8" / "nn_metrics.json").read_text())["metrics"]
    assert 0 <= metrics["top1"] <= 100
    wrong = subprocess.run([sys.executable, "inference/csr_inference.py", "--eval_emb_path", str(emb / "val_emb.npy"),
                            "--hidden-size", "4096", "--cse_ckpt", str(ckpt), "--out", str(tmp_path / "c")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        f"error: --hidden-size 4096: {ckpt} has hidden_size 8192"]
