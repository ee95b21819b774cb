"""AuxK term alone: the dense code over the dead units (GEMMs) vs gathered (row, unit) pairs, forward + backward.

    python bench/auxk_speed.py                          # B 4096, d 1280, 5120 units, auxk 512, 70 / 90 / 98 % dead
    python bench/auxk_speed.py --dead 0.1 0.2 --auxk 512 --precision bf16

What `csr/model.py` chooses between (`DENSE_AUXK_RATIO`): `_DeadUnitsCode` (a `[B, n_dead]` code, four GEMMs) and
`_SparseCode` over the `[B, auxk]` selected pairs (`embedding_bag` gathers), on the same selected units and values,
tied decoder, random weights and inputs. Each round times both, one after the other (A/B/A/B...), and the report
is the median of the within-round ratios, so load arriving during the run hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import csr.model  # noqa: E402
from csr.model import CSR, _DeadUnitsCode, _SparseCode  # noqa: E402
from csr.precision import select_topk  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--auxk", type=int, default=512)
    p.add_argument("--dead", type=float, nargs="+", default=[0.7, 0.9, 0.98], help="shares of dead units")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    csr.model.DENSE_AUXK_RATIO = float("inf")  # always build the dense code here; the pairs are built below
    B, d, H = args.batch_size, args.dim, args.hidden
    weight = (torch.randn(H, d) / d ** 0.5).requires_grad_()
    pre_bias, latent_bias = torch.zeros(d, requires_grad=True), torch.zeros(H, requires_grad=True)
    xc, target = torch.randn(B, d), torch.randn(B, d)
    params = (pre_bias, weight, latent_bias, None)
    print(f"B {B}, d {d}, {H} units, auxk {args.auxk}, {args.precision}, threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds")
    print("| dead units | dense code (s) | pairs (s) | pairs / dense |")
    print("|---|---|---|---|")
    for share in args.dead:
        dead = torch.zeros(H, dtype=torch.bool)
        dead[torch.randperm(H)[:int(share * H)]] = True
        a = min(args.auxk, int(dead.sum()))
        with torch.no_grad():
            pre = xc @ weight.T
            _, units, z, _ = CSR._aux_code(pre.clone(), dead, a)
            vals, idx = select_topk(pre.clone(), a, exclude=~dead, sorted=False)

        def dense():
            ((_DeadUnitsCode.apply(xc, *params, units, z, args.precision) - target) ** 2).mean().backward()

        def pairs():
            _, rec, _ = _SparseCode.apply(xc, *params, idx, vals, a, args.precision)
            ((rec - target) ** 2).mean().backward()

        times: dict[str, list[float]] = {"dense": [], "pairs": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, fn in (("dense", dense), ("pairs", pairs)):
                weight.grad = None
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append(time.perf_counter() - t0)
        ratio = statistics.median(tp / td for tp, td in zip(times["pairs"], times["dense"]))
        print(f"| {int(dead.sum())} | {statistics.median(times['dense']):.3f} | {statistics.median(times['pairs']):.3f} "
              f"| {ratio:.2f} |")


if __name__ == "__main__":
    main()
