"""torchrun / DDP plumbing: the one place that knows about ranks, devices and the process group.

The rest of the library reaches torch.distributed only through the functions here (set-up and clean-up, the
collectives it needs: all-reduce, broadcast, all-gather of rows, broadcast of a Python object); each is a no-op
(or returns its input) when no process group is initialised."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto", gpu: int | None = None, local_rank: int = 0) -> torch.device:
    """`auto` = CUDA when present. `gpu` (the paper's `--gpu N`) picks a CUDA index for single-process runs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from csr.io import CSRError
            raise CSRError("--device cuda requested but CUDA is not available")
        index = local_rank if int(os.environ.get("WORLD_SIZE", "1")) > 1 else (gpu or 0)
        index = min(index, torch.cuda.device_count() - 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    from csr.io import CSRError
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CSRError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CSRError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CSRError(f"--device {device} requested but CUDA is not available")
    return dev


def setup(use_ddp: bool, device: str = "auto", gpu: int | None = None) -> Runtime:
    """Initialise the process group when launched by torchrun with `use_ddp` (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not use_ddp or world == 1:
        return Runtime(device=pick_device(device, gpu))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, gpu, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every rank's `t` becomes rank `src`'s (in place; a no-op without DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t.data, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (any picklable value) on every rank; `obj` itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def group() -> tuple[int, int, torch.device]:
    """(world size, rank, the device collectives run on) of the initialised process group: this rank's CUDA
    device under NCCL, the CPU under gloo."""
    nccl = dist.get_backend() == "nccl"
    return dist.get_world_size(), dist.get_rank(), torch.device("cuda", torch.cuda.current_device()) if nccl \
        else torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_rows(x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, int]:
    """The rows of `x` of every rank concatenated in rank order, and this rank's row offset in them (`x`, 0
    without DDP). With `grad`, the gather is differentiable: backward sums each rank's gradient into its rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    if grad:
        import warnings

        import torch.distributed.nn.functional as dnn
        with warnings.catch_warnings():  # deprecated in favour of a private API
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(dnn.all_gather(x))
    else:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
    return torch.cat(parts, 0), dist.get_rank() * x.shape[0]
