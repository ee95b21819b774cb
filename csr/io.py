"""File contract between stages: atomic writes, embeddings, labels, sidecars, sparse codes.

Every writer goes through `atomic_path`: data is written to a temporary file beside the target and renamed
into place only when complete, so a crashed stage never leaves a file the next stage would read as valid.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class CSRError(Exception):
    """A user-facing error: printed as one line naming the file, flag or shape at fault."""


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; outputs get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; it replaces `path` (a folder) only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CSRError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _public(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _public(folder: Path) -> None:
    """mkdtemp (and safetensors) create private entries: give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_output(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse to clobber an existing output unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CSRError(f"{path} exists; pass {flag} to replace it")
    return path


# ----------------------------------------------------------------------------- provenance

def code_version() -> str:
    """Git commit of this checkout (with -dirty), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from csr import __version__
    return __version__


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def sidecar_path(path: str | os.PathLike) -> Path:
    """`train_emb.npy` -> `train_meta.json`; `x.json` -> `x.meta.json`; anything else `x.ext` -> `x.json`."""
    path = Path(path)
    if path.name.endswith("_emb.npy"):
        return path.with_name(path.name[: -len("_emb.npy")] + "_meta.json")
    if path.suffix == ".json":  # a JSON output keeps its provenance beside it, never in place of it
        return path.with_name(path.stem + ".meta.json")
    return path.with_suffix(".json")


def write_sidecar(path: str | os.PathLike, **fields: Any) -> Path:
    """Write the JSON sidecar describing artifact `path` (command, code version, plus `fields`)."""
    meta = {"file": Path(path).name, "command": command_line(), "code_version": code_version(), **fields}
    side = sidecar_path(path)
    atomic_write_json(side, meta)
    return side


def read_sidecar(path: str | os.PathLike) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise CSRError(f"{side}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- embeddings and labels

def labels_path_for(emb_path: str | os.PathLike) -> Path:
    """`{split}_emb.npy` -> `{split}_labels.npy` (the file contract)."""
    p = Path(emb_path)
    if p.name.endswith("_emb.npy"):
        return p.with_name(p.name[: -len("_emb.npy")] + "_labels.npy")
    return p.with_name(p.stem + "_labels.npy")


def _open_npy(path: Path, what: str, mmap: bool) -> np.ndarray:
    if not path.exists():
        raise CSRError(f"{path}: {what} file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CSRError(f"{path}: not a readable .npy {what} file ({e})") from None


def check_finite(arr: np.ndarray, path: str | os.PathLike, chunk: int = 65536) -> None:
    """Raise naming the first row with NaN/Inf; reads memory-mapped arrays chunk by chunk."""
    for start in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[start:start + chunk])
        bad = ~np.isfinite(block).all(axis=tuple(range(1, block.ndim)))
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise CSRError(f"{path}: NaN or Inf in embeddings (first at row {row})")


def load_embeddings(path: str | os.PathLike, mmap: bool = True, finite: bool = True) -> np.ndarray:
    """Load `[N, d]` float embeddings (memory-mapped by default), validating shape, dtype and values."""
    path = Path(path)
    arr = _open_npy(path, "embedding", mmap)
    if arr.ndim != 2:
        raise CSRError(f"{path}: embeddings must be 2-D [N, d], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CSRError(f"{path}: empty embedding array, shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise CSRError(f"{path}: embeddings must be float16/float32, got {arr.dtype}")
    if finite:
        check_finite(arr, path)
    return arr


def load_labels(path: str | os.PathLike, n: int | None = None, required: bool = True) -> np.ndarray | None:
    """Load int64 labels `[N]`; check the length against `n` rows of embeddings."""
    path = Path(path)
    if not path.exists():
        if required:
            raise CSRError(f"{path}: labels file not found")
        return None
    lab = _open_npy(path, "labels", mmap=False)
    if lab.ndim != 1:
        raise CSRError(f"{path}: labels must be 1-D [N], got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise CSRError(f"{path}: labels must be integers, got {lab.dtype}")
    if n is not None and lab.shape[0] != n:
        raise CSRError(f"{path}: {lab.shape[0]} labels but the embeddings have {n} rows")
    return lab.astype(np.int64, copy=False)


def read_rows(x: np.ndarray, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
    """`x[rows]` as a new array, read in increasing row order (sequential on a memory map), returned in the
    order of `rows`."""
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + x.shape[1:], dtype=dtype)
    out[order] = x[rows[order]]
    return out


class NpyWriter:
    """Write a large `[N, d]` .npy incrementally through a memory map into a temp file; `close()` renames it.

    RAM does not grow with N. If the writer is not closed successfully the temp file is removed.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any = np.float32):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial.npy")
        self.arr = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)

    def write(self, start: int, block: np.ndarray) -> None:
        self.arr[start:start + len(block)] = block

    def close(self) -> None:
        self.arr.flush()
        del self.arr
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if hasattr(self, "arr"):
            del self.arr
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- sparse codes

def index_dtype(hidden_size: int) -> np.dtype:
    return np.dtype(np.int16) if hidden_size <= 32767 else np.dtype(np.int32)


@dataclass
class SparseCodes:
    """k-sparse codes: row i has `values[i, j]` at unit `indices[i, j]`; zero values are padding."""
    indices: np.ndarray  # [N, k] int16/int32
    values: np.ndarray  # [N, k] float16/float32
    hidden_size: int
    labels: np.ndarray | None = None  # [N] int64

    def __post_init__(self) -> None:
        validate_codes(self.indices, self.values, self.hidden_size, "codes")

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def to_scipy(self, normalize: bool = False):
        """CSR matrix `[N, hidden]` (float32); duplicates summed; optionally rows L2-normalised."""
        import scipy.sparse as sp
        indptr = np.arange(0, self.n * self.k + 1, self.k, dtype=np.int64)
        m = sp.csr_matrix((self.values.astype(np.float32).ravel(), self.indices.astype(np.int64).ravel(), indptr),
                          shape=(self.n, self.hidden_size))
        m.sum_duplicates()  # before normalising: a repeated index is one coordinate, as in the sparse engine
        m.eliminate_zeros()
        if normalize:
            rows = np.repeat(np.arange(self.n), np.diff(m.indptr))
            norms = np.sqrt(np.bincount(rows, weights=m.data.astype(np.float64) ** 2, minlength=self.n))
            m.data /= np.maximum(norms, 1e-12).astype(np.float32)[rows]
        return m

    def to_dense(self, normalize: bool = False) -> np.ndarray:
        return self.to_scipy(normalize).toarray()


def validate_codes(indices: np.ndarray, values: np.ndarray, hidden_size: int, name: str) -> None:
    if indices.ndim != 2 or values.shape != indices.shape:
        raise CSRError(f"{name}: indices {indices.shape} and values {values.shape} must both be [N, k]")
    if not np.issubdtype(indices.dtype, np.integer):
        raise CSRError(f"{name}: indices must be integers, got {indices.dtype}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= hidden_size:
            raise CSRError(f"{name}: unit indices must lie in [0, {hidden_size}), found range [{lo}, {hi}]")
    if not np.isfinite(values).all():
        raise CSRError(f"{name}: NaN or Inf in code values")


def save_codes(path: str | os.PathLike, codes: SparseCodes, **meta: Any) -> None:
    """Atomically write codes to `.npz` (indices, values, hidden_size, labels) plus a JSON sidecar."""
    arrays = dict(indices=codes.indices, values=codes.values, hidden_size=np.int64(codes.hidden_size))
    if codes.labels is not None:
        arrays["labels"] = codes.labels.astype(np.int64)
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    write_sidecar(path, n=codes.n, k=codes.k, hidden_size=codes.hidden_size,
                  indices_dtype=str(codes.indices.dtype), values_dtype=str(codes.values.dtype), **meta)


def load_codes(path: str | os.PathLike) -> SparseCodes:
    path = Path(path)
    if not path.exists():
        raise CSRError(f"{path}: sparse code file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"indices", "values", "hidden_size"} - set(z.files)
            if missing:
                raise CSRError(f"{path}: not a sparse code file (missing {sorted(missing)})")
            labels = z["labels"] if "labels" in z.files else None
            return SparseCodes(z["indices"], z["values"], int(z["hidden_size"]), labels)
    except CSRError as e:
        raise CSRError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise CSRError(f"{path}: not a readable .npz code file ({e})") from None
