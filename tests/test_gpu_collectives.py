"""Every collective, dtype, op and algorithm on 2, 3 and 4 GPUs, compared bit for bit with
detar_cupy.reference (the quick tier of the GPU suite). Skips without enough GPUs."""
from __future__ import annotations

import os

import pytest

import gpu_cases
from gpu_support import need, spawn_with_env

pytestmark = pytest.mark.gpu
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,3,4").split(","))
SEED = 1000
_results: dict[int, list] = {}


def results(world: int) -> list:
    """Per-rank {case id: (ok, detail, digest)}, computed once per world size."""
    if world not in _results:
        _results[world] = spawn_with_env(gpu_cases.run_cases, world, gpu_cases.TEST_ENV,
                                         args=(world, SEED))
    return _results[world]


@pytest.mark.parametrize("world,case_id", [(w, c.id) for w in WORLDS
                                           for c in gpu_cases.cases(w, SEED)])
def test_case(world: int, case_id: str) -> None:
    need(world)
    per_rank = results(world)
    for rank, res in enumerate(per_rank):
        ok, detail, _ = res[case_id]
        assert ok, f"rank {rank}: {detail}"
    digests = {res[case_id][2] for res in per_rank}
    if not case_id.startswith("reduce_scatter"):  # each rank holds a different slice there
        assert len(digests) == 1, f"ranks disagree: {digests}"
