"""Benchmark against NCCL in the same run on the same GPUs (nccl-tests style rows).

Every implementation is timed the same way: warm-up, then back-to-back calls on one stream between
two device events, median of several repeats, maximum over ranks; once eagerly (Python launches
each call: what a training loop sees) and once by replaying a captured CUDA graph (GPU time: what
an inference engine that captures its all-reduces sees). Each detar row also counts the elements
whose bits differ from detar_cupy.reference (#wrong, must be 0).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Sequence

import numpy as np

from . import reference
from .dtypes import numpy_dtype

KIB = 1 << 10
DEFAULT_SIZES = tuple(KIB << (2 * i) for i in range(10))  # 1 KiB .. 256 MiB
IMPLS = ("auto", "ll", "one_shot", "two_shot", "nccl")
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "bfloat16": "NCCL_BFLOAT16"}


def _reps(nbytes: int) -> int:
    return max(5, min(200, (64 << 20) // max(nbytes, 1)))


def _nccl_comm(comm: Any):
    from cupy.cuda import nccl

    uid = nccl.get_unique_id() if comm.rank == 0 else None
    uid = comm._rdv.exchange(uid)[0]
    return nccl.NcclCommunicator(comm.world_size, uid, comm.rank)


def _timed(comm: Any, call, stream, reps: int, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call, in microseconds (this rank)."""
    import cupy as cp

    for _ in range(3):
        call()
    stream.synchronize()
    times = []
    for _ in range(repeats):
        comm._rdv.barrier()  # start together, so rank skew is not timed
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            call()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / reps)
    return statistics.median(times)


def _graph(call, stream, calls: int):
    """A CUDA graph of ``calls`` back-to-back calls, or None where capture is unsupported."""
    try:
        stream.begin_capture()
        for _ in range(calls):
            call()
        return stream.end_capture()
    except Exception:
        return None


def run_rank(comm: Any, sizes: Sequence[int], dtypes: Sequence[str], impls: Sequence[str],
             graphs: bool = True) -> list[dict]:
    """Per-rank measurements (spawned worker): one dict per (dtype, size, impl)."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    nc = _nccl_comm(comm) if "nccl" in impls else None
    rows = []
    for name in dtypes:
        np_dt = numpy_dtype(name)
        for nbytes in sizes:
            count = nbytes // np_dt.itemsize
            rng = np.random.default_rng([nbytes, comm.rank])
            host = rng.standard_normal(count).astype(np_dt)
            x = cp.asarray(host)
            out = cp.empty_like(x)
            # The upload may still be in flight (pageable copies return early) and the timed
            # stream does not wait for the legacy stream: settle before the first call.
            cp.cuda.Device().synchronize()
            reps = _reps(nbytes)
            want = None
            for impl in impls:
                if impl == "ll" and nbytes > comm._geom.ll_bytes:
                    continue
                if impl == "nccl":
                    from cupy.cuda import nccl

                    kind = getattr(nccl, _NCCL_TYPES.get(name, ""), None)
                    if nc is None or kind is None:
                        continue

                    def call(kind=kind):
                        nc.allReduce(x.data.ptr, out.data.ptr, count, kind, nccl.NCCL_SUM,
                                     stream.ptr)
                else:
                    def call(impl=impl):
                        comm.all_reduce(x, out, stream=stream, algorithm=impl)
                with stream:  # poison on the timed stream: no race with the call
                    out.fill(0)
                call()
                stream.synchronize()
                if impl != "nccl":
                    comm.check()
                got = cp.asnumpy(out)
                if want is None:
                    everyone = [np.random.default_rng([nbytes, r]).standard_normal(count)
                                .astype(np_dt) for r in range(comm.world_size)]
                    want = reference.all_reduce(everyone)
                diff = got.view(np.uint8).reshape(count, -1) != want.view(np.uint8).reshape(count, -1)
                wrong = int(np.count_nonzero(diff.any(axis=1)))
                row = {"dtype": name, "bytes": nbytes, "count": count, "impl": impl,
                       "eager_us": _timed(comm, call, stream, reps), "wrong": wrong}
                if graphs:
                    g = _graph(call, stream, min(reps, 50))
                    if g is not None:
                        row["graph_us"] = _timed(comm, lambda: g.launch(stream), stream, 1) / min(reps, 50)
                rows.append(row)
    rows.append({"host": _host_cost(comm)})
    return rows


def _host_cost(comm: Any) -> dict:
    """Host microseconds per call: our all_reduce vs a bare pre-packed launch of the same kernel."""
    import cupy as cp

    x = cp.ones(256, cp.float16)
    for _ in range(10):
        comm.all_reduce(x, x, algorithm="ll")
    plan = comm._plans[("ar", "float16", "sum", "ll", 256)]
    f, grid, block, _, _, count, aux, sig = plan[0]
    stream = cp.cuda.get_current_stream()
    launch = comm._launcher.launch
    res = {}
    for label, call in (("all_reduce", lambda: comm.all_reduce(x, x, algorithm="ll")),
                        ("bare_launch", lambda: launch(f, grid, block, stream.ptr, x.data.ptr,
                                                       x.data.ptr, count, aux, sig))):
        best = []
        for _ in range(5):
            comm._rdv.barrier()
            t0 = time.perf_counter()
            for _ in range(200):
                call()
            best.append((time.perf_counter() - t0) / 200 * 1e6)
            stream.synchronize()
        res[label + "_us"] = statistics.median(best)
    comm.check()
    return res


def merge(per_rank: list[list[dict]], world: int) -> tuple[list[dict], dict]:
    """Max over ranks of every time; busbw and ratio to NCCL (time_nccl / time: >1 is faster)."""
    rows, hosts = [], [r[-1]["host"] for r in per_rank]
    for i, row in enumerate(per_rank[0][:-1]):
        merged = dict(row)
        for key in ("eager_us", "graph_us"):
            if key in row:
                merged[key] = max(r[i][key] for r in per_rank)
        merged["wrong"] = max(r[i]["wrong"] for r in per_rank)
        t = merged["eager_us"]
        merged["algbw_GBs"] = row["bytes"] / t / 1e3
        merged["busbw_GBs"] = merged["algbw_GBs"] * 2 * (world - 1) / world
        rows.append(merged)
    nccl = {(r["dtype"], r["bytes"]): r for r in rows if r["impl"] == "nccl"}
    for r in rows:
        ref = nccl.get((r["dtype"], r["bytes"]))
        if ref is not None:
            r["speedup_eager"] = ref["eager_us"] / r["eager_us"]
            if "graph_us" in r and "graph_us" in ref:
                r["speedup_graph"] = ref["graph_us"] / r["graph_us"]
    host = {k: max(h[k] for h in hosts) for k in hosts[0]}
    return rows, host


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def size(n: int) -> str:
        return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"

    body = [[r["dtype"], size(r["bytes"]), r["impl"], f"{r['eager_us']:.1f}",
             f"{r['graph_us']:.1f}" if "graph_us" in r else "-", f"{r['busbw_GBs']:.1f}",
             r["wrong"] if r["impl"] != "nccl" else "-",
             f"{r['speedup_eager']:.2f}" if "speedup_eager" in r else "-",
             f"{r['speedup_graph']:.2f}" if "speedup_graph" in r else "-"] for r in rows]
    return tabulate(body, headers=["dtype", "size", "impl", "eager us", "graph us", "busbw GB/s",
                                   "#wrong", "x NCCL eager", "x NCCL graph"])


def plot(rows: list[dict], world: int, path: str) -> bool:
    """Latency and bus bandwidth vs size, log-log, one line per implementation."""
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
        a.plot(xs, [r.get("graph_us", r["eager_us"]) for r in sel], marker="o", label=f"{impl} {name}")
        b.plot(xs, [r["busbw_GBs"] for r in sel], marker="o", label=f"{impl} {name}")
    for ax, label in ((a, "time per call, graph replay (us)"), (b, "bus bandwidth, eager (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"detar_cupy vs NCCL all-reduce, {world} GPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(world: int, sizes: Sequence[int] = DEFAULT_SIZES, dtypes: Sequence[str] = ("float16",),
        impls: Sequence[str] = IMPLS, out_prefix: str | None = None,
        graphs: bool = True) -> tuple[list[dict], dict]:
    """Spawn ``world`` ranks, measure, print the table; write JSON and PNG if ``out_prefix``."""
    from ._spawn import spawn

    per_rank = spawn(run_rank, world, args=(tuple(sizes), tuple(dtypes), tuple(impls), graphs))
    rows, host = merge(per_rank, world)
    print(table(rows))
    print(f"host us per call: all_reduce {host['all_reduce_us']:.2f}, "
          f"bare pre-packed launch {host['bare_launch_us']:.2f}")
    if out_prefix:
        with open(out_prefix + ".json", "w") as f:
            json.dump({"world_size": world, "rows": rows, "host": host}, f, indent=1)
        plot(rows, world, out_prefix + ".png")
    return rows, host
