"""No hangs: a dead peer and mismatched calls raise clear, sticky errors on every rank.

Opt-in (`-m slow`). Status: written against issue 5 but not yet seen to finish on a GPU — both
runs so far reached their time limit before pytest reported (cause not established: too slow for
the limit, or a survivor stuck after its peer died; see the issue's note)."""
from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest

import gpu_reliability
from gpu_support import need, spawn_with_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("alg", ["one_shot", "two_shot", "ll"])
@pytest.mark.parametrize("world", WORLDS)
def test_dead_peer_raises_peer_timeout_on_every_survivor(world: int, alg: str) -> None:
    need(world)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port, victim = _free_port(), world - 1
    procs = [ctx.Process(target=gpu_reliability.dead_peer_rank,
                         args=(r, world, port, alg, victim, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = {}
        deadline = time.time() + 45
        while len(reports) < world and time.time() < deadline:
            rank, what, when, detail = queue.get(timeout=max(1, deadline - time.time()))
            reports[rank] = (what, when, detail)
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert victim in reports and reports[victim][0] == "killed", reports
    assert len(reports) == world, f"survivors never reported: {reports}"
    died = reports[victim][1]
    for rank in range(world - 1):
        what, when, detail = reports[rank]
        assert what == "PeerTimeoutError", (rank, what, detail)
        assert f"peer={victim}" in detail or "peer rank" in detail
        latency = when - died
        print(f"world {world} {alg}: rank {rank} raised PeerTimeoutError {latency:.2f} s after the kill")
        assert latency < 3 + 4, latency  # the 3 s timeout plus a margin
        assert procs[rank].exitcode == 0, "a survivor did not exit cleanly"


@pytest.mark.parametrize("variant", list(gpu_reliability.MISMATCHES))
@pytest.mark.parametrize("world", WORLDS)
def test_mismatched_calls_raise_mismatch_on_every_rank(world: int, variant: str) -> None:
    need(world)
    results = spawn_with_env(gpu_reliability.mismatch_rank, world, {"DETAR_TIMEOUT": "20"},
                             args=(variant,))
    for rank, (name, msg, elapsed, sticky) in enumerate(results):
        print(f"world {world} {variant}: rank {rank} {name} after {elapsed:.3f} s")
        assert name == "MismatchError", (rank, name, msg)
        assert elapsed < 5, elapsed  # detected in the kernel, not by the 20 s timeout
        assert sticky, "the error must stay until the communicator is closed"
