"""The contract where it is easiest to break silently (default GPU run; ranks may share a GPU):
float32 results at the FLT_MIN boundary and the one canonical NaN, long-running communicators
(epochs past 2^31, 2^32 and 2^63), buffers at any address and NCCL-style aliasing decided alike on
every rank, and chunked calls whose counts differ."""
from __future__ import annotations

import os

import pytest

import gpu_cases
import gpu_contract
from gpu_support import cached_spawn, need

pytestmark = pytest.mark.gpu
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,3").split(","))
SEED = 7100
RANDOM_SAMPLES = 1_000_000


def _check_rows(per_rank: list) -> int:
    """Every row bit-exact on every rank, and the ranks' outputs identical where they hold the
    same result; returns the number of rows per rank."""
    bad = [(rank, label, detail) for rank, rows in enumerate(per_rank)
           for label, ok, detail, _ in rows if not ok]
    assert not bad, bad[:10]
    for i, (label, *_rest) in enumerate(per_rank[0]):
        if "reduce_scatter" not in label:  # each rank holds its own slice there
            assert len({rows[i][3] for rows in per_rank}) == 1, f"ranks disagree on {label}"
    return len(per_rank[0])


@pytest.mark.parametrize("world", WORLDS)
def test_flt_min_boundary_and_canonical_nan(world: int) -> None:
    """prod/avg results just below FLT_MIN round up as IEEE says (0x3F7FFFFF * 0x00800000 is
    0x00800000, 0x00FFFFFF / 2 is 0x00800000), sums are exact, and inf - inf, 0 * inf and NaN
    inputs of any payload give the canonical NaN of each dtype, on every algorithm."""
    need(world)
    per_rank = cached_spawn(("boundary", world), gpu_contract.boundary_rank, world,
                            gpu_cases.TEST_ENV, args=(SEED,))
    assert _check_rows(per_rank) > 100


def test_random_boundary_biased_samples() -> None:
    """10^6 boundary-biased samples per dtype and op (float32, bfloat16, complex64; prod, avg),
    thousands of them in the band where flushing hardware and IEEE rounding differ."""
    need(2)
    per_rank = cached_spawn(("random_boundary", 2), gpu_contract.random_boundary_rank, 2,
                            gpu_cases.TEST_ENV, args=(SEED, RANDOM_SAMPLES))
    assert _check_rows(per_rank) == 3 * 2 * 2
    for label, *_ in per_rank[0]:
        print(label)


@pytest.mark.parametrize("world", WORLDS)
def test_long_lived_communicator_epochs(world: int) -> None:
    """Communicators that start at launch 2^31 - 3, 2^32 - 3 and 2^63 - 3 (DETAR_FIRST_EPOCH):
    flags never written are then older by more than 2^31 launches (the signed 32-bit distance of
    the old epochs read them as reached), and the launches cross the old wrap points. A mixed
    sequence of every kernel kind and grid size, twice, bit-exact."""
    need(world)
    per_rank = cached_spawn(("epochs", world), gpu_contract.epochs_rank, world,
                            gpu_cases.TEST_ENV, args=(SEED,))
    for first in gpu_contract.FIRST_EPOCHS:
        rows = [rank_rows[first] for rank_rows in per_rank]
        assert _check_rows(rows) == 22, first


@pytest.mark.parametrize("world", WORLDS)
def test_buffers_at_any_address(world: int) -> None:
    """Inputs and outputs at every byte offset 0..15, different on every rank for the same call
    shape (so no rank can decide differently from its peers), every collective: bit-exact. Also
    the 8-byte aligned complex128 view that used to raise cudaErrorMisalignedAddress."""
    need(world)
    per_rank = cached_spawn(("misaligned", world), gpu_contract.misaligned_rank, world,
                            gpu_cases.TEST_ENV, args=(SEED,))
    assert _check_rows(per_rank) == 4 * 4 * 8 + 3


@pytest.mark.parametrize("world", WORLDS)
def test_aliasing_layouts_decided_alike_on_every_rank(world: int) -> None:
    """NCCL-style in-place all_gather and reduce_scatter, and overlaps that differ per rank for
    the same call shape: every rank runs the call, bit-exact (none raises on some ranks only,
    which would leave the others waiting out the timeout)."""
    need(world)
    per_rank = cached_spawn(("aliasing", world), gpu_contract.aliasing_rank, world,
                            gpu_cases.TEST_ENV, args=(SEED,))
    assert _check_rows(per_rank) == 3 * 5


@pytest.mark.parametrize("world", WORLDS)
def test_chunked_calls_whose_counts_differ_raise_on_every_rank(world: int) -> None:
    """Counts that differ but both span several chunks of the same length (two and three full
    launches): MismatchError naming the count on every rank at the first call, within a second
    (the kernels' timeout is 20 s). Before, the first launches matched, the shorter call
    returned wrong bits and its next call paired with the longer call's third launch."""
    need(world)
    per_rank = cached_spawn(("chunked_mismatch", world), gpu_contract.chunked_mismatch_rank,
                            world, gpu_cases.TEST_ENV)
    for rank, rec in enumerate(per_rank):
        assert rec["type"] == "MismatchError", (rank, rec)
        assert "count" in rec["differs"], (rank, rec)
        assert rec["elapsed"] < 1.0, (rank, rec["elapsed"])


@pytest.mark.parametrize("world", WORLDS)
def test_coalesced_buffers_match_their_own_all_reduce(world: int) -> None:
    """Many buffers through one gather, one all-reduce and one scatter (two launches per 64
    buffers): every buffer bit for bit what its own call gives, at any address and size."""
    need(world)
    per_rank = cached_spawn(("coalesced", world), gpu_contract.coalesced_rank, world,
                            gpu_cases.TEST_ENV, args=(SEED,))
    assert _check_rows(per_rank) == 4 * 150
