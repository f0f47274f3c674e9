"""Workers of the NCCL transport's GPU tests (module-level: spawned ranks import them by name).

Every rank shares GPU 0 (``DETAR_SHARE_GPUS=1``); NCCL accepts several ranks on one GPU only as
separate hosts, so each rank sets its own ``NCCL_HOSTID`` (NCCL then talks over sockets: about
5 ms per NCCL call, so the case lists are short samples). Simulated nodes come from
``DETAR_NODE`` per rank (rank r on node r // G).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import gpu_cases
import gpu_reliability as rel
from detar_cupy import reference

TRANSPORT_ENV = "DETAR_TEST_TRANSPORT"  # the transport= these ranks ask for
NODES_ENV = "DETAR_TEST_NODES"  # "2,2": simulated nodes of 2 and 2 ranks (unset: one node)
#: Every NCCL test rank's environment (set before spawning; per-rank values in rank_env).
ENV = {**gpu_cases.TEST_ENV, "DETAR_SHARE_GPUS": "1", "NCCL_NVLS_ENABLE": "0"}
#: Per world size, every STRIDE-th all_reduce case of the quick tier and every third case of
#: the other collectives (all dtypes, ops, algorithms and size classes), plus the chunked
#: two-shot sum of the CHUNKED dtypes (None: all). World 4 runs hierarchical, whose calls take
#: several NCCL steps each: fewer cases.
STRIDE = {2: 37, 4: 61}
CHUNKED = {2: None, 4: ("float16", "bfloat16", "float32", "int8", "complex128")}
COMPARE_DTYPES = ("float16", "bfloat16", "float32")  # cases also run on the IPC transport


def rank_env(rank: int, nodes: str | None) -> dict[str, str]:
    """One rank's own settings: its NCCL host id, and its simulated node."""
    env = {"NCCL_HOSTID": f"detar-test-host-{rank}"}
    if nodes:
        sizes = [int(g) for g in nodes.split(",")]
        starts = np.cumsum([0] + sizes)
        env["DETAR_NODE"] = f"sim-node-{int(np.searchsorted(starts, rank, side='right')) - 1}"
    return env


def make_comm(rendezvous: Any, device: int) -> Any:
    """spawn()'s ``_make_comm``: this rank's environment, then a communicator over the transport
    named by DETAR_TEST_TRANSPORT."""
    from detar_cupy.communicator import Communicator

    os.environ.update(rank_env(rendezvous.rank, os.environ.get(NODES_ENV)))
    return Communicator._from_rendezvous(rendezvous, device, os.environ[TRANSPORT_ENV])


def sampled_cases(world: int, seed: int) -> list:
    """The sample of the quick tier (gpu_cases.cases) run on ``world`` ranks: see STRIDE and
    CHUNKED (None: every dtype)."""
    every = gpu_cases.cases(world, seed)
    dtypes = CHUNKED[world]
    chunked = [c for c in every if c.kind == "all_reduce" and c.algorithm == "two_shot"
               and c.op == "sum" and (dtypes is None or c.dtype in dtypes)
               and c.count * gpu_cases.DTYPES[c.dtype].itemsize > gpu_cases.STAGE_HALF]
    picked = []
    for kind in ("all_reduce", "reduce_scatter", "all_gather", "broadcast"):
        picked += [c for c in every if c.kind == kind][::STRIDE[world] if kind == "all_reduce"
                                                       else 3]
    return picked + [c for c in chunked if c not in picked]


def run_sampled(comm: Any, world: int, seed: int) -> dict:
    """The sampled cases on this rank's NCCL-transport communicator, and the cases of
    COMPARE_DTYPES again on an IPC communicator of the same ranks: {"transport", "reason",
    "cases": {id: (ok, detail, digest)}, "ipc": {id: digest}}."""
    cases = sampled_cases(world, seed)
    out = {"transport": str(comm.transport), "reason": comm.transport.reason,
           "cases": {c.id: _run(comm, c) for c in cases}}
    node = os.environ.pop("DETAR_NODE", None)  # IPC: every rank on this one machine
    try:
        ipc = comm._beside("ipc")
    finally:
        if node is not None:
            os.environ["DETAR_NODE"] = node
    with ipc:
        out["ipc"] = {c.id: _run(ipc, c)[2] for c in cases if c.dtype in COMPARE_DTYPES}
    return out


def _run(comm: Any, case: Any) -> tuple:
    try:
        return gpu_cases.run_case(comm, case)
    except Exception as exc:  # report per case; a sticky device error fails the rest loudly
        return False, f"{type(exc).__name__}: {exc}", ""


def graph_replay(comm: Any, seed: int) -> list[tuple[str, bool, str]]:
    """Three calls (all_reduce two-shot, reduce_scatter, all_gather) captured in one CUDA graph,
    replayed twice with the outputs poisoned in between, then one eager call: every result
    bit-exact. Rows (label, ok, detail)."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    n = 3000
    xs = [np.random.default_rng([seed, r]).standard_normal(n * world).astype(np.float32)
          for r in range(world)]
    x = cp.asarray(xs[rank])
    ar, rs, ag = cp.empty(n * world, cp.float32), cp.empty(n, cp.float32), cp.empty(
        n * world * world, cp.float32)
    want = (reference.all_reduce(xs), reference.reduce_scatter(xs, "max")[rank],
            reference.all_gather(xs))
    stream = cp.cuda.Stream(non_blocking=True)
    comm.all_reduce(x, ar, algorithm="two_shot", stream=stream)  # plans made outside capture
    comm.reduce_scatter(x, rs, op="max", stream=stream)
    comm.all_gather(x, ag, stream=stream)
    stream.synchronize()
    stream.begin_capture()
    try:
        comm.all_reduce(x, ar, algorithm="two_shot", stream=stream)
        comm.reduce_scatter(x, rs, op="max", stream=stream)
        comm.all_gather(x, ag, stream=stream)
    finally:
        graph = stream.end_capture()
    rows = []
    for replay in range(2):
        for a in (ar, rs, ag):
            a.fill(np.nan)
        cp.cuda.Device().synchronize()  # the fills ran on the legacy stream
        graph.launch(stream)
        comm.synchronize(stream)
        for label, got, w in zip(("all_reduce", "reduce_scatter", "all_gather"), (ar, rs, ag),
                                 want):
            ok = reference.bits_equal(cp.asnumpy(got), w)
            rows.append((f"replay {replay} {label}", ok, ""))
    eager = comm.all_reduce(x, algorithm="two_shot")
    comm.synchronize()
    rows.append(("eager after replays", reference.bits_equal(cp.asnumpy(eager), want[0]), ""))
    return rows


def mismatch(comm: Any, seed: int) -> dict:
    """The last rank reduces one element more than the others: every rank must raise
    MismatchError (count) well within the timeout, and close cleanly."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    n = 4096 + (rank == world - 1)
    x = cp.asarray(np.random.default_rng([seed, rank]).standard_normal(n).astype(np.float16))
    comm.all_reduce(x[:4096], algorithm="two_shot")  # kernels loaded before anything is timed
    comm.synchronize()
    comm.exchange(None)
    start = time.perf_counter()
    rec: dict[str, Any] = {}
    try:
        comm.all_reduce(x, algorithm="two_shot")
        comm.synchronize()
        rec["type"] = None
    except Exception as exc:
        rec.update(type=type(exc).__name__, text=str(exc), peer=getattr(exc, "peer", None),
                   differs=tuple(getattr(exc, "differs", ()) or ()))
    rec["elapsed"] = time.perf_counter() - start
    rec["close"] = repr(rel._raised(comm.close))
    return rec


def process_comm(rank: int, world: int, port: int) -> Any:
    """A raw process's communicator over the flat NCCL transport, ranks sharing GPU 0
    (gpu_reliability.dead_peer_rank's ``make``)."""
    os.environ.update(ENV)
    os.environ.update(rank_env(rank, None))
    from detar_cupy._rendezvous import connect
    from detar_cupy.communicator import Communicator

    return Communicator._from_rendezvous(connect(world, rank, port=port, timeout=60), 0, "nccl")
