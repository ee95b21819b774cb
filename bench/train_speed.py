"""Training speed: our CSR trainer vs the authors' step, on the same batches, in one run.

    python bench/train_speed.py --train-emb .cache/fmnist/emb/train_emb.npy --eval-emb .cache/fmnist/emb/val_emb.npy

The baseline is written here exactly as the authors' reference code runs a step: three forward passes per step
(k, 4k, and k again as the second "view" for the contrastive term), each with a dense [B, hidden] code, a
dense decoder and AuxK, deadness counted per forward call, and the contrastive loss on 2B stacked rows.
Ours: one encoder pass (top-4k once), sparse decoding, sparse encoder backward (csr/model.py).
Both start from the same initial weights and see the same batches; afterwards both are evaluated by exact
1-NN top-1 at k (train split = database, eval split = queries) and by the fraction of units that never fire
on the train set. Defaults: d from the file, hidden 5120 (4·1280), k 8, batch 4096 (the paper's recipe).
The last line is `speedup N.Nx` (median step time of the baseline / ours).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.encode import dead_fraction, encode_array  # noqa: E402
from csr.io import labels_path_for, load_embeddings, load_labels  # noqa: E402
from csr.knn import search  # noqa: E402
from csr.metrics import retrieval_metrics  # noqa: E402
from csr.model import CSR, CSRConfig  # noqa: E402
from csr.train import TrainConfig, TrainData, train  # noqa: E402


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


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-emb", default=".cache/fmnist/emb/train_emb.npy", help="train split embeddings")
    p.add_argument("--eval-emb", default=".cache/fmnist/emb/val_emb.npy", help="eval split embeddings")
    p.add_argument("--hidden-size", type=int, default=None, help="latent units (default 4·d)")
    p.add_argument("--topk", type=int, default=8, help="k")
    p.add_argument("--auxk", type=int, default=512, help="AuxK units")
    p.add_argument("--batch-size", type=int, default=4096, help="batch size")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps for each method")
    p.add_argument("--seed", type=int, default=1227, help="seed (same initial weights for both)")
    args = p.parse_args(argv)

    xtr = np.asarray(load_embeddings(args.train_emb), dtype=np.float32)
    xte = np.asarray(load_embeddings(args.eval_emb), dtype=np.float32)
    ytr = load_labels(labels_path_for(args.train_emb), len(xtr))
    yte = load_labels(labels_path_for(args.eval_emb), len(xte))
    d = xtr.shape[1]
    hidden = args.hidden_size or 4 * d
    k = args.topk
    cfg = TrainConfig(batch_size=args.batch_size, epochs=10 ** 6, max_steps=args.steps, seed=args.seed)
    print(f"threads {torch.get_num_threads()}, d {d}, hidden {hidden}, k {k}, auxk {args.auxk}, "
          f"batch {args.batch_size}, {args.steps} steps each, train {xtr.shape}, eval {xte.shape}")

    torch.manual_seed(args.seed)
    ours = CSR(CSRConfig(d, hidden, k, args.auxk))
    ref = ReferenceAE(d, hidden, args.auxk, ours.cfg.dead_threshold)
    ref.load_state_dict({n: t.clone() for n, t in ours.state_dict().items()})

    # ours: the real trainer, per-step wall times from its step callback
    marks = [time.perf_counter()]
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        train(ours, TrainData(xtr), cfg, tmp, progress=False, on_step=lambda s, t: marks.append(time.perf_counter()))
    ours_times = np.diff(marks)

    # the reference: the same batches in the same order
    from csr.distributed import Runtime
    from csr.train import Batches
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    ref_times = []
    ref.train()
    epoch = 0
    while len(ref_times) < args.steps:
        for batch in Batches(TrainData(xtr), cfg, Runtime()).epoch(epoch):
            t0 = time.perf_counter()
            reference_step(ref, opt, batch.x, k, cfg)
            ref_times.append(time.perf_counter() - t0)
            print(f"  reference step {len(ref_times)}/{args.steps}: {ref_times[-1]:.2f}s", flush=True)
            if len(ref_times) == args.steps:
                break
        epoch += 1
    ref_as_csr = CSR(CSRConfig(d, hidden, k, args.auxk))
    ref_as_csr.load_state_dict(ref.state_dict())

    acc_ours, dead_ours = one_nn(ours, xtr, ytr, xte, yte, k)
    acc_ref, dead_ref = one_nn(ref_as_csr, xtr, ytr, xte, yte, k)
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    print(f"| method | median step (s) | 1-NN top-1 @k={k} (%) | units never firing on train |")
    print("|---|---|---|---|")
    print(f"| reference (3 passes, dense) | {t_ref:.3f} | {acc_ref:.2f} | {dead_ref:.1%} |")
    print(f"| ours (1 pass, sparse) | {t_ours:.3f} | {acc_ours:.2f} | {dead_ours:.1%} |")
    print(f"speedup {t_ref / t_ours:.1f}x")
    return t_ref / t_ours


if __name__ == "__main__":
    main()
