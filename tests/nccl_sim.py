"""A lockstep CPU model of the NCCL transport: every rank's schedules (detar_cupy.transports.
schedule) executed with numpy, NCCL's byte movement modelled by matching the ranks' operations,
our kernels by detar_cupy.reference's arithmetic. What it checks is the schedules: that every
byte goes where the fold expects it, in rank order, and that no rank waits forever.

Matching follows NCCL's rules conservatively: a collective completes when every rank is at it
(same kind, same size); a group of sends/receives completes when every peer it names is at a
group holding the matching operation (first unmatched send/receive of that pair, in order); a
node step (the IPC kernels) when every rank of the node is at it. A schedule that completes
here completes under NCCL, which can only make more progress (it need not wait for whole groups).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detar_cupy import _fold_abi, reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from detar_cupy.transports import Call
from detar_cupy.transports import schedule as S


class Deadlock(RuntimeError):
    """No rank can make progress: on a GPU the watchdog would abort."""


@dataclass
class RankState:
    topo: S.Topology
    steps: list  # (schedule, step) pairs of every call, in order
    mem: dict[str, bytearray]
    epoch: int = 0
    failed: str | None = None  # "mismatch" or "timeout" once the transport failed
    mismatch_peer: int | None = None
    pc: int = 0
    skipped: list = field(default_factory=list)  # kernels that did nothing: the rank had failed

    @property
    def current(self):
        return self.steps[self.pc] if self.pc < len(self.steps) else None


def _view(buf: bytearray, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def _put(buf: bytearray, offset: int, data: np.ndarray | bytes) -> None:
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    buf[offset:offset + len(raw)] = raw


class Sim:
    """Ranks with their memory; :meth:`run` executes every rank's programs to the end."""

    def __init__(self, topos: list[S.Topology]) -> None:
        self.ranks = [RankState(t, [], {"stage": bytearray(t.stage_bytes),
                                        "hdr": bytearray(t.world_size * _fold_abi.HEADER_BYTES)})
                      for t in topos]

    def call(self, calls: list[Call], inputs: list[bytes], outs: list[bytes]) -> list[S.Schedule]:
        """Queue one call per rank (``calls[r]``, its input bytes and its output buffer's first
        contents); the call's buffers are fresh, so consecutive calls see each other only
        through staging."""
        scheds = []
        for r, st in enumerate(self.ranks):
            sched = S.plan(st.topo, calls[r])
            scheds.append(sched)
            key = len(st.steps)
            st.mem[f"in{key}"] = bytearray(inputs[r])
            st.mem[f"out{key}"] = bytearray(outs[r])
            if calls[r].collective == "broadcast":  # in place: in and out are one buffer
                st.mem[f"out{key}"] = st.mem[f"in{key}"]
            st.steps += [(sched, step, key) for step in sched.steps]
        return scheds

    def output(self, rank: int, index: int) -> bytes:
        """The output buffer of ``rank``'s ``index``-th call."""
        keys = sorted(int(k[3:]) for k in self.ranks[rank].mem if k.startswith("out"))
        return bytes(self.ranks[rank].mem[f"out{keys[index]}"])

    # ---- memory ----------------------------------------------------------------------------
    @staticmethod
    def _buf(st: RankState, ref: S.Ref, key: int) -> bytearray:
        return st.mem[f"{ref.space}{key}"] if ref.space in ("in", "out") else st.mem[ref.space]

    def _read(self, st: RankState, ref: S.Ref, nbytes: int, key: int) -> bytes:
        buf = self._buf(st, ref, key)
        assert 0 <= ref.offset and ref.offset + nbytes <= len(buf), (ref, nbytes, len(buf))
        return bytes(buf[ref.offset:ref.offset + nbytes])

    def _write(self, st: RankState, ref: S.Ref, data: bytes, key: int) -> None:
        buf = self._buf(st, ref, key)
        assert 0 <= ref.offset and ref.offset + len(data) <= len(buf), (ref, len(data), len(buf))
        buf[ref.offset:ref.offset + len(data)] = data

    # ---- local steps (our kernels) -----------------------------------------------------------
    def _local(self, r: int) -> bool:
        """Run rank r's steps up to its next meeting; whether it moved."""
        st = self.ranks[r]
        moved = False
        while st.current is not None and not isinstance(st.current[1], S.MEETINGS):
            sched, step, key = st.current
            if isinstance(step, S.Stamp):
                st.epoch += 1
                _put(st.mem["hdr"], r * _fold_abi.HEADER_BYTES,
                     _fold_abi.header_bytes(st.epoch, step.sig, step.count, step.aux))
            elif isinstance(step, S.Check):
                self._check(r)
            elif st.failed:
                st.skipped.append(type(step).__name__)
            elif isinstance(step, S.Fold):
                self._fold(st, sched, step, key)
            elif isinstance(step, S.Copy):
                for q in range(step.slots):
                    nbytes = step.count * sched.call.itemsize
                    data = self._read(st, S.Ref(step.src.space, step.src.offset + q * step.src_stride),
                                      nbytes, key)
                    self._write(st, S.Ref(step.dst.space, step.dst.offset + q * step.dst_stride),
                                data, key)
            st.pc += 1
            moved = True
        return moved

    def _check(self, r: int) -> None:
        st = self.ranks[r]
        size = _fold_abi.HEADER_BYTES
        hdrs = [bytes(st.mem["hdr"][q * size:(q + 1) * size]) for q in range(st.topo.world_size)]
        differ = [q for q, h in enumerate(hdrs) if h != hdrs[r]]
        if differ and st.failed is None:
            st.failed, st.mismatch_peer = "mismatch", differ[0]

    def _fold(self, st: RankState, sched: S.Schedule, step: S.Fold, key: int) -> None:
        dt = DTYPES[sched.call.dtype]
        np_dt, acc_dt = numpy_dtype(dt.name), numpy_dtype(dt.acc)
        n = step.count
        slots = [np.frombuffer(self._read(st, S.Ref(step.src.space, step.src.offset + q * step.stride),
                                          n * dt.itemsize, key), dtype=np_dt)
                 for q in range(step.slots)]
        partial = None
        if step.carry is not None:
            partial = np.frombuffer(self._read(st, step.carry, n * acc_dt.itemsize, key),
                                    dtype=acc_dt)
        self._store_fold(st, sched, slots, partial, step.dst, step.carry_out, key)

    def _store_fold(self, st: RankState, sched: S.Schedule, slots: list[np.ndarray],
                    partial: np.ndarray | None, dst: S.Ref, carry_out: bool, key: int) -> None:
        op = sched.call.op
        acc = reference.fold_partial(slots, op, sched.call.dtype, partial=partial)
        if carry_out:
            self._write(st, dst, acc.tobytes(), key)
        else:
            done = reference.finish(acc, op, sched.divisor, sched.call.dtype)
            self._write(st, dst, done.tobytes(), key)

    # ---- meetings (NCCL, IPC) ----------------------------------------------------------------
    def _collective(self) -> bool:
        cur = [st.current for st in self.ranks]
        if any(c is None or not isinstance(c[1], (S.AllGather, S.Broadcast)) for c in cur):
            return False
        kinds = {(type(c[1]).__name__, c[1].nbytes, getattr(c[1], "root", None)) for c in cur}
        if len(kinds) > 1:
            raise Deadlock(f"ranks entered different collectives: {sorted(kinds)}")
        step0 = cur[0][1]
        if isinstance(step0, S.AllGather):
            sent = [self._read(st, c[1].send, c[1].nbytes, c[2]) for st, c in zip(self.ranks, cur)]
            for st, c in zip(self.ranks, cur):
                self._write(st, c[1].recv, b"".join(sent), c[2])
        else:
            root = step0.root
            data = self._read(self.ranks[root], cur[root][1].send, step0.nbytes, cur[root][2])
            for st, c in zip(self.ranks, cur):
                self._write(st, c[1].recv, data, c[2])
        for st in self.ranks:
            st.pc += 1
        return True

    def _group_ops(self, r: int, kind: type, peer: int) -> list:
        return [o for o in self.ranks[r].current[1].ops if isinstance(o, kind) and o.peer == peer]

    def _groups(self) -> bool:
        """Complete the largest set of groups whose every operation is matched by a peer's
        current group: the k-th send of a to b with the k-th receive of b from a, same size."""
        live = {r for r, st in enumerate(self.ranks)
                if st.current is not None and isinstance(st.current[1], S.Group)}
        while True:
            drop = set()
            for r in live:
                for peer in {o.peer for o in self.ranks[r].current[1].ops}:
                    if peer not in live:
                        drop.add(r)
                        continue
                    for kind, theirs in ((S.Send, S.Recv), (S.Recv, S.Send)):
                        a, b = self._group_ops(r, kind, peer), self._group_ops(peer, theirs, r)
                        if len(a) != len(b):
                            drop.add(r)
                        elif any(x.nbytes != y.nbytes for x, y in zip(a, b)):
                            raise Deadlock(f"rank {r} and rank {peer} disagree on the sizes of "
                                           f"their transfers: {a} / {b}")
            if not drop:
                break
            live -= drop
        if not live:
            return False
        outbox: dict[tuple[int, int], list[bytes]] = {}
        for r in live:  # every send's bytes, read before any receive writes
            st = self.ranks[r]
            _, group, key = st.current
            for op in group.ops:
                if isinstance(op, S.Send):
                    outbox.setdefault((r, op.peer), []).append(self._read(st, op.src, op.nbytes,
                                                                          key))
        for r in live:
            st = self.ranks[r]
            _, group, key = st.current
            for op in group.ops:
                if isinstance(op, S.Recv):
                    self._write(st, op.dst, outbox[(op.peer, r)].pop(0), key)
            st.pc += 1
        return True

    def _node_steps(self) -> bool:
        moved = False
        for st in self.ranks:
            topo = st.topo
            members = topo.nodes[topo.node]
            if st.topo.rank != members[0]:
                continue
            cur = [self.ranks[m].current for m in members]
            if any(c is None or not isinstance(c[1], (S.NodeCarry, S.NodeGather)) for c in cur):
                continue
            shapes = {(type(c[1]).__name__, c[1].count, getattr(c[1], "slice", None)) for c in cur}
            if len(shapes) > 1:
                raise Deadlock(f"node ranks {members} at different node steps: {sorted(shapes)}")
            if isinstance(cur[0][1], S.NodeCarry):
                self._node_carry(members, cur)
            else:
                self._node_gather(members, cur)
            for m in members:
                self.ranks[m].pc += 1
            moved = True
        return moved

    def _node_carry(self, members: tuple[int, ...], cur: list) -> None:
        sched, step0, _ = cur[0]
        if any(self.ranks[m].failed for m in members):  # a failed rank skips the whole kernel:
            for m in members:  # its node peers time out at the barrier
                self.ranks[m].failed = self.ranks[m].failed or "timeout"
            return
        dt = DTYPES[sched.call.dtype]
        np_dt, acc_dt = numpy_dtype(dt.name), numpy_dtype(dt.acc)
        g, s = len(members), dt.itemsize
        cut = S.pieces(step0.count, g, 16 // s)
        ins = [self._read(self.ranks[m], c[1].src, step0.count * s, c[2])
               for m, c in zip(members, cur)]
        for j, (m, c) in enumerate(zip(members, cur)):
            _, step, key = c
            lo, hi = cut[j]
            slots = [np.frombuffer(x[lo * s:hi * s], dtype=np_dt) for x in ins]
            if hi == lo:
                continue
            partial = None
            if step.carry is not None:
                partial = np.frombuffer(self._read(self.ranks[m], step.carry,
                                                   (hi - lo) * acc_dt.itemsize, key), dtype=acc_dt)
            self._store_fold(self.ranks[m], sched, slots, partial, step.dst, step.carry_out, key)

    def _node_gather(self, members: tuple[int, ...], cur: list) -> None:
        sched, step0, _ = cur[0]
        nbytes = step0.count * sched.call.itemsize
        parts = [self._read(self.ranks[m], c[1].src, nbytes, c[2]) for m, c in zip(members, cur)]
        for m, c in zip(members, cur):
            self._write(self.ranks[m], c[1].dst, b"".join(parts), c[2])

    def run(self) -> None:
        """Execute until every rank is done; Deadlock when no rank can move."""
        while any(st.current is not None for st in self.ranks):
            moved = False
            for r in range(len(self.ranks)):
                moved |= self._local(r)
            moved |= self._collective()
            moved |= self._groups()
            moved |= self._node_steps()
            if not moved:
                where = {r: type(st.current[1]).__name__ if st.current else "done"
                         for r, st in enumerate(self.ranks)}
                raise Deadlock(f"no rank can move: {where}")


def topologies(world: int, node_sizes: tuple[int, ...] | None, stage_half: int,
               node_half: int | None = None) -> list[S.Topology]:
    """Every rank's Topology: flat when ``node_sizes`` is None, else contiguous nodes."""
    if node_sizes is None:
        nodes = (tuple(range(world)),)
    else:
        assert sum(node_sizes) == world
        starts = np.cumsum((0,) + node_sizes)
        nodes = tuple(tuple(range(starts[i], starts[i + 1])) for i in range(len(node_sizes)))
    stage = S.stage_bytes(stage_half, world)
    return [S.Topology(world, r, nodes, node_sizes is not None, stage,
                       node_half if node_half is not None else stage_half)
            for r in range(world)]
