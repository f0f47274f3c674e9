"""Shared helpers of the GPU test modules: how many GPUs there are, one spawn per world size whose
results the parametrized tests read, and raw process groups whose waits are all bounded."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import pytest

from detar_cupy._sharing import shared_gpus_allowed

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the case modules by name


def gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device: the GPU tests skip
        return 0


GPUS = gpu_count()
# DETAR_SHARE_GPUS=1 runs every world size on the GPUs there are (several ranks per GPU):
# the same bits, much slower calls (detar_cupy._sharing).
SHARED = shared_gpus_allowed()


def need(world: int) -> None:
    if GPUS < 1:
        pytest.skip(f"needs {world} GPU(s), found none")
    if GPUS < world and not SHARED:
        pytest.skip(f"needs {world} GPUs, found {GPUS} (DETAR_SHARE_GPUS=1 runs it with ranks "
                    "sharing GPUs)")


def spawn_with_env(fn: Callable[..., Any], world: int, env: dict[str, str], args=(),
                   timeout: float = 900.0, devices: list[int] | None = None,
                   make_comm: Callable[..., Any] | None = None) -> list:
    """detar_cupy.spawn with ``env`` set in the ranks' environment; the whole run is bounded by
    ``timeout`` seconds (spawn stops every rank and raises TimeoutError after that).
    ``make_comm``: spawn's ``_make_comm`` (a module-level (rendezvous, device) -> communicator)."""
    import detar_cupy as dc

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return dc.spawn(fn, world, args=args, timeout=timeout, devices=devices,
                        _make_comm=make_comm)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_CACHE: dict[Any, tuple[bool, Any]] = {}


def cached_spawn(key: Any, fn: Callable[..., Any], world: int, env: dict[str, str], args=(),
                 timeout: float = 900.0, devices: list[int] | None = None,
                 make_comm: Callable[..., Any] | None = None) -> list:
    """spawn_with_env once per ``key``; later calls return the same per-rank results, or raise the
    same exception again (so that a failed spawn is not repeated by every parametrized test)."""
    if key not in _CACHE:
        try:
            _CACHE[key] = (True, spawn_with_env(fn, world, env, args, timeout, devices,
                                                make_comm))
        except Exception as exc:
            _CACHE[key] = (False, exc)
    ok, value = _CACHE[key]
    if not ok:
        raise value
    return value


def run_processes(target: Callable[..., Any], world: int, args: tuple = (), *,
                  report_within_s: float, exit_within_s: float = 10.0) -> tuple[dict, list, float]:
    """Start ``world`` raw processes (spawn context) running ``target(rank, *args, conn)``, each of
    which sends one report through ``conn``. For groups that :func:`detar_cupy.spawn` cannot run:
    a rank that SIGKILLs itself, ranks that exit without closing, two ranks on one GPU.

    Every wait is bounded: reports are collected until ``report_within_s`` seconds after the
    start, then the processes get ``exit_within_s`` seconds to exit on their own; whatever is
    still running is killed. Returns ({rank: report}, exit codes, seconds until all had exited);
    a rank that was killed here has exit code -9, so a test that expects 0 fails."""
    ctx = multiprocessing.get_context("spawn")
    ends = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [ctx.Process(target=target, args=(rank, *args, ends[rank][1]), daemon=True,
                         name=f"gpu test rank {rank}") for rank in range(world)]
    reports: dict[int, Any] = {}
    start = time.monotonic()
    try:
        for proc in procs:
            proc.start()
        for _, child_end in ends:
            child_end.close()  # only the child holds it now: its death shows up as EOF here
        waiting = {ends[rank][0]: rank for rank in range(world)}
        deadline = start + report_within_s
        while waiting:
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                rank = waiting.pop(conn)
                try:
                    reports[rank] = conn.recv()
                except (EOFError, OSError):
                    pass  # it exited (or was killed) without reporting
        exit_deadline = time.monotonic() + exit_within_s
        for proc in procs:
            proc.join(max(0.0, exit_deadline - time.monotonic()))
        wall = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5)
        for parent_end, _ in ends:
            parent_end.close()
    return reports, [proc.exitcode for proc in procs], wall
