"""The few torch.distributed operations the callback needs, also correct in one process.

Every rank generates its shard of the sample; the results are gathered on rank
0, which alone talks to the writer. A rank with an empty shard still takes part
in the collective (with an empty list), so no rank waits forever.
"""

from typing import Any, TypeVar

import torch.distributed as dist

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
