"""Baselines on the same frozen embeddings, each giving dense vectors that the same kNN evaluation reads:
full-dimensional, truncation to the first d dims, PCA to d dims (fit on the train split), and an MRL adaptor.
The one implementation of truncation and PCA for every table: the image sweep (`csr/sweep.py`) and the text
evaluation (`csr/text_eval.py`) both use them.

The MRL adaptor is a linear map (or a small MLP) trained on the frozen embeddings with the Matryoshka loss:
for every nested prefix d in {8, 16, ..., D} one objective on z[:, :d], summed. Supervised (as MRL): a
cross-entropy head per prefix (`heads="separate"`, MRL) or one head whose first d input rows serve prefix d
(`heads="shared"`, MRL-E). Unsupervised (no labels): each prefix preserves the pairwise cosine similarities
of the input batch (Matryoshka-Adaptor style), with a reconstruction term from the full code.
The MRL-at-d representation is always the first d dims of one shared representation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from csr.io import CSRError, read_rows
from csr.progress import progress_bar


def truncate(x: np.ndarray, d: int) -> np.ndarray:
    """The first d dims as contiguous float32 (not re-normalised)."""
    if d > x.shape[1]:
        raise CSRError(f"cannot truncate {x.shape[1]}-d embeddings to {d} dims")
    return np.ascontiguousarray(x[:, :d], dtype=np.float32)


class PCA:
    """PCA fit on the train split: centred by its mean; the components are the eigenvectors of the covariance
    (`np.linalg.eigh`), largest variance first."""

    def __init__(self, max_dim: int):
        self.max_dim = max_dim

    def fit(self, x: np.ndarray, sample: int = 200000, seed: int = 0, block: int = 8192) -> "PCA":
        """Fit on `x` (an array or a memory map), or on `sample` rows of it drawn without replacement (seed).

        Streams over row blocks: two passes (mean, then the centred covariance) accumulated in float64, so
        memory is O(d^2 + block * d) whatever the number of rows; equals `np.cov` + `eigh` on the same rows."""
        n, dim = x.shape
        rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
        blocks = [rows[s:s + block] for s in range(0, len(rows), block)]

        def read(r: np.ndarray) -> np.ndarray:
            return np.asarray(x[r[0]:r[-1] + 1] if len(rows) == n else x[r], dtype=np.float64)

        total = np.zeros(dim)
        for r in blocks:
            total += read(r).sum(0)
        self.mean = total / len(rows)
        cov = np.zeros((dim, dim))
        for r in blocks:
            xc = read(r) - self.mean
            cov += xc.T @ xc
        cov /= max(1, len(rows) - 1)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][: self.max_dim]
        self.components = evecs[:, order].astype(np.float32)  # [D, max_dim]
        self.explained = evals[order] / evals.sum()
        return self

    def transform(self, x: np.ndarray, d: int, batch: int = 65536) -> np.ndarray:
        """`x` centred and projected on the first d components, float32, in row batches."""
        if d > self.components.shape[1]:
            raise CSRError(f"PCA was fit with {self.components.shape[1]} components, asked for {d}")
        out = np.empty((len(x), d), dtype=np.float32)
        for s in range(0, len(x), batch):
            out[s:s + batch] = (np.asarray(x[s:s + batch], dtype=np.float32) - self.mean) @ self.components[:, :d]
        return out


def matryoshka_dims(full: int, start: int = 8) -> list[int]:
    """8, 16, 32, ... up to and including `full`."""
    dims, d = [], start
    while d < full:
        dims.append(d)
        d *= 2
    return dims + [full]


@dataclass
class MRLConfig:
    out_dim: int | None = None  # D of the adaptor's output (default: input dim)
    dims: tuple[int, ...] | None = None  # nested prefixes (default 8, 16, ..., D)
    hidden: int = 0  # 0 = linear adaptor; >0 = one hidden layer MLP of this width
    heads: str = "separate"  # separate (MRL) | shared (MRL-E); supervised only
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    wd: float = 1e-5
    seed: int = 0


class MRLAdaptor(nn.Module):
    """z = f(x) with nested prefixes; supervised heads per prefix when `n_classes` is given."""

    def __init__(self, in_dim: int, cfg: MRLConfig, n_classes: int | None):
        super().__init__()
        D = cfg.out_dim or in_dim
        self.dims = list(cfg.dims or matryoshka_dims(D))
        if max(self.dims) != D or min(self.dims) < 1:
            raise CSRError(f"MRL prefixes {self.dims} must lie in [1, {D}] and end at D={D}")
        self.cfg = cfg
        if cfg.hidden:
            self.body = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, D))
        else:
            self.body = nn.Linear(in_dim, D)
        self.n_classes = n_classes
        if n_classes is not None:
            if cfg.heads == "shared":
                self.head = nn.Linear(D, n_classes)
            elif cfg.heads == "separate":
                self.heads = nn.ModuleList(nn.Linear(d, n_classes) for d in self.dims)
            else:
                raise CSRError(f"MRL heads must be separate or shared, got {cfg.heads!r}")
        else:
            self.decoder = nn.Linear(D, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, z: torch.Tensor, d: int) -> torch.Tensor:
        """Class logits of prefix d: shared heads use the first d input rows of the one full head."""
        zd = z[:, :d]
        if self.cfg.heads == "shared":
            return F.linear(zd, self.head.weight[:, :d], self.head.bias)
        return self.heads[self.dims.index(d)](zd)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        z = self(x)
        if self.n_classes is not None:
            return sum(F.cross_entropy(self.logits(z, d), y) for d in self.dims)
        return similarity_preservation_loss(z, x, self.dims) + F.mse_loss(self.decoder(z), x)


def similarity_preservation_loss(z: torch.Tensor, x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """sum over prefixes d of MSE(cos(z[:, :d]) , cos(x)) over all B x B pairs (the label-free Matryoshka loss).

    cos = G_d / (n n^T) with G_d = z[:, :d] z[:, :d]^T and n = max(sqrt(diag G_d), 1e-12), as `F.normalize`
    clamps norms. Computed by `_NestedCosineMSE` (closed-form gradient); equal in value and gradient to the
    per-prefix formula (tests/test_precision.py)."""
    xn = F.normalize(x.detach().float(), dim=1)
    return _NestedCosineMSE.apply(z, xn @ xn.T, tuple(sorted(dims)))


class _NestedCosineMSE(torch.autograd.Function):
    """The label-free MRL loss with its gradient written out, so each prefix costs one B x B x (d - d') product
    forward and one backward (autograd's takes two backward: one per operand of block @ block^T).

    The prefixes' Gram matrices are nested, G_d = G_d' + Z_b Z_b^T with Z_b = z[:, d':d]. With C = G / (n n^T)
    and R = 2 (C - T) / B^2 the gradient of prefix d's term is
        P_d = dL/dG_d = R / (n n^T) - diag(sum_j R_ij C_ij / n_i^2)   (no diagonal term where n is clamped),
    and since block b enters every G_d with d >= b, dL/dZ_b = 2 H_b Z_b with H_b = sum_{d >= b} P_d (a suffix sum
    accumulated in place in backward). Forward keeps one B x B matrix per prefix (P_d)."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def forward(ctx, z: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.in_dtype = z.dtype
        z = z.float()
        B = z.shape[0]
        total = z.new_zeros(())
        gram, prev, grads = None, 0, []
        for d in dims:
            block = z[:, prev:d]
            gram = block @ block.T if gram is None else gram.addmm_(block, block.T)
            sq = gram.diagonal().clamp_min(0)
            live = sq > 1e-24
            inv = 1.0 / sq.sqrt().clamp_min(1e-12)
            scale = torch.outer(inv, inv)
            cos = gram * scale
            diff = cos - target
            total += torch.dot(diff.view(-1), diff.view(-1))
            # R_ij C_ij summed over j, for the norm's share of the gradient (before diff becomes P_d in place)
            norm_part = torch.linalg.vecdot(diff, cos, dim=1) * (2.0 / B**2) * inv * inv * live
            del cos
            grad = diff.mul_(scale).mul_(2.0 / B**2)
            grad.diagonal().sub_(norm_part)
            grads.append(grad)
            prev = d
        ctx.save_for_backward(z, *grads)
        ctx.dims = dims
        return total / B**2

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, *grads = ctx.saved_tensors
        dz = torch.zeros_like(z)
        bounds = [0, *ctx.dims]
        suffix = grads[-1]  # accumulated in place (a second backward through the same graph is not supported)
        for i in range(len(ctx.dims) - 1, -1, -1):
            if i < len(ctx.dims) - 1:
                suffix += grads[i]
            lo, hi = bounds[i], bounds[i + 1]
            dz[:, lo:hi] = suffix @ z[:, lo:hi]
        return dz.mul_(2 * grad_out).to(ctx.in_dtype), None, None


def train_mrl(x: np.ndarray, labels: np.ndarray | None, cfg: MRLConfig, progress: bool = True,
              device: str = "cpu", max_steps: int = 0) -> MRLAdaptor:
    """Train the adaptor on frozen embeddings; `labels=None` selects the unsupervised objective.

    Each batch is read from `x` (an array or a memory map: never copied whole). `max_steps` > 0 stops after
    that many batches (the cosine schedule then spans them)."""
    torch.manual_seed(cfg.seed)
    n = len(x)
    n_classes = int(labels.max()) + 1 if labels is not None else None
    yt = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    model = MRLAdaptor(x.shape[1], cfg, n_classes).to(device)
    # fused: one kernel per parameter instead of one per arithmetic op (the same update to float rounding)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd, fused=True)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    steps = min(steps, max_steps) if max_steps > 0 else steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    step = 0
    bar = progress_bar(total=steps, desc="MRL adaptor", disable=not progress, leave=False)
    while step < steps:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            rows = perm[s:s + cfg.batch_size]
            xb = torch.from_numpy(read_rows(x, rows.numpy()))
            loss = model.loss(xb.to(device), yt[rows].to(device) if yt is not None else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update()
            if step >= steps:
                break
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    bar.close()
    return model.eval()


@torch.no_grad()
def mrl_transform(model: MRLAdaptor, x: np.ndarray, d: int, batch: int = 65536) -> np.ndarray:
    """The MRL-at-d representation: the first d dims of the adaptor's output."""
    out = np.empty((len(x), d), dtype=np.float32)
    dev = next(model.parameters()).device
    for s in range(0, len(x), batch):
        out[s:s + batch] = model(torch.from_numpy(np.array(x[s:s + batch], dtype=np.float32)).to(dev))[:, :d].cpu().numpy()
    return out
