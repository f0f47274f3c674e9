"""The contract, bit for bit (quick tier): run-to-run, batch invariance, rank and algorithm
agreement, streams and graph replay, plus an observation of NCCL's behaviour on the same machine.
One spawn per world size serves both tests: 23-35 s per world size on 2 and 4 H200s once the
kernels are compiled (its ranks print each section's time on stderr: run with -s).

Opt-in (`-m slow`). Inputs come from a fresh seed per session, printed with every failure;
``DETAR_DETERMINISM_SEED=N`` repeats a session's inputs."""
from __future__ import annotations

import os
import time

import pytest

import gpu_determinism
from gpu_support import cached_spawn, need

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))
SEED = gpu_determinism.master_seed()
TIMEOUT_S = 300  # about a minute expected: a hang fails in minutes, not at the 15-minute default


def quick(world: int) -> list:
    """Per-rank results of gpu_determinism.run_quick (one spawn per world size; a failed spawn
    is reported again, not repeated)."""
    return cached_spawn(("determinism quick", world, SEED), gpu_determinism.run_quick, world,
                        gpu_determinism.QUICK_ENV, args=(SEED,), timeout=TIMEOUT_S)


def _reproduce(world: int) -> str:
    return (f"reproduce: DETAR_DETERMINISM_SEED={SEED} DETAR_TEST_WORLDS={world} "
            f"python3 -m pytest -m slow -s tests/test_gpu_determinism.py")


@pytest.mark.parametrize("world", WORLDS)
def test_quick_tier(world: int) -> None:
    need(world)
    t0 = time.monotonic()
    per_rank = quick(world)
    wall = time.monotonic() - t0  # the spawn, unless another test of this world ran it first
    names = list(per_rank[0]["checks"])
    for rank, res in enumerate(per_rank):
        assert list(res["checks"]) == names, f"rank {rank} ran different checks"
    failures, skipped, failed = [], [], set()
    for name in names:
        results = [res["checks"][name] for res in per_rank]
        seed = results[0]["seed"]
        if all(r["ok"] is None for r in results):
            skipped.append(f"{name}: {results[0]['detail']}")
            continue
        problems = [f"rank {rank}: {r['detail']}" for rank, r in enumerate(results)
                    if r["ok"] is not True]
        digests = {r["digest"] for r in results}
        if len(digests) != 1:  # rank agreement: every rank's output has the same bytes
            problems.append(f"ranks' outputs differ: {sorted(digests)}")
        if problems:
            failed.add(name)
            failures += [f"{name} (seed {seed}) {p}" for p in problems]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in per_rank[0]["seconds"].items())
    print(f"determinism quick tier, world {world}: {len(names)} checks, "
          f"{len(names) - len(skipped) - len(failed)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped; {wall:.1f} s wall ({timing}); seed {SEED}")
    for line in skipped:
        print(f"  skipped: {line}")
    assert not failures, "\n".join(failures[:40] + [_reproduce(world)])


@pytest.mark.parametrize("world", WORLDS)
def test_nccl_contrast_is_recorded(world: int) -> None:
    need(world)
    per_rank = quick(world)
    observed = [res["nccl"] for res in per_rank]
    if "skipped" in observed[0]:
        pytest.skip(observed[0]["skipped"])
    nccl = observed[0]
    print(f"world {world} (seed {nccl['seed']}): NCCL gave {nccl['nccl distinct prefixes']} "
          f"distinct results for the first 4096 elements over sizes {nccl['sizes']}; "
          f"sizes per distinct result: {nccl['nccl sizes per distinct prefix']}; "
          f"sizes equal to the reference: {nccl['nccl sizes equal to reference']}")
    for rank, res in enumerate(observed):
        assert res["ours distinct prefixes"] == 1 and res["ours equals reference"], (
            f"rank {rank}: detar_cupy's prefix changed with the message size or differs from "
            f"the reference: {res}\n{_reproduce(world)}")
