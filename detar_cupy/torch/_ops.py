"""The collectives as torch custom ops (namespace ``detar``), so that ``torch.compile`` traces them
without a graph break and the compiled code calls them.

An op cannot take a Python object, so a :class:`~detar_cupy.torch.DetarGroup` registers itself
here under an int handle, which the ops take instead. The schemas are written out to declare it
``int``, not the ``SymInt`` that type hints give: tracing must never make a key symbolic. Each
op's real implementation is the group's eager collective; its fake implementation runs the same
argument checks (no data needed) and returns outputs of the right shape, so the checks' errors
also surface while a graph is traced.

Op (``torch.ops.detar.*``) and the DetarGroup method it stands for: ``all_reduce``
(all_reduce_out), ``all_reduce_`` (all_reduce), ``reduce_scatter`` (reduce_scatter_out),
``reduce_scatter_into`` (reduce_scatter_tensor), ``all_gather`` (all_gather_out),
``all_gather_into`` (all_gather_into_tensor), ``broadcast_`` (broadcast),
``all_reduce_coalesced_`` (all_reduce_coalesced).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

_GROUPS: dict[int, Any] = {}
_HANDLES = itertools.count(1)


def register(group: Any) -> int:
    """A new handle under which the ops find ``group``."""
    handle = next(_HANDLES)
    _GROUPS[handle] = group
    return handle


def unregister(handle: int) -> None:
    _GROUPS.pop(handle, None)


def lookup(handle: int) -> Any:
    """The group registered under ``handle``; ValueError when there is none (closed)."""
    group = _GROUPS.get(handle)
    if group is None:
        raise ValueError(f"no open DetarGroup has handle {handle}: the group was closed (or the "
                         "handle comes from another process); make a new group, and compile "
                         "again if a compiled function used the old one")
    return group


@torch.library.custom_op("detar::all_reduce", mutates_args=(),
                         schema="(Tensor input, int group, str op, str algorithm) -> Tensor")
def all_reduce(input: Tensor, group: int, op: str, algorithm: str) -> Tensor:
    return lookup(group)._all_reduce_out(input, op, None, algorithm)


@all_reduce.register_fake
def _(input: Tensor, group: int, op: str, algorithm: str) -> Tensor:
    lookup(group)._reducible(input, "input")
    return input.new_empty(input.shape)


@torch.library.custom_op("detar::all_reduce_", mutates_args=("tensor",),
                         schema="(Tensor(a!) tensor, int group, str op, str algorithm) -> ()")
def all_reduce_(tensor: Tensor, group: int, op: str, algorithm: str) -> None:
    lookup(group)._all_reduce(tensor, op, None, algorithm)


@all_reduce_.register_fake
def _(tensor: Tensor, group: int, op: str, algorithm: str) -> None:
    lookup(group)._reducible(tensor, "tensor")


@torch.library.custom_op("detar::reduce_scatter", mutates_args=(),
                         schema="(Tensor input, int group, str op) -> Tensor")
def reduce_scatter(input: Tensor, group: int, op: str) -> Tensor:
    return lookup(group)._reduce_scatter_out(input, op, None)


@reduce_scatter.register_fake
def _(input: Tensor, group: int, op: str) -> Tensor:
    g = lookup(group)
    g._reducible(input, "input")
    return input.new_empty(g._scattered_shape(input))


@torch.library.custom_op("detar::reduce_scatter_into", mutates_args=("output",),
                         schema="(Tensor(a!) output, Tensor input, int group, str op) -> ()")
def reduce_scatter_into(output: Tensor, input: Tensor, group: int, op: str) -> None:
    lookup(group)._reduce_scatter_into(output, input, op, None)


@reduce_scatter_into.register_fake
def _(output: Tensor, input: Tensor, group: int, op: str) -> None:
    lookup(group)._reduce_scatter_pair(output, input)


@torch.library.custom_op("detar::all_gather", mutates_args=(),
                         schema="(Tensor input, int group) -> Tensor")
def all_gather(input: Tensor, group: int) -> Tensor:
    return lookup(group)._all_gather_out(input, None)


@all_gather.register_fake
def _(input: Tensor, group: int) -> Tensor:
    g = lookup(group)
    g._movable(input, "input")
    return input.new_empty(g._gathered_shape(input))


@torch.library.custom_op("detar::all_gather_into", mutates_args=("output",),
                         schema="(Tensor(a!) output, Tensor input, int group) -> ()")
def all_gather_into(output: Tensor, input: Tensor, group: int) -> None:
    lookup(group)._all_gather_into(output, input, None)


@all_gather_into.register_fake
def _(output: Tensor, input: Tensor, group: int) -> None:
    lookup(group)._all_gather_pair(output, input)


@torch.library.custom_op("detar::broadcast_", mutates_args=("tensor",),
                         schema="(Tensor(a!) tensor, int group, int src) -> ()")
def broadcast_(tensor: Tensor, group: int, src: int) -> None:
    lookup(group)._broadcast(tensor, src, None)


@broadcast_.register_fake
def _(tensor: Tensor, group: int, src: int) -> None:
    lookup(group)._movable(tensor, "tensor")


@torch.library.custom_op("detar::all_reduce_coalesced_", mutates_args=("tensors",),
                         schema="(Tensor(a!)[] tensors, int group, str op) -> ()")
def all_reduce_coalesced_(tensors: list[Tensor], group: int, op: str) -> None:
    lookup(group)._all_reduce_coalesced(tensors, op, None)


@all_reduce_coalesced_.register_fake
def _(tensors: list[Tensor], group: int, op: str) -> None:
    g = lookup(group)
    for i, t in enumerate(tensors):
        g._reducible(t, f"tensors[{i}]")
