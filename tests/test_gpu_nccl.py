"""The NCCL transport on a GPU: flat (2 ranks) and hierarchical (4 ranks as 2 simulated nodes of
2), every collective, dtype, op and size class (a sample of the quick tier, chunked through
64 KiB staging), bit-exact against the reference and equal to the IPC transport; graph capture
and replay; a mismatch and a dead peer raising within the timeout.

Ranks share one GPU (DETAR_SHARE_GPUS=1; each rank sets its own NCCL_HOSTID, so NCCL runs them
as separate hosts over sockets: about 5 ms per NCCL call), so one GPU is enough. In the default
GPU run; ``-m nccl`` selects only these. About 1-2 minutes with the kernels in CuPy's cache
(``python -m detar_cupy compile --worlds 2,4`` fills it in parallel)."""
from __future__ import annotations

import signal

import pytest

import gpu_nccl
import gpu_reliability as rel
from gpu_support import cached_spawn, need, run_processes

pytestmark = [pytest.mark.gpu, pytest.mark.nccl]
SEED = 7100
LAYOUTS = {"flat": (2, None), "hierarchical": (4, "2,2")}
MARGIN_S = 3.0  # detection may take the timeout plus this (watchdog period, NCCL abort, teardown)


def need_nccl() -> None:
    need(1)
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        pytest.skip(f"CuPy has no NCCL here: {exc}")
    if not getattr(nccl, "available", True):
        pytest.skip("cupy.cuda.nccl is unavailable")


def _spawn(key: str, fn, args=(), world: int | None = None, timeout: float = 300.0):
    world_, nodes = LAYOUTS[key]
    world = world or world_
    need_nccl()
    env = {**gpu_nccl.ENV, gpu_nccl.TRANSPORT_ENV: "nccl", gpu_nccl.NODES_ENV: nodes or ""}
    return cached_spawn((key, fn.__name__), fn, world, env, args=args, timeout=timeout,
                        devices=[0] * world, make_comm=gpu_nccl.make_comm)


def _sampled(key: str) -> list:
    world = LAYOUTS[key][0]
    return _spawn(key, gpu_nccl.run_sampled, (world, SEED))


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_transport_is_the_one_asked_for(key: str) -> None:
    per_rank = _sampled(key)
    assert {r["transport"] for r in per_rank} == {"nccl" if key == "flat" else key}, per_rank[0]


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_sampled_cases_are_bit_exact(key: str) -> None:
    per_rank = _sampled(key)
    world = LAYOUTS[key][0]
    n_cases = len(gpu_nccl.sampled_cases(world, SEED))
    for rank, res in enumerate(per_rank):
        assert len(res["cases"]) == n_cases
        failed = {cid: detail for cid, (ok, detail, _) in res["cases"].items() if not ok}
        assert not failed, (rank, failed)
    for cid in per_rank[0]["cases"]:
        if not cid.startswith("reduce_scatter"):  # each rank holds a different slice there
            assert len({res["cases"][cid][2] for res in per_rank}) == 1, f"ranks disagree: {cid}"


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_same_bits_as_the_ipc_transport(key: str) -> None:
    for rank, res in enumerate(_sampled(key)):
        assert res["ipc"], "no case compared"
        for cid, digest in res["ipc"].items():
            assert digest == res["cases"][cid][2], (rank, cid)


def test_graph_capture_and_replay() -> None:
    per_rank = _spawn("flat", gpu_nccl.graph_replay, (SEED,))
    failed = [(rank, label) for rank, rows in enumerate(per_rank) for label, ok, _ in rows if not ok]
    assert not failed, failed


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_mismatch_raises_on_every_rank(key: str) -> None:
    per_rank = _spawn(key, gpu_nccl.mismatch, (SEED,))
    world = LAYOUTS[key][0]
    for rank, rec in enumerate(per_rank):
        print(f"{key} mismatch: rank {rank} {rec['type']} after {rec['elapsed'] * 1e3:.0f} ms")
        assert rec["type"] == "MismatchError", (rank, rec)
        assert rec["differs"] == ("count",), (rank, rec)
        assert rec["peer"] == (world - 1 if rank < world - 1 else 0), (rank, rec)
        assert rec["elapsed"] < 10.0, rec  # the watchdog aborts NCCL: no wait for DETAR_TIMEOUT
        assert rec["close"] == "None", (rank, rec["close"])


def test_dead_peer_raises_peer_timeout_on_every_survivor() -> None:
    need_nccl()
    world, victim = 3, 1
    port = rel.free_ports(1)[0]
    reports, exitcodes, wall = run_processes(
        rel.dead_peer_rank, world, (world, port, "one_shot", victim, SEED, gpu_nccl.process_comm),
        report_within_s=120.0, exit_within_s=20.0)
    crashes = {r: rep["crash"] for r, rep in reports.items() if "crash" in rep}
    assert not crashes, crashes
    assert exitcodes[victim] == -signal.SIGKILL, exitcodes
    killed_at = reports[victim]["killed_at"]
    for rank in (r for r in range(world) if r != victim):
        rep = reports.get(rank)
        assert rep is not None, f"survivor {rank} never reported (hung?); exit codes {exitcodes}"
        assert rep["transport"] == "nccl"
        latency = rep.get("raised_at", float("inf")) - killed_at
        print(f"NCCL dead peer: rank {rank} raised {rep['type']} {latency:.2f} s after the kill "
              f"(timeout {rel.TIMEOUT_S:g} s); wall {wall:.1f} s")
        assert rep["type"] == "PeerTimeoutError", (rank, rep)
        assert rep["peer"] == victim and f"peer rank {victim}" in rep["text"], rep["text"]
        assert latency <= rel.TIMEOUT_S + MARGIN_S, latency
        for how in ("again", "check"):  # sticky
            assert rep[how]["type"] == "PeerTimeoutError" and rep[how]["same_text"], (how, rep)
        assert rep["close"] == "ok" and rep["after_close"] == "CommunicatorClosedError", rep
        assert exitcodes[rank] == 0, exitcodes
