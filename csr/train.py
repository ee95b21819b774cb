"""The one CSR training loop, shared by visual, text and image-text runs (`train`): any batch source, loss and
optimiser; explicit LR schedule, AMP on CUDA, DDP under torchrun, k annealing, dead-unit resampling, checkpoint
per epoch, resume, progress bars, and a per-epoch JSONL log (each loss term, dead-latent fraction, samples/s).
The optimisation settings (`TrainConfig`) and the loss terms of one step (`step_losses`) are csr/train_config.py's,
the rows and batches (`TrainData`, `Batches`, `BatchSource`) csr/batches.py's; all are importable from here."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from csr import losses as L
from csr.batches import MIN_ROWS, Batch, Batches, BatchSource, TrainData, check_data
from csr.checkpoint import (check_finite_weights, check_resume, first_line, read_checkpoint, run_finished,
                            save_checkpoint)
from csr.distributed import Runtime, all_reduce_, barrier
from csr.encode import dead_fraction_on_rows
from csr.io import CSRError, atomic_write_text, info, warn, write_sidecar
from csr.model import CSR
from csr.progress import progress_bar
from csr.remedies import (init_encoder_from_data, init_encoder_from_pca, init_pre_bias, remove_parallel_decoder_grad,
                          resample_dead_units)
from csr.train_config import TrainConfig, adam, make_scheduler, step_losses


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
    """One warning line for each silent change of the recipe's k values: k annealing off because k_start is not
    above k (also once clamped to hidden/4), k_start clamped to hidden/4, and multi_k raised to 4·k (the second
    reconstruction always uses at least 4x the current k)."""
    if not say:
        return
    k_first = k
    if 0 < cfg.k_start <= k:
        warn(f"--k-start {cfg.k_start} is not above k = {k}: k annealing is off (it starts above k and "
             f"decreases to it)")
    elif cfg.k_start > k:
        k_first = max(k, min(cfg.k_start, hidden // 4))
        if k_first < cfg.k_start:
            off = f", not above k = {k}: k annealing is off" if k_first == k else ""
            warn(f"--k-start {cfg.k_start} clamped to hidden_size/4 = {hidden // 4}{off}")
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


LossFn = Callable[[dict[str, torch.Tensor], Batch], dict[str, torch.Tensor]]


def train(model: CSR, data: TrainData | BatchSource, cfg: TrainConfig, out_dir: str | Path,
          rt: Runtime | None = None, args: dict[str, Any] | None = None, resume: bool | str | Path = False,
          progress: bool = True, extra: dict[str, Any] | None = None, loss_fn: LossFn | None = None,
          optimizer: Callable[[CSR], torch.optim.Optimizer] | None = None,
          save_every: int = 0, epoch_name: str = "epoch{epoch:03d}.pt",
          replace_old: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train `model`, the one loop of every run (visual, text, image-text); returns a summary.

    `data`: training rows (`TrainData`, batched by `Batches`) or any `BatchSource`. `loss_fn(out, batch)` gives
    the loss terms with their weighted sum as `total` (default `step_losses` with `cfg`); `optimizer(model)`
    builds the optimiser (default Adam). Writes `out_dir/last.pt` after every epoch (what --resume continues;
    `resume` True = that file, or a checkpoint path), `epoch_name` every `save_every` epochs and at the end
    (or every epoch with `cfg.keep_epochs`), and `csr.pt`, `csr.json`, `log.jsonl`. `extra` goes into every
    checkpoint and the sidecar (e.g. the sweep's digest of the run's inputs). `replace_old()` (--overwrite: remove
    the old run's files) runs on the main rank just before the first file is written, so a run that fails
    earlier leaves the old run as it was.

    The steps: `start_run` (set-up, then `resume_or_init`), `run_epoch` (`train_step` per batch), `end_epoch`
    (log line, last.pt, epoch checkpoints) and `finish_run` (dead fraction on the rows, csr.pt and its sidecar).
    """
    if isinstance(data, TrainData) and len(data) < MIN_ROWS:
        what = (data.identity or {}).get("path") or "the training data"
        raise CSRError(f"{what}: {len(data)} training row(s); CSR needs at least {MIN_ROWS} (a code learnt from one row "
                       f"says nothing about any other)")
    extra = {**(extra or {}), **({"args": args} if args is not None else {})}
    run = start_run(model, data, cfg, Path(out_dir), rt or Runtime(), resume, extra, loss_fn, optimizer,
                    save_every=1 if cfg.keep_epochs else save_every, epoch_name=epoch_name)
    run.replace_old = replace_old
    summary: dict[str, Any] = {"epochs": cfg.epochs, "steps": run.step}
    if run.log_lines:  # resumed: the last epoch's stats, until an epoch runs (none when only csr.pt was missing)
        summary.update({**json.loads(run.log_lines[-1]), "epochs": cfg.epochs})
    model.train()
    for epoch in range(run.start_epoch, cfg.epochs):
        if run.reached_max_steps():
            break
        tally = run_epoch(run, epoch, progress)
        stats = epoch_stats(run, epoch, tally)
        summary.update(stats)
        last_epoch = epoch == cfg.epochs - 1 or run.reached_max_steps()
        end_epoch(run, epoch, stats, tally.steps, last_epoch)
        if last_epoch:
            break
    summary["steps"] = run.step
    if run.rt.is_main:
        finish_run(run, summary)
    barrier()
    model.eval()
    return summary


# ----------------------------------------------------------------------------- set-up and resume

@dataclass
class Run:
    """One training run's state between its steps and epochs (made by `start_run`)."""
    model: CSR
    net: torch.nn.Module  # the model, or its DDP wrapper (what the step calls)
    opt: torch.optim.Optimizer
    sched: Any
    source: BatchSource
    cfg: TrainConfig
    rt: Runtime
    out_dir: Path
    loss_fn: LossFn
    extra: dict[str, Any]  # stored in every checkpoint and the sidecar
    total_steps: int
    anneal_steps: int  # k goes from cfg.k_start down to the model's k over these steps
    multi_k: int  # units of the second reconstruction (at least 4x the current k)
    resample_gen: torch.Generator
    save_every: int = 0  # write epoch_name every save_every epochs and at the end (0 = never)
    epoch_name: str = "epoch{epoch:03d}.pt"
    t_start: float = 0.0
    start_epoch: int = 0
    step: int = 0  # optimiser steps so far
    log_lines: list[str] = field(default_factory=list)  # log.jsonl, one JSON line per epoch
    saved: list[str] = field(default_factory=list)  # epoch checkpoints written
    replace_old: Callable[[], None] | None = None  # --overwrite: remove the old run's files before the first write

    @property
    def rows(self) -> np.ndarray | None:  # the training rows, when the source holds them
        return getattr(self.source, "rows", None)

    @property
    def identity(self) -> dict[str, Any] | None:
        return getattr(self.source, "identity", None)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.source.steps_per_epoch)

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps and self.step >= self.cfg.max_steps)


def start_run(model: CSR, data: TrainData | BatchSource, cfg: TrainConfig, out_dir: Path, rt: Runtime,
              resume: bool | str | Path, extra: dict[str, Any], loss_fn: LossFn | None,
              optimizer: Callable[[CSR], torch.optim.Optimizer] | None, save_every: int, epoch_name: str) -> Run:
    """Everything before the first step: the batch source, seed, optimiser and LR schedule, then the weights
    (`resume_or_init`), the DDP wrapper and the k warnings."""
    t_start = time.time()
    if isinstance(data, TrainData):
        check_data(data, cfg)
        data = Batches(data, cfg, rt)
    torch.manual_seed(cfg.seed)
    total_steps = max(1, data.steps_per_epoch) * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    model.to(rt.device)
    opt = (optimizer or adam(cfg))(model)
    sched = make_scheduler(opt, cfg, total_steps)
    hidden, k = model.cfg.hidden_size, model.cfg.topk
    loss_fn = loss_fn or (lambda out, b: step_losses(out, b.x, cfg, hidden, b.labels, rt.distributed))
    run = Run(model, model, opt, sched, data, cfg, rt, out_dir, loss_fn, extra, total_steps,
              anneal_steps=cfg.k_anneal_steps or int(cfg.k_anneal_fraction * total_steps),
              multi_k=cfg.multi_k or 4 * k,
              resample_gen=torch.Generator(device=rt.device).manual_seed(cfg.seed + 1),
              save_every=save_every, epoch_name=epoch_name, t_start=t_start)
    resume_or_init(run, resume)
    if rt.distributed:
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    warn_k_changes(cfg, k, hidden, run.multi_k, rt.is_main)
    return run


def resume_or_init(run: Run, resume: bool | str | Path) -> None:
    """Continue from a checkpoint (`resume` True: out_dir/last.pt when it exists; a path: that file, which must
    exist), or start afresh: b_pre and the encoder initialised from the training rows as the recipe says."""
    explicit = isinstance(resume, (str, Path)) and bool(resume)  # a checkpoint path must exist; True may not
    last = Path(resume) if explicit else run.out_dir / "last.pt"
    if explicit or (resume and last.exists()):
        resume_from(run, last)
        return
    if resume and run.rt.is_main:
        info(f"--resume: no {last} yet, starting from scratch")
    cfg, rows = run.cfg, run.rows
    if rows is not None:
        init_pre_bias(run.model, rows, cfg.bpre_init, cfg.seed)
        if cfg.encoder_init == "data":
            init_encoder_from_data(run.model, rows, cfg.seed)
        elif cfg.encoder_init == "pca":
            init_encoder_from_pca(run.model, rows, cfg.seed)
    elif cfg.bpre_init != "zeros" or cfg.encoder_init != "random":
        raise CSRError("--bpre-init / --encoder-init from data need the training rows, which this batch "
                       "source does not hold")
    run.model.stats_last_nonzero.zero_()


def resume_from(run: Run, last: Path) -> None:
    """Load weights, optimiser, schedule and random generator states from checkpoint `last` (checked against this
    run's model, data and training settings), and the log lines of the epochs it holds; refuse a finished run
    whose csr.pt exists (nothing to do)."""
    ckpt = read_checkpoint(last)
    missing = [k for k in ("epoch", "step", "optimizer", "scheduler") if k not in ckpt]
    if missing:
        raise CSRError(f"--resume {last}: not a training checkpoint (no {', '.join(missing)}); --resume continues "
                       f"a run's last.pt or epoch checkpoint")
    check_resume(ckpt, last, run.model.cfg.to_dict(), run.identity, asdict(run.cfg))
    run.start_epoch, run.step = ckpt["epoch"] + 1, ckpt["step"]
    cfg = run.cfg
    if run_finished(ckpt, cfg.epochs, cfg.max_steps) and (run.out_dir / "csr.pt").exists():
        raise CSRError(f"--resume {last}: nothing to resume, the run finished ({run.start_epoch} of {cfg.epochs} "
                       f"epochs, step {run.step}); pass a larger --epochs (or --max-steps) to train on")
    try:
        run.model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CSRError(f"--resume {last}: checkpoint weights do not match its config ({first_line(e)})") from None
    check_finite_weights(run.model, f"--resume {last}")
    try:
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CSRError(f"--resume {last}: its optimiser state does not fit this run's optimiser ({first_line(e)})"
                       ) from None
    restore_rng(run, ckpt.get("rng"), last)
    log_path = run.out_dir / "log.jsonl"
    if log_path.exists():
        run.log_lines = [ln for ln in log_path.read_text().splitlines()
                         if ln.strip() and json.loads(ln)["epoch"] <= ckpt["epoch"]]
    if run.rt.is_main:
        info(f"resuming from {last}: {run.start_epoch} epochs done, step {run.step}")


def rng_state(run: Run) -> dict[str, Any]:
    """Every random generator a training step may draw from (resampling's, torch's global ones), for last.pt:
    a resumed run then draws what the uninterrupted run would have drawn."""
    state = {"device": run.rt.device.type, "resample": run.resample_gen.get_state(), "torch": torch.get_rng_state()}
    if run.rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.rt.device)
    return state


def restore_rng(run: Run, state: dict[str, Any] | None, last: Path) -> None:
    """Set the generators to `rng_state`'s saved `state`. A checkpoint without it (an older version) or saved on
    another device type keeps the fresh seeds, with a warning when the run draws random numbers (resampling)."""
    same_device = bool(state) and state.get("device") == run.rt.device.type
    if not same_device:
        if run.cfg.resample_every and run.rt.is_main:
            why = (f"was saved on {state.get('device')}, this run is on {run.rt.device.type}" if state
                   else "holds no random generator states (an older version wrote it)")
            warn(f"--resume {last} {why}: resampling picks other units and rows than the uninterrupted run would")
        return
    try:
        run.resample_gen.set_state(state["resample"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], run.rt.device)
    except (RuntimeError, TypeError, KeyError) as e:
        raise CSRError(f"--resume {last}: unreadable random generator state ({first_line(e)})") from None


# ----------------------------------------------------------------------------- one step, one epoch

def next_batch(run: Run, batches: Iterator[Batch]) -> Batch | None:
    """This rank's next batch, on the device, or None at the end of the epoch. With an uneven source every rank
    stops as soon as one runs out of data (never a hanging all-reduce)."""
    batch = next(batches, None)
    if run.rt.distributed and getattr(run.source, "uneven", False):
        have = torch.tensor([0.0 if batch is None else 1.0], device=run.rt.device)
        if float(all_reduce_(have, dist.ReduceOp.MIN)) == 0:
            return None
    elif batch is None:
        return None
    x = batch.x.to(run.rt.device, non_blocking=True).float()
    return Batch(x, None if batch.labels is None else batch.labels.to(run.rt.device), batch.samples)


def train_step(run: Run, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One optimiser step on `batch` at the annealed k, then dead-unit resampling when due. Returns the loss
    terms, the dead-unit mask the step ran with, and the number of units resampled."""
    model, cfg = run.model, run.cfg
    dead = model.dead_mask()
    k_now = annealed_k(run.step, model.cfg.topk, min(cfg.k_start, model.cfg.hidden_size // 4), run.anneal_steps)
    with autocast(run.rt.device, cfg.amp):
        out = run.net(batch.x, k=k_now, multi_k=max(run.multi_k, 4 * k_now), dead=dead)
        terms = run.loss_fn(out, batch)
    L.check_finite_loss(terms, run.step + 1)
    optimizer_step(model, run.opt, run.sched, terms["total"], out["idx"][:, :k_now], cfg.grad_clip)
    run.step += 1
    moved = 0
    if cfg.resample_every and run.step % cfg.resample_every == 0 and run.step < cfg.resample_until * run.total_steps:
        units, _ = resample_dead_units(model, run.opt, batch.x, k_now, cfg.resample_every, run.resample_gen)
        moved = int(units.numel())
    return terms, dead, moved


@dataclass
class EpochTally:
    """What one epoch's log line counts: loss sums, steps, samples (all ranks), resampled units, start time."""
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    resampled: int = 0
    t0: float = field(default_factory=time.time)


def run_epoch(run: Run, epoch: int, progress: bool) -> EpochTally:
    """Train on the batch source's epoch `epoch` until it ends or --max-steps is reached; returns its tally."""
    rt, tally = run.rt, EpochTally()
    with progress_bar(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{run.cfg.epochs}",
              disable=not (progress and rt.is_main), leave=False) as bar:  # closed (cleared) on errors too
        batches = run.source.epoch(epoch)
        while (batch := next_batch(run, batches)) is not None:
            terms, dead, moved = train_step(run, batch)
            tally.resampled += moved
            tally.steps += 1
            tally.samples += batch.samples * rt.world_size
            accumulate(tally.sums, terms)
            bar.update(1)
            if rt.is_main:
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.4g}", dead=f"{float(dead.float().mean()):.2f}")
            if run.reached_max_steps():
                break
    if tally.steps == 0:
        raise CSRError(f"epoch {epoch + 1} produced no batch: the training data holds fewer samples than one "
                       f"batch per rank (lower --batch-size or check the training data)")
    return tally


def epoch_stats(run: Run, epoch: int, tally: EpochTally) -> dict[str, Any]:
    """The epoch's log line: mean loss terms (over the global batch under DDP), dead fraction, samples/s, lr."""
    rt, sums = run.rt, tally.sums
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - tally.t0
    if rt.distributed:  # log the global-batch losses, not rank 0's share
        names = sorted(sums)
        t = all_reduce_(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=rt.device))
        sums = {n: float(v) / rt.world_size for n, v in zip(names, t.tolist())}
    stats = {"epoch": epoch, "step": run.step, **{f"loss_{n}": s / tally.steps for n, s in sums.items()},
             "dead_fraction": float(run.model.dead_mask().float().mean()), "samples": tally.samples,
             "samples_per_s": tally.samples / max(dt, 1e-9), "lr": run.sched.get_last_lr()[0], "epoch_time_s": dt,
             "resampled_units": tally.resampled}
    if hasattr(run.source, "skipped"):
        stats["skipped_samples"] = int(run.source.skipped)
    return stats


# ----------------------------------------------------------------------------- end of epoch, end of run

def end_epoch(run: Run, epoch: int, stats: dict[str, Any], steps: int, last_epoch: bool) -> None:
    """Append the epoch's log line; on the main rank write log.jsonl, last.pt, the epoch checkpoint when due,
    and one line of progress."""
    run.log_lines.append(json.dumps(stats))
    if not run.rt.is_main:
        return
    if run.replace_old is not None:
        run.replace_old()
        run.replace_old = None
    write_log(run)  # the log first: a last.pt always has its epoch's line (--resume drops lines past it)
    state = dict(optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), epoch=epoch, step=run.step,
                 train_config=asdict(run.cfg), data=run.identity, rng=rng_state(run), **run.extra)
    save_checkpoint(run.out_dir / "last.pt", run.model, **state)
    if run.save_every and ((epoch + 1) % run.save_every == 0 or last_epoch):
        path = run.out_dir / run.epoch_name.format(epoch=epoch, n=epoch + 1)
        save_checkpoint(path, run.model, **state)
        run.saved.append(str(path))
    info(f"epoch {epoch + 1}/{run.cfg.epochs}: {steps} steps, loss {stats['loss_total']:.5g} (recon_k "
         f"{stats['loss_recon_k']:.4g}, auxk {stats['loss_auxk']:.4g}, cl {stats['loss_cl']:.4g}), dead "
         f"{stats['dead_fraction']:.1%}, {stats['samples_per_s']:.1f} samples/s")


def write_log(run: Run) -> None:
    atomic_write_text(run.out_dir / "log.jsonl", "\n".join(run.log_lines) + "\n")


def finish_run(run: Run, summary: dict[str, Any]) -> None:
    """Main rank, after the last epoch: the trained model's dead fraction on the training rows (units in no top-k
    code, added to the summary and the last log line), then csr.pt and its sidecar csr.json."""
    model, cfg = run.model, run.cfg
    if run.rows is not None:
        model.eval()
        summary["dead_fraction_rows"], summary["dead_rows_checked"] = dead_fraction_on_rows(model, run.rows)
        if run.log_lines:
            run.log_lines[-1] = json.dumps({**json.loads(run.log_lines[-1]),
                                            "dead_fraction_rows": summary["dead_fraction_rows"]})
            write_log(run)
    final = run.out_dir / "csr.pt"
    save_checkpoint(final, model, optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                    epoch=summary.get("epoch", cfg.epochs - 1), step=run.step, train_config=asdict(cfg),
                    data=run.identity, rng=rng_state(run), complete=True, train_seconds=time.time() - run.t_start,
                    **run.extra)
    write_sidecar(final, model_config=model.cfg.to_dict(), train_config=asdict(cfg), steps=run.step,
                  final_stats={k: v for k, v in summary.items() if k != "epochs"}, **run.extra)
    summary["checkpoint"] = str(final)
    summary["saved"] = run.saved
