"""The optimisation settings of a training run (`TrainConfig`) and what they decide about each step: its loss
terms (`step_losses`), the optimiser (`adam`) and the LR schedule (`make_scheduler`). The loop that uses them is
csr/train.py's (which re-exports these names)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from csr import losses as L
from csr.io import CSRError
from csr.model import CSR


@dataclass
class TrainConfig:
    """Optimisation recipe. Defaults are the paper's (main_visual.py) unless noted."""
    lr: float = 4e-4
    batch_size: int = 4096  # global batch (split across DDP ranks)
    epochs: int = 10
    cl: str = "self"  # contrastive term: self | label | pair | none
    cl_coef: float = 0.1  # gamma (0.1 vision, 1 multimodal)
    temperature: float = 0.2
    sim_coef: float = 0.0  # weight of the kNN-preserving term (ours; 0 = off, the paper's recipe)
    sim_loss: str = "rank"  # rank (KL of the neighbour distributions) | gram (MSE of the cosine matrices)
    sim_temperature: float = 0.05  # temperature of the rank term's neighbour distributions
    auxk_coef: float = 1 / 32  # beta
    multi_k_coef: float = 1 / 8  # weight of the 4k reconstruction
    multi_k: int = 0  # units of the second reconstruction; 0 = 4·k
    recon_loss: str = "mse"  # mse (reference) | nmse (MSE / Var(x): our option)
    wd: float = 0.0
    adam_eps: float = 6.25e-10
    fused_adam: bool = True  # torch's fused Adam kernel: the same update up to float rounding, fewer passes
    schedule: str = "constant"  # constant (reference: StepLR gamma 1) | cosine
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    bpre_init: str = "zeros"  # zeros (reference) | mean | geometric_median
    encoder_init: str = "random"  # random (reference: torch's Linear init) | data (rows = centred, unit-norm samples)
    #                               | pca (rows = ±principal directions around b_pre: starts at PCA's information)
    k_start: int = 0  # k annealing (CSRv2-style, off = 0): train with k_start active units at step 0 ...
    k_anneal_steps: int = 0  # ... decreasing linearly to the model's k at this step (0 = --k-anneal-fraction)
    k_anneal_fraction: float = 0.5  # ... or over this share of all steps (CSRv2: 0.7)
    resample_every: int = 0  # every N steps, move units idle for N steps onto badly reconstructed inputs (0 = off)
    resample_until: float = 0.5  # ... during this share of all steps only (the moved units then settle)
    seed: int = 1227
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = run all epochs)
    keep_epochs: bool = False  # keep epochNNN.pt besides last.pt

    def __post_init__(self) -> None:
        if self.cl not in L.CL_MODES:
            raise CSRError(f"--cl must be one of {L.CL_MODES}, got {self.cl!r}")
        if self.sim_loss not in L.SIM_LOSSES:
            raise CSRError(f"--sim-loss must be one of {L.SIM_LOSSES}, got {self.sim_loss!r}")
        if self.recon_loss not in ("mse", "nmse"):
            raise CSRError(f"--recon-loss must be mse or nmse, got {self.recon_loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise CSRError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        if self.encoder_init not in ("random", "data", "pca"):
            raise CSRError(f"--encoder-init must be random, data or pca, got {self.encoder_init!r}")
        if self.bpre_init not in ("zeros", "mean", "geometric_median"):
            raise CSRError(f"--bpre-init must be zeros, mean or geometric_median, got {self.bpre_init!r}")
        for flag, v in (("--lr", self.lr), ("--temperature", self.temperature),
                        ("--sim-temperature", self.sim_temperature), ("--adam-eps", self.adam_eps)):
            if not math.isfinite(v) or v <= 0:  # anything else can only produce NaN losses or Adam's traceback
                raise CSRError(f"{flag} must be a finite number > 0, got {v}")
        for flag, v in (("--max-steps", self.max_steps), ("--k-start", self.k_start), ("--warmup-steps", self.warmup_steps)):
            if v < 0:
                raise CSRError(f"{flag} must be >= 0, got {v}")


def step_losses(out: dict[str, torch.Tensor], x: torch.Tensor, cfg: TrainConfig, hidden: int,
                labels: torch.Tensor | None = None, distributed: bool = False) -> dict[str, torch.Tensor]:
    """All loss terms of one step from one forward pass; `total` is the weighted sum."""
    if cfg.recon_loss == "mse":
        recon = L.mse
    else:
        var = L.batch_variance(x, distributed)
        recon = lambda p, t: L.mse(p, t) / var  # noqa: E731
    k = int(out["k"])
    terms = {"recon_k": recon(out["recon_k"], x), "recon_multi": recon(out["recon_multi"], x)}
    if "aux_recon" in out:
        residual = (x.float() - out["recon_k"].float()).detach()
        terms["auxk"] = L.nmse(out["aux_recon"], residual, distributed)
    else:
        terms["auxk"] = torch.zeros((), device=x.device)
    idx, vals = out["idx"][:, :k], out["vals"][:, :k]
    if cfg.cl == "self":
        terms["cl"] = L.self_contrastive(idx, vals, hidden, cfg.temperature)
    elif cfg.cl == "label":
        if labels is None:
            raise CSRError("--cl label needs labels (a {split}_labels.npy beside the embeddings)")
        terms["cl"] = L.label_contrastive(idx, vals, labels, hidden, cfg.temperature)
    elif cfg.cl == "pair":
        half = idx.shape[0] // 2
        terms["cl"] = L.pair_contrastive(idx[:half], vals[:half], idx[half:], vals[half:], hidden, cfg.temperature)
    else:
        terms["cl"] = torch.zeros((), device=x.device)
    terms["total"] = (terms["recon_k"] + cfg.multi_k_coef * terms["recon_multi"] + cfg.auxk_coef * terms["auxk"]
                      + cfg.cl_coef * terms["cl"])
    if cfg.sim_coef > 0:
        terms["sim"] = L.similarity_preservation(idx, vals, x, hidden, cfg.sim_loss, cfg.sim_temperature)
        terms["total"] = terms["total"] + cfg.sim_coef * terms["sim"]
    return terms


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def adam(cfg: TrainConfig) -> Callable[[CSR], torch.optim.Optimizer]:
    """The paper's optimiser: Adam with the recipe's lr, eps and weight decay; `cfg.fused_adam` runs torch's fused
    kernel (one pass over each parameter instead of one per arithmetic op: the same update to float rounding)."""
    return lambda model: torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.wd,
                                          fused=cfg.fused_adam)
