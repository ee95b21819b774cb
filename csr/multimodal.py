"""Image-text CSR training: configuration around the one training loop (`csr.train.train`).

One CSR is shared by both towers: a step encodes the L2-normalised image and text features of a batch of pairs
as one `[2B, d]` input. Loss = reconstruction at k and 4k + AuxK (`csr.train.step_losses` with `cl="none"`)
+ gamma * a CLIP-style symmetric InfoNCE scaled by the frozen CLIP's logit scale, computed on the
L2-normalised top-k reconstructions (as the reference does) or, with `cl_on="codes"`, on the sparse codes.
The optimiser is AdamW set up as open_clip does.

Features come either online (every step runs the frozen CLIP on decoded shard samples, `OnlineFeatures`) or
from a feature cache (`csr.webdata.build_feature_cache`, then epochs are shuffled passes over it,
`CachedFeatures`). The CLIP towers live in `csr.clip`, the shards in `csr.webdata`, zero-shot retrieval in
`csr.zeroshot`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from csr import losses as L
from csr.clip import FrozenCLIP
from csr.distributed import Runtime, gather_rows
from csr.io import CSRError
from csr.model import CSR
from csr.train import Batch, Batches, TrainConfig, TrainData, step_losses, train
from csr.webdata import ShardStream, shard_loader

CL_ON = ("recon", "codes")


# ============================================================================ feature sources

class OnlineFeatures:
    """Per step: decode a shard batch, run the frozen CLIP, yield `[image features; text features]` `[2B, d]`."""

    def __init__(self, clip: FrozenCLIP, stream: ShardStream, workers: int):
        self.clip, self.stream, self.workers = clip, stream, workers
        self.skipped, self.uneven = 0, True  # ranks read different shards: one may run dry first
        per_worker = stream.batches_per_worker or 0
        self.steps_per_epoch = per_worker * max(1, workers)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.stream.epoch = epoch
        for images, tokens, skipped in shard_loader(self.stream, self.workers, self.clip.device.type == "cuda"):
            self.skipped += int(skipped)
            x = torch.cat([self.clip.image_features(images), self.clip.text_features(tokens)])
            yield Batch(x, None, len(images))


class CachedFeatures(Batches):
    """Shuffled global batches of cached (image, text) feature rows; each rank takes its slice."""

    def __init__(self, image: np.ndarray, text: np.ndarray, global_batch: int, seed: int, rt: Runtime):
        super().__init__(TrainData(image, x_pair=text), TrainConfig(batch_size=global_batch, seed=seed, cl="none"), rt)
        self.rows, self.skipped = None, 0  # no b_pre from data, no dead-latent count on the image rows alone


# ============================================================================ losses

def clip_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between rows of `a` and `b` (row i of a pairs with row i of b).

    Rows are L2-normalised here. Under DDP, each rank's rows are scored against the global batch of the other
    side (all-gathered with gradient), so the averaged gradients are those of the global-batch loss.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, offset = gather_rows(a, grad=True)
    all_b, _ = gather_rows(b, grad=True)
    target = offset + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logit_scale * a @ all_b.t(), target)
                  + F.cross_entropy(logit_scale * b @ all_a.t(), target))


def multimodal_losses(out: dict[str, torch.Tensor], x: torch.Tensor, cfg: TrainConfig, hidden: int,
                      logit_scale: float, cl_on: str = "recon", distributed: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms of one step on `x = [image rows; text rows]` (2B rows, one shared CSR pass).

    The InfoNCE logits are computed in float32 even under autocast: at CLIP's logit scale (100) bfloat16
    would resolve logits only to ~0.5.
    """
    terms = step_losses(out, x, replace(cfg, cl="none"), hidden, None, distributed)
    half = x.shape[0] // 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        if cl_on == "recon":
            rec = out["recon_k"].float()
            terms["cl"] = clip_infonce(rec[:half], rec[half:], logit_scale)
        elif cl_on == "codes":
            k = int(out["k"])
            idx, vals = out["idx"][:, :k], out["vals"][:, :k].float()
            terms["cl"] = L.pair_contrastive(idx[:half], vals[:half], idx[half:], vals[half:], hidden,
                                             1.0 / logit_scale)
        else:
            raise CSRError(f"--csr-cl-on must be recon or codes, got {cl_on!r}")
    terms["total"] = terms["total"] + cfg.cl_coef * terms["cl"]
    return terms


# ============================================================================ training

def make_optimizer(model: CSR, lr: float, wd: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW as open_clip sets it up: weight decay on weight matrices, none on biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)



def train_multimodal(model: CSR, source: OnlineFeatures | CachedFeatures, cfg: TrainConfig, out_dir: str | Path,
                     rt: Runtime, logit_scale: float, cl_on: str = "recon", save_frequency: int = 1,
                     betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, extra: dict[str, Any] | None = None,
                     resume: bool | str | None = None, progress: bool = True,
                     replace_old: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train the shared CSR on (image, text) feature batches from `source` with `csr.train.train`.

    Writes `out_dir/epoch_{E}.pt` every `save_frequency` epochs and at the end, `out_dir/last.pt` after every
    epoch (for resuming from it), `out_dir/csr.pt` at the end, and `out_dir/log.jsonl`. Returns the summary.
    `replace_old()` (--overwrite) removes an earlier run's files just before the first write.
    """
    if cl_on not in CL_ON:
        raise CSRError(f"--csr-cl-on must be one of {CL_ON}, got {cl_on!r}")
    hidden = model.cfg.hidden_size

    def loss_fn(out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return multimodal_losses(out, batch.x, cfg, hidden, logit_scale, cl_on, rt.distributed)

    return train(model, source, cfg, out_dir, rt, resume=resume or False, progress=progress,
                 extra={**(extra or {}), "logit_scale": logit_scale, "cl_on": cl_on}, loss_fn=loss_fn,
                 optimizer=lambda m: make_optimizer(m, cfg.lr, cfg.wd, betas, eps), save_every=save_frequency,
                 epoch_name="epoch_{n}.pt", replace_old=replace_old)
