"""Training speed: our CSR step in fp32 and bf16 vs the authors' step and a plain matmul, in one run, interleaved.

    python bench/train_speed.py --train-emb .cache/fmnist/emb/train_emb.npy --eval-emb .cache/fmnist/emb/val_emb.npy
    python bench/train_speed.py --ks 8 32 --reference False          # ours vs the matmul only (fast)
    python bench/train_speed.py --fidelity --ks 2 8 32               # fp32 vs bf16 training: 1-NN top-1, dead units

Speed (default): every round times, one after the other, the authors' step (`--reference`), our trainer's step in
fp32, our step in bf16, and a plain `torch.matmul` of the encoder's shapes ([B, d] x [d, hidden]) in fp32 and in
bf16, so load that arrives during the run hits all of them alike (A/B/A/B...). Reported: the median over rounds of
each ratio measured within a round, and GFLOP/s: the matmul's 2·B·d·hidden FLOPs over its time, and for a step the
same FLOPs (its encoder forward) over the whole step's time (forward, losses, backward, Adam), i.e. how far a step is
from the speed of its one dense matmul. `--dead-fraction` of the units start dead (a trained paper-recipe model
has ~90 % dead at k = 8), so that AuxK runs as it does in training.
The authors' step is written here exactly as the authors' reference code runs it: three forward passes per step (k, 4k,
and k again as the second "view"), each with a dense [B, hidden] code, a dense decoder and AuxK, deadness counted
per forward call, and the contrastive loss on 2B stacked rows.

Fidelity (`--fidelity`): trains the demo's CSR models (`--recipes`, the paper's by default, at each k) in fp32 and
in bf16 from the same initial weights on the same batches and prints exact 1-NN top-1 (train split = database,
eval split = queries) and the fraction of units in no top-k code of the train split, for both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.cli import bool_flag, positive_int  # noqa: E402
from csr.distributed import Runtime  # noqa: E402
from csr.encode import dead_fraction, encode_array  # noqa: E402
from csr.io import labels_path_for, load_embeddings, load_labels  # noqa: E402
from csr.knn import search  # noqa: E402
from csr.metrics import retrieval_metrics  # noqa: E402
from csr.model import CSR, CSRConfig  # noqa: E402
from csr.precision import resolve_precision  # noqa: E402
from csr.recipes import RECIPES, apply_recipe  # noqa: E402
from csr.train import Batches, TrainConfig, TrainData, adam, make_scheduler, optimizer_step, step_losses, train  # noqa: E402


class ReferenceAE(nn.Module):
    """The authors' tied top-k autoencoder as their reference code runs it (dense codes, dense decoder)."""

    def __init__(self, d: int, hidden: int, auxk: int, dead_threshold: int):
        super().__init__()
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.encoder = nn.Linear(d, hidden, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(hidden))
        self.auxk, self.dead_threshold = auxk, dead_threshold
        self.register_buffer("stats_last_nonzero", torch.zeros(hidden, dtype=torch.long))

    def forward(self, x: torch.Tensor, k: int):
        pre = F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)
        vals, idx = torch.topk(pre, k, dim=-1)
        latents = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
        # the reference advances deadness on every forward call (3 per step)
        self.stats_last_nonzero *= (latents == 0).all(dim=0).long()
        self.stats_last_nonzero += 1
        dead = self.stats_last_nonzero > self.dead_threshold
        recons = latents @ self.encoder.weight + self.pre_bias
        aux = None
        if dead.any():
            a = min(self.auxk, int(dead.sum()))
            av, ai = torch.topk(pre.masked_fill(~dead, float("-inf")), a, dim=-1)
            aux = torch.zeros_like(pre).scatter(1, ai, F.relu(av)) @ self.encoder.weight
        return latents, recons, aux


def reference_step(model: ReferenceAE, opt, x: torch.Tensor, k: int, cfg: TrainConfig) -> float:
    lat_k, rec_k, aux_k = model(x, k)
    _, rec_4k, _ = model(x, 4 * k)
    lat_v, _, _ = model(x, k)  # the second "view": an identical pass
    loss = F.mse_loss(rec_k, x) + cfg.multi_k_coef * F.mse_loss(rec_4k, x)
    if aux_k is not None:
        target = (x - rec_k).detach()
        loss = loss + cfg.auxk_coef * F.mse_loss(aux_k, target) / ((target - target.mean(0)) ** 2).mean()
    u = F.normalize(torch.cat([lat_k, lat_v]), dim=1)
    s = u @ u.T / cfg.temperature
    B = x.shape[0]
    pos = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    same = torch.eye(2 * B, dtype=torch.bool)
    other_view = torch.zeros_like(same)
    other_view[torch.arange(2 * B), pos] = True
    neg = torch.exp(s).masked_fill(same | other_view, 0).sum(1)
    p = torch.exp(s[torch.arange(2 * B), pos])
    loss = loss + cfg.cl_coef * (-torch.log(p / (p + neg))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def one_nn(model: CSR, xtr, ytr, xte, yte, k: int) -> tuple[float, float]:
    db = encode_array(model, xtr, k, progress=False)
    q = encode_array(model, xte, k, progress=False)
    idx, _ = search(q, db, 1, progress=False)
    return retrieval_metrics(idx, ytr, yte, ())["top1"], dead_fraction(db)


class OurStep:
    """Our trainer's step (forward, `step_losses`, `optimizer_step`) on a model of one precision."""

    def __init__(self, model: CSR, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.opt = adam(cfg)(model)
        self.sched = make_scheduler(self.opt, cfg, 10 ** 6)

    def __call__(self, x: torch.Tensor) -> None:
        m, k = self.model, self.model.cfg.topk
        out = m(x, k=k, multi_k=4 * k, dead=m.dead_mask())
        terms = step_losses(out, x, self.cfg, m.cfg.hidden_size)
        optimizer_step(m, self.opt, self.sched, terms["total"], out["idx"][:, :k])


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def speed(args, xtr: np.ndarray, k: int) -> None:
    """Interleaved rounds of every contender at one k; prints the medians of within-round ratios."""
    d = xtr.shape[1]
    hidden = args.hidden_size or 4 * d
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)
    models = {p: CSR(CSRConfig(d, hidden, k, args.auxk, precision=p)) for p in ("fp32", "bf16")}
    models["bf16"].load_state_dict(models["fp32"].state_dict())
    n_dead = int(args.dead_fraction * hidden)
    for m in models.values():
        m.stats_last_nonzero[torch.randperm(hidden)[:n_dead]] = m.cfg.dead_threshold + 1
    steps = {f"ours {p}": OurStep(m, cfg) for p, m in models.items()}
    if args.reference:
        ref = ReferenceAE(d, hidden, args.auxk, models["fp32"].cfg.dead_threshold)
        ref.load_state_dict({n: t.clone() for n, t in models["fp32"].state_dict().items()})
        ref_opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        steps = {"reference": lambda x: reference_step(ref, ref_opt, x, k, cfg), **steps}
    w = models["fp32"].encoder.weight.detach()
    wt32, wt16 = w.t().contiguous(), w.t().contiguous().to(torch.bfloat16)
    batches = Batches(TrainData(xtr), cfg, Runtime())
    epoch = 0
    it = batches.epoch(epoch)
    times: dict[str, list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (allocations, oneDNN kernels), not reported
        batch = next(it, None)
        if batch is None:
            epoch += 1
            it = batches.epoch(epoch)
            batch = next(it)
        x = batch.x
        xb = x.to(torch.bfloat16)
        row = {"matmul fp32": timed(torch.matmul, x, wt32), "matmul bf16": timed(torch.matmul, xb, wt16)}
        for name, fn in steps.items():
            row[name] = timed(fn, x)
        if r:
            for name, t in row.items():
                times.setdefault(name, []).append(t)
            print(f"  k={k} round {r}/{args.rounds}: " + ", ".join(f"{n} {t:.3f}s" for n, t in row.items()), flush=True)
    flops = 2 * x.shape[0] * d * hidden

    def ratio(a: str, b: str) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    print(f"\nk={k}, B={x.shape[0]}, d={d}, hidden={hidden}, auxk={args.auxk}, {n_dead} units dead at the start, "
          f"{args.rounds} interleaved rounds (median of within-round ratios; GFLOP/s = 2·B·d·hidden / time)")
    print("| contender | median time (s) | x matmul fp32 | x matmul bf16 | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name in times:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {ratio(name, 'matmul fp32'):.2f} | {ratio(name, 'matmul bf16'):.2f} | "
              f"{flops / t / 1e9:.0f} |")
    if args.reference:
        print(f"speedup over the reference: fp32 {ratio('reference', 'ours fp32'):.1f}x, "
              f"bf16 {ratio('reference', 'ours bf16'):.1f}x")
    print(f"bf16 step / fp32 step: {ratio('ours bf16', 'ours fp32'):.2f}")


def fidelity(args, xtr, ytr, xte, yte) -> None:
    """fp32 vs bf16 training of the demo's models: 1-NN top-1 and dead fraction at each k."""
    d = xtr.shape[1]
    rows = []
    for recipe in args.recipes:
        for k in args.ks:
            res = {}
            for prec in ("fp32", "bf16"):
                mcfg = CSRConfig(d, args.hidden_size or 4 * d, k, args.auxk, precision=prec)
                tcfg = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, seed=args.seed)
                if recipe != "paper":
                    mcfg, tcfg = apply_recipe(recipe, mcfg, tcfg, xtr, args.hidden_size is not None)
                    mcfg = replace(mcfg, precision=prec)
                torch.manual_seed(tcfg.seed)
                model = CSR(mcfg)
                t0 = time.time()
                with tempfile.TemporaryDirectory() as tmp:
                    train(model, TrainData(xtr, ytr if tcfg.cl == "label" else None), tcfg, tmp, progress=False)
                secs = time.time() - t0
                res[prec] = (*one_nn(model, xtr, ytr, xte, yte, k), secs)
                print(f"  {recipe} k={k} {prec}: top-1 {res[prec][0]:.2f}, dead {res[prec][1]:.1%}, {secs:.0f}s",
                      flush=True)
            rows.append((recipe, k, res))
    print("\n| recipe | k | top-1 fp32 | top-1 bf16 | bf16 - fp32 | dead fp32 (%) | dead bf16 (%) | train s fp32 | train s bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for recipe, k, res in rows:
        (a32, d32, s32), (a16, d16, s16) = res["fp32"], res["bf16"]
        worst = max(worst, abs(a16 - a32))
        print(f"| {recipe} | {k} | {a32:.2f} | {a16:.2f} | {a16 - a32:+.2f} | {100 * d32:.1f} | {100 * d16:.1f} | "
              f"{s32:.0f} | {s16:.0f} |")
    print(f"largest |bf16 - fp32| top-1 gap: {worst:.2f} points")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-emb", default=".cache/fmnist/emb/train_emb.npy", help="train split embeddings")
    p.add_argument("--eval-emb", default=".cache/fmnist/emb/val_emb.npy", help="eval split embeddings (fidelity)")
    p.add_argument("--max-rows", type=int, default=8000, help="speed: use the first N train rows (0 = all)")
    p.add_argument("--hidden-size", type=int, default=None, help="latent units (default 4·d)")
    p.add_argument("--ks", type=positive_int, nargs="+", default=[8], help="k values")
    p.add_argument("--auxk", type=int, default=512, help="AuxK units")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="batch size (paper: 4096)")
    p.add_argument("--rounds", type=positive_int, default=5, help="speed: interleaved timing rounds")
    p.add_argument("--dead-fraction", type=float, default=0.9, help="speed: share of units dead at the start")
    bool_flag(p, "--reference", default=True, help="speed: time the authors' step too (slow: ~20x ours)")
    bool_flag(p, "--fidelity", default=False, help="train fp32 and bf16 models and compare their accuracy")
    p.add_argument("--recipes", nargs="+", default=["paper"], choices=["paper", *RECIPES],
                   help="fidelity: recipes to train at each k")
    p.add_argument("--epochs", type=positive_int, default=10, help="fidelity: epochs (paper: 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=1227, help="seed (same initial weights for every contender)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(resolve_precision("bf16", torch.device("cpu"))[1])
    xtr = load_embeddings(args.train_emb)
    print(f"threads {torch.get_num_threads()}, train {xtr.shape}, batch {args.batch_size}, ks {args.ks}")
    if args.fidelity:
        xtr = np.asarray(xtr, dtype=np.float32)
        xte = np.asarray(load_embeddings(args.eval_emb), dtype=np.float32)
        ytr = load_labels(labels_path_for(args.train_emb), len(xtr))
        yte = load_labels(labels_path_for(args.eval_emb), len(xte))
        fidelity(args, xtr, ytr, xte, yte)
        return
    xtr = np.asarray(xtr[: args.max_rows or len(xtr)], dtype=np.float32)
    for k in args.ks:
        speed(args, xtr, k)


if __name__ == "__main__":
    main()
