"""A DistributedDataParallel communication hook that reduces gradient buckets through detar, so
gradients are bitwise identical across runs and bucket sizes (``bucket_cap_mb``): element i of a
bucket is the left fold of element i over the ranks, whatever bucket it lands in."""
# No `from __future__ import annotations` here: DDP compares the hook's annotations with
# dist.GradBucket and torch.futures.Future[torch.Tensor] themselves, not with strings.
from typing import Any, NamedTuple, Union

import torch
import torch.distributed as dist

from ._group import DetarGroup

_HOOK_OPS = ("avg", "sum")


class DDPHookState(NamedTuple):
    """The state of :func:`ddp_comm_hook`: the group, and ``"avg"`` (DDP's own semantics: the
    mean of the ranks' gradients) or ``"sum"``."""

    group: DetarGroup
    op: str = "avg"


def ddp_comm_hook(state: Union[DetarGroup, DDPHookState],
                  bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``model.register_comm_hook(state, ddp_comm_hook)``: all-reduce the bucket in place on
    torch's current stream (the stream DDP's later copy into ``.grad`` runs on) and return a
    completed future that also orders any other stream that waits on it after the reduction.
    ``state``: a :class:`DetarGroup` (average) or a :class:`DDPHookState`."""
    group, op = (state, "avg") if isinstance(state, DetarGroup) else state
    buffer = bucket.buffer()
    group.all_reduce(buffer, op)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=[buffer.device])
    future.set_result(buffer)
    return future


def register_ddp_comm_hook(model: Any, group: DetarGroup, op: str = "avg") -> None:
    """Make DistributedDataParallel ``model`` reduce its gradients through ``group`` (``op``:
    ``"avg"``, DDP's default, or ``"sum"``). ValueError when ``group`` does not have as many
    ranks as the model's process group (the check is the same on every rank)."""
    if op not in _HOOK_OPS:
        raise ValueError(f"op must be one of {', '.join(_HOOK_OPS)} for gradients, got {op!r}")
    ranks = dist.get_world_size(model.process_group)
    if ranks != group.world_size:
        raise ValueError(f"the model's process group has {ranks} ranks but the DetarGroup has "
                         f"{group.world_size}: build the group with "
                         "detar_cupy.torch.from_process_group(model.process_group)")
    model.register_comm_hook(DDPHookState(group, op), ddp_comm_hook)
