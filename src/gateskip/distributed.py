"""Data-parallel helpers for ``torchrun --nproc_per_node N -m gateskip train ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``init_from_env`` turns
them into a process group (nccl on GPUs, gloo on CPU). Without those variables everything here is
a no-op and training runs as a single process.

Every rank draws the same global batch from the same ``PackedBatches`` stream (same seed, same
position) and keeps its own disjoint slice of rows (``shard``): the union over ranks is exactly
the batch a single process with ``world * batch_size`` rows would see, and the data position in a
checkpoint is the same for every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gateskip.errors import GateSkipError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def init_from_env() -> Dist:
    """Join the process group torchrun describes in the environment (or return ``SINGLE``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("GATESKIP_DIST_BACKEND", "") != "gloo"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise GateSkipError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun --nproc_per_node N")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def shard(batch: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's rows of a global batch: contiguous, disjoint, equal-sized slices."""
    if not d.enabled:
        return batch
    n = batch.shape[0] // d.world
    return batch[d.rank * n:(d.rank + 1) * n]


def mean_over_ranks(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Average scalar log values over ranks (one all-reduce for the whole dict)."""
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, d: Dist) -> bool:
    """True when ``flag`` is True on any rank (so that all ranks stop together, none hangs)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---- FSDP2 (``--fsdp``) ---------------------------------------------------------------------------
# Each decoder layer (with its gates) becomes one FSDP unit, the root holds embeddings and head.
# FSDP2 shards every parameter on its own (DTensor), so frozen backbone weights and trainable
# gates can share a unit. Gathering full tensors is a collective: every rank must call these.

def _full_options(rank0_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload + full_state_dict: the full tensors land on rank 0's CPU only.
    return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)


def shard_model(net) -> None:
    from torch.distributed.fsdp import fully_shard

    from gateskip.arch import decoder_layers

    for layer in decoder_layers(net):
        fully_shard(layer)
    fully_shard(net)


def gathered_trainable(net, opt) -> tuple[dict, dict]:
    """Full trainable weights and optimizer state (on rank 0; other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = {k for k, p in net.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(net, options=_full_options(True))
    optim = get_optimizer_state_dict(net, opt, options=_full_options(True))
    return {k: v for k, v in weights.items() if k in names}, optim


def full_state(net) -> dict:
    """Every weight, unsharded, on rank 0's CPU (for calibration and the gates folder)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_full_options(True))


def load_sharded(net, opt, state: dict) -> None:
    """Load full trainable weights + optimizer state (every rank read the same file) into shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _full_options(False)
    set_model_state_dict(net, state["trainable"], options=_strict_false(options))
    set_optimizer_state_dict(net, opt, state["optimizer"], options=options)


def _strict_false(options):
    from dataclasses import replace

    return replace(options, strict=False)  # the checkpoint holds only the trainable weights
