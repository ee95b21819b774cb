"""CSR losses: reconstruction at k and 4k, AuxK on dead latents, the contrastive term, and an optional
kNN-preserving term (`similarity_preservation`, off in the paper's recipe).

    L = R(x, x_hat_k) + 1/8 R(x, x_hat_4k) + beta * NMSE(aux_recon, x - x_hat_k) + gamma * L_CL

R is torch's MSE (mean over all B·d elements, the scale the reference's coefficients assume) or, with
`recon_loss="nmse"`, MSE / Var(x) so that gamma means the same for unit-norm text and raw image features.
Contrastive terms take codes as (indices, values) and never densify a [B, B, hidden] product: similarities
are `embedding_bag` lookups into the transposed dense code of the other side, O(B^2 k).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from csr.distributed import all_reduce_, gather_rows
from csr.io import CSRError
from csr.model import dense_code
from csr.precision import pair_dots

CL_MODES = ("self", "label", "pair", "none")


def batch_variance(x: torch.Tensor, group_reduce: bool = False) -> torch.Tensor:
    """Mean over elements of (x - mean over the batch)^2, i.e. the batch variance of the target, no grad.

    Under DDP the statistics are all-reduced so every rank uses the variance of the global batch.
    """
    with torch.no_grad():
        x = x.float()
        s = torch.stack([x.sum(0), (x * x).sum(0)])  # [2, d]
        n = torch.tensor(float(x.shape[0]), device=x.device)
        if group_reduce:
            all_reduce_(s)
            all_reduce_(n)
        mean = s[0] / n
        var = (s[1] / n - mean * mean).clamp_min(0)
        return var.mean().clamp_min(1e-12)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def nmse(pred: torch.Tensor, target: torch.Tensor, group_reduce: bool = False) -> torch.Tensor:
    """MSE divided by the batch variance of the target (OpenAI TopK SAE's normalised MSE)."""
    return mse(pred, target) / batch_variance(target, group_reduce)


def normalized_values(vals: torch.Tensor) -> torch.Tensor:
    """L2-normalise codes through their values (units in a row are distinct)."""
    vals = vals.float()
    return vals / vals.norm(dim=1, keepdim=True).clamp_min(1e-12)


def transposed_code(idx: torch.Tensor, u: torch.Tensor, hidden: int) -> torch.Tensor:
    """`[hidden, N]` dense transpose of a sparse code set (units in a row are distinct), built in place."""
    z = u.new_zeros(hidden, idx.shape[0])
    z[idx, torch.arange(idx.shape[0], device=idx.device)[:, None]] = u
    return z


class _SparseLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp of `scale · U_a U_b^T` for two sparse code sets, without entries `(r, own + r)` when
    `own` is given (each row's own code among the gathered ones).

    Forward: one `embedding_bag` of the rows of `a` into the transposed dense code of `b`, then exp in place: the
    `[Na, Nb]` buffer is the only one of that size, and it is turned into the softmax gradient in place in backward.
    The value gradients are per-pair dot products (`pair_dots`) of that gradient and its transpose with the
    transposed dense codes, so no `[hidden, N]` gradient is materialised and scattered back.
    """

    @staticmethod
    def forward(ctx, idx_a: torch.Tensor, u_a: torch.Tensor, idx_b: torch.Tensor, u_b: torch.Tensor, hidden: int,
                scale: float, own: int | None):
        zt_b = transposed_code(idx_b, u_b, hidden)
        e = F.embedding_bag(idx_a, zt_b, per_sample_weights=u_a * scale, mode="sum")
        if own is not None:
            rows = torch.arange(idx_a.shape[0], device=e.device)
            e[rows, own + rows] = float("-inf")
        top = e.amax(1, keepdim=True)
        z = e.sub_(top).exp_().sum(1, keepdim=True)
        ctx.save_for_backward(idx_a, u_a, idx_b, u_b)
        ctx.e, ctx.z, ctx.zt_b, ctx.hidden, ctx.scale = e, z, zt_b, hidden, scale
        ctx.same = idx_a is idx_b and u_a is u_b
        return (top + z.log()).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        idx_a, u_a, idx_b, u_b = ctx.saved_tensors
        if ctx.e is None:
            raise RuntimeError("the contrastive log-sum-exp's backward ran twice (its buffer is reused in place)")
        grad_s, ctx.e = ctx.e.mul_(g[:, None] / ctx.z), None  # softmax times the incoming gradient
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = pair_dots(grad_s, ctx.zt_b, idx_a).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            zt_a = ctx.zt_b if ctx.same else transposed_code(idx_a, u_a, ctx.hidden)
            grad_b = pair_dots(grad_s.t().contiguous(), zt_a, idx_b).mul_(ctx.scale)
        return None, grad_a, None, grad_b, None, None, None


def sparse_logsumexp(idx_a: torch.Tensor, u_a: torch.Tensor, idx_b: torch.Tensor, u_b: torch.Tensor, hidden: int,
                     scale: float = 1.0, own: int | None = None) -> torch.Tensor:
    """`[Na]`: log sum_j exp(scale · u_a[r] . u_b[j]) over the rows j of `b` (all but `own + r` when `own` is
    given), differentiable in both value tensors."""
    return _SparseLogSumExp.apply(idx_a, u_a.float(), idx_b, u_b.float(), hidden, scale, own)


def code_dots(idx_a: torch.Tensor, u_a: torch.Tensor, idx_b: torch.Tensor, u_b: torch.Tensor, hidden: int) -> torch.Tensor:
    """`[N]`: row-wise inner products u_a[r] . u_b[r] of two sparse code sets."""
    return (dense_code(idx_b, u_b, hidden).gather(1, idx_a) * u_a).sum(1)


def gather_codes(idx: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None):
    """All-gather codes (values differentiably) and labels across DDP ranks; returns this rank's row offset."""
    all_u, offset = gather_rows(u, grad=True)
    all_idx, _ = gather_rows(idx)
    all_labels = gather_rows(labels)[0] if labels is not None else None
    return all_idx, all_u, all_labels, offset


def self_contrastive(idx: torch.Tensor, vals: torch.Tensor, hidden: int, temperature: float = 0.2) -> torch.Tensor:
    """The reference's contrastive term, from ONE pass.

    The reference stacks two identical views (2B rows): row i's positive is its copy (s = u_i·u_i / tau) and
    its negatives are the 2B-2 rows of other samples, i.e. every other sample twice. So the loss is
    mean_i [ log(exp(s_ii) + 2 sum_{j != i} exp(s_ij)) - s_ii ]. Under DDP, negatives come from all ranks and
    sample identities are global (rank offset), never `arange(B)` per rank.
    """
    u = normalized_values(vals)
    all_idx, all_u, _, offset = gather_codes(idx, u, None)
    if all_idx.shape[0] == 1:  # no negatives: one logit, zero loss
        return u.sum() * 0.0
    lse_others = sparse_logsumexp(idx, u, all_idx, all_u, hidden, 1.0 / temperature, own=offset)
    s_own = (u * u).sum(1) / temperature
    return (torch.logaddexp(s_own, lse_others + math.log(2.0)) - s_own).mean()


def label_contrastive(idx: torch.Tensor, vals: torch.Tensor, labels: torch.Tensor, hidden: int,
                      temperature: float = 0.2) -> torch.Tensor:
    """Supervised contrastive loss: same-label samples are positives, all other samples the denominator.

    Computed on one view; anchors without another same-label sample in the (global) batch are skipped.
    """
    u = normalized_values(vals)
    all_idx, all_u, all_labels, offset = gather_codes(idx, u, labels)
    classes, cls = torch.unique(all_labels, return_inverse=True)
    mine = cls[offset:offset + idx.shape[0]]
    n_pos = torch.bincount(cls, minlength=len(classes))[mine] - 1
    keep = n_pos > 0
    if not keep.any():
        return u.sum() * 0.0
    lse = sparse_logsumexp(idx, u, all_idx, all_u, hidden, 1.0 / temperature, own=offset)
    # sum of s_ij over i's positives = u_i . (sum of the codes of i's class - u_i) / tau, from per-class code sums
    dots = _ClassSumDots.apply(u, all_u, mine[:, None] * hidden + idx, cls[:, None] * hidden + all_idx,
                               len(classes) * hidden)
    pos_sum = (dots - (u * u).sum(1)) / temperature
    return -(pos_sum[keep] / n_pos[keep] - lse[keep]).mean()


class _ClassSumDots(torch.autograd.Function):
    """`dots[i] = sum_j S[key[i, j]] u[i, j]` with `S = sum of all_u at all_key` (flat class x unit sums).

    Both sums are `torch.bincount` with weights, which adds in index order: `index_put(accumulate=True)` and the
    backward of advanced indexing add in a thread-dependent order on CPU, which made `--cl label` runs differ
    from run to run in the last bits (and then in their codes)."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def forward(ctx, u: torch.Tensor, all_u: torch.Tensor, key: torch.Tensor, all_key: torch.Tensor,
                size: int) -> torch.Tensor:
        sums = torch.bincount(all_key.reshape(-1), weights=all_u.reshape(-1).float(), minlength=size)
        at = sums[key]
        ctx.save_for_backward(u, at, key, all_key)
        ctx.size = size
        return (at * u).sum(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, at, key, all_key = ctx.saved_tensors
        g_sums = torch.bincount(key.reshape(-1), weights=(g[:, None] * u).reshape(-1).float(), minlength=ctx.size)
        return (at * g[:, None]).to(u.dtype), g_sums[all_key].to(u.dtype), None, None, None


def pair_contrastive(idx_a: torch.Tensor, vals_a: torch.Tensor, idx_b: torch.Tensor, vals_b: torch.Tensor,
                     hidden: int, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE between paired codes (query/document, image/text): row i of a matches row i of b."""
    ua, ub = normalized_values(vals_a), normalized_values(vals_b)
    all_idx_b, all_ub, _, offset = gather_codes(idx_b, ub, None)
    all_idx_a, all_ua, _, _ = gather_codes(idx_a, ua, None)
    s_pos = code_dots(idx_a, ua, idx_b, ub, hidden) / temperature  # s_ab[i, offset + i] = s_ba[i, offset + i]
    lse_ab = sparse_logsumexp(idx_a, ua, all_idx_b, all_ub, hidden, 1.0 / temperature)
    lse_ba = sparse_logsumexp(idx_b, ub, all_idx_a, all_ua, hidden, 1.0 / temperature)
    return (0.5 * (lse_ab + lse_ba) - s_pos).mean()


class _SparseGram(torch.autograd.Function):
    """`[N, N]` Gram matrix `U U^T` of one sparse code set: one `embedding_bag` of the rows into the transposed
    dense code, O(N^2 k). Backward: dL/du[r, t] = sum_j (G + G^T)[r, j] Z[j, idx[r, t]], per-pair dot products."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def forward(ctx, idx: torch.Tensor, u: torch.Tensor, hidden: int) -> torch.Tensor:
        zt = transposed_code(idx, u, hidden)
        ctx.save_for_backward(idx, zt)
        return F.embedding_bag(idx, zt, per_sample_weights=u, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        idx, zt = ctx.saved_tensors
        return None, pair_dots((g + g.t()).contiguous(), zt, idx), None


def sparse_gram(idx: torch.Tensor, u: torch.Tensor, hidden: int) -> torch.Tensor:
    """`[N, N]`: u[r] . u[j] for every pair of rows of one sparse code set, differentiable in the values."""
    return _SparseGram.apply(idx, u.float(), hidden)


SIM_LOSSES = ("rank", "gram")


def similarity_preservation(idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, hidden: int,
                            mode: str = "rank", temperature: float = 0.05) -> torch.Tensor:
    """How far the codes' cosine similarities within the batch are from the inputs' (a kNN-preserving term).

    - `rank`: each row's neighbour distribution, softmax over the other rows j of cos(x_i, x_j) / tau, is the
      target of the codes' one: mean_i KL(p_i || q_i). Shift-invariant per row, and dominated by each row's
      nearest neighbours, which is what 1-NN retrieval reads.
    - `gram`: mean over all B x B pairs of (cos(z_i, z_j) - cos(x_i, x_j))^2, the label-free MRL adaptor's
      objective applied to the sparse code.
    Computed within the rows of this process (under DDP: per rank, over its share of the batch).
    """
    u = normalized_values(vals)
    s = sparse_gram(idx, u, hidden)
    xn = F.normalize(x.detach().float(), dim=1)
    t = xn @ xn.T
    if mode == "gram":
        return (s - t).pow(2).mean()
    if mode != "rank":
        raise CSRError(f"--sim-loss must be one of {SIM_LOSSES}, got {mode!r}")
    if s.shape[0] < 2:
        return s.sum() * 0.0
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    p = torch.softmax((t / temperature).masked_fill(eye, float("-inf")), dim=1)
    log_q = torch.log_softmax((s / temperature).masked_fill(eye, float("-inf")), dim=1)
    log_p = torch.log(p.clamp_min(1e-30))
    return torch.where(eye, 0.0, p * (log_p - log_q)).sum(1).mean()


def check_finite_loss(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop training at the first non-finite loss term, naming the step and the term (a NaN loss would
    otherwise turn every weight into NaN and be saved as a finished model)."""
    total = float(terms["total"].detach())
    if math.isfinite(total):
        return
    bad = [n for n, v in terms.items() if n != "total" and not math.isfinite(float(v.detach()))]
    raise CSRError(f"non-finite training loss at step {step} ({', '.join(bad) or 'total'} = {total}); nothing "
                   f"written for this run's final model: lower --lr or check the embeddings")
