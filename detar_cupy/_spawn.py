"""Starting ranks: :func:`spawn` (one process per GPU) and :func:`init_process_group`
(processes started by someone else). CuPy and the communicator are imported lazily, so this module
imports without them.
"""
from __future__ import annotations

import functools
import multiprocessing
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from detar_cupy._launchers import resolve as resolve_launch
from detar_cupy._rendezvous import Rendezvous, check_world, connect, pipe_mesh
from detar_cupy._sharing import SHARE_HINT, shared_gpus_allowed
from detar_cupy.errors import CupyMissingError, GpuUnavailableError, WorkerError
from detar_cupy.transports.select import check_transport

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from detar_cupy.communicator import Communicator

# How long ranks that reported their result get to exit on their own (CUDA teardown) before
# they are terminated.
_EXIT_GRACE_S = 10.0
# How long a terminated (SIGTERM) rank gets before SIGKILL, and a killed one before we give up
# waiting (a process stuck in the GPU driver may not even die of SIGKILL).
_KILL_GRACE_S = 1.0


def spawn(fn: Callable[..., Any], nprocs: int | None = None, *, args: Sequence[Any] = (),
          devices: Sequence[int] | None = None, timeout: float | None = None,
          transport: str = "auto",
          _make_comm: Callable[[Rendezvous, int], Any] | None = None) -> list[Any]:
    """Run ``fn(comm, *args)`` in one new process per rank and return the results in rank order.

    - ``nprocs``: number of ranks; default ``len(devices)`` if given, else the number of GPUs.
    - ``devices``: the GPU of each rank (default ``0 .. nprocs-1``); no GPU may be used twice,
      unless ``DETAR_SHARE_GPUS=1`` lets ranks share GPUs (then the default is ``rank % GPUs``;
      see :mod:`detar_cupy._sharing`).
    - ``timeout``: seconds for the whole run (``None``: no limit). When it expires every rank is
      stopped and :class:`TimeoutError` is raised, naming the ranks that had not finished.
    - ``transport``: ``"auto"`` (default), ``"ipc"`` or ``"nccl"``: how the bytes move (see
      :attr:`Communicator.transport <detar_cupy.communicator.Communicator.transport>`).

    Processes start with the ``spawn`` method, so ``fn`` must be a module-level function and
    ``args`` and the return values picklable (return host data such as numpy arrays, not CuPy
    arrays), and the calling script needs the usual ``if __name__ == "__main__":`` guard. The
    communicator is closed when ``fn`` returns.

    If a rank raises, dies (a signal, ``os._exit``) or returns something unpicklable, the other
    ranks are stopped at once and :class:`~detar_cupy.errors.WorkerError` is raised for that rank,
    carrying its traceback and exit code. No rank is left running, also when the parent is
    interrupted (Ctrl-C).

    ``_make_comm`` (private, for tests): a picklable module-level ``(rendezvous, device) -> comm``
    used instead of the real communicator; with it, CuPy is not imported.
    """
    check_transport(transport)
    nprocs, devices = _check_spawn_args(nprocs, devices, timeout, real_gpus=_make_comm is None)
    make_comm = _make_comm or functools.partial(_make_communicator, transport=transport)
    ctx = multiprocessing.get_context("spawn")
    mesh = pipe_mesh(nprocs)
    procs: list[BaseProcess] = []
    results: list[Connection] = []
    finished = False
    try:
        for rank in range(nprocs):
            result_end, child_end = ctx.Pipe(duplex=False)
            results.append(result_end)
            proc = ctx.Process(target=_run_rank, name=f"detar_cupy rank {rank}",
                               args=(rank, nprocs, devices[rank], mesh[rank], child_end, fn,
                                     tuple(args), make_comm))
            try:
                proc.start()
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise TypeError("spawn could not send fn and args to the new process: fn must "
                                "be a module-level function and args picklable") from exc
            finally:
                # Only the child may hold its ends, so that its death closes them for the others.
                child_end.close()
                for conn in mesh[rank]:
                    conn.close()
            procs.append(proc)
        values = _supervise(procs, results, timeout)
        finished = True
        return values
    finally:
        _stop(procs, _EXIT_GRACE_S if finished else 0.0)
        for conn in results + [c for ends in mesh for c in ends]:
            conn.close()


def init_process_group(n_devices: int | None = None, rank: int | None = None, *,
                       host: str | None = None, port: int | None = None,
                       authkey: bytes | str | None = None, device: int | None = None,
                       timeout: float = 60.0, transport: str = "auto") -> Communicator:
    """Create this process's communicator in a group of ``n_devices`` processes started by
    someone else (torchrun, mpirun, a scheduler); every process calls it with its ``rank``.

    Shaped like ``cupyx.distributed.init_process_group``. Rank 0 listens and the others connect
    to it; see :func:`detar_cupy._rendezvous.connect` for ``host``, ``port`` and ``authkey`` and
    their fallbacks ``DETAR_HOST`` (default ``127.0.0.1``), ``DETAR_PORT`` (default 29517) and
    ``DETAR_AUTHKEY``. On loopback without a secret, ranks meet on a Unix socket only this user
    can reach; with a secret (required off loopback, the same random value on every rank) over
    TCP, every message authenticated with it. Nothing received is unpickled. ``device``
    defaults to ``rank % number of GPUs``. ``timeout`` bounds the wait for the other ranks (and
    each later exchange of setup values between them), in seconds. ``transport``: ``"auto"``
    (IPC where every rank shares a node with P2P between all GPUs, else NCCL), ``"ipc"`` or
    ``"nccl"``; every rank passes the same.

    Under torchrun, ``init_process_group()`` with no arguments takes the world size, rank and
    device from ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, and listens on ``MASTER_PORT + 1``
    (torch's store has ``MASTER_PORT``); explicit arguments and ``DETAR_HOST``/``DETAR_PORT``
    take precedence (the full rules: :mod:`detar_cupy._launchers`).
    """
    n_devices, rank, device, host, port = resolve_launch(n_devices, rank, device, host, port)
    check_world(n_devices, rank)
    check_transport(transport)
    if device is not None and (not isinstance(device, int) or device < 0):
        raise ValueError(f"device must be an int >= 0, got {device!r}")
    # The GPU is checked before waiting for the peers: a rank that cannot work says so at once.
    gpus = _cuda_device_count()
    if device is None:
        device = rank % gpus
    elif device >= gpus:
        raise GpuUnavailableError(f"device={device} does not exist: CuPy sees {gpus} GPU(s) "
                                  "(CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES may hide some)")
    # Imported before connecting, so that a broken install fails before the other ranks wait.
    from detar_cupy.communicator import Communicator

    rendezvous = connect(n_devices, rank, host=host, port=port, authkey=authkey, timeout=timeout)
    try:
        return Communicator._from_rendezvous(rendezvous, device, transport)
    except BaseException:
        rendezvous.close()
        raise


def _make_communicator(rendezvous: Rendezvous, device: int, transport: str) -> Communicator:
    from detar_cupy.communicator import Communicator

    return Communicator._from_rendezvous(rendezvous, device, transport)


def _cuda_device_count() -> int:
    """The GPUs CuPy sees (at least one), or a detar error saying why none can be used."""
    try:
        import cupy
    except ImportError as exc:
        raise CupyMissingError(str(exc)) from exc
    try:
        gpus = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError/HIP error: no driver, driver too old, no device
        raise GpuUnavailableError(
            f"CuPy is installed but cannot reach a GPU ({type(exc).__name__}: {exc}); check that "
            "the GPU driver works (nvidia-smi or rocm-smi) and that the CuPy build matches it "
            "(cupy-cuda12x/13x for CUDA, cupy-rocm-* for ROCm)") from None
    if gpus < 1:
        raise GpuUnavailableError("CuPy sees no GPU (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES "
                                  "may hide them)")
    return gpus


def _check_spawn_args(nprocs: int | None, devices: Sequence[int] | None, timeout: float | None,
                      real_gpus: bool) -> tuple[int, list[int]]:
    """Validate everything before a process starts; returns (nprocs, devices)."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")
    gpus = _cuda_device_count() if real_gpus else None
    if nprocs is None:
        if devices is not None:
            nprocs = len(devices)
        elif gpus is None:
            raise ValueError("nprocs (or devices) is required with _make_comm")
        else:
            nprocs = gpus
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    share = shared_gpus_allowed()
    if devices is None:
        devices = [rank % gpus for rank in range(nprocs)] if share and gpus else list(range(nprocs))
    else:
        devices = list(devices)
    if len(devices) != nprocs:
        raise ValueError(f"{nprocs} ranks but {len(devices)} devices: give one device per rank")
    for rank, device in enumerate(devices):
        if not isinstance(device, int) or device < 0:
            raise ValueError(f"device of rank {rank} must be an int >= 0, got {device!r}")
        if device in devices[:rank] and not share:
            raise ValueError(f"device {device} is given to ranks {devices.index(device)} and "
                             f"{rank}: each rank needs its own GPU ({SHARE_HINT})")
    if gpus is not None:
        if nprocs > gpus and not share:
            raise ValueError(f"{nprocs} ranks but CuPy sees only {gpus} GPU(s) ({SHARE_HINT})")
        if max(devices) >= gpus:
            raise ValueError(f"device {max(devices)} does not exist: CuPy sees {gpus} GPU(s)")
    return nprocs, devices


def _run_rank(rank: int, world_size: int, device: int, pipes: list[Connection],
              result: Connection, fn: Callable[..., Any], args: tuple[Any, ...],
              make_comm: Callable[[Rendezvous, int], Any]) -> None:
    """Body of a spawned rank: report ("ok", value) or ("error", message, traceback)."""
    try:
        value = _call(rank, world_size, device, pipes, fn, args, make_comm)
    except BaseException as exc:
        result.send(("error", f"raised {exc!r}", traceback.format_exc()))
        return
    try:
        result.send(("ok", value))
    except Exception as exc:  # send() pickles before writing, so nothing went out
        result.send(("error", f"its return value cannot be pickled for the parent: {exc!r}",
                     traceback.format_exc()))


def _call(rank: int, world_size: int, device: int, pipes: list[Connection],
          fn: Callable[..., Any], args: tuple[Any, ...],
          make_comm: Callable[[Rendezvous, int], Any]) -> Any:
    rendezvous = Rendezvous.from_pipes(rank, world_size, pipes)
    try:
        comm = make_comm(rendezvous, device)
        try:
            return fn(comm, *args)
        finally:
            close = getattr(comm, "close", None)
            if callable(close):
                close()
    finally:
        rendezvous.close()


_RUNNING = object()  # _outcome of a rank that has not finished


def _supervise(procs: list[BaseProcess], results: list[Connection],
               timeout: float | None) -> list[Any]:
    """Collect every rank's result; raise at the first failure (or the timeout)."""
    values: list[Any] = [None] * len(procs)
    running = set(range(len(procs)))
    deadline = None if timeout is None else time.monotonic() + timeout
    while running:
        # A rank's result pipe says what it returned; its sentinel says that it died without
        # reporting (then its result pipe is at EOF too, unless a grandchild holds it).
        owners: dict[Any, int] = {results[r]: r for r in running}
        owners |= {procs[r].sentinel: r for r in running}
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(owners), timeout=remaining)
        if not ready:
            listed = ", ".join(map(str, sorted(running)))
            raise TimeoutError(f"spawn timed out after {timeout:g}s; rank(s) {listed} had not "
                               f"finished and were stopped")
        failures = []
        for rank in sorted({owners[obj] for obj in ready}):
            outcome = _outcome(rank, procs[rank], results[rank])
            if isinstance(outcome, WorkerError):
                failures.append(outcome)
            elif outcome is not _RUNNING:
                values[rank] = outcome
                running.discard(rank)
        if failures:
            # Among failures seen together, a rank that died beats ranks that reported an
            # error: those are usually its peers noticing the broken connection.
            raise min(failures, key=lambda e: (e.exitcode is None, e.rank))
    return values


def _outcome(rank: int, proc: BaseProcess, result: Connection) -> Any:
    """The value rank returned, a WorkerError, or _RUNNING."""
    if result.poll():
        try:
            message = result.recv()
        except (EOFError, OSError):
            message = None  # it exited without (completely) reporting
        except Exception as exc:
            return WorkerError(rank, f"its result could not be unpickled in the parent: {exc!r}")
        if message is not None:
            if message[0] == "ok":
                return message[1]
            return WorkerError(rank, message[1], message[2])
    elif proc.is_alive():
        return _RUNNING
    proc.join(_KILL_GRACE_S)
    return WorkerError(rank, _describe_exit(proc.exitcode), exitcode=proc.exitcode)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its result pipe without reporting a result"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"killed by signal {name}"
    return f"exited with code {exitcode} without reporting a result"


def _stop(procs: list[BaseProcess], exit_grace: float) -> None:
    """Let the processes exit within exit_grace seconds, then terminate, then kill them."""
    _join_all(procs, exit_grace)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    _join_all(procs, _KILL_GRACE_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    _join_all(procs, _KILL_GRACE_S)


def _join_all(procs: list[BaseProcess], grace: float) -> None:
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
