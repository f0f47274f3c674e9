"""The contract, bit for bit: run-to-run, batch invariance, rank and algorithm agreement, streams
and graph replay (quick tier), plus an observation of NCCL's behaviour on the same machine.

Opt-in (`-m slow`). Status: not yet seen to finish on a GPU — its one run reached the time limit
before pytest reported (see issue 4's note)."""
from __future__ import annotations

import os

import pytest

import gpu_determinism
from gpu_support import need, spawn_with_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))


@pytest.mark.parametrize("world", WORLDS)
def test_quick_tier(world: int) -> None:
    need(world)
    per_rank = spawn_with_env(gpu_determinism.run_quick, world, {})
    for rank, res in enumerate(per_rank):
        for check, ok in res.items():
            print(f"world {world} rank {rank}: {check}: {ok}")
            assert ok is True or str(ok).startswith("skipped"), (rank, check)


@pytest.mark.parametrize("world", WORLDS)
def test_nccl_contrast_is_recorded(world: int) -> None:
    need(world)
    pytest.importorskip("cupy.cuda.nccl")
    res = spawn_with_env(gpu_determinism.nccl_contrast, world, {})[0]
    print(f"world {world}: {res}")
    assert res["ours distinct prefixes"] == 1 and res["ours equals reference"]
