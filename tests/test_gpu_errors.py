"""Every bad input raises the exact exception type with a message naming the problem."""
from __future__ import annotations

import pytest

import gpu_errors
from gpu_support import need, spawn_with_env

pytestmark = pytest.mark.gpu


def test_bad_inputs_raise_clear_errors_and_leave_the_communicator_usable() -> None:
    need(2)
    per_rank = spawn_with_env(gpu_errors.bad_inputs_rank, 2, {})
    failures = [(rank, label, detail) for rank, rows in enumerate(per_rank)
                for label, ok, detail in rows if not ok]
    assert not failures, failures
    assert len(per_rank[0]) == 19


def test_world_size_one_is_the_reference_copy() -> None:
    need(1)
    (rows,) = spawn_with_env(gpu_errors.world_one_rank, 1, {})
    failures = [row for row in rows if not row[1]]
    assert not failures, failures
