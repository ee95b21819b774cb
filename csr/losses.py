"""CSR losses: reconstruction at k and 4k, AuxK on dead latents, and the contrastive term.

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


def sparse_similarity(idx_a: torch.Tensor, u_a: torch.Tensor, idx_b: torch.Tensor, u_b: torch.Tensor,
                      hidden: int) -> torch.Tensor:
    """`[Na, Nb]` inner products of two sparse code sets, differentiable in both value tensors."""
    dense_b_t = dense_code(idx_b, u_b, hidden).t().contiguous()  # [hidden, Nb]
    return F.embedding_bag(idx_a, dense_b_t, per_sample_weights=u_a, mode="sum")


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
    s = sparse_similarity(idx, u, all_idx, all_u, hidden) / temperature  # [B, B_global]
    rows = torch.arange(idx.shape[0], device=idx.device)
    pos = offset + rows
    logits = s + math.log(2.0)
    logits[rows, pos] = s[rows, pos]
    return F.cross_entropy(logits, pos)


def label_contrastive(idx: torch.Tensor, vals: torch.Tensor, labels: torch.Tensor, hidden: int,
                      temperature: float = 0.2) -> torch.Tensor:
    """Supervised contrastive loss: same-label samples are positives, all other samples the denominator.

    Computed on one view; anchors without another same-label sample in the (global) batch are skipped.
    """
    u = normalized_values(vals)
    all_idx, all_u, all_labels, offset = gather_codes(idx, u, labels)
    s = sparse_similarity(idx, u, all_idx, all_u, hidden) / temperature
    B = idx.shape[0]
    rows = torch.arange(B, device=idx.device)
    not_self = torch.ones_like(s, dtype=torch.bool)
    not_self[rows, offset + rows] = False
    pos = (labels[:, None] == all_labels[None, :]) & not_self
    log_prob = s - torch.logsumexp(s.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return s.sum() * 0.0
    per_anchor = (log_prob * pos).sum(1)[keep] / n_pos[keep]
    return -per_anchor.mean()


def pair_contrastive(idx_a: torch.Tensor, vals_a: torch.Tensor, idx_b: torch.Tensor, vals_b: torch.Tensor,
                     hidden: int, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE between paired codes (query/document, image/text): row i of a matches row i of b."""
    ua, ub = normalized_values(vals_a), normalized_values(vals_b)
    all_idx_b, all_ub, _, offset = gather_codes(idx_b, ub, None)
    all_idx_a, all_ua, _, _ = gather_codes(idx_a, ua, None)
    target = offset + torch.arange(idx_a.shape[0], device=idx_a.device)
    s_ab = sparse_similarity(idx_a, ua, all_idx_b, all_ub, hidden) / temperature
    s_ba = sparse_similarity(idx_b, ub, all_idx_a, all_ua, hidden) / temperature
    return 0.5 * (F.cross_entropy(s_ab, target) + F.cross_entropy(s_ba, target))


def check_finite_loss(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop training at the first non-finite loss term, naming the step and the term (a NaN loss would
    otherwise turn every weight into NaN and be saved as a finished model)."""
    total = float(terms["total"].detach())
    if math.isfinite(total):
        return
    bad = [n for n, v in terms.items() if n != "total" and not math.isfinite(float(v.detach()))]
    raise CSRError(f"non-finite training loss at step {step} ({', '.join(bad) or 'total'} = {total}); nothing "
                   f"written for this run's final model: lower --lr or check the embeddings")
