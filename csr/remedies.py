"""Unit-usage remedies: what keeps a top-k autoencoder's units alive (README, "Unit-usage remedies").

Each is off in the paper's recipe and switched on by a flag: b_pre at the mean / geometric median of the data
(`--bpre-init`), encoder rows initialised from data (`--encoder-init data`), the untied decoder's projected
gradient (`--tied False`), and resampling of dead units onto badly reconstructed inputs (`--resample-every`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from csr.distributed import broadcast_
from csr.model import CSR


def geometric_median(x: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm."""
    x = x.astype(np.float64)
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(new - m) <= tol * max(1.0, np.linalg.norm(m)):
            return new
        m = new
    return m


def init_pre_bias(model: CSR, x: np.ndarray, how: str, seed: int, sample: int = 10000) -> None:
    if how == "zeros":
        return
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    xs = np.asarray(x[rows], dtype=np.float32)
    if model.cfg.normalize:
        xs = model.preprocess(torch.from_numpy(xs))[0].numpy()
    center = xs.mean(0) if how == "mean" else geometric_median(xs)
    with torch.no_grad():
        model.pre_bias.copy_(torch.from_numpy(np.asarray(center, dtype=np.float32)))


def init_encoder_from_data(model: CSR, x: np.ndarray, seed: int) -> None:
    """Encoder rows = distinct training rows, centred by b_pre and L2-normalised; decoder rows the same.

    Every unit then starts as the direction of one data point and wins the top-k for the inputs near it, so no
    unit starts out dead (with torch's random init on un-centred features a few units win for every input).
    The k units an input selects point roughly its way, so each row is scaled for a k-term reconstruction of
    the right size: encoder rows by 1/k with unit-norm untied decoder rows, by 1/sqrt(k) when tied.
    """
    hidden = model.cfg.hidden_size
    rng = np.random.default_rng([seed, 1])
    rows = np.sort(rng.choice(len(x), size=hidden, replace=hidden > len(x)))
    xs = torch.from_numpy(np.asarray(x[rows], dtype=np.float32))
    xs = model.preprocess(xs)[0] - model.pre_bias.detach()
    xs = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    k = model.cfg.topk
    with torch.no_grad():
        model.latent_bias.zero_()
        if model.decoder_weight is not None:
            model.decoder_weight.copy_(xs)
            model.encoder.weight.copy_(xs / k)
        else:
            model.encoder.weight.copy_(xs / math.sqrt(k))


def init_encoder_from_pca(model: CSR, x: np.ndarray, seed: int, sample: int = 50000) -> None:
    """Encoder (and decoder) rows = the principal directions of the rows around b_pre, each with both signs.

    Unit 2i is +u_i and unit 2i+1 is -u_i (u_i the i-th eigenvector of E[(x - b_pre)(x - b_pre)^T], unit norm),
    for the top min(hidden // 2, d) directions; the latent bias is zero. The pre-activations are then the
    principal coefficients c_i and -c_i, and ReLU(TopK_k) keeps the k largest |c_i| with their sign: the best
    k-term approximation of each input in the principal basis, never worse than PCA's first k coefficients. So
    training starts from at least PCA's information at every k. Units beyond 2·d (hidden > 2·d) start from data
    as in `init_encoder_from_data`.
    """
    hidden, d = model.cfg.hidden_size, model.cfg.input_dim
    rng = np.random.default_rng([seed, 2])
    rows = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    xs = model.preprocess(torch.from_numpy(np.asarray(x[rows], dtype=np.float32)))[0] - model.pre_bias.detach()
    xs = xs.double()
    evals, evecs = torch.linalg.eigh(xs.T @ xs / len(xs))
    m = min(hidden // 2, d)
    u = evecs[:, torch.argsort(evals, descending=True)[:m]].T.float()  # [m, d], unit rows
    pcs = torch.stack([u, -u], 1).reshape(2 * m, d)
    if hidden > 2 * m:
        init_encoder_from_data(model, x, seed)  # the units past 2·d keep their data directions
    with torch.no_grad():
        model.latent_bias.zero_()
        model.encoder.weight[:2 * m] = pcs
        if model.decoder_weight is not None:
            model.decoder_weight[:2 * m] = pcs


def remove_parallel_decoder_grad(model: CSR) -> None:
    """Untied unit-norm decoder (OpenAI TopK SAE): drop each row's gradient component along the row itself,
    so that the step moves rows on the unit sphere and the renormalisation after it is a small correction."""
    w = model.decoder_weight
    if w is not None and w.grad is not None:
        with torch.no_grad():
            w.grad -= (w.grad * w).sum(1, keepdim=True) * w


@torch.no_grad()
def resample_dead_units(model: CSR, opt: torch.optim.Optimizer, x: torch.Tensor, k: int, min_idle_steps: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move units idle for `min_idle_steps` steps onto the inputs of `x` the model reconstructs worst.

    Inputs are drawn with probability proportional to their squared residual (as Anthropic's resampling). Unit
    j moved to input i gets the residual's direction r_i as decoder row (untied) and as encoder direction,
    scaled so that its pre-activation on x_i is 1.1x the k-th largest one there: it then enters x_i's top-k
    code and reduces exactly the error that input has, unless that would make its encoder row longer than the
    longest live row's (the cap: an uncapped row made training diverge, tied and untied). Adam's moments of the
    moved rows are reset (stale moments would throw the new row away at the next step) and their idle counters
    restart. Under DDP every rank takes rank 0's new rows. Returns (moved units, the rows of `x` they were moved to).
    """
    idle = (model.stats_last_nonzero >= min_idle_steps).nonzero().flatten()
    n = min(int(idle.numel()), x.shape[0])
    if n == 0:
        return idle[:0], idle[:0]
    idle = idle[torch.randperm(int(idle.numel()), generator=generator, device=idle.device)[:n]].sort().values
    xp = model.preprocess(x.float())[0]
    idx, vals = model.encode(x, k)
    residual = xp - model.decode(idx, vals)
    err = residual.pow(2).sum(1)
    rows = torch.multinomial(err / err.sum().clamp_min(1e-30), n, replacement=False, generator=generator)
    r = residual[rows]
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centred = xp[rows] - model.pre_bias
    kth = model.pre_activation(xp[rows]).topk(k, dim=1).values[:, -1]
    along = (r * centred).sum(1).clamp_min(1e-6 * centred.norm(dim=1).clamp_min(1e-12))
    scale = (1.1 * kth.clamp_min(0) + 1e-6) / along
    enc = model.encoder.weight
    # A residual almost orthogonal to its input makes `along` tiny and the scale huge; such a row fires far above
    # every other unit on all inputs and blows up the reconstruction (tied: it is also the decoder row, and
    # diverged on text; untied: an adaptive model on 60k Fashion-MNIST rows reached inf at step 267). Cap it at the
    # longest live row's norm.
    live = torch.ones(enc.shape[0], dtype=torch.bool, device=enc.device)
    live[idle] = False
    if live.any():
        scale = scale.clamp_max(float(enc[live].norm(dim=1).max()))
    enc[idle] = r * scale[:, None]
    model.latent_bias[idle] = 0
    params = [enc, model.latent_bias]
    if model.decoder_weight is not None:
        model.decoder_weight[idle] = r
        params.append(model.decoder_weight)
    for p in params:
        broadcast_(p)
        for moment in ("exp_avg", "exp_avg_sq"):
            state = opt.state.get(p, {})
            if moment in state:
                state[moment][idle] = 0
    model.stats_last_nonzero[idle] = 0
    return idle, rows
