"""The bad-input contract of the retrieval stages (inference/csr_inference.py, retrieval/faiss_nn.py,
retrieval/compute_metrics.py) for the cases of issue 37: work lost, silent results, raw tracebacks.

Each bad input ends in exactly ONE line `error: ...` naming the file, flag or shape at fault, exit code 2, no
traceback and nothing new on disk (`expect_error` of tests/test_bad_input.py); a legal but suspicious input
gives one `warning: ...` line and a correct result.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import main_text
from csr.checkpoint import save_checkpoint
from csr.cli import run
from csr.codes import SparseCodes, load_codes, save_codes
from csr.knn import l2_normalize, search
from csr.model import CSR, CSRConfig
from inference import csr_inference
from retrieval import compute_metrics, faiss_nn
from test_bad_input import D, expect_error, rows, save_split, save_text_folder

HIDDEN, K_CODE = 32, 4


def random_codes(n: int, seed: int, labels: bool = True) -> SparseCodes:
    """k distinct units per row with distinct positive values (no ties between rows)."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((n, HIDDEN)), axis=1)[:, :K_CODE].astype(np.int16)
    val = rng.uniform(0.1, 1.0, (n, K_CODE)).astype(np.float32)
    return SparseCodes(idx, val, HIDDEN, np.arange(n) % 3 if labels else None)


def save_npz(path: Path, codes: SparseCodes, **override) -> Path:
    """A codes .npz with some members replaced (or removed: None), as a foreign writer might leave it."""
    arrays = {"indices": codes.indices, "values": codes.values, "hidden_size": np.int64(codes.hidden_size),
              "labels": codes.labels}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture(scope="module")
def r(tmp_path_factory):
    """Embeddings, codes with labels, their neighbours (nn.npy + nn.json), a checkpoint, a text embedding folder,
    and every kind of broken code, sidecar and labels file."""
    d = tmp_path_factory.mktemp("bad37")
    f = {"dir": d, "emb": save_split(d, "train", rows(200, 0)), "val": save_split(d, "val", rows(60, 1))}
    f["val2"] = save_split(d / "b", "train", rows(60, 1))  # same name as the database, other folder
    db, q = random_codes(200, 0), random_codes(60, 1)
    f["db"], f["q"] = d / "codes" / "train_codes.npz", d / "codes" / "val_codes.npz"
    save_codes(f["db"], db)
    save_codes(f["q"], q)
    f["nn"] = d / "nn.npy"
    faiss_nn.main(["--database", str(f["db"]), "--queries", str(f["q"]), "--out", str(f["nn"]), "-K", "20"])
    f["ckpt"] = d / "csr.pt"
    save_checkpoint(f["ckpt"], CSR(CSRConfig(D, HIDDEN, K_CODE, 8)), complete=True)
    bad = d / "npz"
    bad.mkdir()
    n = db.n
    for name, over in {
        "hidden_arr": {"hidden_size": np.array([32, 32])},
        "hidden_float": {"hidden_size": np.float64(32)},
        "complex": {"values": db.values.astype(np.complex64)},
        "strvals": {"values": np.full(db.values.shape, "a")},
        "empty": {"indices": db.indices[:0], "values": db.values[:0], "labels": db.labels[:0]},
        "lab_neg": {"labels": np.full(n, -1)},
        "lab_float": {"labels": np.arange(n) / 2},
        "lab_long": {"labels": np.arange(n + 5) % 3},
        "lab_short": {"labels": np.arange(n - 5) % 3},
        "lab_2d": {"labels": np.zeros((n, 2), np.int64)},
        "lab_str": {"labels": np.array([str(i % 3) for i in range(n)])},
        "lab_obj": {"labels": np.array([{"a": 1}] * n, dtype=object)},
    }.items():
        save_npz(bad / f"{name}.npz", db, **over)
    f["bad"] = bad
    cplx = d / "cplx"
    cplx.mkdir()
    np.save(cplx / "train_emb.npy", rows(20, 2).astype(np.complex64))
    np.save(cplx / "train_labels.npy", np.zeros(20, np.int64))
    f["cplx_emb"] = cplx / "train_emb.npy"
    for name, side in {"list": [1, 2], "int": 5, "labint": {"file": "labint.npy", "database_labels": 3,
                                                            "query_labels": str(f["q"])}}.items():
        shutil.copy(f["nn"], d / f"{name}.npy")
        (d / f"{name}.json").write_text(json.dumps(side))
    (d / "outdir").mkdir()
    (d / "outdir" / "keep").write_text("x")
    save_text_folder(d / "text")
    return f


def cases(f):
    """(script main, argv, text the one error line must contain)."""
    d, bad, new = f["dir"], f["bad"], f["dir"] / "new"
    knn = [faiss_nn.main, "--queries", f["q"], "--out", new / "nn.npy", "--database"]
    met = [compute_metrics.main, "--neighbors", f["nn"], "--query_labels", f["q"], "--out", new / "m.json",
           "--db_labels"]
    ow = "--overwrite"
    return [
        # work lost: an output that is an input, another file's sidecar, or the other split's codes
        (compute_metrics.main, "--neighbors", f["nn"], "--out", d / "nn.json", ow,
         f"{d / 'nn.json'} is the sidecar of {f['nn']}, which {d / 'nn.json'} would replace"),
        (compute_metrics.main, "--neighbors", f["nn"], "--out", f["nn"], ow,
         f"{f['nn']} is also the input --neighbors {f['nn']}"),
        (compute_metrics.main, "--neighbors", f["nn"], "--out", f["q"], ow, "is also the input --query_labels"),
        (faiss_nn.main, "--database", f["db"], "--queries", f["q"], "--out", d / "nn.json", ow,
         f"{d / 'nn.json'} is the sidecar of {f['nn']}"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["val"], "--out", f["emb"], ow,
         f"{f['emb']} is also the input --database"),
        (csr_inference.main, "--train_emb_path", f["emb"], "--eval_emb_path", f["val2"], "--csr_ckpt", f["ckpt"],
         "--out", new, f"--train_emb_path {f['emb']} and --eval_emb_path {f['val2']} would both be written to "
                       f"{new / 'train_codes.npz'}"),
        # silent results
        (*knn, bad / "complex.npz", "complex.npz: code values must be real floats (float16/float32), got complex64"),
        (*knn[:2], bad / "complex.npz", *knn[3:], f["db"], "complex.npz: code values must be real floats"),
        (faiss_nn.main, "--database", f["emb"], "--queries", f["cplx_emb"], "--out", new / "nn.npy",
         "cplx/train_emb.npy: embeddings must be float16/float32, got complex64"),
        (*knn[:2], bad / "empty.npz", *knn[3:], f["db"], "empty.npz: no codes (0 rows)"),
        (*met, bad / "lab_neg.npz", "lab_neg.npz: labels must be >= 0, found -1 at row 0"),
        (*met, bad / "lab_float.npz", "lab_float.npz: labels must be integers, got float64"),
        (*met, bad / "lab_long.npz", "lab_long.npz: 205 labels but 200 codes"),
        (*met, bad / "lab_short.npz", "lab_short.npz: 195 labels but 200 codes"),
        (*knn, bad / "lab_neg.npz", "lab_neg.npz: labels must be >= 0"),
        (compute_metrics.main, "--neighbors", f["nn"], "--query_labels", f["emb"].with_name("train_labels.npy"),
         "--out", new / "m.json", "train_labels.npy: 200 query labels but " + str(f["nn"]) + " has 60 queries"),
        # raw tracebacks
        (*knn, bad / "hidden_arr.npz", "hidden_arr.npz: hidden_size must be one integer, got a int64 array of "
                                       "shape (2,)"),
        (*knn, bad / "hidden_float.npz", "hidden_float.npz: hidden_size must be one integer, got a float64"),
        (*knn, bad / "strvals.npz", "strvals.npz: code values must be real floats"),
        (faiss_nn.main, "--database", f["db"], "--queries", f["q"], "--out", d / "outdir", ow,
         f"{d / 'outdir'} is a directory; give a file name"),
        (compute_metrics.main, "--neighbors", f["nn"], "--out", d / "outdir", ow, "outdir is a directory"),
        (main_text.main, "eval", "--emb-dir", d / "text", "--methods", "truncation", "--dims", "8", "--out",
         d / "outdir", ow, "outdir is a directory"),
        (compute_metrics.main, "--neighbors", d / "list.npy", "list.json: not a sidecar (expected a JSON object, "
                                                               "got list)"),
        (compute_metrics.main, "--neighbors", d / "int.npy", "int.json: not a sidecar (expected a JSON object, "
                                                              "got int)"),
        (compute_metrics.main, "--neighbors", d / "labint.npy", "labint.json: `database_labels` must name a labels "
                                                                 "file, got 3"),
        (*met, bad / "lab_2d.npz", "lab_2d.npz: labels must be 1-D [N], got shape (200, 2)"),
        (*met, bad / "lab_str.npz", "lab_str.npz: labels must be integers, got <U1"),
        (*met, bad / "lab_obj.npz", "lab_obj.npz: `labels` is an object array (a pickle); expected numbers"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_leaves_nothing(r, capsys):
    for main, *argv, needle in cases(r):
        expect_error(main, argv, needle, capsys, r["dir"])
    assert not (r["dir"] / "new").exists()
    assert (r["dir"] / "outdir" / "keep").read_text() == "x"


def test_same_file_as_database_and_queries_is_encoded_once(r, tmp_path, capsys):
    written = csr_inference.main(["--train_emb_path", str(r["emb"]), "--eval_emb_path", str(r["emb"]),
                                  "--csr_ckpt", str(r["ckpt"]), "--out", str(tmp_path)])
    assert written == {"train": str(tmp_path / "train_codes.npz")}
    assert load_codes(tmp_path / "train_codes.npz").n == 200


def test_all_zero_query_code_warns_in_one_line(r, tmp_path, capsys):
    q = random_codes(60, 1)
    q.values[7] = 0
    path = save_npz(tmp_path / "q_codes.npz", q)
    capsys.readouterr()
    run(faiss_nn.main, ["--database", str(r["db"]), "--queries", str(path), "--out", str(tmp_path / "nn.npy"),
                        "-K", "10"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))]
    assert err == [f"warning: {path}: 1 of 60 codes are all zero (first at row 7); they have cosine 0 to everything"]
    nn, sc = np.load(tmp_path / "nn.npy"), np.load(tmp_path / "nn_scores.npy")
    assert nn[7].tolist() == list(range(10)) and (sc[7] == 0).all()  # what cosine 0 to everything ranks first
    ref = np.load(r["nn"])[:, :10]
    np.testing.assert_array_equal(np.delete(nn, 7, 0), np.delete(ref, 7, 0))


def test_codes_searched_against_themselves_warn_once(r, tmp_path, capsys):
    c = random_codes(30, 4)
    c.values[3] = 0
    path = save_npz(tmp_path / "c_codes.npz", c)
    capsys.readouterr()
    run(faiss_nn.main, ["--database", str(path), "--queries", str(path), "--out", str(tmp_path / "nn.npy"), "-K", "5"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))]
    assert err == [f"warning: {path}: 1 of 30 codes are all zero (first at row 3); they have cosine 0 to everything"]
    assert (np.load(tmp_path / "nn.npy")[[0, 1, 2, 4], 0] == [0, 1, 2, 4]).all()


def run_quiet(main, argv: list) -> None:
    """Run a stage with every Python warning (numpy's RuntimeWarning included) turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(main, [str(a) for a in argv])


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_scaled_embeddings_find_the_unscaled_neighbours(r, tmp_path, scale, capsys):
    """Float32 norms of rows scaled by 1e30 overflow (1e-30: underflow); the search still ranks by cosine."""
    ref = tmp_path / "ref.npy"
    run_quiet(faiss_nn.main, ["--database", r["emb"], "--queries", r["val"], "--out", ref, "-K", "20"])
    db = save_split(tmp_path / "s", "train", rows(200, 0) * np.float32(scale))
    q = save_split(tmp_path / "s", "val", rows(60, 1) * np.float32(scale))
    capsys.readouterr()
    run_quiet(faiss_nn.main, ["--database", db, "--queries", q, "--out", tmp_path / "nn.npy", "-K", "20"])
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "nn.npy"), np.load(ref))
    np.testing.assert_allclose(np.load(tmp_path / "nn_scores.npy"), np.load(tmp_path / "ref_scores.npy"), atol=1e-6)


@pytest.mark.parametrize("backend", ["sparse", "scipy", "faiss"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_scaled_codes_find_the_unscaled_neighbours(r, tmp_path, scale, backend, capsys):
    ref = np.load(r["nn"])
    db, q = load_codes(r["db"]), load_codes(r["q"])
    paths = []
    for name, c in (("db", db), ("q", q)):
        paths.append(save_npz(tmp_path / f"{name}.npz", c, values=c.values * np.float32(scale)))
    capsys.readouterr()
    run_quiet(faiss_nn.main, ["--database", paths[0], "--queries", paths[1], "--out", tmp_path / "nn.npy", "-K", "20",
                              "--backend", backend])
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "nn.npy"), ref)
    np.testing.assert_allclose(np.load(tmp_path / "nn_scores.npy"), np.load(r["nn"].with_name("nn_scores.npy")),
                               atol=1e-6)


def test_normalisation_is_scale_free():
    """l2_normalize and both code normalisations give the unscaled rows' unit vectors, float64 codes too."""
    x = rows(50, 3)
    unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    for scale in (1e30, 1e-30, 1e-40):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_allclose(l2_normalize(x * np.float32(scale)), unit, rtol=1e-5 if scale > 1e-38 else 1e-2)
    assert (l2_normalize(np.zeros((2, 4), np.float32)) == 0).all()
    np.testing.assert_allclose(l2_normalize(x.astype(np.float64) * 1e300), unit, rtol=1e-6)
    c = random_codes(40, 5, labels=False)
    ref = search(c, c, 5, backend="sparse", progress=False)
    wide = c.values.astype(np.float64)
    for values in (c.values * np.float32(1e30), wide * 1e300, wide * 1e-300):
        scaled = SparseCodes(c.indices, values, HIDDEN)
        for backend in ("sparse", "scipy"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = search(scaled, scaled, 5, backend=backend, progress=False)
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_allclose(got[1], ref[1], atol=1e-6)
