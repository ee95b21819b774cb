"""The CSR training loop: Adam, explicit LR schedule, AMP on CUDA, DDP under torchrun, checkpoint per epoch,
resume, tqdm, and a per-epoch JSONL log (each loss term, dead-latent fraction, samples/s)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from csr import losses as L
from csr.checkpoint import check_resume, read_checkpoint, save_checkpoint
from csr.distributed import Runtime, all_reduce_
from csr.encode import dead_fraction_on_rows
from csr.io import CSRError, atomic_write_text, warn, write_sidecar
from csr.model import CSR
from csr.remedies import init_encoder_from_data, init_pre_bias, remove_parallel_decoder_grad, resample_dead_units


@dataclass
class TrainConfig:
    """Optimisation recipe. Defaults are the paper's (main_visual.py) unless noted."""
    lr: float = 4e-4
    batch_size: int = 4096  # global batch (split across DDP ranks)
    epochs: int = 10
    cl: str = "self"  # contrastive term: self | label | pair | none
    cl_coef: float = 0.1  # gamma (0.1 vision, 1 multimodal)
    temperature: float = 0.2
    auxk_coef: float = 1 / 32  # beta
    multi_k_coef: float = 1 / 8  # weight of the 4k reconstruction
    multi_k: int = 0  # units of the second reconstruction; 0 = 4·k
    recon_loss: str = "mse"  # mse (reference) | nmse (MSE / Var(x): our option)
    wd: float = 0.0
    adam_eps: float = 6.25e-10
    schedule: str = "constant"  # constant (reference: StepLR gamma 1) | cosine
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    bpre_init: str = "zeros"  # zeros (reference) | mean | geometric_median
    encoder_init: str = "random"  # random (reference: torch's Linear init) | data (rows = centred, unit-norm samples)
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
        if self.recon_loss not in ("mse", "nmse"):
            raise CSRError(f"--recon-loss must be mse or nmse, got {self.recon_loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise CSRError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        if self.encoder_init not in ("random", "data"):
            raise CSRError(f"--encoder-init must be random or data, got {self.encoder_init!r}")
        if self.bpre_init not in ("zeros", "mean", "geometric_median"):
            raise CSRError(f"--bpre-init must be zeros, mean or geometric_median, got {self.bpre_init!r}")
        for flag, v in (("--lr", self.lr), ("--temperature", self.temperature), ("--adam-eps", self.adam_eps)):
            if not math.isfinite(v) or v <= 0:  # anything else can only produce NaN losses or Adam's traceback
                raise CSRError(f"{flag} must be a finite number > 0, got {v}")
        for flag, v in (("--max-steps", self.max_steps), ("--k-start", self.k_start), ("--warmup-steps", self.warmup_steps)):
            if v < 0:
                raise CSRError(f"{flag} must be >= 0, got {v}")


# Named recipes, applied on top of the flags; "paper" (the default) changes nothing. A recipe adapts to two
# measured properties of the training rows, never to a data set's name (choices made on validation splits of the
# training rows, README "Results"):
# - non-negative features (post-ReLU CNN embeddings) share a large common mean, which leaves most units dead with
#   b_pre = 0 (DESIGN.md): centre with the geometric median, untie the decoder (unit-norm rows, parallel gradient
#   removed), reconstruction loss normalised by Var(x), self-contrastive term;
# - signed features (sentence embeddings) lost accuracy and cluster quality with those changes and with the
#   self-contrastive term: keep the paper's centring and tied decoder, no contrastive term;
# - non-negative rows also get dead units resampled onto badly reconstructed inputs (signed rows barely have any);
# - both: the default hidden size 4·d is capped
#   at one unit per ROWS_PER_UNIT training rows (a 1.6k-text corpus with 1536 units gets codes that do not
#   generalise). "+labels" uses same-class positives with gamma = 1 (0.1 in the paper).
RESAMPLE = dict(resample_every=14, resample_until=0.9)
NONNEG = (dict(tied=False), dict(bpre_init="geometric_median", recon_loss="nmse", cl="self", **RESAMPLE))
SIGNED = ({}, dict(cl="none"))  # no resampling: ~0 units die on text, and with a tied decoder it can diverge
RECIPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "paper": {"nonnegative": ({}, {}), "signed": ({}, {})},
    "recommended": {"nonnegative": NONNEG, "signed": SIGNED},
    "recommended+labels": {"nonnegative": (NONNEG[0], {**NONNEG[1], "cl": "label", "cl_coef": 1.0}),
                           "signed": (SIGNED[0], {**SIGNED[1], "cl": "label", "cl_coef": 1.0})},
}
ROWS_PER_UNIT = 4


def is_nonnegative(x: np.ndarray, sample: int = 10000, seed: int = 0) -> bool:
    """Whether the rows are non-negative features (checked on a fixed sample of rows: memmaps stay cheap)."""
    n = len(x)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    return bool(np.min(np.asarray(x[rows])) >= 0)


def apply_recipe(name: str, model_cfg: Any, train_cfg: "TrainConfig", x: np.ndarray | None = None,
                 hidden_fixed: bool = False) -> tuple[Any, "TrainConfig"]:
    """(model config, train config) with recipe `name` applied for training rows `x` (None: non-negative rows,
    no cap). An explicit --hidden-size (`hidden_fixed`) is kept."""
    if name not in RECIPES:
        raise CSRError(f"--recipe must be one of {list(RECIPES)}, got {name!r}")
    from dataclasses import replace
    kind = "nonnegative" if x is None or is_nonnegative(x) else "signed"
    mchange, tchange = RECIPES[name][kind]
    model_cfg, train_cfg = replace(model_cfg, **mchange), replace(train_cfg, **tchange)
    if name != "paper" and x is not None and not hidden_fixed:
        cap = max(len(x) // ROWS_PER_UNIT, 4 * model_cfg.topk)
        if cap < model_cfg.hidden_size:
            model_cfg = replace(model_cfg, hidden_size=cap)
    return model_cfg, train_cfg


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


# ----------------------------------------------------------------------------- losses of one step

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


# ----------------------------------------------------------------------------- batches

class Batches:
    """Deterministic shuffled global batches (seed, epoch); each DDP rank takes its contiguous slice."""

    def __init__(self, data: TrainData, cfg: TrainConfig, rt: Runtime, ram_limit_bytes: float = 4e9):
        self.data, self.cfg, self.rt = data, cfg, rt
        self.n = len(data)
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

    def epoch(self, epoch: int, skip: int = 0):
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)
        B, W, r = self.cfg.batch_size, self.rt.world_size, self.rt.rank
        for step in range(skip, self.steps_per_epoch):
            g = perm[step * B:(step + 1) * B]
            per = len(g) // W
            if per == 0:
                continue
            rows = g[r * per:(r + 1) * per]
            x = self._rows("x", rows)
            labels = torch.from_numpy(self.data.labels[rows]) if self.data.labels is not None else None
            x_pair = self._rows("x_pair", rows) if self.data.x_pair is not None else None
            yield x, labels, x_pair


# ----------------------------------------------------------------------------- the loop

AMP_DEVICE_TYPES = ("cuda",)  # bf16 autocast is slower than fp32 on CPU; tests add "cpu" to check the AMP path


def autocast(device: torch.device, enabled: bool):
    """The bfloat16 autocast of a training step (`--amp`): on for CUDA, a no-op elsewhere.

    Only the loss arithmetic is affected: `CSR.forward` runs in float32 (top-k from fp32 pre-activations).
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type in AMP_DEVICE_TYPES)


def annealed_k(step: int, k: int, k_start: int, anneal_steps: int) -> int:
    """Active units at `step`: k_start decreasing linearly to k over `anneal_steps` (k when annealing is off)."""
    if k_start <= k or anneal_steps <= 0 or step >= anneal_steps:
        return k
    return int(round(k_start + (k - k_start) * step / anneal_steps))


def warn_k_changes(cfg: TrainConfig, k: int, hidden: int, multi_k: int, say: bool = True) -> None:
    """One warning line for each silent change of the recipe's k values: k_start clamped to hidden/4, and
    multi_k raised to 4·k (the second reconstruction always uses at least 4x the current k)."""
    if not say:
        return
    k_first = k
    if cfg.k_start > k:
        k_first = min(cfg.k_start, hidden // 4)
        if k_first < cfg.k_start:
            warn(f"--k-start {cfg.k_start} clamped to hidden_size/4 = {hidden // 4}")
    if multi_k < 4 * k_first:
        warn(f"multi_k {multi_k} raised to 4·k = {4 * k_first} while k = {k_first}")


def optimizer_step(model: CSR, opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, idx_k: torch.Tensor,
                   grad_clip: float = 0.0) -> None:
    """One update: backward, optional clipping, Adam and schedule step, decoder renormalisation, and the deadness
    counters from this step's top-k indices (OR-ed over ranks under DDP, so every rank agrees on who is dead)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_decoder_grad(model)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    model.normalize_decoder_()
    fired = torch.zeros(model.cfg.hidden_size, device=idx_k.device)
    fired[idx_k.reshape(-1)] = 1
    model.update_dead_stats(all_reduce_(fired) > 0)


def accumulate(sums: dict[str, float], terms: dict[str, torch.Tensor]) -> None:
    """Add this step's loss terms to the epoch sums (for the per-epoch means of the JSONL log)."""
    for name, v in terms.items():
        sums[name] = sums.get(name, 0.0) + float(v.detach())


def train(model: CSR, data: TrainData, cfg: TrainConfig, out_dir: str | Path, rt: Runtime | None = None,
          args: dict[str, Any] | None = None, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` on `data`; writes `out_dir/{last.pt, csr.pt, log.jsonl, csr.json}`; returns a summary.

    `on_step(global_step, terms)` is called after every optimiser step (used by tests to simulate a crash);
    `extra` is stored in every checkpoint (e.g. the sweep's digest of the run's inputs).
    """
    t_start = time.time()
    rt = rt or Runtime()
    out_dir = Path(out_dir)
    if cfg.cl == "pair" and data.x_pair is None:
        raise CSRError("--cl pair needs paired rows (query/document or image/text embeddings)")
    if cfg.cl == "label" and data.labels is None:
        raise CSRError("--cl label needs labels (a {split}_labels.npy beside the embeddings)")
    torch.manual_seed(cfg.seed)
    batches = Batches(data, cfg, rt)
    total_steps = batches.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    model.to(rt.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.wd)
    sched = make_scheduler(opt, cfg, total_steps)
    anneal_steps = cfg.k_anneal_steps or int(cfg.k_anneal_fraction * total_steps)
    resample_gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1)
    start_epoch, step, log_lines = 0, 0, []
    last = out_dir / "last.pt"
    if resume and last.exists():
        ckpt = read_checkpoint(last)
        check_resume(ckpt, last, model.cfg.to_dict(), data.identity)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        log_path = out_dir / "log.jsonl"
        if log_path.exists():
            log_lines = [ln for ln in log_path.read_text().splitlines()
                         if ln.strip() and json.loads(ln)["epoch"] <= ckpt["epoch"]]
        if rt.is_main:
            print(f"resuming from {last}: epoch {start_epoch}, step {step}")
    else:
        if resume and rt.is_main:
            print(f"--resume: no {last} yet, starting from scratch")
        init_pre_bias(model, data.x, cfg.bpre_init, cfg.seed)
        if cfg.encoder_init == "data":
            init_encoder_from_data(model, data.x, cfg.seed)
        model.stats_last_nonzero.zero_()

    net: torch.nn.Module = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    hidden, k = model.cfg.hidden_size, model.cfg.topk
    multi_k = cfg.multi_k or 4 * k
    warn_k_changes(cfg, k, hidden, multi_k, rt.is_main)
    summary: dict[str, Any] = {"epochs": cfg.epochs, "steps": step}
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        sums: dict[str, float] = {}
        n_steps, n_samples, n_resampled, t0 = 0, 0, 0, time.time()
        bar = tqdm(batches.epoch(epoch), total=batches.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and rt.is_main), leave=False)
        for x, labels, x_pair in bar:
            x = x.to(rt.device, non_blocking=True)
            if x_pair is not None:
                x = torch.cat([x, x_pair.to(rt.device, non_blocking=True)])
            if labels is not None:
                labels = labels.to(rt.device)
            dead = model.dead_mask()
            k_now = annealed_k(step, k, min(cfg.k_start, hidden // 4), anneal_steps)
            with autocast(rt.device, cfg.amp):
                out = net(x, k=k_now, multi_k=max(multi_k, 4 * k_now), dead=dead)
                terms = step_losses(out, x, cfg, hidden, labels, rt.distributed)
            L.check_finite_loss(terms, step + 1)
            optimizer_step(model, opt, sched, terms["total"], out["idx"][:, :k_now], cfg.grad_clip)
            step += 1
            if cfg.resample_every and step % cfg.resample_every == 0 and step < cfg.resample_until * total_steps:
                moved, _ = resample_dead_units(model, opt, x, k_now, cfg.resample_every, resample_gen)
                n_resampled += int(moved.numel())
            n_steps += 1
            n_samples += x.shape[0] * rt.world_size // (2 if x_pair is not None else 1)
            accumulate(sums, terms)
            if rt.is_main:
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.4g}", dead=f"{float(dead.float().mean()):.2f}")
            if on_step is not None:
                on_step(step, terms)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        bar.close()
        dt = time.time() - t0
        if rt.distributed:  # log the global-batch losses, not rank 0's share
            names = sorted(sums)
            t = all_reduce_(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=rt.device))
            sums = {n: float(v) / rt.world_size for n, v in zip(names, t.tolist())}
        stats = {"epoch": epoch, "step": step, **{f"loss_{n}": s / max(1, n_steps) for n, s in sums.items()},
                 "dead_fraction": float(model.dead_mask().float().mean()), "samples_per_s": n_samples / max(dt, 1e-9),
                 "lr": sched.get_last_lr()[0], "epoch_time_s": dt, "resampled_units": n_resampled}
        log_lines.append(json.dumps(stats))
        summary.update(stats)
        if rt.is_main:
            state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, step=step,
                         train_config=asdict(cfg), args=args or {}, data=data.identity, **(extra or {}))
            save_checkpoint(last, model, **state)
            if cfg.keep_epochs:
                save_checkpoint(out_dir / f"epoch{epoch:03d}.pt", model, **state)
            atomic_write_text(out_dir / "log.jsonl", "\n".join(log_lines) + "\n")
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats.get('loss_total', float('nan')):.5g} "
                  f"(recon_k {stats.get('loss_recon_k', float('nan')):.4g}, cl {stats.get('loss_cl', float('nan')):.4g}), "
                  f"dead {stats['dead_fraction']:.1%}, {stats['samples_per_s']:.0f} samples/s")
    summary["steps"] = step
    if rt.is_main:
        # the "dead latents" of the trained model: units in no top-k code of the training rows (the sweep's rule)
        model.eval()
        summary["dead_fraction_rows"], summary["dead_rows_checked"] = dead_fraction_on_rows(model, data.x)
        if log_lines:
            log_lines[-1] = json.dumps({**json.loads(log_lines[-1]), "dead_fraction_rows": summary["dead_fraction_rows"]})
            atomic_write_text(out_dir / "log.jsonl", "\n".join(log_lines) + "\n")
        final = out_dir / "csr.pt"
        save_checkpoint(final, model, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        epoch=cfg.epochs - 1, step=step, train_config=asdict(cfg), args=args or {}, complete=True,
                        train_seconds=time.time() - t_start, **(extra or {}))
        write_sidecar(final, model_config=model.cfg.to_dict(), train_config=asdict(cfg), steps=step,
                      final_stats={k: v for k, v in summary.items() if k != "epochs"})
        summary["checkpoint"] = str(final)
    model.eval()
    return summary
