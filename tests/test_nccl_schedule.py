"""The NCCL transport's schedules on the CPU: every rank's steps executed by a lockstep model of
NCCL (nccl_sim), our kernels by the reference's arithmetic, for world sizes 1-8, flat and
hierarchical node layouts, every collective, dtype and op, and sizes from empty to chunked many
times over small staging. The bits must be detar_cupy.reference's on every rank. Also the plans'
own rules: slice arithmetic, chunk bounds, the call header."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import nccl_sim as NS
from detar_cupy import _fold_abi, reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from detar_cupy.transports import Call
from detar_cupy.transports import schedule as S
from gpu_cases import random_values

STAGE = 256  # DETAR_STAGING_BYTES (per half) here: the smallest allowed, so calls chunk early
NODE_STAGE = 1024  # the same for the hierarchical layouts (whose node IPC buffers are halves)
LAYOUTS = [(2, 2), (2, 2, 2), (3, 3), (2, 3), (3, 2), (1, 3), (3, 1), (1, 1, 2), (4, 4),
           (2, 2, 2, 2), (1, 7), (3, 5)]
COUNTS = (0, 1, 37, 1003, 4099)


def _values(dtype: str, count: int, seed: tuple) -> np.ndarray:
    with np.errstate(all="ignore"):  # specials cast to 16-bit types overflow on purpose
        return random_values(np.random.default_rng(seed), dtype, count)


def _call(coll: str, dtype: str, op: str, count: int, alg: str = "auto", root: int = 0) -> Call:
    reducing = coll in ("all_reduce", "reduce_scatter")
    return Call(coll, dtype if reducing else None, DTYPES[dtype].itemsize, op if reducing else "-",
                count, alg if coll == "all_reduce" else "-", root)


def _case(world: int, coll: str, dtype: str, op: str, count: int, seed: int, root: int = 0):
    """(every rank's input, every rank's expected output) of one call."""
    n_in = count * world if coll == "reduce_scatter" else count
    xs = [_values(dtype, n_in, (seed, r)) for r in range(world)]
    if coll == "all_reduce":
        want = [reference.all_reduce(xs, op)] * world
    elif coll == "reduce_scatter":
        want = reference.reduce_scatter(xs, op)
    elif coll == "all_gather":
        want = [reference.all_gather(xs)] * world
    else:
        want = [reference.broadcast(xs, root)] * world
    return xs, want


def simulate(world: int, nodes: tuple[int, ...] | None, calls: list[tuple],
             stage: int = STAGE) -> list[S.Schedule]:
    """Run ``calls`` [(collective, dtype, op, count, algorithm, root), ...] back to back on one
    simulated communicator; assert every rank's every output against the reference. Returns
    rank 0's schedules."""
    sim = NS.Sim(NS.topologies(world, nodes, stage))
    wants, first = [], []
    for i, (coll, dtype, op, count, alg, root) in enumerate(calls):
        xs, want = _case(world, coll, dtype, op, count, 1000 + i, root)
        poison = [_values(dtype, w.size, (7, i, r)).tobytes() for r, w in enumerate(want)]
        if coll == "broadcast":  # in place: non-roots' buffers start as poison
            ins = [x.tobytes() if r == root else poison[r] for r, x in enumerate(xs)]
        else:
            ins = [x.tobytes() for x in xs]
        scheds = sim.call([_call(coll, dtype, op, count, alg, root)] * world, ins, poison)
        first.append(scheds[0])
        wants.append(want)
    sim.run()
    for i, (call, want) in enumerate(zip(calls, wants)):
        for r in range(world):
            got = np.frombuffer(sim.output(r, i), dtype=numpy_dtype(call[1]))
            assert reference.bits_equal(got, want[r].reshape(-1)), (
                f"rank {r} call {i} {call} ({first[i].path}) differs from the reference")
    assert all(st.failed is None for st in sim.ranks)
    return first


def _ops(dtype: str, i: int) -> str:
    ops = DTYPES[dtype].ops
    return ops[i % len(ops)]


# ---- bits against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["one_shot", "two_shot", "auto"])
@pytest.mark.parametrize("world", range(1, 9))
def test_flat_all_reduce_is_the_reference(world: int, alg: str) -> None:
    calls = [("all_reduce", dtype, _ops(dtype, world + i), count, alg, 0)
             for i, (dtype, count) in enumerate(itertools.product(DTYPES, COUNTS))]
    paths = {s.path for s in simulate(world, None, calls)}
    # auto: these calls are small (N x bytes <= GATHER_MAX_BYTES); large ones are below
    assert paths == ({"scatter"} if alg == "two_shot" and world > 1 else {"gather"})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_every_op_of_the_float_types(world: int, dtype: str) -> None:
    simulate(world, None, [("all_reduce", dtype, op, count, alg, 0)
                           for op in DTYPES[dtype].ops for count in (13, 3001)
                           for alg in ("one_shot", "two_shot")])


@pytest.mark.parametrize("world", range(1, 9))
def test_flat_reduce_scatter_all_gather_broadcast(world: int) -> None:
    calls = []
    for i, dtype in enumerate(DTYPES):
        for count in (0, 5, 1001):
            calls.append(("reduce_scatter", dtype, _ops(dtype, i), count, "-", 0))
    for i, (dtype, count) in enumerate(itertools.product(("uint8", "float16", "float32",
                                                          "float64", "complex128"), COUNTS)):
        calls += [("all_gather", dtype, "-", count, "-", 0),
                  ("broadcast", dtype, "-", count, "-", i % world)]
    simulate(world, None, calls)


def _dtype_share(layout_index: int, every: int = 2) -> list[str]:
    """Every ``every``-th dtype, shifted per layout: all dtypes over the layouts together."""
    names = list(DTYPES)
    return names[layout_index % every::every]


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=["x".join(map(str, n)) for n in LAYOUTS])
def test_hierarchical_all_reduce_is_the_reference(i: int) -> None:
    nodes = LAYOUTS[i]
    calls = [("all_reduce", dtype, _ops(dtype, i + j), count, "two_shot", 0)
             for j, (dtype, count) in enumerate(itertools.product(_dtype_share(i),
                                                                  (0, 1, 37, 1003, 4099)))]
    calls.append(("all_reduce", "float16", "sum", 100, "auto", 0))  # small: the gather path
    paths = [s.path for s in simulate(sum(nodes), nodes, calls, NODE_STAGE)]
    assert set(paths[:-1]) == {"chain"} and paths[-1] == "gather"


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=["x".join(map(str, n)) for n in LAYOUTS])
def test_hierarchical_reduce_scatter_and_movers(i: int) -> None:
    nodes = LAYOUTS[i]
    world = sum(nodes)
    calls = [("reduce_scatter", dtype, _ops(dtype, i + j), count, "-", 0)
             for j, (dtype, count) in enumerate(itertools.product(_dtype_share(i, 3),
                                                                  (0, 1, 37, 700)))]
    calls += [("all_gather", "float16", "-", 333, "-", 0),
              ("broadcast", "int32", "-", 1001, "-", world - 1)]
    paths = {s.path for s in simulate(world, nodes, calls, NODE_STAGE)}
    assert paths == {"chain", "all_gather", "broadcast"}


@pytest.mark.parametrize("nodes", [None, (2, 2), (1, 2, 1)])
def test_default_staging_sizes(nodes) -> None:
    """The defaults (32 MiB staging halves) with calls that still fit one chunk."""
    world = 4
    paths = [s.path for s in simulate(
        world, nodes, [("all_reduce", "bfloat16", "sum", 70_000, "two_shot", 0),
                       ("reduce_scatter", "float32", "max", 20_000, "-", 0),
                       ("all_reduce", "int16", "prod", 3, "auto", 0),
                       ("all_reduce", "float32", "avg", 300_000, "auto", 0)], stage=32 << 20)]
    large = "scatter" if nodes is None else "chain"
    assert paths == [large, "reduce_scatter" if nodes is None else "chain", "gather", large]


# ---- mismatched calls ---------------------------------------------------------------------------

MISMATCHES = {
    "count": dict(count=1001),
    "dtype": dict(dtype="bfloat16"),
    "op": dict(op="max"),
    "algorithm": dict(alg="one_shot"),
    "collective": dict(coll="reduce_scatter"),
}


@pytest.mark.parametrize("nodes", [None, (2, 2)])
@pytest.mark.parametrize("what", sorted(MISMATCHES))
def test_a_mismatch_fails_every_rank_before_anything_is_folded(what: str, nodes) -> None:
    world = 4
    base = dict(coll="all_reduce", dtype="float16", op="sum", count=3000, alg="two_shot")
    odd = {**base, **MISMATCHES[what]}
    sim = NS.Sim(NS.topologies(world, nodes, NODE_STAGE))
    calls = [_call(**(odd if r == world - 1 else base)) for r in range(world)]
    poison = [bytes([0xA5]) * (c.count * c.itemsize) for c in calls]
    ins = [_values(c.dtype, c.count * (world if c.collective == "reduce_scatter" else 1),
                   (3, r)).tobytes() for r, c in enumerate(calls)]
    sim.call(calls, ins, poison)
    try:
        sim.run()
    except NS.Deadlock:
        pass  # on a GPU the watchdog aborts NCCL here
    for r, st in enumerate(sim.ranks):
        assert st.failed == "mismatch", (r, st.failed)
        assert st.mismatch_peer == (world - 1 if r < world - 1 else 0)
        assert sim.output(r, 0) == poison[r], f"rank {r} wrote its output after a mismatch"


# ---- the plans' own rules -----------------------------------------------------------------------

def test_slices_are_two_shots() -> None:
    """The scatter path cuts as the two-shot kernel does (collectives.hip: slice =
    ((count + N - 1) / N + K - 1) / K * K), so each rank folds the same elements."""
    for n, k, count in itertools.product(range(1, 9), (1, 2, 4, 8, 16), (0, 1, 7, 100, 4097)):
        want = ((count + n - 1) // n + k - 1) // k * k
        assert S.two_shot_slice(count, n, k) == want
        cut = S.pieces(count, n, k)
        assert cut[0][0] == 0 and cut[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(cut, cut[1:]))


@pytest.mark.parametrize("nodes", [None] + LAYOUTS[:6])
@pytest.mark.parametrize("dtype", ["int8", "float16", "complex128"])
def test_chunks_fit_staging_and_node_buffers(nodes, dtype: str) -> None:
    """Every staging extent a step touches lies inside staging; the partials and node buffers
    the kernels access by whole packs are 16-byte aligned; node carry pieces fit the node's IPC
    staging; the chain's chunks cover the call."""
    world = 6 if nodes is None else sum(nodes)
    for topo in NS.topologies(world, nodes, NODE_STAGE):
        g = len(topo.nodes[topo.node])
        for coll, count in itertools.product(("all_reduce", "reduce_scatter"), (1, 3001, 20_000)):
            sched = S.plan(topo, _call(coll, dtype, "sum", count, "two_shot"))
            covered = 0
            for step in sched.steps:
                for ref, nbytes in _extents(step, sched):
                    if ref.space == "stage":
                        assert ref.offset + nbytes <= topo.stage_bytes, (step, topo.stage_bytes)
                if isinstance(step, (S.Fold, S.NodeCarry)):
                    packed = [step.carry] + ([step.dst] if step.carry_out else [])
                    if isinstance(step, S.NodeCarry):
                        packed.append(step.dst)
                    assert all(r.offset % 16 == 0 for r in packed if r is not None), step
                if isinstance(step, S.NodeCarry):
                    assert g * step.slice * sched.call.itemsize <= topo.node_half_bytes
                    assert step.slice % (16 // sched.call.itemsize) == 0
                    covered += step.count
            if sched.path == "chain" and g > 1:
                total = count * (world if coll == "reduce_scatter" else 1)
                assert covered == total


def _extents(step: S.Step, sched: S.Schedule):
    """(ref, bytes) that a step reads or writes, as far as staging bounds go."""
    s = sched.call.itemsize
    if isinstance(step, S.Group):
        return [(op.src if isinstance(op, S.Send) else op.dst, op.nbytes) for op in step.ops]
    if isinstance(step, (S.AllGather, S.Broadcast)):
        n = sched.divisor if isinstance(step, S.AllGather) else 1
        return [(step.send, step.nbytes), (step.recv, step.nbytes * n)]
    if isinstance(step, S.Fold):
        return [(step.src, (step.slots - 1) * step.stride + step.count * s)]
    if isinstance(step, S.Copy):
        return [(step.src, (step.slots - 1) * step.src_stride + step.count * s)]
    return []


def test_chain_pipelines_large_calls() -> None:
    """A large call is cut into at least two chunks per node, each node folding at its own tick."""
    topo = NS.topologies(8, (4, 4), 32 << 20)[0]
    sched = S.plan(topo, _call("all_reduce", "bfloat16", "sum", 64 << 20, "two_shot"))
    carries = [s for s in sched.steps if isinstance(s, S.NodeCarry)]
    assert len(carries) >= 4 and len({c.count for c in carries[:-1]}) == 1


def test_every_call_opens_with_the_header_exchange() -> None:
    topo = NS.topologies(3, None, STAGE)[1]
    for call in (_call("all_reduce", "float32", "sum", 0), _call("broadcast", "int8", "-", 9,
                                                                    root=2)):
        stamp, gather, check = S.plan(topo, call).steps[:3]
        assert isinstance(stamp, S.Stamp) and isinstance(check, S.Check)
        assert gather == S.AllGather(S.Ref("hdr", _fold_abi.HEADER_BYTES), S.Ref("hdr", 0),
                                     _fold_abi.HEADER_BYTES)
        assert stamp.count == call.count


def test_header_signatures_tell_calls_apart() -> None:
    topo = NS.topologies(4, None, STAGE)[0]
    sigs = {S.plan(topo, _call(c, d, o, n, a)).steps[0]
            for c in ("all_reduce", "reduce_scatter") for d in ("float16", "bfloat16")
            for o in ("sum", "max") for n in (1000, 1001) for a in ("one_shot", "two_shot")}
    assert len(sigs) == 2 * 2 * 2 * 2 + 2 * 2 * 2  # reduce_scatter has no algorithm


def test_header_encoding_round_trips_and_is_rendered_with_its_offsets() -> None:
    raw = _fold_abi.header_bytes(7, 0xDEADBEEF << 32 | 0xFEED, 1 << 40, 3)
    assert len(raw) == _fold_abi.HEADER_BYTES == 32
    h = _fold_abi.read_header(raw)
    assert (h.epoch, h.sig, h.count, h.aux) == (7, 0xDEADBEEF << 32 | 0xFEED, 1 << 40, 3)
    text = _fold_abi.c_source()
    for cls, name in ((_fold_abi.FoldArgs, "FoldArgs"), (_fold_abi.CallHeader, "CallHeader")):
        for field, _ in cls._fields_:
            assert f"__builtin_offsetof({name}, {field}) == {getattr(cls, field).offset}" in text
        assert f"sizeof({name}) == {cls().__sizeof__() if False else _size(cls)}" in text


def _size(cls) -> int:
    import ctypes

    return ctypes.sizeof(cls)


def test_staging_holds_one_pack_per_rank_at_least() -> None:
    assert S.stage_bytes(256, 8) == 8192 and S.stage_bytes(32 << 20, 8) == 64 << 20
