"""Baselines (truncation, PCA, MRL adaptor) and the sweep on real Fashion-MNIST pixels."""
import json
import re

import numpy as np
import pytest
import torch

from csr.baselines import PCA, MRLAdaptor, MRLConfig, matryoshka_dims, mrl_transform, train_mrl, truncate
from csr.fashion_mnist import DEFAULT_SOURCE, load_split
from csr.io import CSRError
from csr.knn import search
from csr.metrics import retrieval_metrics
from retrieval import sweep


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    d = tmp_path_factory.mktemp("px")
    out = {}
    for split, n in (("train", 2000), ("val", 500)):
        x, y = load_split(DEFAULT_SOURCE, split)
        x = (x[:n].reshape(n, -1) / 255.0).astype(np.float32)
        np.save(d / f"{split}_emb.npy", x)
        np.save(d / f"{split}_labels.npy", y[:n])
        out[split] = (x, y[:n])
    out["dir"] = d
    return out


def one_nn(xtr, ytr, xte, yte):
    idx, _ = search(xte, xtr, 1, backend="faiss", progress=False)
    return retrieval_metrics(idx, ytr, yte, ())["top1"]


def test_matryoshka_dims():
    assert matryoshka_dims(1280) == [8, 16, 32, 64, 128, 256, 512, 1024, 1280]
    assert matryoshka_dims(64) == [8, 16, 32, 64]


def test_shared_prefix_head_equals_full_head_truncated():
    torch.manual_seed(0)
    m = MRLAdaptor(20, MRLConfig(out_dim=32, dims=(8, 16, 32), heads="shared"), n_classes=5)
    x = torch.randn(7, 20)
    z = m(x)
    for d in (8, 16):
        zt = torch.cat([z[:, :d], torch.zeros(7, 32 - d)], 1)  # the full head applied to the truncated code
        assert torch.allclose(m.logits(z, d), m.head(zt), atol=1e-6)
    assert torch.allclose(m.logits(z, 32), m.head(z), atol=1e-6)
    # every prefix representation is the first d dims of one shared representation
    assert torch.equal(torch.from_numpy(mrl_transform(m, x.numpy(), 8)), z[:, :8].detach())


def test_pca_orders_components_by_variance(pixels):
    xtr, _ = pixels["train"]
    p = PCA(64).fit(xtr)
    assert np.all(np.diff(p.explained) <= 1e-12)
    z = p.transform(xtr, 16)
    var = z.var(0)
    assert np.all(var[:-1] >= var[1:] - 1e-4) and np.allclose(z.mean(0), 0, atol=1e-3)


def test_mrl_adaptor_beats_truncation_at_prefix_8(pixels):
    (xtr, ytr), (xte, yte) = pixels["train"], pixels["val"]
    base = one_nn(truncate(xtr, 8), ytr, truncate(xte, 8), yte)
    model = train_mrl(xtr, ytr, MRLConfig(epochs=15, batch_size=256), progress=False)
    sup = one_nn(mrl_transform(model, xtr, 8), ytr, mrl_transform(model, xte, 8), yte)
    unsup_model = train_mrl(xtr, None, MRLConfig(epochs=15, batch_size=256), progress=False)
    unsup = one_nn(mrl_transform(unsup_model, xtr, 8), ytr, mrl_transform(unsup_model, xte, 8), yte)
    assert sup > base + 20 and unsup > base + 20, (base, sup, unsup)


def test_sweep_writes_consistent_table_json_png_and_reuses_parts(pixels, tmp_path, capsys):
    d = pixels["dir"]
    argv = ["--train-emb", str(d / "train_emb.npy"), "--eval-emb", str(d / "val_emb.npy"), "--out", str(tmp_path),
            "--ks", "8", "16", "--methods", "csr", "pca", "trunc", "full", "--epochs", "3", "--batch-size", "256",
            "--hidden-size", "512", "--auxk", "64", "--ablation-k", "8", "--recipes", "recommended"]
    table = sweep.main(argv)
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "accuracy_vs_dims.png").stat().st_size > 5000
    assert (tmp_path / "table.md").read_text() == table
    parts = {p["key"]: p for p in res["parts"]}
    assert set(parts) == {"full", "trunc_8", "trunc_16", "pca_8", "pca_16", "csr_k8", "csr_k16", "csr_rec_k8",
                          "csr_rec_k16"}
    rec = parts["csr_rec_k8"]  # the recipe's row trains with the recipe's settings and is shown in the table
    assert rec["row"] == "csr_rec" and rec["model_config"]["tied"] is False
    assert rec["train_config"]["bpre_init"] == "geometric_median" and rec["train_config"]["recon_loss"] == "nmse"
    assert rec["train_config"]["resample_every"] == 14 and parts["csr_k8"]["train_config"]["resample_every"] == 0
    assert "CSR (recommended recipe) dead latents (%)" in table
    for key, p in parts.items():  # the table shows exactly the numbers in the JSON
        assert f"{p['top1']:.2f}" in table, key
    # dead fraction = units that never appear (with a non-zero value) in any train code of the trained model
    from csr.checkpoint import load_model
    from csr.encode import encode_array
    model, _ = load_model(next((tmp_path / "models").glob("csr_k8.*/csr.pt")))
    codes = encode_array(model, pixels["train"][0], 8, progress=False)
    fired = np.zeros(512, bool)
    fired[codes.indices[codes.values != 0].astype(np.int64)] = True
    assert parts["csr_k8"]["dead_fraction"] == pytest.approx(1 - fired.mean(), abs=1e-12)
    assert parts["csr_k8"]["steps"] == 24
    assert {a["variant"] for a in res["ablation"]} == set(sweep.ABLATIONS)
    assert parts["csr_k16"]["top1"] > parts["trunc_16"]["top1"]
    csr_part = next((tmp_path / "parts").glob("csr_k8.*.json"))
    mtime = csr_part.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(CSRError, match="table.md exists; pass --overwrite"):  # a finished report is not replaced
        sweep.main(argv)
    assert (tmp_path / "table.md").read_text() == table
    capsys.readouterr()
    again = sweep.main(argv + ["--overwrite"])
    assert again == table and csr_part.stat().st_mtime_ns == mtime
    out = capsys.readouterr().out
    n_parts = len(res["parts"]) + len(res["ablation"])  # every row and variant, those sharing a model too
    assert recomputed(out) == set() and f"reused {n_parts} cached parts" in out  # same flags: everything reused


def recomputed(out: str) -> set[str]:
    return set(re.findall(r"computing (\S+) \(", out))


def test_sweep_recomputes_exactly_the_parts_a_change_affects(pixels, tmp_path, capsys):
    """Never a stale number: a changed flag or data file recomputes the parts that depend on it, and only those."""
    d = pixels["dir"]
    data = ["--train-emb", str(d / "train_emb.npy"), "--eval-emb", str(d / "val_emb.npy"), "--out", str(tmp_path)]
    base = ["--ks", "8", "--methods", "csr", "pca", "trunc", "mrl_unsup", "--epochs", "2", "--batch-size", "500",
            "--hidden-size", "256", "--auxk", "32", "--ablation-k", "0", "--mrl-epochs", "1", "--recipes", "--overwrite"]
    first = sweep.main(data + base)
    assert recomputed(capsys.readouterr().out) == {"csr_k8", "pca_8", "trunc_8", "mrl_unsup_8"}
    sweep.main(data + base)
    assert recomputed(capsys.readouterr().out) == set()
    cases = [(["--epochs", "3"], {"csr_k8"}), (["--lr", "1e-3"], {"csr_k8"}), (["--cl", "none"], {"csr_k8"}),
             (["--hidden-size", "128"], {"csr_k8"}), (["--seed", "5"], {"csr_k8", "mrl_unsup_8"}),
             (["--mrl-epochs", "2"], {"mrl_unsup_8"}), (["--amp", "False"], set()),  # AMP is CUDA-only: no change on CPU
             (["--precision", "bf16"], {"csr_k8"})]
    for change, expected in cases:
        argv = data + base + change
        table = sweep.main(argv)
        out = capsys.readouterr().out
        assert recomputed(out) == expected, (change, out)
        if change[0] in ("--epochs", "--lr"):  # the message names what changed
            assert f"changed: code" not in out and f"train_config.{change[0][2:]}" in out, out
        assert sweep.main(argv) == table and recomputed(capsys.readouterr().out) == set()
    # the data: other embeddings in the same --out (same shape) recompute everything
    other = tmp_path / "other"
    other.mkdir()
    x, y = pixels["train"]
    np.save(other / "train_emb.npy", x[::-1].copy())
    np.save(other / "train_labels.npy", y[::-1].copy())
    argv = ["--train-emb", str(other / "train_emb.npy"), "--eval-emb", str(d / "val_emb.npy"), "--out", str(tmp_path)]
    sweep.main(argv + base)
    assert recomputed(capsys.readouterr().out) == {"csr_k8", "pca_8", "trunc_8", "mrl_unsup_8"}
    # going back to the first flags reuses their parts (each configuration's version is kept)
    assert sweep.main(data + base) == first and recomputed(capsys.readouterr().out) == set()


def test_a_part_does_not_depend_on_which_parts_or_methods_ran_before(pixels, tmp_path, capsys):
    """Each part seeds itself from its own config: the CSR and MRL cells computed alone equal the same cells
    computed after other methods and other k (and after the global RNG was used), to the last digit."""
    d = pixels["dir"]
    common = ["--train-emb", str(d / "train_emb.npy"), "--eval-emb", str(d / "val_emb.npy"), "--epochs", "2",
              "--batch-size", "500", "--hidden-size", "256", "--auxk", "32", "--ablation-k", "0", "--mrl-epochs", "1",
              "--recipes"]

    def parts(out, *argv):
        sweep.main(common + ["--out", str(tmp_path / out), *argv])
        return {p["key"]: p for p in json.loads((tmp_path / out / "results.json").read_text())["parts"]}

    alone_csr = parts("a", "--ks", "8", "--methods", "csr")
    alone_mrl = parts("b", "--ks", "8", "--methods", "mrl_unsup")
    torch.rand(1000)  # whatever used the global RNG before must not matter either
    together = parts("c", "--ks", "2", "8", "--methods", "mrl_unsup", "pca", "csr")
    for key, alone in (("csr_k8", alone_csr), ("mrl_unsup_8", alone_mrl)):
        assert alone[key]["top1"] == together[key]["top1"] and alone[key]["digest"] == together[key]["digest"], key
        metrics = [m for m in alone[key] if m.startswith(("top", "mAP", "dead"))]
        assert metrics and all(alone[key][m] == together[key][m] for m in metrics), key
