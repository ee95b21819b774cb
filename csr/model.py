"""The CSR model: a top-k sparse autoencoder over frozen embeddings (docs/design.md, "The model").

    pre = W (x - b_pre) + b_lat,   z_k = ReLU(TopK_k(pre)),   x_hat = W_d^T z + b_pre

Tied decoder (W_d = W) by default, as the reference; an untied decoder with unit-norm rows (OpenAI TopK SAE
style) is an option. Training uses ONE encoder pass per step: top-4k is taken once and z_k is its first k.
Decoding is sparse (`embedding_bag` over the active units), never a dense [B, hidden] product, and the
encoder's and decoder's backward only touch the selected units (see `_SparseCode`). The dense encoder matmul
runs in fp32 or, with `precision="bf16"`, with bf16 operands and fp32 accumulation (csr/precision.py); codes
are selected by one function (`select_topk`) in training and encoding.
Parameter names follow sentence-transformers' `SparseAutoEncoder` (pre_bias, encoder, latent_bias).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from csr.precision import encoder_preactivation, mm, pair_dots, select_topk


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
    precision: str = "fp32"  # encoder matmul that selects codes: fp32 (paper) or bf16 (fp32 accumulation)

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.hidden_size < 1:
            raise ValueError(f"input_dim and hidden_size must be >= 1, got {self.input_dim}, {self.hidden_size}")
        if not 1 <= self.topk <= self.hidden_size:
            raise ValueError(f"topk must be in [1, hidden_size={self.hidden_size}], got {self.topk}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 (auto is resolved before), got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CSRConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def units_by_pair_order(idx: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (b, j) of a `[B, K]` index matrix grouped by unit: `(order, offsets)`, the flat pair ids sorted by
    unit and each unit's first position in that order (one stable sort on 16/32-bit keys)."""
    units = idx.reshape(-1)
    key = units.to(torch.int16 if hidden <= 32767 else torch.int32)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(units, minlength=hidden)
    return order, torch.cumsum(counts, 0) - counts


class _SparseCode(torch.autograd.Function):
    """A selected code and its sparse reconstructions, with the backward of both in one pass over the pairs.

    Forward: `vals = ReLU(pre[b, idx])` (pre-activations computed without grad) and the bias-free decodings
    `sum_j vals[:, j] W_dec[idx[:, j]]` of the first `split` columns and of the rest.
    Backward, touching only the B·K selected (row, unit) pairs: the gradient of each value (its own plus
    `g_rec[b] . W_dec[unit]`), then per unit `grad W_dec[j] = sum_b vals_bj g_rec[b]` and
    `grad W[j] = sum_b g_bj (x_b - b_pre)`, each an `embedding_bag` over the pairs grouped by unit (tied:
    added), and the biases' gradients from the per-unit sums of g. With `precision="bf16"` these gathers read
    bf16 copies of their tables (fp32 accumulation); the forward reconstructions stay fp32.
    """

    @staticmethod
    def forward(ctx, xc: torch.Tensor, pre_bias: torch.Tensor, weight: torch.Tensor, latent_bias: torch.Tensor,
                dec_weight: torch.Tensor | None, idx: torch.Tensor, pre_vals: torch.Tensor, split: int,
                precision: str = "fp32"):
        vals = F.relu(pre_vals)
        w_dec = weight if dec_weight is None else dec_weight
        first = F.embedding_bag(idx[:, :split], w_dec, per_sample_weights=vals[:, :split], mode="sum")
        rest = F.embedding_bag(idx[:, split:], w_dec, per_sample_weights=vals[:, split:], mode="sum") \
            if split < idx.shape[1] else torch.zeros_like(first)
        ctx.save_for_backward(xc, weight, dec_weight, idx, vals)
        ctx.split, ctx.precision = split, precision
        return vals, first, rest

    @staticmethod
    def backward(ctx, g_vals: torch.Tensor, g_first: torch.Tensor, g_rest: torch.Tensor):
        xc, weight, dec_weight, idx, vals = ctx.saved_tensors
        split, (B, K) = ctx.split, idx.shape
        hidden = weight.shape[0]
        # bf16: the gathers read bf16 tables and accumulate in fp32 (one rounding of each output)
        low = (lambda t: t.to(torch.bfloat16)) if ctx.precision == "bf16" else (lambda t: t)
        w_dec = low(weight if dec_weight is None else dec_weight)
        has_rest = split < K
        g = g_vals.float().clone(memory_format=torch.contiguous_format)
        g[:, :split] += pair_dots(low(g_first), w_dec, idx[:, :split]).float()
        if has_rest:
            g[:, split:] += pair_dots(low(g_rest), w_dec, idx[:, split:]).float()
        g = g.masked_fill_(vals <= 0, 0.0)  # ReLU
        units, g_flat = idx.reshape(-1), g.reshape(-1)
        per_unit = torch.zeros(hidden, dtype=g.dtype, device=g.device).index_add_(0, units, g_flat)
        order, offsets = units_by_pair_order(idx, hidden)
        b = torch.div(order, K, rounding_mode="floor")

        def per_unit_sum(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            """`[hidden, d]`: row j = sum over unit j's pairs of weight * table[row]."""
            table = low(table)
            return F.embedding_bag(rows, table, offsets, per_sample_weights=weights.to(table.dtype), mode="sum").float()

        grad_w = per_unit_sum(xc, b, g_flat[order])  # the encoder's share
        # the decoder's share reads g_first (columns < split) or g_rest (columns >= split)
        dec_rows = b + B * (order % K >= split).long() if has_rest else b
        grad_dec = per_unit_sum(torch.cat([g_first, g_rest]) if has_rest else g_first, dec_rows,
                                vals.reshape(-1)[order])
        if dec_weight is None:  # tied: both shares go to the one weight
            grad_w, grad_dec = grad_w.add_(grad_dec), None
        grad_pre_bias = -(per_unit @ weight)
        return None, grad_pre_bias, grad_w, per_unit, grad_dec, None, None, None, None


# The AuxK code is computed densely over the dead units (GEMMs) while they are at most this many times the AuxK
# units per row; beyond, as gathered (row, unit) pairs, whose memory traffic is then the smaller cost
# (bench/auxk_speed.py times both). Same values either way.
DENSE_AUXK_RATIO = 16


class _DeadUnitsCode(torch.autograd.Function):
    """The AuxK reconstruction from a dense code over the dead units: `z [B, n_dead]` (ReLU-ed pre-activations,
    zero outside each row's top-a; bf16 when the pre-activations are) times `W_dec[units]`, with the backward of the encoder and decoder rows of
    those units as GEMMs. Forward and backward equal `_SparseCode`'s over the same selected pairs. With
    `precision="bf16"` the four GEMMs take bf16 operands (fp32 accumulation), as the encoder's matmul does."""

    @staticmethod
    def forward(ctx, xc: torch.Tensor, pre_bias: torch.Tensor, weight: torch.Tensor, latent_bias: torch.Tensor,
                dec_weight: torch.Tensor | None, units: torch.Tensor, z: torch.Tensor,
                precision: str = "fp32") -> torch.Tensor:
        w_dec = (weight if dec_weight is None else dec_weight)[units]
        ctx.save_for_backward(xc, weight, dec_weight, units, z)
        ctx.precision = precision
        return mm(z, w_dec, precision)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xc, weight, dec_weight, units, z = ctx.saved_tensors
        p = ctx.precision
        w_dec = (weight if dec_weight is None else dec_weight)[units]
        gz = mm(g, w_dec.T, p, low_out=True).masked_fill_(z <= 0, 0.0)  # unselected, ReLU-clipped: 0 in z
        per_unit = gz.sum(0, dtype=torch.float32)
        grad_w = torch.zeros_like(weight).index_copy_(0, units, mm(gz.T, xc, p))
        grad_dec_units = mm(z.T, g, p)
        if dec_weight is None:
            grad_w.index_add_(0, units, grad_dec_units)
            grad_dec = None
        else:
            grad_dec = torch.zeros_like(dec_weight).index_copy_(0, units, grad_dec_units)
        grad_latent = weight.new_zeros(weight.shape[0]).index_copy_(0, units, per_unit)
        grad_pre_bias = -(per_unit @ weight[units])
        return None, grad_pre_bias, grad_w, grad_latent, grad_dec, None, None, None


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

    def pre_activation(self, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Dense `[B, hidden]` pre-activations (x already preprocessed); bf16 output on CPU in bf16."""
        return encoder_preactivation(x - self.pre_bias, self.encoder.weight, self.latent_bias, precision)

    def select(self, xc: torch.Tensor, k: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(dense pre-activations, top-k values fp32, indices)` of centred inputs `xc`, no grad: the one way codes
        are chosen (training and encoding). In bf16 the selected values are recomputed exactly in fp32."""
        pre = encoder_preactivation(xc, self.encoder.weight, self.latent_bias, precision)
        vals, idx = select_topk(pre, k)
        if precision != "fp32":
            vals = pair_dots(xc, self.encoder.weight, idx) + self.latent_bias[idx]
        return pre, vals, idx

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
    def encode(self, x: torch.Tensor, k: int | None = None, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k code of `x`: `(indices [B, k] long, values [B, k])`, values sorted descending, ReLU applied.
        `precision` defaults to the model's (`cfg.precision`, the one it was trained with)."""
        k = self.cfg.topk if k is None else k
        if not 1 <= k <= self.cfg.hidden_size:
            raise ValueError(f"k must be in [1, {self.cfg.hidden_size}], got {k}")
        with torch.autocast(device_type=x.device.type, enabled=False):  # codes never depend on autocast
            xp, _ = self.preprocess(x.float())
            _, vals, idx = self.select(xp - self.pre_bias, k, precision or self.cfg.precision)
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
        xc = (xp - self.pre_bias).detach()  # the inputs are frozen embeddings
        n_dead = int(dead.sum()) if dead is not None else 0
        a = min(auxk, n_dead)
        with torch.no_grad():
            pre, top_vals, top_idx = self.select(xc, multi_k, self.cfg.precision)
            if a > 0:
                aux = self._aux_code(pre, dead, a)
        del pre
        params = (self.pre_bias, self.encoder.weight, self.latent_bias, self.decoder_weight)
        prec = self.cfg.precision
        vals, rec_k_nobias, rec_rest = _SparseCode.apply(xc, *params, top_idx, top_vals, k, prec)
        out = {"idx": top_idx, "vals": vals, "k": torch.tensor(k)}
        out["recon_k"] = self._finish(rec_k_nobias + self.pre_bias, info)
        out["recon_multi"] = self._finish(rec_k_nobias + rec_rest + self.pre_bias, info)
        if a > 0:
            if aux[0] == "dense":
                _, units, z, aux_idx = aux
                aux_recon = _DeadUnitsCode.apply(xc, *params, units, z, prec)
            else:
                _, aux_idx, aux_vals = aux
                _, aux_recon, _ = _SparseCode.apply(xc, *params, aux_idx, aux_vals, a, prec)
            out["aux_recon"] = aux_recon if info is None else aux_recon * (info[1] + 1e-5)
            out["aux_idx"] = aux_idx
        return out

    @staticmethod
    def _aux_code(pre: torch.Tensor, dead: torch.Tensor, a: int) -> tuple:
        """The AuxK code: the top-`a` pre-activations among dead units. While the dead units are at most
        `DENSE_AUXK_RATIO` x `a`, a dense `[B, n_dead]` code over them (zero outside each row's top-a):
        `("dense", units, z, idx)`; otherwise the `[B, a]` pairs: `("sparse", idx, vals)`. `pre` may be
        overwritten."""
        n_dead = int(dead.sum())
        if n_dead > DENSE_AUXK_RATIO * a:
            vals, idx = select_topk(pre, a, exclude=~dead, sorted=False)
            return "sparse", idx, vals
        units = dead.nonzero().squeeze(1)
        pre_dead = pre[:, units]
        z = pre_dead if pre_dead.dtype == torch.bfloat16 else pre_dead.float()  # bf16 (CPU): what the GEMMs read
        if a < n_dead:
            _, sel = select_topk(pre_dead, a, sorted=False)
            z = torch.zeros_like(z).scatter_(1, sel, z.gather(1, sel))
            idx = units[sel]
        else:  # every dead unit is in every row's code
            idx = units.expand(len(pre), -1)
        return "dense", units, z.clamp_(min=0), idx

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
