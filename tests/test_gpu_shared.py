"""Ranks sharing one GPU (DETAR_SHARE_GPUS=1): the same bits as ranks on GPUs of their own, with
the grid cut so that every rank's blocks fit on the GPU at once. In the default GPU run; needs one
GPU. Without the setting the same set-up is refused (test_gpu_errors)."""
from __future__ import annotations

import pytest

import gpu_cases
from gpu_support import need, spawn_with_env

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("world", (2, 3))
def test_ranks_sharing_one_gpu_are_bit_exact(world: int) -> None:
    need(1)
    from detar_cupy._kernels import MAX_BLOCKS

    env = {**gpu_cases.TEST_ENV, "DETAR_SHARE_GPUS": "1"}
    per_rank = spawn_with_env(gpu_cases.run_shared_cases, world, env, args=(world, 5000),
                              timeout=600, devices=[0] * world)
    n_cases = len(gpu_cases.cases(world, 5000)[::gpu_cases.SHARED_STRIDE])
    for rank, (grid, sms, results) in enumerate(per_rank):
        assert grid == min(MAX_BLOCKS, sms // world), (rank, grid, sms)
        assert len(results) == n_cases
        failed = {cid: detail for cid, (ok, detail, _) in results.items() if not ok}
        assert not failed, (rank, failed)
    for cid in per_rank[0][2]:
        if not cid.startswith("reduce_scatter"):  # each rank holds a different slice there
            assert len({res[cid][2] for _, _, res in per_rank}) == 1, f"ranks disagree on {cid}"
