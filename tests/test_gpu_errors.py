"""Every bad input raises the exact exception type with a message naming the problem; edge inputs
(empty arrays, counts at and past one launch's capacity) work; bad set-ups fail before any work.

The first two tests are in the default GPU run; the others are opt-in (`-m slow`; `-m gpu` selects
all of them): one spawn per world size for the capacity boundaries, two raw processes sharing
GPU 0."""
from __future__ import annotations

import multiprocessing.context
import os
import time

import pytest

import gpu_cases
import gpu_errors
from gpu_reliability import free_ports
from gpu_support import GPUS, SHARED, need, run_processes, spawn_with_env

pytestmark = pytest.mark.gpu
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))


def test_bad_inputs_raise_clear_errors_and_leave_the_communicator_usable() -> None:
    need(2)
    per_rank = spawn_with_env(gpu_errors.bad_inputs_rank, 2, {}, timeout=300)
    failures = [(rank, label, detail) for rank, rows in enumerate(per_rank)
                for label, ok, detail in rows if not ok]
    for label, _, detail in per_rank[0]:
        if label.startswith("empty"):
            print(f"{label}: {detail}")
    assert not failures, failures
    assert len(per_rank[0]) == (25 if GPUS > 1 else 23)  # 2 rows need a second GPU


def test_world_size_one_is_the_reference_copy() -> None:
    need(1)
    (rows,) = spawn_with_env(gpu_errors.world_one_rank, 1, {})
    failures = [row for row in rows if not row[1]]
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_largest_single_launch_and_one_past_it_are_exact(world: int) -> None:
    need(world)
    env = gpu_cases.TEST_ENV  # small buffers: DETAR_STAGING_BYTES 64 KiB, DETAR_LL_BYTES 8 KiB
    stage, ll = int(env["DETAR_STAGING_BYTES"]), int(env["DETAR_LL_BYTES"])
    start = time.monotonic()
    per_rank = spawn_with_env(gpu_errors.capacity_boundaries_rank, world, env,
                              args=(stage, ll, 4242), timeout=300)
    print(f"capacity boundaries world {world}: {len(per_rank[0])} cases per rank "
          f"(staging half {stage} B, LL {ll} B) in {time.monotonic() - start:.1f} s")
    failures = [(rank, label, detail) for rank, rows in enumerate(per_rank)
                for label, ok, detail, _ in rows if not ok]
    assert not failures, failures
    n_cases = len(gpu_errors.BOUNDARY_DTYPES) * 3 * 2
    assert all(len(rows) == n_cases for rows in per_rank)
    digests = {tuple(row[3] for row in rows) for rows in per_rank}
    assert len(digests) == 1, "ranks disagree"


def _refused_before_start(monkeypatch: pytest.MonkeyPatch, call) -> str:
    """The text of the ValueError ``call`` raises, asserting that no process was started."""
    started: list = []
    with monkeypatch.context() as patch, pytest.raises(ValueError) as info:
        patch.setattr(multiprocessing.context.SpawnProcess, "start",
                      lambda self: started.append(self.name))
        call()
    assert type(info.value) is ValueError
    assert started == [], started
    return str(info.value)


@pytest.mark.slow
def test_two_ranks_on_one_gpu_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    need(1)
    import detar_cupy as dc

    monkeypatch.delenv("DETAR_SHARE_GPUS", raising=False)  # the default: one GPU per rank

    # spawn() checks its devices before starting anything: a ValueError, no process.
    text = _refused_before_start(monkeypatch, lambda: dc.spawn(gpu_errors.never_runs, 2,
                                                               devices=[0, 0]))
    assert "ranks 0 and 1" in text and "own GPU" in text, text
    # Processes started by someone else: the communicator compares the ranks' PCI bus ids.
    port = free_ports(1)[0]
    reports, exitcodes, wall = run_processes(gpu_errors.same_gpu_rank, 2, (2, port),
                                             report_within_s=60.0)
    print(f"two ranks on GPU 0: {reports} (exit codes {exitcodes}, {wall:.1f} s)")
    for rank in range(2):
        assert rank in reports, (rank, reports, exitcodes)
        assert reports[rank]["type"] == "RendezvousError", reports[rank]
        text = reports[rank]["text"]
        assert "ranks 0 and 1" in text and "same GPU" in text, text
        assert exitcodes[rank] == 0, exitcodes


@pytest.mark.slow
def test_more_ranks_than_gpus_is_refused_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    need(1)
    import detar_cupy as dc

    monkeypatch.delenv("DETAR_SHARE_GPUS", raising=False)  # the default: one GPU per rank
    text = _refused_before_start(monkeypatch, lambda: dc.spawn(gpu_errors.never_runs, GPUS + 1))
    assert f"{GPUS + 1} ranks" in text and f"only {GPUS} GPU" in text, text


@pytest.mark.slow
@pytest.mark.parametrize("name,value", [("DETAR_STAGING_BYTES", str(1 << 20)),
                                        ("DETAR_MAX_BLOCKS", "16"),
                                        ("DETAR_SHARE_GPUS", "0" if SHARED else "1")])
def test_ranks_with_different_settings_are_refused(name: str, value: str) -> None:
    need(2)
    port = free_ports(1)[0]
    reports, exitcodes, wall = run_processes(gpu_errors.settings_rank, 2, (2, port, name, value),
                                             report_within_s=60.0)
    print(f"{name} set on rank 1 only: {reports} (exit codes {exitcodes}, {wall:.1f} s)")
    for rank in range(2):
        assert rank in reports, (rank, reports, exitcodes)
        assert reports[rank]["type"] == "MismatchError", reports[rank]
        text = reports[rank]["text"]
        assert name in text and f"rank 1 {value}" in text, reports[rank]
        assert exitcodes[rank] == 0, exitcodes
