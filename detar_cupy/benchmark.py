"""Benchmark against NCCL, and against torch's symmetric-memory all-reduce where torch is
installed, in the same run on the same GPUs (nccl-tests style rows).

Every implementation is timed the same way: warm-up, then back-to-back calls on one stream between
two device events, median of several repeats, maximum over ranks; once eagerly (Python launches
each call: what a training loop sees) and once by replaying a captured CUDA graph (GPU time: what
an inference engine that captures its all-reduces sees). Every row counts the elements whose bits
differ from detar_cupy.reference (#wrong): it must be 0 for detar_cupy's rows; for NCCL and torch
it is informational, since neither promises that fold order.

Transport rows: ``nccl_transport`` is detar_cupy's all-reduce (``auto``) over its NCCL transport
(NCCL moves the bytes, our kernels fold: flat, every rank on this machine); ``hier_transport``
is the hierarchical transport with the machine's ranks split into two simulated nodes
(``DETAR_NODE``: ranks 0..N/2-1 and N/2..N-1, IPC inside each, NCCL between; needs 4 or more
ranks, an even number). On one machine both measure the schedules' overheads, not a network.

torch rows (``torch_symm_one_shot``, ``torch_symm_two_shot``): ``torch.ops.symm_mem``'s one-shot
(out of place) and two-shot (in place) all-reduce on a symmetric buffer, launched on the timed
stream, never the multicast (multimem) variants: NVLink multicast stays off
(``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NCCL_NVLS_ENABLE=0`` unless set otherwise). Anything
torch cannot do here (not installed, an unsupported dtype, no graph capture) becomes a note in
the results instead of an error (torch 2.11 has these kernels for bfloat16 and float32 only).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from importlib import metadata
from typing import Any, Callable, Sequence

import numpy as np

from . import reference
from .dtypes import numpy_dtype
from .transports.select import NODE_ENV

KIB = 1 << 10
DEFAULT_SIZES = tuple(KIB << (2 * i) for i in range(10))  # 1 KiB .. 256 MiB
ALGORITHM_IMPLS = ("auto", "ll", "one_shot", "two_shot")
#: detar_cupy over its NCCL transport: flat, and hierarchical across two simulated nodes.
TRANSPORT_IMPLS = {"nccl_transport": "nccl", "hier_transport": "hierarchical"}
DETAR_IMPLS = ALGORITHM_IMPLS + tuple(TRANSPORT_IMPLS)  # rows whose #wrong must be 0
TORCH_IMPLS = ("torch_symm_one_shot", "torch_symm_two_shot")
IMPLS = DETAR_IMPLS + ("nccl",) + TORCH_IMPLS
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "bfloat16": "NCCL_BFLOAT16"}
_GRAPH_CALLS = 50  # calls captured per graph (fewer for large messages: see _reps)


def _reps(nbytes: int) -> int:
    return max(5, min(200, (64 << 20) // max(nbytes, 1)))


def size_label(nbytes: int) -> str:
    """``512 B``, ``64 KiB``, ``16 MiB`` (the largest unit that divides evenly, else KiB/MiB)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes} B"


def progress_line(done: int, total: int, dtype: str, nbytes: int, impl: str, eager_us: float,
                  graph_us: float | None) -> str:
    """One finished measurement, as rank 0 prints it:
    ``[12/60] float16 64 KiB one_shot eager 6.1 us graph 5.2 us``."""
    graph = "" if graph_us is None else f" graph {graph_us:.1f} us"
    return f"[{done}/{total}] {dtype} {size_label(nbytes)} {impl} eager {eager_us:.1f} us{graph}"


def _nccl_comm(comm: Any):
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if comm.rank == 0 else None
    uid = comm.exchange(uid)[0]
    return nccl.NcclCommunicator(comm.world_size, uid, comm.rank)


def _nccl_type(name: str) -> int | None:
    """NCCL's constant for dtype ``name``, or None (no such type in NCCL or in CuPy's binding)."""
    from cupy.cuda import nccl

    return getattr(nccl, _NCCL_TYPES.get(name, ""), None)


def _start_nccl(comm: Any, notes: _Notes) -> Any:
    """A NCCL communicator on every rank, or None on every rank (with a note)."""
    try:
        nc, reason = _nccl_comm(comm), None
    except Exception as exc:  # CuPy built without NCCL, NCCL init failure
        nc, reason = None, _reason(exc)
    return None if _failed_anywhere(comm, reason, notes, "nccl", "unavailable") else nc


def _failed_anywhere(comm: Any, reason: str | None, notes: _Notes, subject: str,
                     what: str) -> bool:
    """Whether any rank failed (``reason`` is this rank's, None if it did not); if so, the first
    rank's reason becomes the note {subject: "what: reason"} on every rank. Collective: each
    rank must reach it, so all go on alike."""
    reasons = [r for r in comm.exchange(reason) if r is not None]
    if reasons:
        notes.add(subject, f"{what}: {reasons[0]}")
    return bool(reasons)


def _timed(comm: Any, call: Callable[[], Any], stream: Any, reps: int, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call, in microseconds (this rank)."""
    import cupy as cp

    for _ in range(3):
        call()
    stream.synchronize()
    times = []
    for _ in range(repeats):
        comm.exchange(None)  # start together (a host barrier), so rank skew is not timed
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            call()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / reps)
    return statistics.median(times)


def _graph(call: Callable[[], Any], stream: Any, calls: int) -> tuple[Any, str | None]:
    """(a CUDA graph of ``calls`` back-to-back calls, None) or (None, why capture failed)."""
    try:
        stream.begin_capture()
    except Exception as exc:  # no capture on this platform (CuPy 13 on ROCm)
        return None, _reason(exc)
    try:
        for _ in range(calls):
            call()
    except Exception as exc:
        try:
            stream.end_capture()  # leave the stream usable; the graph is invalid anyway
        except Exception:
            pass
        return None, _reason(exc)
    try:
        return stream.end_capture(), None
    except Exception as exc:
        return None, _reason(exc)


def _reason(exc: BaseException) -> str:
    """A one-line description of an exception, for notes."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Notes:
    """Row-less remarks ({subject: text}) recorded once each; rank 0 prints each as it arises."""

    def __init__(self, rank: int) -> None:
        self.items: list[dict] = []
        self._rank = rank

    def add(self, subject: str, text: str) -> None:
        note = {subject: text}
        if note not in self.items:
            self.items.append(note)
            if self._rank == 0:
                print(f"note: {subject}: {text}", file=sys.stderr, flush=True)


class _TorchSymm:
    """torch's symmetric-memory all-reduce on this rank's GPU, for comparison.

    One symmetric buffer as large as the largest message is allocated and rendezvoused once;
    each measurement uses a prefix of it (viewed as the dtype) as the input. Construction is
    collective (every rank, same arguments)."""

    def __init__(self, comm: Any, max_bytes: int) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.torch, self.dist = torch, dist
        self.device = torch.device("cuda", comm.device.id)
        torch.cuda.set_device(self.device)
        port = comm.exchange(_free_port() if comm.rank == 0 else None)[0]
        options = {"backend": "nccl", "init_method": f"tcp://127.0.0.1:{port}",
                   "rank": comm.rank, "world_size": comm.world_size,
                   "timeout": timedelta(seconds=60)}
        try:
            dist.init_process_group(device_id=self.device, **options)
        except TypeError:  # torch releases before device_id
            dist.init_process_group(**options)
        try:
            self.group = dist.group.WORLD.group_name
            # Older torch needs the group enabled first; newer marks the call deprecated
            # (typing_extensions' @deprecated sets __deprecated__) and registers groups itself.
            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None and not hasattr(enable, "__deprecated__"):
                enable(self.group)
            self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=self.device)
            self.handle = symm_mem.rendezvous(self.buffer, self.group)
            self.ops = torch.ops.symm_mem
        except BaseException:
            dist.destroy_process_group()
            raise

    def view(self, name: str, count: int) -> Any:
        """The first ``count`` elements of the symmetric buffer as dtype ``name``."""
        dt = getattr(self.torch, name)
        return self.buffer[: count * numpy_dtype(name).itemsize].view(dt)

    def load(self, host: np.ndarray) -> None:
        """Copy ``host``'s bytes to the start of the symmetric buffer (outside any timing)."""
        self.buffer[: host.nbytes].copy_(self.torch.from_numpy(host.reshape(-1).view(np.uint8)))
        self.torch.cuda.synchronize(self.device)

    def output(self, impl: str, name: str, count: int) -> Any:
        """Where ``impl``'s result lands: a separate tensor (one-shot) or the input (two-shot)."""
        if impl == "torch_symm_one_shot":
            return self.torch.empty(count, dtype=getattr(self.torch, name), device=self.device)
        return self.view(name, count)

    def call(self, impl: str, name: str, count: int, out: Any) -> Callable[[], Any]:
        """One all-reduce (sum) on torch's current stream. No allocation per call, so it can be
        captured in a graph."""
        x = self.view(name, count)
        if impl == "torch_symm_one_shot":
            one_shot = self.ops.one_shot_all_reduce_out
            return lambda: one_shot(x, "sum", self.group, out)
        two_shot = self.ops.two_shot_all_reduce_
        return lambda: two_shot(x, "sum", self.group)

    def on(self, stream: Any) -> Any:
        """Context manager making CuPy ``stream`` torch's current stream."""
        torch = self.torch
        return torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr, device=self.device))

    def result_bytes(self, out: Any) -> np.ndarray:
        return out.view(self.torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.handle = self.buffer = None
        self.dist.destroy_process_group()


def _start_torch(comm: Any, max_bytes: int, notes: _Notes) -> _TorchSymm | None:
    """A _TorchSymm on every rank, or None on every rank (with a note) if any rank failed."""
    # Before torch.distributed (and its NCCL) initialise: NVLink multicast stays off.
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # Importing first and agreeing on it spares the others init_process_group's 60 s wait for
    # a rank that will never come (the common case: torch is not installed).
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
        reason = None
    except Exception as exc:
        reason = _reason(exc)
    symm = None
    if not _failed_anywhere(comm, reason, notes, "torch_symm", "unavailable"):
        try:
            symm = _TorchSymm(comm, max_bytes)
        except Exception as exc:  # too old, no P2P, NCCL failure, ...
            reason = _reason(exc)
        if _failed_anywhere(comm, reason, notes, "torch_symm", "unavailable"):
            if symm is not None:
                symm.close()
            symm = None
    return symm


def _start_transports(comm: Any, impls: Sequence[str], notes: _Notes) -> dict[str, Any]:
    """{impl: communicator over that transport} for the TRANSPORT_IMPLS asked for, on every
    rank alike (an impl that fails on any rank is left out, with a note)."""
    out = {}
    for impl, want in TRANSPORT_IMPLS.items():
        if impl not in impls:
            continue
        halves = comm.world_size // 2
        saved = os.environ.get(NODE_ENV)
        tcomm, reason = None, None
        if want == "hierarchical" and (comm.world_size < 4 or comm.world_size % 2):
            reason = f"needs an even world of 4 or more ranks, got {comm.world_size}"
        else:
            if want == "hierarchical":  # two simulated nodes on this machine
                os.environ[NODE_ENV] = f"bench-node-{comm.rank // halves}"
            try:
                tcomm = comm._beside("nccl")
                if tcomm.transport != want:
                    reason = f"got the {tcomm.transport} transport ({tcomm.transport.reason})"
            except Exception as exc:  # no NCCL in this CuPy, NCCL init failure, ...
                reason = _reason(exc)
            finally:
                if want == "hierarchical":
                    if saved is None:
                        os.environ.pop(NODE_ENV, None)
                    else:
                        os.environ[NODE_ENV] = saved
        if _failed_anywhere(comm, reason, notes, impl, "unavailable"):
            if tcomm is not None:
                tcomm.close()
        else:
            out[impl] = tcomm
    return out


def _torch_supports(comm: Any, symm: _TorchSymm, stream: Any, name: str, impl: str,
                    notes: _Notes) -> bool:
    """Whether ``impl`` runs for dtype ``name`` on every rank (a small collective trial)."""
    try:
        out = symm.output(impl, name, 256)
        with symm.on(stream):
            symm.call(impl, name, 256, out)()
        stream.synchronize()
        reason = None
    except Exception as exc:  # e.g. a dtype the op does not dispatch
        reason = _reason(exc)
    return not _failed_anywhere(comm, reason, notes, "torch_symm", f"{impl} {name} unavailable")


def _environment(comm: Any) -> dict:
    """What the numbers were measured on (this rank's view)."""
    import cupy as cp

    rt = cp.cuda.runtime
    env = {"world_size": comm.world_size,
           "gpu": rt.getDeviceProperties(comm.device.id)["name"].decode(),
           "cupy": cp.__version__, "platform": "rocm" if rt.is_hip else "cuda",
           "runtime_version": rt.runtimeGetVersion(), "driver_api_version": rt.driverGetVersion(),
           "driver": _nvidia_driver(), "nccl": None, "torch": None,
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    if comm.rank == 0:  # machine-wide facts; context() keeps rank 0's environment
        # The same lent kind has measured 14-16 % apart between machines (bench/NOTES.md, v4):
        # what each machine says about its links and virtualisation goes with its numbers.
        env["topology"] = command_output(["rocm-smi", "--showtopo"] if rt.is_hip
                                         else ["nvidia-smi", "topo", "-m"])
        env["virtualization"] = None if rt.is_hip else _nvidia_virtualization()
    try:
        from cupy.cuda import nccl

        env["nccl"] = nccl.get_version()
    except Exception:  # CuPy built without NCCL
        pass
    try:
        env["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    return env


def command_output(args: Sequence[str], timeout_s: float = 10.0) -> str | None:
    """stdout of a diagnostic command, or None where it is missing, fails or hangs."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout).strip()  # no terminal colour codes


def _nvidia_virtualization() -> str | None:
    """nvidia-smi's "Virtualization Mode" (e.g. Pass-Through, None) of the first GPU."""
    text = command_output(["nvidia-smi", "-q", "-i", "0"])
    found = re.search(r"Virtualization Mode\s*:\s*(\S[^\n]*)", text or "")
    return found.group(1).strip() if found else None


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version (e.g. 580.159.04), where Linux exposes it."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]*)", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def measurement_plan(sizes: Sequence[int], dtypes: Sequence[str], impls: Sequence[str],
                     runs: Callable[[str, int, str], bool]) -> list[tuple[str, int, list[str]]]:
    """(dtype, bytes, implementations) to measure, in order; ``runs(dtype, bytes, impl)`` says
    whether an implementation applies."""
    return [(name, nbytes, [i for i in impls if runs(name, nbytes, i)])
            for name in dtypes for nbytes in sizes]


def run_rank(comm: Any, sizes: Sequence[int], dtypes: Sequence[str], impls: Sequence[str],
             graphs: bool = True, progress: bool = True) -> list[dict]:
    """Per-rank measurements (spawned worker): one dict per (dtype, size, impl) with an "impl"
    key, then {"host": ...}, {"env": ...} and any notes ({subject: text})."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before any NCCL communicator
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    notes = _Notes(comm.rank)
    nc = _start_nccl(comm, notes) if "nccl" in impls else None
    others = _start_transports(comm, impls, notes)
    symm = (_start_torch(comm, max(sizes), notes) if any(i in TORCH_IMPLS for i in impls)
            else None)
    torch_ok = {(name, impl): symm is not None and _torch_supports(comm, symm, stream, name,
                                                                    impl, notes)
                for name in dtypes for impl in impls if impl in TORCH_IMPLS}

    def runs(name: str, nbytes: int, impl: str) -> bool:
        if impl == "ll":
            return nbytes <= comm.geometry.ll_bytes
        if impl == "nccl":
            return nc is not None and _nccl_type(name) is not None
        if impl in TORCH_IMPLS:
            return torch_ok[(name, impl)]
        if impl in TRANSPORT_IMPLS:
            return impl in others
        return True

    plan = measurement_plan(sizes, dtypes, impls, runs)
    total, done = sum(len(p[2]) for p in plan), 0
    rows = []
    try:
        for name, nbytes, todo in plan:
            np_dt = numpy_dtype(name)
            count = nbytes // np_dt.itemsize
            host = np.random.default_rng([nbytes, comm.rank]).standard_normal(count).astype(np_dt)
            x, out, kw = _upload(host, name)
            # The upload may still be in flight (pageable copies return early) and the timed
            # stream does not wait for the legacy stream: settle before the first call.
            cp.cuda.Device().synchronize()
            want = None
            for impl in todo:
                if impl in TORCH_IMPLS:
                    row = _measure_torch(comm, symm, impl, name, host, stream, graphs, notes)
                else:
                    row = _measure_cupy(others.get(impl, comm), nc, impl, name, x, out, kw,
                                        stream, graphs, notes)
                done += 1
                if row is None:
                    if progress and comm.rank == 0:
                        print(f"[{done}/{total}] {name} {size_label(nbytes)} {impl} skipped "
                              "(see note)", file=sys.stderr, flush=True)
                    continue
                got = row.pop("result")
                if want is None:
                    everyone = [np.random.default_rng([nbytes, r]).standard_normal(count)
                                .astype(np_dt) for r in range(comm.world_size)]
                    want = reference.all_reduce(everyone)
                row.update(dtype=name, bytes=nbytes, count=count, impl=impl,
                           wrong=wrong_elements(got, want))
                rows.append(row)
                if progress and comm.rank == 0:
                    print(progress_line(done, total, name, nbytes, impl, row["eager_us"],
                                        row.get("graph_us")), file=sys.stderr, flush=True)
    finally:
        for tcomm in others.values():
            tcomm.close()
        if symm is not None:
            try:
                symm.close()
            except Exception as exc:  # the measurements are taken: keep them
                notes.add("torch_symm", f"shutdown failed: {_reason(exc)}")
    rows.append({"host": _host_cost(comm)})
    rows.append({"env": _environment(comm)})
    rows += notes.items
    return rows


def _upload(host: np.ndarray, name: str) -> tuple[Any, Any, dict]:
    """(input, output, extra all_reduce arguments) on the GPU. A dtype the array library does not
    know (bfloat16 on CuPy 13) travels as raw bits named with ``dtype=``."""
    import cupy as cp

    try:
        x, kw = cp.asarray(host), {}
    except Exception:  # CuPy rejects the dtype (the error type varies between versions)
        x, kw = cp.asarray(host.view(np.dtype(f"u{host.itemsize}"))), {"dtype": name}
    return x, cp.empty_like(x), kw


def wrong_elements(got: np.ndarray, want: np.ndarray) -> int:
    """Elements whose bytes differ between ``got`` (any dtype of the same bytes) and ``want``."""
    size = want.dtype.itemsize
    diff = (np.ascontiguousarray(got).view(np.uint8).reshape(-1, size) !=
            np.ascontiguousarray(want).view(np.uint8).reshape(-1, size))
    return int(np.count_nonzero(diff.any(axis=1)))


def _timings(comm: Any, call: Callable[[], Any], stream: Any, nbytes: int, graphs: bool,
             impl: str, notes: _Notes) -> dict:
    """{"eager_us"[, "graph_us"]}: the one timing method every implementation goes through."""
    reps = _reps(nbytes)
    row = {"eager_us": _timed(comm, call, stream, reps)}
    if graphs:
        calls = min(reps, _GRAPH_CALLS)
        graph, why = _graph(call, stream, calls)
        # Graph times only where every rank captured: a rank replaying alone would wait forever.
        everyone = comm.exchange(why)
        if graph is not None and all(w is None for w in everyone):
            row["graph_us"] = _timed(comm, lambda: graph.launch(stream), stream, 1) / calls
        else:
            first = next(w for w in everyone if w is not None)
            notes.add("torch_symm" if impl in TORCH_IMPLS else "graph",
                      f"{impl}: graph capture failed, eager only: {first}")
    return row


def _measure_cupy(comm: Any, nc: Any, impl: str, name: str, x: Any, out: Any, kw: dict,
                  stream: Any, graphs: bool, notes: _Notes) -> dict:
    """detar_cupy (``impl`` an algorithm, or a transport whose communicator ``comm`` is) or
    NCCL: one checked call, then the timings."""
    import cupy as cp

    if impl == "nccl":
        from cupy.cuda import nccl

        kind = _nccl_type(name)

        def call() -> None:
            nc.allReduce(x.data.ptr, out.data.ptr, x.size, kind, nccl.NCCL_SUM, stream.ptr)
    else:
        algorithm = "auto" if impl in TRANSPORT_IMPLS else impl

        def call() -> None:
            comm.all_reduce(x, out, stream=stream, algorithm=algorithm, **kw)
    with stream:  # poison on the timed stream: no race with the call
        out.fill(0)
    call()
    stream.synchronize()
    if impl != "nccl":
        comm.check()
    row = {"result": cp.asnumpy(out)}
    row.update(_timings(comm, call, stream, x.nbytes, graphs, impl, notes))
    return row


def _measure_torch(comm: Any, symm: _TorchSymm, impl: str, name: str, host: np.ndarray,
                   stream: Any, graphs: bool, notes: _Notes) -> dict | None:
    """torch symmetric memory: fresh input, one checked call, then the timings on ``stream``.
    None (on every rank, with a note) if the call fails on any rank."""
    count = host.size
    try:
        symm.load(host)
        out = symm.output(impl, name, count)
        call = symm.call(impl, name, count, out)
        with symm.on(stream):
            call()
        stream.synchronize()
        got, reason = symm.result_bytes(out), None
    except Exception as exc:
        got, reason = None, _reason(exc)
    if _failed_anywhere(comm, reason, notes, "torch_symm",
                        f"{impl} {name} {size_label(host.nbytes)} failed"):
        return None
    # Two-shot reduces in place, so repeated calls keep folding their own output: the values
    # grow (to inf), which does not change what the kernel does or how long it takes.
    with symm.on(stream):
        row = {"result": got}
        row.update(_timings(comm, call, stream, host.nbytes, graphs, impl, notes))
    return row


def _host_cost(comm: Any) -> dict:
    """Host microseconds per call: our all_reduce against the floor, one pre-packed driver launch
    of a kernel with the same parameters and no work."""
    import cupy as cp

    from . import _kernels
    from ._launch import Launcher
    from ._protocol import Ctx

    x = cp.ones(256, cp.float16)
    for _ in range(10):
        comm.all_reduce(x, x, algorithm="ll")
    f = _kernels.function(_kernels.ModuleKey(None, comm.world_size),
                          _kernels.nop_name(comm.world_size), comm.device.id)
    launcher = Launcher(Ctx())
    p = launcher.prepare(f.ptr, 1, 256, 0, 0, 256, 0, 0, 256, 0)
    launch = launcher.launch_kernel
    stream = cp.cuda.get_current_stream()
    sptr = stream.ptr
    res = {}
    for label, call in (("all_reduce", lambda: comm.all_reduce(x, x, algorithm="ll")),
                        ("bare_launch", lambda: launch(p.f, p.grid, 1, 1, p.block, 1, 1, 0, sptr,
                                                       p.params, 0))):
        best = []
        for _ in range(5):
            comm.exchange(None)
            t0 = time.perf_counter()
            for _ in range(200):
                call()
            best.append((time.perf_counter() - t0) / 200 * 1e6)
            stream.synchronize()
        res[label + "_us"] = statistics.median(best)
    comm.check()
    return res


def _key(row: dict) -> tuple:
    return row["dtype"], row["bytes"], row["impl"]


def merge(per_rank: list[list[dict]], world: int) -> tuple[list[dict], dict]:
    """Max over ranks of every time; busbw and ratio to NCCL (time_nccl / time: >1 is faster).
    Rows are matched across ranks by (dtype, bytes, impl); entries without "impl" (host cost,
    environment, notes) are not rows."""
    by_rank = [{_key(r): r for r in rank if "impl" in r} for rank in per_rank]
    rows = []
    for row in (r for r in per_rank[0] if "impl" in r):
        same = [rank[_key(row)] for rank in by_rank if _key(row) in rank]
        merged = dict(row)
        for key in ("eager_us", "graph_us"):
            if all(key in r for r in same):
                merged[key] = max(r[key] for r in same)
            else:
                merged.pop(key, None)
        merged["wrong"] = max(r["wrong"] for r in same)
        merged["algbw_GBs"] = row["bytes"] / merged["eager_us"] / 1e3
        merged["busbw_GBs"] = merged["algbw_GBs"] * 2 * (world - 1) / world
        rows.append(merged)
    nccl = {(r["dtype"], r["bytes"]): r for r in rows if r["impl"] == "nccl"}
    for r in rows:
        ref = nccl.get((r["dtype"], r["bytes"]))
        if ref is not None:
            r["speedup_eager"] = ref["eager_us"] / r["eager_us"]
            if "graph_us" in r and "graph_us" in ref:
                r["speedup_graph"] = ref["graph_us"] / r["graph_us"]
    hosts = [e["host"] for rank in per_rank for e in rank if "host" in e]
    host = {k: max(h[k] for h in hosts) for k in hosts[0]}
    return rows, host


def context(per_rank: list[list[dict]]) -> dict:
    """{"env": rank 0's environment plus every rank's GPU name, "notes": the notes, once each}."""
    envs = [e["env"] for rank in per_rank for e in rank if "env" in e]
    env = dict(envs[0]) if envs else {}
    if envs:
        env["gpus"] = [e["gpu"] for e in envs]
    notes: list[dict] = []
    for rank in per_rank:
        for e in rank:
            if "impl" not in e and "host" not in e and "env" not in e and e not in notes:
                notes.append(e)
    return {"env": env, "notes": notes}


def table(rows: list[dict]) -> str:
    """The rows as a text table. #wrong of NCCL and torch rows is in parentheses: informational."""
    from tabulate import tabulate

    def wrong(r: dict) -> str:
        return str(r["wrong"]) if r["impl"] in DETAR_IMPLS else f"({r['wrong']})"

    body = [[r["dtype"], size_label(r["bytes"]), r["impl"], f"{r['eager_us']:.1f}",
             f"{r['graph_us']:.1f}" if "graph_us" in r else "-", f"{r['busbw_GBs']:.1f}",
             wrong(r),
             f"{r['speedup_eager']:.2f}" if "speedup_eager" in r else "-",
             f"{r['speedup_graph']:.2f}" if "speedup_graph" in r else "-"] for r in rows]
    # The cells are formatted already: tabulate must not re-parse them ("1.00" would show as 1).
    return tabulate(body, headers=["dtype", "size", "impl", "eager us", "graph us", "busbw GB/s",
                                   "#wrong", "x NCCL eager", "x NCCL graph"],
                    disable_numparse=True, colalign=("left", "right", "left") + ("right",) * 6)


def plot(rows: list[dict], world: int, path: str) -> bool:
    """Latency and bus bandwidth vs size, log-log, one line per implementation. An
    implementation without graph times is drawn with its eager times, marked "(eager)"."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, impl) in sorted({(r["dtype"], r["impl"]) for r in rows}):
        sel = [r for r in rows if r["dtype"] == name and r["impl"] == impl]
        xs = [r["bytes"] for r in sel]
        if all("graph_us" in r for r in sel):
            a.plot(xs, [r["graph_us"] for r in sel], marker="o", label=f"{impl} {name}")
        else:
            a.plot(xs, [r["eager_us"] for r in sel], marker="x", linestyle="--",
                   label=f"{impl} {name} (eager)")
        b.plot(xs, [r["busbw_GBs"] for r in sel], marker="o", label=f"{impl} {name}")
    for ax, label in ((a, "time per call, graph replay (us)"), (b, "bus bandwidth, eager (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    others = sorted({r["impl"] for r in rows} - set(DETAR_IMPLS))  # what detar is compared to
    fig.suptitle(f"detar_cupy all-reduce vs {', '.join(others) or 'nothing else'}, {world} GPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(world: int, sizes: Sequence[int] = DEFAULT_SIZES, dtypes: Sequence[str] = ("float16",),
        impls: Sequence[str] = IMPLS, out_prefix: str | None = None,
        graphs: bool = True, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Spawn ``world`` ranks, measure, print the table; write JSON and PNG if ``out_prefix``.
    ``progress``: rank 0 prints a line per finished measurement on stderr."""
    from ._spawn import spawn

    per_rank = spawn(run_rank, world, args=(tuple(sizes), tuple(dtypes), tuple(impls), graphs,
                                            progress))
    rows, host = merge(per_rank, world)
    extra = context(per_rank)
    print(table(rows))
    print("#wrong in parentheses is informational: NCCL and torch do not promise detar_cupy's "
          "fold order")
    print(f"host us per call: all_reduce {host['all_reduce_us']:.2f}, "
          f"bare pre-packed launch {host['bare_launch_us']:.2f}")
    if out_prefix:
        with open(out_prefix + ".json", "w") as f:
            json.dump({"world_size": world, "env": extra["env"], "notes": extra["notes"],
                       "rows": rows, "host": host}, f, indent=1)
        plot(rows, world, out_prefix + ".png")
    return rows, host
