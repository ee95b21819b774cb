"""What the training loop consumes: the rows to train on (`TrainData`), one step's input (`Batch`), any source
of batches (`BatchSource`) and the deterministic shuffled global batches of rows (`Batches`), with the checks of
the rows (`MIN_ROWS`, `check_data`). The loop is csr/train.py's (which re-exports these names)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from csr.distributed import Runtime
from csr.io import CSRError
from csr.train_config import TrainConfig


MIN_ROWS = 2  # fewer rows train a model whose codes describe nothing but that row


@dataclass
class TrainData:
    """Rows to train on: `x [N, d]` (array or memmap), optional int labels (for `label`) and paired rows `x_pair`
    (for `pair`: row i of x and x_pair are positives)."""
    x: np.ndarray
    labels: np.ndarray | None = None
    x_pair: np.ndarray | None = None
    identity: dict[str, Any] | None = None  # the data file's path, shape, dtype, size, mtime (checked on --resume)

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Batch:
    """One step's input on this rank: `x` the model's rows (`[x; x_pair]` for pairs: the first half pairs
    with the second), optional labels, and `samples`, how many samples it holds (a pair counts once)."""
    x: torch.Tensor
    labels: torch.Tensor | None = None
    samples: int = 0


class BatchSource(Protocol):
    """What `train` consumes: `epoch(e)` yields this rank's `Batch`es of epoch e; `steps_per_epoch` sizes the
    progress bar and the LR schedule. Optional attributes: `rows` (the training rows: b_pre / encoder
    initialisation and the final dead-latent count), `identity` (checked on --resume), `skipped` (samples
    dropped so far, logged), `uneven` (True when DDP ranks may run out of batches at different steps, as
    streamed shards do: every step then checks that all ranks still have one)."""
    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class Batches:
    """Deterministic shuffled global batches (seed, epoch) of `TrainData`; each DDP rank takes its slice."""

    def __init__(self, data: TrainData, cfg: TrainConfig, rt: Runtime, ram_limit_bytes: float = 4e9):
        self.data, self.cfg, self.rt = data, cfg, rt
        self.n = len(data)
        self.rows, self.identity = data.x, data.identity
        if cfg.batch_size % rt.world_size:
            raise CSRError(f"--batch-size {cfg.batch_size} must be divisible by the number of DDP ranks "
                           f"({rt.world_size})")
        # small arrays live in RAM as tensors; large ones are read from the memory map batch by batch. The limit
        # is shared by the processes of this machine (each DDP rank would hold its own copy).
        per_process = ram_limit_bytes / int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
        self.cache = {}
        for name in ("x", "x_pair"):
            arr = getattr(data, name)
            if arr is not None and arr.nbytes <= per_process:
                self.cache[name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)

    def _rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        if name in self.cache:
            return self.cache[name][torch.from_numpy(rows)]
        order = np.argsort(rows)
        block = np.asarray(getattr(self.data, name)[rows[order]], dtype=np.float32)
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)
        B, W, r = self.cfg.batch_size, self.rt.world_size, self.rt.rank
        for step in range(self.steps_per_epoch):
            g = perm[step * B:(step + 1) * B]
            per = len(g) // W
            if per == 0:
                continue
            rows = g[r * per:(r + 1) * per]
            x = self._rows("x", rows)
            if self.data.x_pair is not None:
                x = torch.cat([x, self._rows("x_pair", rows)])
            labels = torch.from_numpy(self.data.labels[rows]) if self.data.labels is not None else None
            yield Batch(x, labels, len(rows))


def check_data(data: TrainData, cfg: TrainConfig) -> None:
    """The contrastive term's inputs must exist: pairs for `pair`, labels for `label`."""
    if cfg.cl == "pair" and data.x_pair is None:
        raise CSRError("--cl pair needs paired rows (query/document or image/text embeddings)")
    if cfg.cl == "label" and data.labels is None:
        raise CSRError("--cl label needs labels (a {split}_labels.npy beside the embeddings)")
