"""File contract between stages: atomic writes, embeddings, labels, neighbours, sidecars (sparse codes: csr/codes.py).

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
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


class CSRError(Exception):
    """A user-facing error: printed as one line naming the file, flag or shape at fault."""


def info(message: str) -> None:
    """The one way the library reports progress and what it wrote: one line on stdout. Library modules never
    call print() themselves (only csr/cli.py and the scripts do), so this is the single place to redirect it."""
    print(message, flush=True)


def warn(message: str) -> None:
    """The one way the library reports a legal but suspicious input or a silent change of behaviour:
    one line `warning: ...` on stderr (stdout stays for results)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def check_output(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite",
                 also: Iterable[str | os.PathLike] = (), sidecar: bool = False,
                 inputs: dict[str, Any] | None = None, folder: bool = False) -> Path:
    """Before any work: refuse to clobber an existing output unless `overwrite`, and check that `path` can be
    written at all. `also`: every other file the stage writes beside `path` (scores, labels), checked the same
    way; `sidecar`: the stage writes `sidecar_path(path)` too, which is checked as well. Whatever `overwrite`
    says, never replaced: another file's sidecar (another stage's output of the same name), a file the stage
    reads (`inputs`: {flag: path}), and a directory where a file goes (`folder`: the output is a directory)."""
    path = Path(path)
    check_writable(path.parent, path)
    others = [Path(p) for p in also]
    if sidecar:
        others.append(sidecar_path(path))
    for p in (path, *others):
        owner = _sidecar_owner(p)
        if owner is not None and not (sidecar and p == sidecar_path(path) and owner == path.name):
            raise CSRError(f"{p} is the sidecar of {p.parent / owner}, which {path} would replace; choose "
                           f"another name")
        for role, src in (inputs or {}).items():
            if src is not None and same_file(p, Path(src)):
                raise CSRError(f"{p} is also the input {role} {src}, which this stage reads; choose another name")
        if p.is_dir() and not (folder and p == path):
            raise CSRError(f"{p} is a directory; give a file name")
    for p in (path, *others):
        if p.exists() and not overwrite:
            raise CSRError(f"{p} exists; pass {flag} to replace it")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (the same path, a link to it, or a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _sidecar_owner(side: Path) -> str | None:
    """The `file` an existing JSON file describes when it is that file's sidecar (None: no such file, or not a
    sidecar of ours)."""
    if side.suffix != ".json" or not side.is_file() or side.stat().st_size > (1 << 20):  # sidecars are small
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    owner = meta.get("file") if isinstance(meta, dict) else None
    if not isinstance(owner, str) or not owner or "/" in owner or sidecar_path(side.parent / owner) != side:
        return None
    return owner


def check_writable(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Fail before any work when `folder` (to be created if missing) cannot hold files: a regular file on the
    way, a read-only or virtual file system. Probes with a temp file in the nearest existing ancestor, which
    it removes: nothing is left on disk."""
    folder = Path(folder)
    target = Path(target) if target is not None else folder
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CSRError(f"{target}: cannot write here, {anc} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".csr-write-probe.", dir=anc)
        os.close(fd)
        os.unlink(probe)
        if anc != folder:  # the folders still to create must be creatable too
            probe_dir = tempfile.mkdtemp(prefix=".csr-write-probe.", dir=anc)
            os.rmdir(probe_dir)
    except OSError as e:
        raise CSRError(f"{target}: cannot write under {anc} ({e.strerror or e})") from None
    return folder


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


def read_json(path: Path, what: str = "file", flag: str | None = None) -> Any:
    """Parse a JSON object or list; a missing or malformed file is a one-line CSRError naming the path (after
    `flag` when a flag gave it) and `what` the file is."""
    at = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise CSRError(f"{at}: {what} not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CSRError(f"{at}: not valid JSON ({e})") from None
    if not isinstance(obj, (dict, list)):
        raise CSRError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of `path` as a dict ({} when there is none); anything but a JSON object is a CSRError."""
    side = sidecar_path(path)
    if not side.exists():
        return {}
    if not side.is_file():
        raise CSRError(f"{side}: is a directory, expected the JSON sidecar of {path}")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CSRError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CSRError(f"{side}: not a sidecar (expected a JSON object, got {type(meta).__name__})")
    return meta


# ----------------------------------------------------------------------------- embeddings and labels

def labels_path_for(emb_path: str | os.PathLike) -> Path:
    """`{split}_emb.npy` -> `{split}_labels.npy` (the file contract)."""
    p = Path(emb_path)
    if p.name.endswith("_emb.npy"):
        return p.with_name(p.name[: -len("_emb.npy")] + "_labels.npy")
    return p.with_name(p.stem + "_labels.npy")


def check_file(path: Path, what: str) -> None:
    """A missing path, a directory or a 0-byte file, each named as such."""
    if not path.exists():
        raise CSRError(f"{path}: {what} file not found")
    if path.is_dir():
        raise CSRError(f"{path}: is a directory, expected a {what} file")
    if path.stat().st_size == 0:
        raise CSRError(f"{path}: empty {what} file (0 bytes)")


def _open_npy(path: Path, what: str, mmap: bool) -> np.ndarray:
    check_file(path, what)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "not an array: a pickle, or not a .npy file" if "pickled" in str(e) else str(e).splitlines()[0]
        raise CSRError(f"{path}: not a readable .npy {what} file ({why})") from None
    if not isinstance(arr, np.ndarray):
        raise CSRError(f"{path}: not a .npy {what} file (an .npz archive?)")
    return arr


def check_finite(arr: np.ndarray, path: str | os.PathLike, chunk: int = 65536, what: str = "embeddings",
                 nonzero: bool = False) -> None:
    """Raise naming the first row with NaN/Inf; reads memory-mapped arrays chunk by chunk. With `nonzero`,
    an array that is zero everywhere is an error and some all-zero rows are a warning (cosine is undefined)."""
    zero_rows, first_zero = 0, -1
    for start in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[start:start + chunk])
        axes = tuple(range(1, block.ndim))
        bad = ~np.isfinite(block).all(axis=axes)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise CSRError(f"{path}: NaN or Inf in {what} (first at row {row})")
        if nonzero:
            zero = ~block.any(axis=axes)
            if zero.any() and first_zero < 0:
                first_zero = start + int(np.flatnonzero(zero)[0])
            zero_rows += int(zero.sum())
    if nonzero and zero_rows == arr.shape[0]:
        raise CSRError(f"{path}: all {what} are zero (every cosine similarity would be 0)")
    if zero_rows:
        warn(f"{path}: {zero_rows} of {arr.shape[0]} rows of {what} are all zero (first at row {first_zero}); "
             f"they have cosine 0 to everything")


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
        check_finite(arr, path, nonzero=True)
    return arr


def check_same_width(a: np.ndarray, b: np.ndarray, path_a: Any, path_b: Any) -> None:
    """Two embedding files that are compared with each other must have the same width d."""
    if a.shape[1] != b.shape[1]:
        raise CSRError(f"{path_b}: embeddings have d={b.shape[1]} but {path_a} has d={a.shape[1]}")


def check_dims(dims: Any, d: int, flag: str, path: Any) -> None:
    """Every requested size must fit the embedding width (never dropped silently)."""
    bad = [m for m in dims if m > d]
    if bad:
        raise CSRError(f"{flag} {' '.join(map(str, bad))}: larger than the width d={d} of {path}")


def load_neighbors(path: str | os.PathLike) -> np.ndarray:
    """Neighbour lists `[Nq, K]` of integer database indices (faiss_nn.py's output), validated."""
    path = Path(path)
    nn = _open_npy(path, "neighbours", mmap=False)
    if nn.ndim != 2:
        raise CSRError(f"{path}: neighbours must be 2-D [queries, K], got shape {nn.shape}")
    if not np.issubdtype(nn.dtype, np.integer):
        raise CSRError(f"{path}: neighbours must be integer database indices, got {nn.dtype}")
    if nn.shape[0] == 0 or nn.shape[1] == 0:
        raise CSRError(f"{path}: empty neighbour lists, shape {nn.shape}")
    ranked = np.sort(nn, axis=1)
    dup = (ranked[:, 1:] == ranked[:, :-1]).any(axis=1)
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        twice = ranked[row, 1:][ranked[row, 1:] == ranked[row, :-1]][0]
        raise CSRError(f"{path}: row {row} lists database id {int(twice)} twice ({int(dup.sum())} of {len(nn)} rows "
                       f"repeat an id); every metric would count a repeated item more than once")
    return nn


def check_neighbor_ids(nn: np.ndarray, path: Any, n_db: int, db_labels: Any) -> None:
    """Every neighbour id must index the database, whose size is that of its labels file `db_labels`."""
    bad = (nn < 0) | (nn >= n_db)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise CSRError(f"{path}: neighbour id {int(nn[row, col])} (row {row}) is outside the database of {n_db} "
                       f"rows labelled by {db_labels}; were these neighbours searched in another database?")


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
    if lab.size and lab.min() < 0:
        raise CSRError(f"{path}: labels must be >= 0, found {int(lab.min())} at row {int(np.argmin(lab))}")
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
