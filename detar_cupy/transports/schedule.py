"""Schedules of the NCCL transport: for one call, the steps one rank takes, in order, as pure
data: which bytes NCCL moves where, and what our kernels fold or copy. The GPU transport
(:mod:`.nccl`) executes them; the CPU tests execute every rank's schedule with numpy in a lockstep
model of NCCL and compare the bits with :mod:`detar_cupy.reference`.

Every call opens with a fixed-size header exchange (stamp, all-gather, check): a rank whose call
differs from another's finds out on the GPU before any of the call's bytes are folded.

Paths (``Schedule.path``):

- ``gather`` (all_reduce, small): all-gather the inputs into staging, fold locally in rank order.
- ``scatter`` (all_reduce, large): all-to-all of the slices (grouped send/recv), each rank folds
  its slice in rank order, all-gather of the folded slices. The slices are two-shot's (each a
  whole number of 16-byte packs), so the arithmetic is two-shot's and so are the bits.
- ``reduce_scatter``: all-to-all of the slices, fold. ``all_gather`` / ``broadcast``: NCCL's own
  collective into staging, then a copy out.
- ``chain`` (hierarchical all_reduce and reduce_scatter): node k continues the left fold where
  node k-1 left it, carrying accumulator partials (float32 for 16-bit data) between nodes, never
  results. Inside a node, each chunk is cut into G pieces; node rank j folds piece j of the chunk
  over its node's ranks (IPC, :func:`NodeCarry`) and sends the partials to the next node's ranks
  that hold the same elements (rail j when nodes are of one size). The last node finishes the
  fold; all_reduce then passes the results along the nodes (last, 0, 1, ..., K-2) and each node
  shares them by IPC; reduce_scatter sends each result to its owner. Chunks are pipelined: at
  tick t node k folds chunk t-k, so every link is busy once the pipeline is full::

      tick:       0      1      2      3      4
      node 0:   fold0  fold1  fold2                      partials 0 -> 1 at ticks 1, 2, 3
      node 1:          fold0  fold1  fold2               (the last node's folds end in results)
      node 0:                 res0   res1   res2         results 1 -> 0 at ticks 2, 3, 4

Chunks never change bits: element i is folded over ranks 0..N-1 in order whichever chunk, slice,
piece or node it falls in. Staging is bounded (``DETAR_STAGING_BYTES``); nothing is allocated per
call.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import numpy as np

from .._fold_abi import HEADER_BYTES
from .._protocol import call_signature
from ..dtypes import DTYPES, OP_CODES
from . import ALGORITHMS, Call

#: all_reduce takes the gather path when world size x message bytes is at most this (`auto`).
#: Not measured yet: from the cost model in bench/NOTES.md (one NCCL collective of latency
#: ~10-25 us against two plus a copy; the gather path moves (N-1)·M bytes per rank against the
#: scatter path's 2(N-1)/N·M, which costs more than one collective's latency above about 1 MiB
#: of (N-1)·M on NVLink and about 0.5 MiB across nodes).
GATHER_MAX_BYTES = 1 << 20
#: Staging of the NCCL transport per rank, at least: every path then holds one pack per slot.
STAGE_PER_RANK_MIN = 1024
#: The hierarchical chain cuts a call into at least this many chunks per node (when the chunks
#: stay at least CHAIN_MIN_CHUNK bytes), so that the pipeline of K nodes fills.
CHAIN_CHUNKS_PER_NODE = 4
CHAIN_MIN_CHUNK = 256 << 10

SPACES = ("in", "out", "stage", "hdr")  # the call's input and output, staging, header slots


class Ref(NamedTuple):
    """A byte address: ``offset`` bytes into ``space`` (see SPACES)."""

    space: str
    offset: int


class Stamp(NamedTuple):
    """Kernel: this rank's call header (the next epoch, ``sig``, ``count``, ``aux``) into header
    slot ``rank``."""

    sig: int
    count: int
    aux: int


class Check(NamedTuple):
    """Kernel: compare every rank's header with this rank's; a difference fails the transport
    (MismatchError), which turns every later kernel of ours into a no-op."""


class AllGather(NamedTuple):
    """NCCL all-gather of ``nbytes`` per rank: rank q's bytes land at recv + q * nbytes."""

    send: Ref
    recv: Ref
    nbytes: int


class Broadcast(NamedTuple):
    """NCCL broadcast of ``nbytes`` from ``root``'s send into every rank's recv."""

    send: Ref
    recv: Ref
    nbytes: int
    root: int


class Send(NamedTuple):
    src: Ref
    nbytes: int
    peer: int


class Recv(NamedTuple):
    dst: Ref
    nbytes: int
    peer: int


class Group(NamedTuple):
    """NCCL point-to-point operations that run concurrently (ncclGroupStart/End)."""

    ops: tuple[Union[Send, Recv], ...]


class Fold(NamedTuple):
    """Kernel: element i of ``dst`` = the fold of the carried partial (if ``carry``) or slot 0,
    then slots in order; slot q at src + q * stride. ``carry_out``: ``dst`` gets accumulator
    partials (no finish, no rounding) instead of elements."""

    src: Ref
    stride: int
    slots: int
    carry: Ref | None
    dst: Ref
    count: int
    carry_out: bool


class Copy(NamedTuple):
    """Kernel: ``slots`` pieces of ``count`` elements, piece q from src + q * src_stride to
    dst + q * dst_stride."""

    src: Ref
    src_stride: int
    dst: Ref
    dst_stride: int
    slots: int
    count: int


class NodeCarry(NamedTuple):
    """Node collective (IPC kernel, every rank of the node): node rank j folds piece j (pieces of
    ``slice`` elements) of every node rank's ``count`` elements at ``src``, in rank order, from
    the partial at ``carry`` or from the node's first rank, into ``dst`` (partials if
    ``carry_out``, else finished elements)."""

    src: Ref
    count: int
    slice: int
    carry: Ref | None
    dst: Ref
    carry_out: bool


class NodeGather(NamedTuple):
    """Node collective (IPC all-gather): node rank j's ``count`` elements at ``src`` land at
    dst + j * count elements on every rank of the node."""

    src: Ref
    count: int
    dst: Ref


Step = Union[Stamp, Check, AllGather, Broadcast, Group, Fold, Copy, NodeCarry, NodeGather]
#: Steps that involve other ranks (all the others run on this rank alone).
MEETINGS = (AllGather, Broadcast, Group, NodeCarry, NodeGather)


@dataclass(frozen=True)
class Topology:
    """What a schedule depends on besides the call: the ranks, their nodes, the staging sizes.

    ``nodes``: the ranks of each node (contiguous when ``hierarchical``). ``stage_bytes``: this
    transport's staging buffer; ``node_half_bytes``: a half of the node's IPC staging (the node
    carry and node gather kernels' limit)."""

    world_size: int
    rank: int
    nodes: tuple[tuple[int, ...], ...]
    hierarchical: bool
    stage_bytes: int
    node_half_bytes: int

    @property
    def node(self) -> int:
        return next(k for k, m in enumerate(self.nodes) if self.rank in m)


class Schedule(NamedTuple):
    """One rank's steps for one call, with the constants its kernels need."""

    call: Call  # its dtype: the table name of the folded elements (None: data movers)
    path: str
    divisor: int  # avg's N
    steps: tuple[Step, ...]


def stage_bytes(staging_half_bytes: int, world_size: int) -> int:
    """The NCCL transport's staging buffer: both halves of ``DETAR_STAGING_BYTES`` (what the IPC
    transport holds), at least STAGE_PER_RANK_MIN per rank."""
    return max(2 * staging_half_bytes, STAGE_PER_RANK_MIN * world_size)


def two_shot_slice(length: int, parts: int, k: int) -> int:
    """Elements per slice when ``length`` elements are cut into ``parts`` slices of whole packs
    of ``k`` elements (the last slices may be short or empty): two-shot's slicing."""
    return -(-(-(-length // parts)) // k) * k


@functools.lru_cache(maxsize=1024)
def pieces(length: int, parts: int, k: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) of every slice of :func:`two_shot_slice`, in element offsets."""
    s = two_shot_slice(length, parts, k)
    return tuple((min(j * s, length), min((j + 1) * s, length)) for j in range(parts))


def _chunks(total: int, cap: int) -> list[tuple[int, int]]:
    return [(a, min(cap, total - a)) for a in range(0, total, cap)]


def _floor(n: int, k: int) -> int:
    return n // k * k


def _resolved(call: Call, topo: Topology) -> str:
    """The path of a call (all_reduce's algorithm resolved by size)."""
    if call.collective != "all_reduce":
        if call.collective == "reduce_scatter" and topo.hierarchical:
            return "chain"
        return call.collective
    if call.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {call.algorithm!r}; one of {', '.join(ALGORITHMS)}")
    small = (call.algorithm in ("ll", "one_shot") or topo.world_size == 1
             or (call.algorithm == "auto"
                 and topo.world_size * call.count * call.itemsize <= GATHER_MAX_BYTES))
    if small:
        return "gather"
    return "chain" if topo.hierarchical else "scatter"


def plan(topo: Topology, call: Call) -> Schedule:
    """The schedule of ``call`` on rank ``topo.rank``."""
    path = _resolved(call, topo)
    n, rank, s = topo.world_size, topo.rank, call.itemsize
    if call.dtype is not None:
        dt = DTYPES[call.dtype]
        code, op_code = dt.code, OP_CODES[call.op]
    else:
        code, op_code = s, 0
    kind = {"gather": "one_shot", "scatter": "two_shot"}.get(path, call.collective)
    if call.collective == "all_reduce" and path == "chain":
        kind = "two_shot"
    aux = call.root if call.collective == "broadcast" else (
        0 if call.collective == "all_reduce" else call.count)
    sig = call_signature(kind, code, op_code, call.count, aux)
    steps: list[Step] = [Stamp(sig, call.count, aux),
                         AllGather(Ref("hdr", rank * HEADER_BYTES), Ref("hdr", 0), HEADER_BYTES),
                         Check()]
    k = 16 // s
    stage = topo.stage_bytes
    if path == "gather":
        cap = max(k, _floor(stage // (n * s), k))
        for a, length in _chunks(call.count, cap):
            steps += [AllGather(Ref("in", a * s), Ref("stage", 0), length * s),
                      Fold(Ref("stage", 0), length * s, n, None, Ref("out", a * s), length, False)]
    elif path == "scatter":
        slice_cap = max(k, _floor(stage // (2 * n * s), k))
        gather_at = n * slice_cap * s
        for a, length in _chunks(call.count, n * slice_cap):
            sl = two_shot_slice(length, n, k)
            cut = pieces(length, n, k)
            mine = cut[rank][1] - cut[rank][0]
            ops: list[Union[Send, Recv]] = []
            for q, (lo, hi) in enumerate(cut):
                if hi > lo:
                    ops.append(Send(Ref("in", (a + lo) * s), (hi - lo) * s, q))
            if mine:
                ops += [Recv(Ref("stage", q * sl * s), mine * s, q) for q in range(n)]
            steps.append(Group(tuple(ops)))
            if mine:
                steps.append(Fold(Ref("stage", 0), sl * s, n, None,
                                  Ref("stage", gather_at + rank * sl * s), mine, False))
            steps += [AllGather(Ref("stage", gather_at + rank * sl * s), Ref("stage", gather_at),
                                sl * s),
                      Copy(Ref("stage", gather_at), 0, Ref("out", a * s), 0, 1, length)]
    elif path == "reduce_scatter":
        cap = max(k, _floor(stage // n // s, k))
        for a, length in _chunks(call.count, cap):
            stride = -(-length * s // 16) * 16
            steps.append(Group(tuple([Send(Ref("in", (q * call.count + a) * s), length * s, q)
                                      for q in range(n)]
                                     + [Recv(Ref("stage", q * stride), length * s, q)
                                        for q in range(n)])))
            steps.append(Fold(Ref("stage", 0), stride, n, None, Ref("out", a * s), length, False))
    elif path == "all_gather":
        cap = max(k, _floor(stage // (n * s), k))
        for a, length in _chunks(call.count, cap):
            steps += [AllGather(Ref("in", a * s), Ref("stage", 0), length * s),
                      Copy(Ref("stage", 0), length * s, Ref("out", a * s), call.count * s, n,
                           length)]
    elif path == "broadcast":
        cap = max(k, _floor(stage // s, k))
        for a, length in _chunks(call.count, cap):
            steps.append(Broadcast(Ref("in", a * s), Ref("stage", 0), length * s, call.root))
            if rank != call.root:
                steps.append(Copy(Ref("stage", 0), 0, Ref("out", a * s), 0, 1, length))
    else:
        steps += _chain(topo, call)
    return Schedule(call, path, n, tuple(steps))


# ---- the hierarchical chain --------------------------------------------------------------------

class _ChainLayout(NamedTuple):
    """Offsets into staging of the chain's buffers, and the chunk length they hold."""

    chunk: int  # elements per chunk (a multiple of the pack)
    carry_in: int
    carry_out: int
    results: tuple[int, int]  # two, chosen by chunk parity
    tail: int  # all_reduce: the node's gathered results; reduce_scatter: this rank's, arriving


def _acc_bytes(dtype: str) -> int:
    return np.dtype(DTYPES[dtype].acc).itemsize


def _chain_layout(topo: Topology, call: Call, total: int) -> _ChainLayout:
    """The largest chunk whose buffers fit staging on every node (and whose pieces fit the node
    IPC staging), no larger than needed to cut the call into CHAIN_CHUNKS_PER_NODE chunks per
    node where those stay at least CHAIN_MIN_CHUNK bytes."""
    s, b = call.itemsize, _acc_bytes(call.dtype)
    k = 16 // s
    rs = call.collective == "reduce_scatter"

    def sizes(chunk: int) -> tuple[int, int, int, int] | None:
        worst = (0, 0, 0, 0)
        for members in topo.nodes:
            g = len(members)
            sl = two_shot_slice(chunk, g, k)
            if g > 1 and g * sl * s > topo.node_half_bytes:
                return None
            worst = tuple(max(w, v) for w, v in zip(worst, (sl * b, sl * s, g * sl * s,
                                                             chunk * s)))
        carry, res, gathered, received = worst
        need = 2 * carry + 2 * res + (received if rs else gathered)
        return worst if need <= topo.stage_bytes else None

    lo, hi = 1, max(1, topo.stage_bytes // s // k)  # in packs
    while lo < hi:  # the largest chunk (in packs) that fits
        mid = (lo + hi + 1) // 2
        if sizes(mid * k) is None:
            hi = mid - 1
        else:
            lo = mid
    want = max(-(-total // (CHAIN_CHUNKS_PER_NODE * len(topo.nodes))), CHAIN_MIN_CHUNK // s)
    chunk = min(lo, -(-want // k)) * k
    worst = sizes(chunk)
    if worst is None:
        raise ValueError(f"staging of {topo.stage_bytes} bytes cannot hold one pack per node rank "
                         "of the hierarchical transport; raise DETAR_STAGING_BYTES")
    carry, res = worst[:2]
    return _ChainLayout(chunk, 0, carry, (2 * carry, 2 * carry + res), 2 * carry + 2 * res)


def _overlaps(mine: tuple[int, int],
              theirs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(their index, start, stop) of every nonempty overlap of ``mine`` with ``theirs``."""
    out = []
    for j, (lo, hi) in enumerate(theirs):
        a, b = max(lo, mine[0]), min(hi, mine[1])
        if b > a:
            out.append((j, a, b))
    return out


def _chain(topo: Topology, call: Call) -> list[Step]:
    """The hierarchical chain (see the module docstring), for this rank, tick by tick."""
    s, b, k = call.itemsize, _acc_bytes(call.dtype), 16 // call.itemsize
    rs = call.collective == "reduce_scatter"
    n, rank = topo.world_size, topo.rank
    total = call.count * n if rs else call.count
    if total == 0:
        return []
    nodes = topo.nodes
    last = len(nodes) - 1
    me = topo.node
    members = nodes[me]
    j = members.index(rank)
    lay = _chain_layout(topo, call, total)
    chunks = _chunks(total, lay.chunk)

    def cut(node: int, length: int) -> tuple[tuple[int, int], ...]:
        return pieces(length, len(nodes[node]), k)

    # all_reduce passes results along the nodes in this order (the last node finished them)
    order = [last] + list(range(last))
    pos = order.index(me)
    ticks = len(chunks) + (2 * last if not rs else last + 1)
    steps: list[Step] = []
    for t in range(ticks):
        ops: list[Union[Send, Recv]] = []
        c = t - me  # the chunk this node folds at tick t; its partials came from node me-1
        if me > 0 and 0 <= c < len(chunks):
            my = cut(me, chunks[c][1])[j]
            for q, lo, hi in _overlaps(my, cut(me - 1, chunks[c][1])):
                ops.append(Recv(Ref("stage", lay.carry_in + (lo - my[0]) * b), (hi - lo) * b,
                                nodes[me - 1][q]))
        c = t - 1 - me  # the chunk folded last tick: its partials go to node me+1
        if me < last and 0 <= c < len(chunks):
            my = cut(me, chunks[c][1])[j]
            for q, lo, hi in _overlaps(my, cut(me + 1, chunks[c][1])):
                ops.append(Send(Ref("stage", lay.carry_out + (lo - my[0]) * b), (hi - lo) * b,
                                nodes[me + 1][q]))
        got = None  # the chunk whose results this rank holds after this tick's group
        if not rs:
            c = t - last - pos  # results pass from position pos-1 to pos at this tick
            if pos > 0 and 0 <= c < len(chunks):
                got = c
                my = cut(me, chunks[c][1])[j]
                prev = order[pos - 1]
                for q, lo, hi in _overlaps(my, cut(prev, chunks[c][1])):
                    ops.append(Recv(Ref("stage", lay.results[c % 2] + (lo - my[0]) * s),
                                    (hi - lo) * s, nodes[prev][q]))
            c = t - last - pos - 1
            if pos < last and 0 <= c < len(chunks):
                my = cut(me, chunks[c][1])[j]
                nxt = order[pos + 1]
                for q, lo, hi in _overlaps(my, cut(nxt, chunks[c][1])):
                    ops.append(Send(Ref("stage", lay.results[c % 2] + (lo - my[0]) * s),
                                    (hi - lo) * s, nodes[nxt][q]))
        else:
            c = t - last - 1  # the last node's results of chunk c go to their owners
            if 0 <= c < len(chunks):
                start, length = chunks[c]
                if me == last:
                    my = cut(me, length)[j]
                    owners = [(o * call.count - start, (o + 1) * call.count - start)
                              for o in range(n)]
                    for o, lo, hi in _overlaps(my, owners):
                        ops.append(Send(Ref("stage", lay.results[c % 2] + (lo - my[0]) * s),
                                        (hi - lo) * s, o))
                owned = (max(rank * call.count - start, 0),
                         min((rank + 1) * call.count - start, length))
                if owned[1] > owned[0]:
                    got = c
                    for q, lo, hi in _overlaps(owned, cut(last, length)):
                        ops.append(Recv(Ref("stage", lay.tail + (lo - owned[0]) * s),
                                        (hi - lo) * s, nodes[last][q]))
        if ops:
            steps.append(Group(tuple(ops)))
        c = t - me
        if 0 <= c < len(chunks):
            start, length = chunks[c]
            carry = Ref("stage", lay.carry_in) if me > 0 else None
            dst = Ref("stage", lay.carry_out if me < last else lay.results[c % 2])
            if len(members) > 1:
                sl = two_shot_slice(length, len(members), k)
                steps.append(NodeCarry(Ref("in", start * s), length, sl, carry, dst, me < last))
            else:  # a node of one rank: its whole chunk, from its own input
                steps.append(Fold(Ref("in", start * s), 0, 1, carry, dst, length, me < last))
            if me == last and not rs:
                got = c
        if got is not None:
            start, length = chunks[got]
            if rs:
                owned = (max(rank * call.count - start, 0),
                         min((rank + 1) * call.count - start, length))
                steps.append(Copy(Ref("stage", lay.tail), 0,
                                  Ref("out", (start + owned[0] - rank * call.count) * s), 0, 1,
                                  owned[1] - owned[0]))
            elif len(members) > 1:
                sl = two_shot_slice(length, len(members), k)
                steps += [NodeGather(Ref("stage", lay.results[got % 2]), sl,
                                     Ref("stage", lay.tail)),
                          Copy(Ref("stage", lay.tail), 0, Ref("out", start * s), 0, 1, length)]
            else:
                steps.append(Copy(Ref("stage", lay.results[got % 2]), 0, Ref("out", start * s), 0,
                                  1, length))
    return steps
