"""MTEB-style evaluation of text representations: classification, clustering and retrieval.

Every representation is L2-normalised before use: the dense embedding (d dims), its truncation to the first m
dims (MRL-style; all-MiniLM-L6-v2 is not Matryoshka-trained, so this is the naive baseline), PCA to m dims
fitted on the train split (the strong baseline), and CSR codes with k = m active units (sparse
`[N, hidden]` matrices; never densified for search). Truncation and PCA are `csr.baselines`' (the image sweep's):
one exact PCA (covariance eigendecomposition) fitted once on the train split, its first m components for size m.

Protocol (labelled corpora: fit on `train`, score on `test`):
- classification, logistic regression: sklearn `LogisticRegression(max_iter=100, random_state=seed)` (lbfgs,
  C = 1), MTEB's classifier and settings, fitted on ALL train rows (MTEB undersamples train sets per
  experiment; our corpora are small, so one fit on the full split); accuracy and macro-F1 on test.
- classification, kNN: each test text votes among its K (default 10) nearest train texts by exact cosine
  (`csr.knn.search`, ties by lowest index); the most frequent label wins, a tie in counts goes to the tied
  label ranked first. Accuracy on test.
- clustering: k-means (sklearn `KMeans`, n_init 10, seeded) on the test split with the true number of
  classes; V-measure against the labels (MTEB's metric).
- retrieval: test texts query the train texts; relevance: a train text is relevant (grade 1) to a query iff it
  has the query's label. For BEIR folders: queries/corpus/qrels with their graded scores.
  nDCG@10 uses linear gains and log2(rank + 1) discounts (trec_eval / MTEB) with the ideal DCG computed from
  ALL relevant documents of the query, not from the retrieved list (the reference's error, which overstates
  nDCG); recall@k = relevant retrieved in the top k / all relevant (grade > 0); MRR@10 = 1 / rank of the first
  relevant document in the top 10 (0 if none). Queries without a relevant document are skipped (BEIR).
All scores are percentages averaged over queries / test texts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from csr.baselines import PCA, truncate
from csr.codes import SparseCodes
from csr.io import CSRError
from csr.knn import clip_k, l2_normalize, search

RETRIEVAL_KS = (10, 100)


@dataclass
class View:
    """One representation of the rows of a task at one size: dense arrays or sparse codes."""
    method: str  # dense | truncation | pca | csr
    dims: int  # active dimensions (k for CSR)
    a: np.ndarray | SparseCodes  # train split / corpus
    b: np.ndarray | SparseCodes  # test split / queries

    def features(self, which: str):
        """L2-normalised features for sklearn: a dense array or a scipy CSR matrix."""
        x = self.a if which == "a" else self.b
        return x.to_scipy(normalize=True) if isinstance(x, SparseCodes) else l2_normalize(x)

    def neighbours(self, K: int, progress: bool = False) -> np.ndarray:
        """Exact cosine top-K of every `b` row among the `a` rows."""
        backend = "sparse" if isinstance(self.a, SparseCodes) else "faiss"
        return search(self.b, self.a, K, backend=backend, progress=progress)[0]


# ----------------------------------------------------------------------------- metrics

def logreg_scores(x_train, y_train: np.ndarray, x_test, y_test: np.ndarray, max_iter: int = 100,
                  seed: int = 42) -> dict[str, float]:
    """MTEB's classifier: LogisticRegression(max_iter=100) fit on train features; accuracy and macro-F1 on test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=100 is the protocol, not a bug
        clf.fit(x_train, y_train)
    pred = clf.predict(x_test)
    return {"logreg_acc": 100.0 * accuracy_score(y_test, pred),
            "logreg_f1": 100.0 * f1_score(y_test, pred, average="macro")}


def knn_vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Majority label of each row of `[N, K]` neighbour labels (ranked); ties go to the tied label ranked first."""
    n, K = neighbour_labels.shape
    pred = np.empty(n, dtype=neighbour_labels.dtype)
    for i, row in enumerate(neighbour_labels):
        labels, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = counts == counts.max()
        pred[i] = labels[best][np.argmin(first[best])]
    return pred


def knn_accuracy(neighbors: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray, K: int) -> float:
    return 100.0 * float((knn_vote(db_labels[neighbors[:, :K]]) == query_labels).mean())


def v_measure(x, labels: np.ndarray, seed: int = 42, n_init: int = 10) -> float:
    """k-means with the true number of classes, scored by V-measure (MTEB's clustering metric)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score
    n_clusters = len(np.unique(labels))
    if n_clusters < 2:
        raise CSRError(f"clustering needs at least 2 classes, found {n_clusters}")
    pred = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    return 100.0 * v_measure_score(labels, pred)


@dataclass
class Relevance:
    """Graded relevance of ranked lists: `gains [Nq, K]` of the retrieved documents, `ideal [Nq, K]` the K best
    grades among ALL relevant documents (descending, zero-padded), `n_relevant [Nq]` (grade > 0)."""
    gains: np.ndarray
    ideal: np.ndarray
    n_relevant: np.ndarray


def label_relevance(neighbors: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray) -> Relevance:
    """Same-label documents are relevant with grade 1."""
    K = neighbors.shape[1]
    gains = (db_labels[neighbors] == query_labels[:, None]).astype(np.float64)
    sizes = np.bincount(db_labels, minlength=int(max(db_labels.max(), query_labels.max())) + 1)
    n_rel = sizes[query_labels]
    ideal = (np.arange(K)[None, :] < n_rel[:, None]).astype(np.float64)
    return Relevance(gains, ideal, n_rel)


def qrels_relevance(neighbors: np.ndarray, qrels: list[tuple[int, int, int]] | np.ndarray,
                    n_docs: int) -> Relevance:
    """Relevance from (query row, doc row, grade) triples for the queries in `neighbors` (row i = query i)."""
    import scipy.sparse as sp
    nq, K = neighbors.shape
    q = np.asarray(qrels, dtype=np.int64).reshape(-1, 3)
    if len(q) and (q[:, 0].max() >= nq or q[:, 1].max() >= n_docs or q[:, :2].min() < 0):
        raise CSRError(f"qrels name rows outside {nq} queries x {n_docs} documents")
    pos = q[q[:, 2] > 0]
    m = sp.csr_matrix((pos[:, 2].astype(np.float64), (pos[:, 0], pos[:, 1])), shape=(nq, n_docs))
    m.sum_duplicates()
    gains = np.asarray(m[np.arange(nq)[:, None], neighbors].todense(), dtype=np.float64)
    ideal = np.zeros((nq, K))
    for i in range(nq):
        g = np.sort(m.data[m.indptr[i]:m.indptr[i + 1]])[::-1][:K]
        ideal[i, :len(g)] = g
    return Relevance(gains, ideal, np.diff(m.indptr))


def ranking_metrics(rel: Relevance, ndcg_k: int = 10, mrr_k: int = 10,
                    recall_ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    """nDCG@ndcg_k (ideal DCG over all relevant documents), MRR@mrr_k and recall@k, in %; queries without a
    relevant document are skipped."""
    keep = rel.n_relevant > 0
    if not keep.any():
        raise CSRError("no query has a relevant document")
    gains, ideal, n_rel = rel.gains[keep], rel.ideal[keep], rel.n_relevant[keep]
    K = gains.shape[1]
    out = {}
    kk = min(ndcg_k, K)
    disc = 1.0 / np.log2(np.arange(2, kk + 2))
    dcg = (gains[:, :kk] * disc).sum(1)
    idcg = (ideal[:, :kk] * disc).sum(1)
    out[f"ndcg@{ndcg_k}"] = 100.0 * float(np.mean(dcg / idcg))
    hit = gains[:, :min(mrr_k, K)] > 0
    first = np.where(hit.any(1), hit.argmax(1) + 1, np.inf)
    out[f"mrr@{mrr_k}"] = 100.0 * float(np.mean(1.0 / first))
    for k in recall_ks:
        if k <= K:
            out[f"recall@{k}"] = 100.0 * float(np.mean((gains[:, :k] > 0).sum(1) / n_rel))
    return out


# ----------------------------------------------------------------------------- one view, all tasks

def evaluate_labelled(view: View, y_train: np.ndarray, y_test: np.ndarray, knn_k: int = 10,
                      retrieval_k: int = 100, seed: int = 42, logreg_max_iter: int = 100,
                      tasks: tuple[str, ...] = ("classification", "clustering", "retrieval")) -> dict[str, float]:
    """All three task families on one view of a labelled corpus (a = train, b = test)."""
    out: dict[str, float] = {}
    if "classification" in tasks:
        out.update(logreg_scores(view.features("a"), y_train, view.features("b"), y_test, logreg_max_iter, seed))
    nbrs = None
    if "classification" in tasks or "retrieval" in tasks:
        nbrs = view.neighbours(min(max(knn_k, retrieval_k), len(y_train)))
    if "classification" in tasks:
        out[f"knn{knn_k}_acc"] = knn_accuracy(nbrs, y_train, y_test, knn_k)
    if "clustering" in tasks:
        out["v_measure"] = v_measure(view.features("b"), y_test, seed)
    if "retrieval" in tasks:
        out.update(ranking_metrics(label_relevance(nbrs, y_train, y_test)))
    return out


def evaluate_retrieval(view: View, qrels: list[tuple[int, int, int]], retrieval_k: int = 100) -> dict[str, float]:
    """Retrieval on one view of a BEIR corpus (a = corpus, b = queries), graded qrels."""
    n_docs = view.a.n if isinstance(view.a, SparseCodes) else view.a.shape[0]
    nbrs = view.neighbours(min(retrieval_k, n_docs))
    return ranking_metrics(qrels_relevance(nbrs, qrels, n_docs))


# ----------------------------------------------------------------------------- a whole evaluation run

def csr_views(checkpoints: dict[int, str], a: np.ndarray, b: np.ndarray, device: str = "cpu", method: str = "csr"):
    """CSR codes of both sides at each k, from `{k: checkpoint}` (one model may serve several k)."""
    from csr.checkpoint import check_input_dim, load_model
    from csr.encode import encode_array
    for k, path in checkpoints.items():
        model, _ = load_model(path, device)
        check_input_dim(model, a.shape[1], path)
        if k > model.cfg.hidden_size:
            raise CSRError(f"{path}: k={k} exceeds hidden_size={model.cfg.hidden_size}")
        yield View(method, k, encode_array(model, a, k, device=device, progress=False),
                   encode_array(model, b, k, device=device, progress=False))


def baseline_views(a: np.ndarray, b: np.ndarray, dims: tuple[int, ...], methods: tuple[str, ...], seed: int = 0):
    """The dense embedding once, then its truncation and PCA (fitted on `a`) at each size below d."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if "dense" in methods:
        yield View("dense", a.shape[1], l2_normalize(a), l2_normalize(b))
    sizes = [m for m in dims if m < a.shape[1]]
    pca = PCA(max(sizes)).fit(a, seed=seed) if "pca" in methods and sizes else None
    for m in sizes:
        if "truncation" in methods:
            yield View("truncation", m, l2_normalize(truncate(a, m)), l2_normalize(truncate(b, m)))
        if pca is not None:
            yield View("pca", m, l2_normalize(pca.transform(a, m)), l2_normalize(pca.transform(b, m)))


def evaluate_views(views, task: str, y_or_qrels, progress: bool = True, desc: str = "eval", **kw) -> list[dict]:
    """Rows {method, dims, metric: value, ...} for each view; `task` is `labelled` or `retrieval`."""
    from csr.progress import progress_bar
    rows = []
    for view in progress_bar(list(views), desc=desc, disable=not progress, leave=False):
        if task == "labelled":
            scores = evaluate_labelled(view, *y_or_qrels, **kw)
        else:
            scores = evaluate_retrieval(view, y_or_qrels, kw.get("retrieval_k", 100))
        rows.append({"method": view.method, "dims": view.dims, **scores})
    return rows


METHODS = ("dense", "truncation", "pca", "csr")


def check_classes(labels: np.ndarray, path) -> None:
    """Classification and clustering need two classes or more on each side of a labelled corpus."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise CSRError(f"{path}: {len(labels)} labels of one class ({classes[0] if len(classes) else 'none'}); "
                       f"classification and clustering need at least 2 classes")


def method_rank(method: str) -> tuple[int, str]:
    """Table / plot order: truncation, pca, the CSR variants (by name), dense."""
    return ({"truncation": 0, "pca": 1}.get(method, 3 if method == "dense" else 2), method)


def evaluate_folder(emb_dir: str, csr_runs: dict[str, dict[int, str]], dims: tuple[int, ...] = (8, 16, 32, 64),
                    methods: tuple[str, ...] = METHODS, knn_k: int = 10, retrieval_k: int = 100, seed: int = 42,
                    device: str = "cpu", progress: bool = True) -> dict:
    """Every method at every size on an embedded folder (labelled: train/test; retrieval: corpus/queries).
    `csr_runs` maps a method name (e.g. `csr`) to its checkpoints `{k: path}`."""
    from itertools import chain
    from pathlib import Path

    from csr.io import check_dims, check_same_width, load_embeddings, load_labels
    from csr.text_embed import read_corpus_info
    root = Path(emb_dir)
    info = read_corpus_info(root)
    sides = ("train", "test") if info["task"] == "labelled" else ("corpus", "queries")
    a, b = (load_embeddings(root / f"{s}_emb.npy") for s in sides)
    check_same_width(a, b, root / f"{sides[0]}_emb.npy", root / f"{sides[1]}_emb.npy")
    if {"truncation", "pca"} & set(methods):
        check_dims(dims, a.shape[1], "--dims", root / f"{sides[0]}_emb.npy")
    if info["task"] == "labelled":
        target = (load_labels(root / "train_labels.npy", a.shape[0]), load_labels(root / "test_labels.npy", b.shape[0]))
        for side, y in zip(sides, target):
            check_classes(y, root / f"{side}_labels.npy")
        clip_k(knn_k, a.shape[0], "--knn-k")  # a warning: with more voters than rows, every row votes
        kw = dict(knn_k=knn_k, retrieval_k=retrieval_k, seed=seed)
    else:
        if "test" not in info.get("qrels", {}):
            raise CSRError(f"{root / 'corpus.json'}: no test qrels to evaluate retrieval against (splits: "
                           f"{sorted(info.get('qrels', {})) or 'none'})")
        target, kw = info["qrels"]["test"], dict(retrieval_k=retrieval_k)
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    views = chain(baseline_views(a, b, dims, methods, seed),
                  *(csr_views({k: ckpts[k] for k in dims}, a, b, device, name) for name, ckpts in csr_runs.items()))
    rows = evaluate_views(views, info["task"], target, progress, desc=f"eval {info['name']}", **kw)
    rows.sort(key=lambda r: (r["method"] == "dense", r["dims"], method_rank(r["method"])))
    return {"dataset": info["name"], "task": info["task"], "emb_dir": str(root), "n_a": a.shape[0],
            "n_b": b.shape[0], "d": a.shape[1], "checkpoints": {m: {str(k): str(v) for k, v in c.items()} for m, c in csr_runs.items()},
            "rows": [{"dataset": info["name"], **r} for r in rows]}


def results_table(results: list[dict]) -> str:
    """One markdown table (task x method x dims) over the evaluated folders."""
    from csr.metrics import markdown_table
    rows = [r for res in results for r in res["rows"]]
    metrics = [c for c in ("logreg_acc", "logreg_f1") if any(c in r for r in rows)]
    metrics += sorted({c for r in rows for c in r if c.startswith("knn")})
    metrics += [c for c in ("v_measure", "ndcg@10", "mrr@10", "recall@10", "recall@100") if any(c in r for r in rows)]
    return markdown_table(rows, ["dataset", "method", "dims"] + metrics)


def plot_vs_dims(results: list[dict], path, metrics: tuple[str, ...] | None = None) -> None:
    """Each metric against active dimensions (log-2 axis): lines per method, the dense embedding dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csr.io import atomic_path
    if metrics is None:
        have = {c for res in results for r in res["rows"] for c in r}
        metrics = tuple(c for c in ("logreg_acc", "knn10_acc", "v_measure", "ndcg@10") if c in have)
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(3.6 * len(metrics), 3.0 * len(results)),
                             squeeze=False)
    for i, res in enumerate(results):
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            methods = sorted({r["method"] for r in res["rows"]} - {"dense"}, key=method_rank)
            for method in methods:
                pts = sorted((r["dims"], r[metric]) for r in res["rows"] if r["method"] == method and metric in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            for r in res["rows"]:
                if r["method"] == "dense" and metric in r:
                    ax.axhline(r[metric], color="gray", ls="--", label=f"dense ({r['dims']}-d)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{res['dataset']}: {metric}", fontsize=9)
            ax.set_xlabel("active dimensions")
            if j == 0:
                ax.set_ylabel("%")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
