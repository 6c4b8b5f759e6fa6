"""The few torch.distributed operations the callback needs, also correct in one process.

Every rank generates its shard of the sample; the results are gathered on rank
0, which alone talks to the writer. A rank with an empty shard still takes part
in the collective (with an empty list), so no rank waits forever.

Sharded parameters: under FSDP2 (``fully_shard``) a rank holds only a slice of each
parameter, and every forward pass all-gathers the slices, a collective. Generation
stops early when every sequence of a batch has ended and ranks have shards of
different sizes, so if generation ran on sharded parameters the ranks would run
different numbers of forward passes and the collectives would deadlock.
``full_parameters`` therefore gathers every parameter once per pass (one all-gather
per FSDP unit, the same on every rank) and lets each rank generate its shard with no
collective at all; see its docstring and docs/ARCHITECTURE.md for the cost.
DeepSpeed ZeRO-3 partitions parameters the same way but cannot be tested here:
``zero3_partitioned`` lets the generator refuse it loudly instead of hanging.
"""

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch.distributed as dist

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # an older torch has no FSDP2: no model can be sharded by it
    FSDPModule = None

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if _active() else 1


def shard(items: list[T]) -> list[T]:
    """This rank's share of items (round robin, so shards differ in size by at most one)."""
    return items[rank()::world_size()]


def gather_lists(items: list[T]) -> list[T] | None:
    """Concatenation of every rank's list on rank 0; None on the other ranks."""
    if not _active():
        return list(items)
    target = 0
    gathered: list[Any] | None = [None] * world_size() if rank() == target else None
    dist.gather_object(items, gathered, dst=target)
    if gathered is None:
        return None
    return [item for part in gathered for item in (part or [])]


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's value on every rank."""
    if not _active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ----- sharded parameters (FSDP2, DeepSpeed ZeRO-3) -----


def fsdp_units(model: Any) -> list[Any]:
    """The FSDP2 (``fully_shard``) modules of model, outermost first: the same list in the
    same order on every rank, which is what makes the collectives below line up."""
    if FSDPModule is None or model is None:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def zero3_partitioned(model: Any) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the model's parameters (they carry ds_id)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


@contextlib.contextmanager
def full_parameters(model: Any) -> Iterator[int]:
    """Every FSDP2 unit's parameters all-gathered once, kept whole until the block ends.

    A collective: every rank must enter it, also a rank with nothing to generate.
    Inside, forward passes run no collective at all (each unit is unsharded and its
    reshard-after-forward is off), so ranks may run different numbers of forward
    passes. On exit the reshard-after-forward settings are put back exactly and the
    units that were sharded before are sharded again (the sharded parameters are never
    written, so they are bit-identical). Yields the number of units (0: nothing to do).
    """
    units = fsdp_units(model)
    if not units:
        yield 0
        return
    for root in _roots(units):
        root._get_fsdp_state()._lazy_init()  # what its first forward would do
    groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
    saved = [(group, group.post_forward_mesh_info) for group in groups]
    sharded = [unit for unit in units
               if not all(g.is_unsharded for g in unit._get_fsdp_state()._fsdp_param_groups)]
    try:
        for group in groups:
            group.post_forward_mesh_info = None
        for unit in units:
            unit.unshard()
        yield len(units)
    finally:
        for group, mesh_info in saved:
            group.post_forward_mesh_info = mesh_info
        for unit in sharded:
            unit.reshard()


def _roots(units: list[Any]) -> list[Any]:
    """The units no other unit contains (each becomes an FSDP root at its first forward)."""
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    return [unit for unit in units if id(unit) not in inner]
