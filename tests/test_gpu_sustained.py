"""Sustained load: 100,000 back-to-back mixed all-reduces with zero wrong bits in the verified
sample (every 50th call and every call beyond one launch's capacity), the same on every rank.

Opt-in (`-m slow`); run with `-s` for the numbers: 6-13 s of calls on 2 and 4 H200s (host-bound)
including the CPU reference for the ~3,000 verified calls."""
from __future__ import annotations

import time

import pytest

import gpu_sustained
from gpu_support import GPUS, need, spawn_with_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CALLS = 100_000
SEED = 20260
MIN_VERIFIED = 2_000


def test_hundred_thousand_mixed_calls_are_bit_exact() -> None:
    need(2)
    world = 4 if GPUS >= 4 else 2
    start = time.monotonic()
    per_rank = spawn_with_env(gpu_sustained.sustained_rank, world, gpu_sustained.ENV,
                              args=(CALLS, SEED), timeout=400)
    total = time.monotonic() - start
    for rank, res in enumerate(per_rank):
        print(f"sustained world {world} rank {rank}: {res['calls']} calls in {res['wall_s']:.1f} s "
              f"({res['wall_s'] / res['calls'] * 1e6:.0f} us/call incl. {res['ref_s']:.1f} s of "
              f"CPU reference), {res['verified']} verified ({res['large_verified']} of "
              f"{res['large']} large, up to {res['max_count_bytes']} B), "
              f"{res['wrong_bits']} wrong bits; setup {res['setup_s']:.1f} s; "
              f"algorithms {res['by_alg']}, modes {res['by_mode']}")
    print(f"sustained world {world}: {total:.1f} s in all")
    for rank, res in enumerate(per_rank):
        assert res["calls"] == CALLS
        assert res["wrong_bits"] == 0 and not res["failures"], (rank, res["failures"])
        assert res["verified"] >= MIN_VERIFIED, res["verified"]
        assert res["large_verified"] == res["large"] > 0, (res["large_verified"], res["large"])
        assert res["max_count_bytes"] > 2 * gpu_sustained.STAGE_HALF  # beyond the staging buffer
        assert all(n > 0 for n in res["by_alg"].values()), res["by_alg"]
    digests = {res["digest"] for res in per_rank}
    assert len(digests) == 1, f"ranks disagree: {digests}"
