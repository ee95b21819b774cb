"""Number format of the CSR encoder's dense matmul: fp32 (the paper) or bf16 inputs with fp32 accumulation.

`--precision` (csr/cli.py) resolves here to "fp32" or "bf16" once per run (`resolve_precision`); the model stores
the result in its config, so training and encoding select codes the same way. In bf16 the dense pre-activation
`(x - b_pre) W^T + b_lat` runs with bf16 operands (fp32 accumulation; the output is bf16 on CPU, fp32 on CUDA),
the top-k is chosen from it with ties broken by the lowest unit index (`select_topk`), and the selected units'
values are recomputed exactly in fp32 (`pair_dots`). Master weights, gradients and losses stay fp32.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from csr.io import CSRError

PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def cpu_bf16_hardware() -> str:
    """The CPU's native bf16 matmul support: "amx_bf16", "avx512_bf16" or "" (none: bf16 is emulated, slower)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return ""


def bf16_hardware(device: torch.device) -> str:
    """What runs bf16 matmuls natively on `device` ("" when nothing does)."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else ""
    return cpu_bf16_hardware() if device.type == "cpu" else ""


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """(fp32 | bf16, one line saying which path runs) for a `--precision` value on `device`.

    `auto` is bf16 where the hardware has native bf16 matmuls (CUDA, CPUs with AMX or AVX-512 BF16), else fp32;
    an explicit bf16 runs anywhere (emulated, slower, on other CPUs)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise CSRError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    hw = bf16_hardware(device)
    chosen = ("bf16" if hw else "fp32") if precision == "auto" else precision
    if chosen == "fp32":
        why = "" if precision == "fp32" else f" (no native bf16 matmul on {device.type})"
        return "fp32", f"precision: fp32 encoder matmul{why}"
    path = {"cuda": "CUDA bf16 GEMM, fp32 output", "amx_bf16": "CPU AMX bf16 (oneDNN)",
            "avx512_bf16": "CPU AVX-512 BF16 (oneDNN)"}.get(hw, f"emulated bf16 on {device.type} (no native support: slower)")
    return "bf16", f"precision: bf16 encoder matmul with fp32 accumulation, {path}"


def encoder_preactivation(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str) -> torch.Tensor:
    """Dense `xc @ W^T + b` (`xc` = centred input): fp32, or bf16 operands with fp32 accumulation."""
    if precision == "fp32":
        return F.linear(xc.float(), weight.float(), bias.float())
    xb, wb = xc.to(torch.bfloat16), weight.to(torch.bfloat16)
    if xc.device.type == "cuda":  # fp32 output of the bf16 GEMM
        return torch.mm(xb, wb.t(), out_dtype=torch.float32).add_(bias.float())
    return F.linear(xb, wb, bias.to(torch.bfloat16))  # oneDNN adds the bias in fp32, rounds the output once


def mm(a: torch.Tensor, b: torch.Tensor, precision: str, low_out: bool = False) -> torch.Tensor:
    """`a @ b` as fp32: fp32 operands, or bf16 operands with fp32 accumulation (CPU: the output rounded to bf16
    once). `low_out`: on CPU in bf16, return that bf16 output as it is (for a product that feeds another bf16
    GEMM: the same numbers without two conversions of the whole matrix)."""
    if precision == "fp32":
        return a.float() @ b.float()
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.device.type == "cuda":
        return torch.mm(ab, bb, out_dtype=torch.float32)
    out = ab @ bb
    return out if low_out else out.float()


def _tie_broken_keys(pre: torch.Tensor) -> torch.Tensor:
    """fp32 keys in the order of the bf16 values with every tie broken: the bf16 value's bits in the high half and
    `65535 - unit` in the (otherwise zero) low half, so equal positive values rank the lowest unit first (equal
    negative values, whose ReLU is 0, the highest). One pass, no sort. Needs hidden <= 65536."""
    hidden = pre.shape[-1]
    if hidden > 65536:
        raise CSRError(f"bf16 top-k supports hidden_size <= 65536, got {hidden} (use --precision fp32)")
    tie = 65535 - torch.arange(hidden, dtype=torch.int32, device=pre.device)
    keys = pre.float()
    keys.view(torch.int32).bitwise_or_(tie)
    return keys


def select_topk(pre: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values fp32, indices)` of the k largest pre-activations per row (never among `exclude` units).

    fp32 input: `torch.topk`. bf16 input: a strict order (value, then unit index: `_tie_broken_keys`), so
    top-k(K)[:k] is top-k(k) exactly and training and encoding pick the same codes. `pre` may be overwritten when `exclude` is
    given."""
    if pre.dtype == torch.bfloat16:
        keys = _tie_broken_keys(pre)
        if exclude is not None:
            keys.masked_fill_(exclude, float("-inf"))
        idx = torch.topk(keys, k, dim=-1, sorted=sorted).indices
        return pre.gather(1, idx).float(), idx
    if exclude is not None:
        pre = pre.masked_fill_(exclude, float("-inf"))
    return torch.topk(pre, k, dim=-1, sorted=sorted)


def pair_dots(rows: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`[B, K]` inner products `rows[b] . table[idx[b, j]]` without gathering `[B, K, d]` (embedding_bag's
    per-sample-weight kernel)."""
    B, K = idx.shape
    if B * K == 0:
        return rows.new_zeros(B, K)
    offsets = torch.arange(0, B * K, K, device=idx.device)
    bag = torch.arange(B, device=idx.device).repeat_interleave(K)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.contiguous(), table, idx.reshape(-1).contiguous(), offsets, bag, 0, -1)
    return out.view(B, K)
