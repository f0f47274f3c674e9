"""Which transport moves a communicator's bytes, decided from facts every rank exchanged, so that
every rank computes the same answer. Pure Python (CPU-testable).

- ``"ipc"``: every rank on one node and P2P between every pair of GPUs: the kernels move the
  bytes themselves (:mod:`.ipc`).
- ``"hierarchical"``: several nodes, each node's ranks contiguous (ranks 0..G-1 on the first node,
  and so on), P2P inside every node, at most MAX_WORLD ranks per node and some node with two or
  more: IPC inside each node, NCCL between nodes, the fold carried from node to node (:mod:`.nccl`).
- ``"nccl"`` (flat): every other layout; NCCL moves every byte (:mod:`.nccl`).

Node membership is the hostname, or ``DETAR_NODE`` where set (so tests can simulate nodes on one
machine). ``transport="auto"`` takes IPC where it can, else NCCL (hierarchical where the layout
allows); ``transport="nccl"`` takes NCCL even on one node; ``transport="ipc"`` refuses several
nodes. The chosen name is a :class:`Choice`: a ``str`` that also says why.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._fold_abi import MAX_NCCL_WORLD
from .._kernels import MAX_WORLD

TRANSPORTS = ("auto", "ipc", "nccl")
NODE_ENV = "DETAR_NODE"
_LABEL = re.compile(r"[A-Za-z0-9._:@+-]{1,255}")


def node_label(env: Mapping[str, str] | None = None, hostname: str | None = None) -> str:
    """This process's node: ``DETAR_NODE`` if set (letters, digits and ``. _ : @ + -``, at most
    255 characters), else the hostname."""
    env = os.environ if env is None else env
    text = env.get(NODE_ENV, "").strip()
    if not text:
        return hostname if hostname is not None else socket.gethostname()
    if not _LABEL.fullmatch(text):
        raise ValueError(f"{NODE_ENV} must be a node name of letters, digits and . _ : @ + - "
                         f"(at most 255 characters), got {text!r}; ranks with the same "
                         f"{NODE_ENV} share a node")
    return text


def check_transport(transport: object) -> str:
    """``transport`` if it names a transport, else ValueError."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got "
                         f"{transport!r}")
    return str(transport)


@dataclass(frozen=True)
class NodeMap:
    """Every rank's node: ``labels[r]`` names rank r's node; ``members[k]`` are the ranks of node
    k, nodes numbered in order of their lowest rank."""

    labels: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, labels: Sequence[str]) -> "NodeMap":
        order: dict[str, list[int]] = {}
        for rank, label in enumerate(labels):
            order.setdefault(label, []).append(rank)
        return cls(tuple(labels), tuple(tuple(m) for m in order.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Ranks per node."""
        return tuple(len(m) for m in self.members)

    def node_of(self, rank: int) -> int:
        """The node (index into :attr:`members`) of ``rank``."""
        return next(k for k, m in enumerate(self.members) if rank in m)

    def scattered(self) -> list[int]:
        """The nodes whose ranks are not one contiguous block."""
        return [k for k, m in enumerate(self.members) if m != tuple(range(m[0], m[0] + len(m)))]

    def describe(self, k: int) -> str:
        """``ranks 0-3 on 'a'``: node k in words."""
        ranks = self.members[k]
        if len(ranks) == 1:
            span = f"rank {ranks[0]}"
        elif ranks == tuple(range(ranks[0], ranks[-1] + 1)):
            span = f"ranks {ranks[0]}-{ranks[-1]}"
        else:
            span = "ranks " + ", ".join(map(str, ranks))
        return f"{span} on {self.labels[ranks[0]]!r}"


class Choice(str):
    """The chosen transport's name (``"ipc"``, ``"nccl"`` or ``"hierarchical"``), with
    ``reason`` (why, in words) and ``nodes`` (the :class:`NodeMap`)."""

    reason: str
    nodes: NodeMap

    def __new__(cls, name: str, reason: str, nodes: NodeMap) -> "Choice":
        self = super().__new__(cls, name)
        self.reason = reason
        self.nodes = nodes
        return self


def node_p2p(nodes: NodeMap, rows: Sequence[Sequence[bool]]) -> tuple[bool, ...]:
    """Per node: whether every ordered pair of its ranks can reach each other peer to peer.
    ``rows[r][q]``: rank r's view of rank q (ranks on other nodes are not read)."""
    return tuple(all(rows[r][q] for r in m for q in m if q != r) for m in nodes.members)


def choose(requested: str, nodes: NodeMap, p2p: Sequence[bool]) -> Choice:
    """The transport for ``requested`` (``"auto"``, ``"ipc"`` or ``"nccl"``) given every rank's
    node and, per node, whether all its GPU pairs have P2P (:func:`node_p2p`). ValueError for a
    layout the requested transport cannot serve."""
    check_transport(requested)
    world = len(nodes.labels)
    many = len(nodes.members) > 1
    if requested == "ipc" and many:
        raise ValueError("transport='ipc' needs every rank on one node, but "
                         + "; ".join(nodes.describe(k) for k in range(len(nodes.members)))
                         + "; use transport='nccl' (or 'auto') between nodes")
    if requested == "ipc" and world > MAX_WORLD:
        raise ValueError(f"transport='ipc' serves at most {MAX_WORLD} ranks, got {world}; use "
                         "transport='nccl' (or 'auto')")
    if requested == "ipc" or (requested == "auto" and not many and all(p2p)
                              and world <= MAX_WORLD):
        return Choice("ipc", "one node with P2P between every pair of GPUs" if requested == "auto"
                      else "requested", nodes)
    if world > MAX_NCCL_WORLD:
        raise ValueError(f"the NCCL transport serves at most {MAX_NCCL_WORLD} ranks, got "
                         f"{world}")
    flat = _why_flat(nodes, p2p)
    if flat is None:
        return Choice("hierarchical", f"{len(nodes.members)} nodes of "
                      f"{'/'.join(map(str, nodes.sizes))} ranks: IPC inside each node, NCCL "
                      "between nodes, the fold carried from node to node", nodes)
    if requested == "auto" and not many:
        flat = (f"{world} ranks, more than IPC serves ({MAX_WORLD})" if world > MAX_WORLD
                else "not every pair of GPUs on this node has P2P")
    return Choice("nccl", f"flat: {flat}", nodes)


def _why_flat(nodes: NodeMap, p2p: Sequence[bool]) -> str | None:
    """Why the hierarchical transport cannot serve this layout (None: it can)."""
    if len(nodes.members) == 1:
        return "one node"
    if max(nodes.sizes) == 1:
        return "one rank per node (nothing to share inside a node)"
    scattered = nodes.scattered()
    if scattered:
        return (f"the ranks of node {nodes.labels[nodes.members[scattered[0]][0]]!r} "
                f"({', '.join(map(str, nodes.members[scattered[0]]))}) are not contiguous; a "
                "carried fold needs each node's ranks in one block (rank r on node r // G)")
    big = [k for k, size in enumerate(nodes.sizes) if size > MAX_WORLD]
    if big:
        return (f"node {nodes.labels[nodes.members[big[0]][0]]!r} has {nodes.sizes[big[0]]} "
                f"ranks; IPC inside a node serves at most {MAX_WORLD}")
    blind = [k for k, ok in enumerate(p2p) if not ok]
    if blind:
        return (f"not every pair of GPUs on node {nodes.labels[nodes.members[blind[0]][0]]!r} "
                "has P2P")
    return None
