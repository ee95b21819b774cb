"""The CSR model: a top-k sparse autoencoder over frozen embeddings (DESIGN.md, "The model").

    pre = W (x - b_pre) + b_lat,   z_k = ReLU(TopK_k(pre)),   x_hat = W_d^T z + b_pre

Tied decoder (W_d = W) by default, as the reference; an untied decoder with unit-norm rows (OpenAI TopK SAE
style) is an option. Training uses ONE encoder pass per step: top-4k is taken once and z_k is its first k.
Decoding is sparse (`embedding_bag` over the active units), never a dense [B, hidden] product, and the
encoder's backward only touches the selected units (see `_SelectedLinear`).
Parameter names follow sentence-transformers' `SparseAutoEncoder` (pre_bias, encoder, latent_bias).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CSRConfig:
    """Architecture of a CSR model; stored in every checkpoint so inference never repeats shape flags."""
    input_dim: int  # d, width of the frozen embedding
    hidden_size: int  # number of latent units (paper: 4·d)
    topk: int = 8  # k active units per code at training time
    auxk: int = 512  # dead latents used by the AuxK loss
    dead_threshold: int = 30  # a unit is dead after this many training STEPS without firing in the top-k
    tied: bool = True  # decoder = encoder^T (reference); False: separate unit-norm decoder rows
    normalize: bool = False  # per-sample standardisation of inputs, undone on decode (sentence-transformers)

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.hidden_size < 1:
            raise ValueError(f"input_dim and hidden_size must be >= 1, got {self.input_dim}, {self.hidden_size}")
        if not 1 <= self.topk <= self.hidden_size:
            raise ValueError(f"topk must be in [1, hidden_size={self.hidden_size}], got {self.topk}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CSRConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class _SelectedLinear(torch.autograd.Function):
    """Values of `(x - pre_bias) @ W^T + b` at the selected (row, unit) pairs, with a sparse backward.

    Forward values come from the dense pre-activation already computed without grad. Backward touches only
    the B·K selected pairs: grad_W row j = sum over rows b that selected j of g_bj (x_b - pre_bias), computed
    as one `embedding_bag` over pairs sorted by unit, instead of a dense [hidden, B] x [B, d] GEMM; the
    biases' gradients follow from the per-unit sums of g. `x` is data (no gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, pre_bias, weight, idx)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, pre_bias, weight, idx = ctx.saved_tensors
        B, K = idx.shape
        hidden = weight.shape[0]
        g = grad.to(weight.dtype).reshape(-1)
        units = idx.reshape(-1)
        per_unit = torch.zeros(hidden, dtype=weight.dtype, device=weight.device).index_add_(0, units, g)
        grad_w = None
        if ctx.needs_input_grad[2]:
            order = torch.argsort(units)
            counts = torch.bincount(units, minlength=hidden)
            offsets = torch.cumsum(counts, 0) - counts
            rows = torch.div(order, K, rounding_mode="floor")
            grad_w = F.embedding_bag(rows, x.to(weight.dtype), offsets, per_sample_weights=g[order], mode="sum")
            grad_w = grad_w - per_unit[:, None] * pre_bias.to(weight.dtype)[None, :]
        grad_pre_bias = -(per_unit @ weight) if ctx.needs_input_grad[1] else None
        return None, grad_pre_bias, grad_w, per_unit if ctx.needs_input_grad[3] else None, None, None


class CSR(nn.Module):
    """Top-k sparse autoencoder. `encode` for inference, `forward` for one training step's activations."""

    def __init__(self, cfg: CSRConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.input_dim, cfg.hidden_size
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.encoder = nn.Linear(d, h, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(h))
        if cfg.tied:
            self.decoder_weight = None
        else:
            self.decoder_weight = nn.Parameter(self.encoder.weight.detach().clone())
            self.normalize_decoder_()
        # training steps since each unit last fired in a top-k code (reference name: stats_last_nonzero)
        self.register_buffer("stats_last_nonzero", torch.zeros(h, dtype=torch.long))

    @classmethod
    def seeded(cls, cfg: CSRConfig, seed: int) -> "CSR":
        """A new model whose initial weights depend on (cfg, seed) only, not on what used the global RNG before
        (the same weights as `torch.manual_seed(seed); CSR(cfg)`, without touching the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg)

    # ---------------------------------------------------------------- pieces
    @property
    def W_dec(self) -> torch.Tensor:
        """Decoder rows `[hidden, d]`: latent j adds `z_j * W_dec[j]` to the reconstruction."""
        return self.encoder.weight if self.decoder_weight is None else self.decoder_weight

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        if self.decoder_weight is not None:
            self.decoder_weight.div_(self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if not self.cfg.normalize:
            return x, None
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + 1e-5), (mu, std)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Dense `[B, hidden]` pre-activations (x already preprocessed)."""
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)

    def decode(self, idx: torch.Tensor, values: torch.Tensor,
               info: tuple[torch.Tensor, torch.Tensor] | None = None, bias: bool = True) -> torch.Tensor:
        """Sparse decoding: `sum_j values[:, j] * W_dec[idx[:, j]] (+ b_pre)` without densifying the code."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        if bias:
            out = out + self.pre_bias
        if info is not None:
            mu, std = info
            out = out * (std + 1e-5) + mu
        return out

    def decode_dense(self, z: torch.Tensor, info=None) -> torch.Tensor:
        """Reference dense decoding of a `[B, hidden]` code (for tests and small inputs)."""
        out = z @ self.W_dec + self.pre_bias
        if info is not None:
            mu, std = info
            out = out * (std + 1e-5) + mu
        return out

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k code of `x`: `(indices [B, k] long, values [B, k])`, values sorted descending, ReLU applied."""
        k = self.cfg.topk if k is None else k
        if not 1 <= k <= self.cfg.hidden_size:
            raise ValueError(f"k must be in [1, {self.cfg.hidden_size}], got {k}")
        with torch.autocast(device_type=x.device.type, enabled=False):  # codes never depend on autocast
            xp, _ = self.preprocess(x.float())
            vals, idx = torch.topk(self.pre_activation(xp), k, dim=-1)
        return idx, F.relu(vals)

    # ---------------------------------------------------------------- training
    def dead_mask(self) -> torch.Tensor:
        return self.stats_last_nonzero > self.cfg.dead_threshold

    @torch.no_grad()
    def update_dead_stats(self, fired: torch.Tensor) -> None:
        """Advance the deadness counter by ONE training step; `fired` is a bool `[hidden]` mask."""
        self.stats_last_nonzero += 1
        self.stats_last_nonzero[fired] = 0

    def forward(self, x: torch.Tensor, k: int | None = None, multi_k: int | None = None,
                auxk: int | None = None, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One encoder pass for training.

        Returns indices/values of the top-`multi_k` code (its first `k` columns are the top-k code), the
        reconstructions from k and multi_k units, and, when `dead` has units, the AuxK code
        (top-`auxk` pre-activations among dead units) and its bias-free reconstruction.
        """
        # The whole step runs in float32 even under autocast: the top-k is then selected from the same
        # pre-activations `encode` computes (bf16 would reorder near-ties and change the codes), and the sparse
        # decoder's `embedding_bag` needs weights and per-sample weights of one dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x.float(), k, multi_k, auxk, dead)

    def _forward(self, x: torch.Tensor, k: int | None, multi_k: int | None, auxk: int | None,
                 dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
        k = self.cfg.topk if k is None else k
        multi_k = min(4 * k if multi_k is None else multi_k, self.cfg.hidden_size)
        auxk = self.cfg.auxk if auxk is None else auxk
        xp, info = self.preprocess(x)
        xp = xp.detach()  # the inputs are frozen embeddings
        with torch.no_grad():
            pre = F.linear(xp - self.pre_bias, self.encoder.weight, self.latent_bias)
            top_vals, top_idx = torch.topk(pre, multi_k, dim=-1)
            n_dead = int(dead.sum()) if dead is not None else 0
            a = min(auxk, n_dead)
            if a > 0:
                aux_vals, aux_idx = torch.topk(pre.masked_fill(~dead, float("-inf")), a, dim=-1)
        del pre
        vals = F.relu(_SelectedLinear.apply(xp, self.pre_bias, self.encoder.weight, self.latent_bias, top_idx, top_vals))
        out = {"idx": top_idx, "vals": vals, "k": torch.tensor(k)}
        rec_k_nobias = F.embedding_bag(top_idx[:, :k], self.W_dec, per_sample_weights=vals[:, :k], mode="sum")
        rec_rest = F.embedding_bag(top_idx[:, k:], self.W_dec, per_sample_weights=vals[:, k:], mode="sum") \
            if multi_k > k else torch.zeros_like(rec_k_nobias)
        out["recon_k"] = self._finish(rec_k_nobias + self.pre_bias, info)
        out["recon_multi"] = self._finish(rec_k_nobias + rec_rest + self.pre_bias, info)
        if a > 0:
            aux = F.relu(_SelectedLinear.apply(xp, self.pre_bias, self.encoder.weight, self.latent_bias, aux_idx, aux_vals))
            out["aux_recon"] = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux, mode="sum")
            if info is not None:
                out["aux_recon"] = out["aux_recon"] * (info[1] + 1e-5)
            out["aux_idx"] = aux_idx
        return out

    @staticmethod
    def _finish(rec: torch.Tensor, info) -> torch.Tensor:
        if info is None:
            return rec
        mu, std = info
        return rec * (std + 1e-5) + mu


def dense_code(idx: torch.Tensor, values: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Scatter a sparse code into a dense `[B, hidden]` tensor (the contrastive terms densify one side)."""
    z = torch.zeros(idx.shape[0], hidden_size, dtype=values.dtype, device=values.device)
    return z.scatter(1, idx, values)
