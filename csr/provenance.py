"""Identity of inputs and code: what a cached result depends on, as a short digest.

A cached part (sweep) or a resumed run is valid only for the same data files, the same configuration and the
same library code. Files are identified by resolved path, size, mtime, (for .npy) shape and dtype, and a hash
of a fixed sample of their bytes (the header and evenly spaced blocks of rows): a file replaced by another of
the same size with its mtime kept (`cp -p`, `rsync -a`, `tar`) is caught without reading ImageNet-sized files
whole. The code is identified by a hash of the library's sources, so a commit that only touches the README
does not invalidate results, but any edit of `csr/` does.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def file_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Resolved path, size, mtime (ns), `sample` (see `content_sample`) and, for .npy files, shape and dtype.
    None for a missing file."""
    if path is None:
        return None
    p = Path(path).resolve()
    if not p.exists():
        return None
    st = p.stat()
    ident: dict[str, Any] = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_file():
        ident["sample"] = content_sample(p, st.st_size)
    if p.suffix == ".npy" and p.is_file():
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            ident.update(shape=list(arr.shape), dtype=str(arr.dtype))
        except (ValueError, OSError):
            pass
    return ident


SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 4096


def content_sample(path: Path, size: int) -> str:
    """SHA-256 (first 16 hex) of the first 4 KiB (a .npy header and first rows) and of SAMPLE_BLOCKS blocks of
    4 KiB at evenly spaced offsets up to the end: at most 260 KiB read, whatever the file's size."""
    h = hashlib.sha256()
    offsets = sorted({0, *(i * max(size - SAMPLE_BYTES, 0) // SAMPLE_BLOCKS for i in range(1, SAMPLE_BLOCKS + 1))})
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (first 16 hex) of the `csr/` library's Python sources, in path order."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    """Where a result was measured: CPU model, logical cores, torch's CPU threads, and the GPU when one is used."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
