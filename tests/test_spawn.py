"""CPU tests of detar_cupy._spawn: spawn() with a fake communicator, init_process_group() with a
fake Communicator module. No GPU, no CuPy."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import os
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any

# Spawned children import it by name too: they inherit sys.path, where pytest put tests/.
import _spawn_workers as workers
import pytest

from detar_cupy import _spawn
from detar_cupy._rendezvous import Rendezvous
from detar_cupy.errors import CupyMissingError, GpuUnavailableError, RendezvousError, WorkerError

FAKE = workers.make_fake_comm
# Spawned ranks start a fresh interpreter each: generous bounds for a loaded 2-core CI machine,
# still far below the 60 s the surviving ranks would sleep.
PROMPT_S = 20.0


@pytest.fixture(autouse=True)
def _no_shared_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the default (one GPU per rank); the README's one-GPU command sets
    DETAR_SHARE_GPUS=1 for the whole run. Tests of the opt-in set it themselves."""
    monkeypatch.delenv("DETAR_SHARE_GPUS", raising=False)


def assert_all_gone(pid_dir: Path | None = None) -> None:
    assert multiprocessing.active_children() == []
    for pid_file in (pid_dir.glob("*.pid") if pid_dir else []):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def spawn_failing(fn: Any, nprocs: int, *args: Any, **kw: Any) -> tuple[WorkerError, float]:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        _spawn.spawn(fn, nprocs, args=args, _make_comm=FAKE, **kw)
    return info.value, time.monotonic() - start


def test_results_in_rank_order() -> None:
    out = _spawn.spawn(workers.gather, 3, args=("tag",), devices=[5, 3, 1], _make_comm=FAKE)
    seen = [(0, 5), (1, 3), (2, 1)]
    assert out == [(r, 3, d, "tag", seen) for r, d in seen]
    assert_all_gone()


def test_single_rank_devices_default() -> None:
    assert _spawn.spawn(workers.gather, 1, args=("x",), _make_comm=FAKE) == \
        [(0, 1, 0, "x", [(0, 0)])]


def test_raising_rank(tmp_path: Path) -> None:
    err, elapsed = spawn_failing(workers.raise_on, 3, 1, str(tmp_path))
    assert err.rank == 1 and err.exitcode is None
    assert "ValueError('boom from rank 1')" in str(err)
    assert "raise_on" in err.remote_traceback
    assert "ValueError: boom from rank 1" in err.remote_traceback
    assert elapsed < PROMPT_S
    assert_all_gone(tmp_path)


def test_sigkilled_rank(tmp_path: Path) -> None:
    err, elapsed = spawn_failing(workers.sigkill_on, 3, 2, str(tmp_path))
    assert err.rank == 2 and err.exitcode == -9
    assert "killed by signal SIGKILL" in str(err)
    assert elapsed < PROMPT_S
    assert_all_gone(tmp_path)


def test_dead_rank_named_not_its_peers(tmp_path: Path) -> None:
    # ranks 0 and 2 report RendezvousErrors about rank 1; the parent blames rank 1
    err, _ = spawn_failing(workers.sigkill_before_exchange, 3, 1, str(tmp_path))
    assert err.rank == 1 and "SIGKILL" in str(err)
    assert_all_gone(tmp_path)


def test_exit_code() -> None:
    err, _ = spawn_failing(workers.exit_on, 2, 0, 3)
    assert err.rank == 0 and err.exitcode == 3
    assert "exited with code 3" in str(err)
    assert_all_gone()


def test_unpicklable_result() -> None:
    err, _ = spawn_failing(workers.unpicklable_on, 2, 1)
    assert err.rank == 1 and "cannot be pickled" in str(err)
    assert_all_gone()


def test_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank.* 0, 1 had not finished") as info:
        _spawn.spawn(workers.sleep, 2, args=(str(tmp_path),), timeout=1.5, _make_comm=FAKE)
    assert not isinstance(info.value, WorkerError)
    assert time.monotonic() - start < 1.5 + PROMPT_S
    assert_all_gone(tmp_path)


def test_parent_interrupted_stops_children(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: Any) -> None:
        while len(list(tmp_path.glob("*.pid"))) < 2:  # both ranks are running fn
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(_spawn, "_supervise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _spawn.spawn(workers.sleep, 2, args=(str(tmp_path),), _make_comm=FAKE)
    assert_all_gone(tmp_path)


def test_unpicklable_fn() -> None:
    with pytest.raises(TypeError, match="module-level"):
        _spawn.spawn(lambda comm: None, 2, _make_comm=FAKE)
    assert_all_gone()


@pytest.mark.parametrize("kw, match", [
    ({"nprocs": 0}, "nprocs"),
    ({"nprocs": 2, "devices": [0]}, "2 ranks but 1 devices"),
    ({"nprocs": 3, "devices": [0, 1, 0]}, "device 0 is given to ranks 0 and 2"),
    ({"nprocs": 2, "devices": [0, -1]}, "device of rank 1"),
    ({"nprocs": 2, "timeout": 0}, "timeout"),
    ({}, "nprocs"),
])
def test_invalid_args(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _spawn.spawn(workers.gather, _make_comm=FAKE, **kw)
    assert_all_gone()


@pytest.mark.parametrize("kw, match", [
    ({"nprocs": 3}, "3 ranks but CuPy sees only 2 GPU"),
    ({"nprocs": 2, "devices": [0, 2]}, "device 2 does not exist"),
])
def test_gpu_count_checks(kw: dict[str, Any], match: str,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spawn, "_cuda_device_count", lambda: 2)
    with pytest.raises(ValueError, match=match):
        _spawn.spawn(workers.gather, **kw)
    assert_all_gone()


def test_refusals_of_shared_gpus_name_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETAR_SHARE_GPUS", raising=False)
    monkeypatch.setattr(_spawn, "_cuda_device_count", lambda: 2)
    for kw in ({"nprocs": 3}, {"nprocs": 2, "devices": [1, 1]}):
        with pytest.raises(ValueError, match="DETAR_SHARE_GPUS=1"):
            _spawn.spawn(workers.gather, **kw)
    assert_all_gone()


@pytest.mark.parametrize("gpus, nprocs, devices, want", [
    (1, 4, None, [0, 0, 0, 0]),
    (2, 3, None, [0, 1, 0]),
    (2, 2, None, [0, 1]),
    (2, 3, [1, 1, 0], [1, 1, 0]),
])
def test_shared_gpus_assign_devices_round_robin(gpus: int, nprocs: int, devices: Any,
                                                want: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_SHARE_GPUS", "1")
    monkeypatch.setattr(_spawn, "_cuda_device_count", lambda: gpus)
    assert _spawn._check_spawn_args(nprocs, devices, None, real_gpus=True) == (nprocs, want)
    with pytest.raises(ValueError, match=f"device {gpus} does not exist"):
        _spawn._check_spawn_args(2, [0, gpus], None, real_gpus=True)


def test_shared_gpus_spawn_ranks_on_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_SHARE_GPUS", "1")
    out = _spawn.spawn(workers.gather, 3, args=("s",), devices=[0, 0, 0], _make_comm=FAKE)
    assert [o[2] for o in out] == [0, 0, 0]
    assert_all_gone()


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_shared_gpus_setting_must_be_0_or_1(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_SHARE_GPUS", value)
    with pytest.raises(ValueError, match="DETAR_SHARE_GPUS must be 0 or 1"):
        _spawn.spawn(workers.gather, 2, _make_comm=FAKE)
    assert_all_gone()


def test_ranks_per_gpu_counts_the_busiest_gpu() -> None:
    from detar_cupy._sharing import ranks_per_gpu

    assert ranks_per_gpu(["a", "b", "c"]) == 1
    assert ranks_per_gpu(["a", "b", "a", "a"]) == 3


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_missing() -> None:
    with pytest.raises(CupyMissingError):
        _spawn.spawn(workers.gather, 2)
    with pytest.raises(CupyMissingError):
        _spawn.init_process_group(2, 0, port=1)


# ---------------------------------------------------------------- init_process_group

class FakeCommunicator:
    def __init__(self, rendezvous: Rendezvous, device: int) -> None:
        self.rendezvous, self.device = rendezvous, device

    @classmethod
    def _from_rendezvous(cls, rendezvous: Rendezvous, device: int,
                         transport: str = "auto") -> FakeCommunicator:
        return cls(rendezvous, device)


@pytest.fixture
def fake_communicator(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("detar_cupy.communicator")
    module.Communicator = FakeCommunicator  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "detar_cupy.communicator", module)
    monkeypatch.setattr(_spawn, "_cuda_device_count", lambda: 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.usefixtures("fake_communicator")
def test_init_process_group() -> None:
    port = free_port()

    def rank(r: int) -> tuple[int, list[Any]]:
        comm = _spawn.init_process_group(3, r, port=port, authkey="k", timeout=5)
        return comm.device, comm.rendezvous.exchange(r)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        out = list(pool.map(rank, range(3)))
    # default device: rank % number of GPUs (2, faked)
    assert out == [(0, [0, 1, 2]), (1, [0, 1, 2]), (0, [0, 1, 2])]


@pytest.mark.usefixtures("fake_communicator")
def test_init_process_group_explicit_device_single_rank() -> None:
    comm = _spawn.init_process_group(1, 0, device=1, timeout=1)
    assert comm.device == 1 and comm.rendezvous.exchange("x") == ["x"]


@pytest.mark.usefixtures("fake_communicator")
def test_init_process_group_checks_the_device_before_waiting_for_peers() -> None:
    """A device that does not exist fails at once, not after the rendezvous timeout (the other
    ranks never come here)."""
    start = time.monotonic()
    with pytest.raises(GpuUnavailableError, match="device=7 does not exist: CuPy sees 2"):
        _spawn.init_process_group(2, 1, device=7, port=free_port(), timeout=30)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("fails", ["no driver", "no device"])
def test_no_usable_gpu_is_a_detar_error(fails: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy installed but no driver (getDeviceCount raises) or no device: a GpuUnavailableError
    saying so, from spawn and from init_process_group, before any process or wait."""
    def count() -> int:
        if fails == "no driver":
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return 0

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    for call in (lambda: _spawn.spawn(workers.gather, 2),
                 lambda: _spawn.init_process_group(2, 1, port=free_port(), timeout=30)):
        start = time.monotonic()
        with pytest.raises(GpuUnavailableError, match="driver|no GPU"):
            call()
        assert time.monotonic() - start < 5
    assert_all_gone()


@pytest.mark.usefixtures("fake_communicator")
def test_init_process_group_closes_rendezvous_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Rendezvous] = []

    def broken(rendezvous: Rendezvous, device: int, transport: str) -> None:
        made.append(rendezvous)
        raise RuntimeError("no GPU today")

    monkeypatch.setattr(FakeCommunicator, "_from_rendezvous", broken)
    with pytest.raises(RuntimeError, match="no GPU today"):
        _spawn.init_process_group(1, 0, device=0, timeout=1)
    with pytest.raises(RendezvousError, match="closed"):
        made[0].exchange(None)


@pytest.mark.usefixtures("fake_communicator")
@pytest.mark.parametrize("args, kw", [((2, 2), {}), ((0, 0), {}), ((2, 0), {"device": -1})])
def test_init_process_group_invalid(args: tuple[int, int], kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _spawn.init_process_group(*args, timeout=1, **kw)


@pytest.mark.usefixtures("fake_communicator")
def test_init_process_group_without_arguments_under_torchrun(
        monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7.cluster",
                        "MASTER_PORT": str(port - 1)}.items():
        monkeypatch.setenv(name, value)
    for name in ("DETAR_HOST", "DETAR_PORT"):
        monkeypatch.delenv(name, raising=False)

    def rank0() -> tuple[Any, ...]:  # everything from the environment: loopback, MASTER_PORT + 1
        comm = _spawn.init_process_group(timeout=10)
        return comm.device, comm.rendezvous.rank, comm.rendezvous.exchange("zero")

    def rank1() -> tuple[Any, ...]:  # explicit arguments for another rank: the environment unused
        comm = _spawn.init_process_group(2, 1, port=port, device=0, timeout=10)
        return comm.device, comm.rendezvous.rank, comm.rendezvous.exchange("one")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = [f.result(timeout=30) for f in [pool.submit(rank0), pool.submit(rank1)]]
    assert out == [(1, 0, ["zero", "one"]), (0, 1, ["zero", "one"])]


@pytest.mark.usefixtures("fake_communicator")
def test_transport_is_checked_before_waiting_and_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt transport is a ValueError before any rendezvous; a valid one reaches the
    communicator."""
    with pytest.raises(ValueError, match="transport must be one of"):
        _spawn.init_process_group(1, 0, device=0, timeout=1, transport="nvlink")
    with pytest.raises(ValueError, match="transport must be one of"):
        _spawn.spawn(workers.gather, 2, transport="nvlink")
    seen: list[str] = []
    monkeypatch.setattr(FakeCommunicator, "_from_rendezvous",
                        classmethod(lambda cls, rdv, device, transport: seen.append(transport)))
    _spawn.init_process_group(1, 0, device=0, timeout=1, transport="nccl")
    assert seen == ["nccl"]
