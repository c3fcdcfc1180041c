"""torch.distributed plumbing for the engine: which rank this is, joining torchrun's process
group, reductions across ranks, and errors that every rank raises together. With one process
(no process group) every call here is a no-op or the identity."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reprolab.errors import ConfigError, ReprolabError, TrainingDiverged


def world() -> tuple[int, int]:
    """-> (rank, world size) of this process: (0, 1) unless torchrun's process group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_distributed(device: torch.device) -> torch.device:
    """Join the process group of the ranks torchrun started (its environment names them);
    -> this rank's device: cuda:LOCAL_RANK with NCCL, or the CPU with gloo, where each of the
    machine's ranks takes an equal share of its cores (torchrun would leave each one thread)."""
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"{local_world} ranks on this machine and {torch.cuda.device_count()} GPUs: "
                "train.processes (torchrun's --nproc-per-node) allows one rank per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **_rendezvous_store())
        return device
    if device.type != "cpu":
        raise ConfigError(f"train.device = {device.type!r}: torch.distributed trains on CUDA "
                          "(NCCL) or the CPU (gloo); allowed under torchrun: cuda, cpu, auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local_world))
    dist.init_process_group("gloo", **_rendezvous_store())
    return device


def _rendezvous_store() -> dict[str, Any]:
    """The ranks' store, under a prefix of this attempt. torchrun hands its agent's store to
    the ranks of every restart (--max-restarts) as it is: the addresses that the ranks of a
    killed attempt left there would send the new ranks to ports nobody listens on."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"reprolab/attempt-{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def all_ranks(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point: see train.ranks."""
    exc.all_ranks = True  # type: ignore[attr-defined]
    return exc


class RankFailed(ReprolabError):
    """What failed on rank 0, raised on every other rank with the same exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def from_rank0(fn: Callable[[], Any]) -> Any:
    """fn() runs on rank 0 alone; every rank gets its result. Its failure reaches every rank
    too (as RankFailed), so no rank waits forever for a collective that rank 0 never joins."""
    rank, size = world()
    if size == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:
            box[0] = ("failed", str(exc) or type(exc).__name__, getattr(exc, "exit_code", 1))
            dist.broadcast_object_list(box, src=0)
            all_ranks(exc)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "failed":
        raise all_ranks(RankFailed(f"on rank 0: {box[0][1]}", box[0][2]))
    return box[0][1]


def same_everywhere(identity: str, what: str) -> None:
    """Refuse, on every rank, to train when the ranks' `identity` (of config, data and code)
    differ: machines with other params or data would each train something else."""
    rank, size = world()
    if size == 1:
        return
    identities: list[Any] = [None] * size
    dist.all_gather_object(identities, identity)
    other = next((r for r, i in enumerate(identities) if i != identities[0]), None)
    if other is not None:
        raise all_ranks(ConfigError(
            f"rank {other} has another {what} than rank 0 ({identities[other][:12]} vs "
            f"{identities[0][:12]}); run every machine on the same commit, params and data"
        ))


def share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of n items; the first n % world ranks take one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def all_sum(*values: torch.Tensor) -> list[float]:
    """Scalar tensors summed over all ranks, in one reduction (float64: counts stay exact)."""
    if world()[1] == 1:
        return [v.item() for v in values]  # (MPS has no float64)
    stacked = torch.stack([v.detach().double() for v in values])
    dist.all_reduce(stacked)
    return stacked.tolist()


NO_STEP = 2**62  # "no non-finite loss yet" in the cross-rank minimum of steps


def raise_if_diverged(first_bad: torch.Tensor, epoch: int) -> None:
    """The first step of the epoch whose loss was not finite on any rank. One reduction: every
    rank raises at the same check, none is left waiting in a collective."""
    if world()[1] > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    step = int(first_bad.item())
    if step != NO_STEP:
        raise all_ranks(TrainingDiverged(epoch, step))



def wrap(model: nn.Module, device: torch.device) -> tuple[nn.Module, dict[str, nn.Module]]:
    """-> (the module that takes the training steps, the BatchNorm modules it stands in for).
    One process: the model itself. Across ranks: the model in DistributedDataParallel, its
    BatchNorms synchronised over the whole global batch on CUDA (NCCL only: SyncBatchNorm
    refuses CPU tensors, so with gloo each rank normalises its own share). The stand-ins share
    their tensors with the originals, which `unwrap` puts back."""
    if world()[1] == 1:
        return model, {}
    from torch.nn.parallel import DistributedDataParallel

    batchnorms = sync_batchnorm(model) if device.type == "cuda" else {}
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return net, batchnorms


def sync_batchnorm(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm of the model replaced by a SyncBatchNorm that shares its tensors;
    -> the originals by name."""
    kinds = nn.modules.batchnorm._BatchNorm
    originals = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return originals


def unwrap(model: nn.Module, batchnorms: dict[str, nn.Module]) -> None:
    """Put the BatchNorm modules that `wrap` replaced back into the model."""
    for name, module in batchnorms.items():
        module.train(model.training)
        model.set_submodule(name, module)
