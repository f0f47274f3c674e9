"""Determinism checks of the contract, run inside spawned ranks (quick tier), and the helpers the
full tier (gpu_determinism_full.py) shares.

Every assertion compares raw bits. GPU results are compared with each other byte for byte (NaN
payloads included: every path runs the same fold, so even NaNs must agree); a GPU result is compared
with detar_cupy.reference bit for bit except for NaN payloads, which the contract leaves
unspecified (numpy's NaNs are not the GPU's). Inputs include specials (NaN, inf, signed zeros,
float32 subnormals, 16-bit overflow) and come from seeds that every check reports, so a failure
is reproducible from its printed seed (``DETAR_DETERMINISM_SEED``).

Each check returns ``{"ok", "seed", "detail", "digest"}``; ``digest`` is a hash of the output
bytes, which the parent compares across ranks (rank agreement).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from typing import Any, Callable

import numpy as np

from detar_cupy import reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from gpu_cases import random_values

# The ranks' environment. Staging halves of 1 MiB (default 32 MiB) put chunked calls (inputs
# larger than the buffer) at sizes whose numpy reference takes milliseconds, so every dtype and
# op can be checked chunked within the tier's minute. NCCL runs without NVLink multicast, as on
# the benchmark machines.
QUICK_ENV = {"DETAR_STAGING_BYTES": str(1 << 20), "DETAR_TIMEOUT": "60", "NCCL_NVLS_ENABLE": "0"}
ALGORITHMS = ("ll", "one_shot", "two_shot", "auto")
RUN_TO_RUN = 1000
BATCH = 64
HIDDEN = (4096, 5120, 16384)


def master_seed() -> int:
    """``DETAR_DETERMINISM_SEED`` if set (to reproduce a failure), else a fresh random seed."""
    value = os.environ.get("DETAR_DETERMINISM_SEED")
    return int(value) if value else secrets.randbelow(1 << 31)


# ---- helpers shared with the full tier ----------------------------------------------------------

def inputs(seed: int, world: int, count: int, name: str) -> list[np.ndarray]:
    """Every rank's input (rank r's from seed [seed, r]), with specials; the same in every
    process."""
    return [random_values(np.random.default_rng([seed, r]), name, count) for r in range(world)]


def to_device(a: np.ndarray) -> Any:
    """A CuPy array holding ``a``'s bytes; bfloat16 travels as uint16 (CuPy 13 has no bfloat16),
    so calls name the dtype with ``dtype=``."""
    import cupy as cp

    return cp.asarray(a.view(np.uint16) if a.dtype == numpy_dtype("bfloat16") else a)


def to_host(d: Any, name: str) -> np.ndarray:
    """The bytes of CuPy array ``d`` as a numpy array of dtype ``name``."""
    import cupy as cp

    return cp.asnumpy(d).view(numpy_dtype(name))


def same_bits(a: Any, b: Any) -> bool:
    """Raw byte equality of two CuPy arrays, decided on the device."""
    import cupy as cp

    return a.shape == b.shape and bool(cp.all(a.view(cp.uint8) == b.view(cp.uint8)))


def digest(a: np.ndarray) -> str:
    """A short hash of an array's bytes (what ranks compare)."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()[:16]


def _components(a: np.ndarray) -> np.ndarray:
    """Elements as rows of components: complex as (re, im), everything else one column."""
    a = np.ascontiguousarray(a.reshape(-1))
    if a.dtype.kind == "c":
        return a.view(np.float32 if a.dtype == np.complex64 else np.float64).reshape(-1, 2)
    return a.reshape(-1, 1)


def _hex(a: np.ndarray, i: int) -> str:
    """Element i's bytes as one hex number (most significant first)."""
    return "0x" + a[i:i + 1].view(np.uint8)[::-1].tobytes().hex()


def difference(got: np.ndarray, want: np.ndarray, exact: bool) -> str:
    """'' when ``got`` has the bits of ``want``, else which elements differ and the first one.

    ``exact``: every byte must match. Otherwise a component that is NaN in both may differ in
    payload (the rule for comparisons with detar_cupy.reference)."""
    got, want = got.reshape(-1), want.reshape(-1)
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {got.shape} {got.dtype}, expected {want.shape} {want.dtype}"
    gc, wc = _components(got), _components(want)
    size = gc.dtype.itemsize
    shape = (gc.shape[0], gc.shape[1], size)
    same_bytes = (gc.view(np.uint8).reshape(shape) == wc.view(np.uint8).reshape(shape)).all(axis=2)
    floating = gc.dtype.kind == "f" or gc.dtype == numpy_dtype("bfloat16")
    both_nan = (np.isnan(gc) & np.isnan(wc)) if floating else np.zeros_like(same_bytes)
    same = same_bytes | both_nan if not exact else same_bytes
    bad = np.nonzero(~same.all(axis=1))[0]
    if bad.size == 0:
        return ""
    i = int(bad[0])
    nan_only = " (only NaN payloads differ)" if both_nan[~same_bytes].all() else ""
    return (f"{bad.size} of {got.size} elements differ{nan_only}; first at {i}: got {got[i]!r} "
            f"{_hex(got, i)}, want {want[i]!r} {_hex(want, i)}")


def capture(stream: Any, body: Callable[[], Any]) -> Any:
    """The CUDA graph of what ``body`` launches on ``stream``. The capture is ended even when
    ``body`` raises, so the stream stays usable."""
    stream.begin_capture()
    try:
        body()
    except BaseException:
        try:
            stream.end_capture()
        except Exception:  # an invalidated capture: the body's exception is the one to report
            pass
        raise
    return stream.end_capture()


def check(ok: bool | None, seed: int, detail: str = "", out_digest: str = "") -> dict:
    """One check's result as the parent reads it; ``ok`` None: this platform cannot run it."""
    return {"ok": None if ok is None else bool(ok), "seed": seed, "detail": detail,
            "digest": out_digest}


def say(comm: Any, text: str) -> None:
    """A progress line from rank 0 on stderr (visible with pytest -s, and if a time limit hits)."""
    if comm.rank == 0:
        print(text, file=sys.stderr, flush=True)


# ---- the quick tier ---------------------------------------------------------------------------

def run_quick(comm: Any, seed: int) -> dict:
    """Every quick check on this rank: {"checks": {name: check}, "nccl": observation,
    "seconds": {section: wall seconds}}. Seeds are ``seed`` plus a per-check offset."""
    checks: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    sections: list[tuple[str, Callable[[], None]]] = [
        ("kernel load", lambda: _load_kernels(comm)),
        ("run-to-run", lambda: _run_to_run(comm, seed, checks)),
        ("batch invariance", lambda: _batch_invariance(comm, seed + 100, checks)),
        ("algorithm agreement", lambda: _algorithms(comm, seed + 200, checks)),
        ("streams", lambda: _streams(comm, seed + 300, checks)),
        ("graph replay", lambda: _graph_replay(comm, seed + 400, checks)),
    ]
    for label, body in sections:
        t0 = time.perf_counter()
        body()
        comm.synchronize()
        seconds[label] = time.perf_counter() - t0
        say(comm, f"[determinism quick, world {comm.world_size}] {label}: "
                  f"{seconds[label]:.1f} s")
    t0 = time.perf_counter()
    nccl = nccl_contrast(comm, seed + 500)
    seconds["nccl contrast"] = time.perf_counter() - t0
    return {"checks": checks, "nccl": nccl, "seconds": seconds}


def _load_kernels(comm: Any) -> None:
    """Load (or compile, if the kernel cache is cold) every kernel of this world size up front,
    so the time of each check below is the check's own."""
    from detar_cupy import _kernels

    for key in _kernels.module_keys():
        if key.world_size == comm.world_size:
            for name in _kernels.kernel_names(key):
                _kernels.function(key, name, comm.device.id)


def _chunked_count(comm: Any, name: str) -> int:
    """Elements per rank well beyond one staging half (so every algorithm cuts the call into
    chunks), and not a multiple of anything."""
    return comm.geometry.stage_half_bytes * 5 // 2 // DTYPES[name].itemsize + 7


def _run_to_run(comm: Any, seed: int, checks: dict) -> None:
    """The same call RUN_TO_RUN times gives the same bits every time (differences counted on the
    device), and those bits are the reference's."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    for i, name in enumerate(("float16", "bfloat16", "float32")):
        for j, count in enumerate((65536 + 3, _chunked_count(comm, name))):
            s = seed + 10 * i + j
            host = inputs(s, world, count, name)
            x = to_device(host[rank])
            first = comm.all_reduce(x, dtype=name)
            out = cp.empty_like(x)
            first_bytes = first.view(cp.uint8)
            diffs = cp.zeros((), cp.int64)
            for _ in range(RUN_TO_RUN):
                comm.all_reduce(x, out, dtype=name)
                diffs += cp.count_nonzero(out.view(cp.uint8) != first_bytes)
            got = to_host(first, name)
            detail = difference(got, reference.all_reduce(host), exact=False)
            n_diff = int(diffs)
            if n_diff:
                detail = f"{n_diff} bytes changed over {RUN_TO_RUN} repeats; " + detail
            checks[f"run-to-run x{RUN_TO_RUN} {name} n={count}"] = check(
                not detail, s, detail, digest(got))


def _batch_invariance(comm: Any, seed: int, checks: dict) -> None:
    """Rows of a [B, H] batch do not depend on the batch size or on where a slice starts:
    all_reduce(x[:b]) == all_reduce(x)[:b] for every b, and random row and element slices at any
    offset (element slices are misaligned) equal those elements of the full result."""
    world, rank = comm.world_size, comm.rank
    for i, name in enumerate(("bfloat16", "float16", "float32")):
        for j, hidden in enumerate(HIDDEN):
            s = seed + 10 * i + j
            host = [h.reshape(BATCH, hidden) for h in inputs(s, world, BATCH * hidden, name)]
            x = to_device(host[rank])
            full = comm.all_reduce(x, dtype=name)
            got = to_host(full, name)
            problems = []
            ref_diff = difference(got, reference.all_reduce(host), exact=False)
            if ref_diff:
                problems.append(f"full batch vs reference: {ref_diff}")
            for b in range(1, BATCH + 1):
                if not same_bits(comm.all_reduce(x[:b], dtype=name), full[:b]):
                    problems.append(f"x[:{b}] differs from the full batch's first {b} rows")
            rng = np.random.default_rng([s, 1])
            flat, flat_full = x.reshape(-1), full.reshape(-1)
            for _ in range(16):
                lo = int(rng.integers(0, BATCH))
                hi = int(rng.integers(lo + 1, BATCH + 1))
                if not same_bits(comm.all_reduce(x[lo:hi], dtype=name), full[lo:hi]):
                    problems.append(f"rows x[{lo}:{hi}] differ from the full batch's")
                a = int(rng.integers(0, flat.size))
                e = int(rng.integers(a + 1, flat.size + 1))
                if not same_bits(comm.all_reduce(flat[a:e], dtype=name), flat_full[a:e]):
                    problems.append(f"elements [{a}:{e}] differ from the full batch's")
            checks[f"batch invariance B={BATCH} H={hidden} {name}"] = check(
                not problems, s, "; ".join(problems[:4]), digest(got))


def _algorithms(comm: Any, seed: int, checks: dict) -> None:
    """ll == one_shot == two_shot == auto == reference for every dtype and op, on a misaligned
    input (x[1:]) of an odd count and on an input several times the staging buffer (chunked)."""
    world, rank = comm.world_size, comm.rank
    for i, (name, dt) in enumerate(DTYPES.items()):
        for j, (count, offset) in enumerate(((1000 + 3 * world + 1, 1),
                                             (_chunked_count(comm, name), 0))):
            s = seed + 10 * i + j
            padded = inputs(s, world, count + offset, name)
            host = [h[offset:] for h in padded]
            x = to_device(padded[rank])[offset:]  # a view starting `offset` elements in
            for op in dt.ops:
                want = reference.all_reduce(host, op)
                outs = {alg: to_host(comm.all_reduce(x, op=op, algorithm=alg, dtype=name), name)
                        for alg in ALGORITHMS}
                problems = [f"{alg} vs reference: {d}" for alg, o in outs.items()
                            if (d := difference(o, want, exact=False))]
                problems += [f"{alg} vs one_shot: {d}" for alg, o in outs.items()
                             if (d := difference(o, outs["one_shot"], exact=True))]
                kind = "misaligned" if offset else "chunked"
                checks[f"algorithms {name} {op} n={count} {kind}"] = check(
                    not problems, s, "; ".join(problems[:4]), digest(outs["one_shot"]))


def _streams(comm: Any, seed: int, checks: dict) -> None:
    """The same bits on the current stream, on a non-blocking stream, and on that stream while
    another stream keeps the GPU busy with matrix products."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    count = 1 << 20
    host = inputs(seed, world, count, "float16")
    x = to_device(host[rank])
    cp.cuda.Device().synchronize()  # the upload must land before another stream reads x
    on_current = comm.all_reduce(x)
    # Calls on one communicator must be ordered: the side stream does not wait for this one.
    comm.synchronize()
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        on_side = comm.all_reduce(x, stream=side)
    busy = cp.cuda.Stream(non_blocking=True)
    with busy:
        m = cp.ones((2048, 2048), cp.float32)
        for _ in range(4):
            m = m @ m / 2048
    with side:
        while_busy = comm.all_reduce(x, stream=side)
    comm.synchronize(side)
    busy.synchronize()
    got = to_host(on_current, "float16")
    problems = []
    if d := difference(got, reference.all_reduce(host), exact=False):
        problems.append(f"current stream vs reference: {d}")
    for label, arr in (("non-blocking stream", on_side), ("next to busy stream", while_busy)):
        if d := difference(to_host(arr, "float16"), got, exact=True):
            problems.append(f"{label} vs current stream: {d}")
    checks[f"stream independence n={count}"] = check(not problems, seed, "; ".join(problems),
                                                     digest(got))


def _graph_replay(comm: Any, seed: int, checks: dict) -> None:
    """One CUDA graph holding a call of every algorithm, replayed 100 times (outputs poisoned
    before each replay) gives the eager bits every time."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    count = (1 << 20) + 5  # chunked for one_shot and two_shot with QUICK_ENV's buffers
    host = inputs(seed, world, count, "float16")
    x = to_device(host[rank])
    eager = {alg: comm.all_reduce(x, algorithm=alg) for alg in ALGORITHMS}  # also caches plans
    outs = {alg: cp.empty_like(x) for alg in ALGORITHMS}
    cap = cp.cuda.Stream(non_blocking=True)
    comm.synchronize()
    name = f"graph replay x100 == eager n={count}"

    def every_algorithm() -> None:
        for alg in ALGORITHMS:
            comm.all_reduce(x, outs[alg], stream=cap, algorithm=alg)

    try:
        graph = capture(cap, every_algorithm)
    except Exception as exc:
        if not cp.cuda.runtime.is_hip:  # CUDA graphs work with CuPy on CUDA: a real failure
            raise
        # CuPy 13 on ROCm has no graph capture: recorded as skipped, not faked
        checks[name] = check(None, seed, f"skipped: {exc}")
        return
    problems = []
    want = to_host(eager["one_shot"], "float16")
    if d := difference(want, reference.all_reduce(host), exact=False):
        problems.append(f"eager one_shot vs reference: {d}")
    for replay in range(100):
        with cap:  # poison on the replay stream, so it is ordered before the replay
            for out in outs.values():
                out.fill(0)
        graph.launch(cap)
        comm.synchronize(cap)
        for alg in ALGORITHMS:
            if not same_bits(outs[alg], eager[alg]):
                problems.append(f"replay {replay} {alg} differs from eager")
    problems += [f"eager {alg} differs from eager one_shot" for alg in ALGORITHMS
                 if not same_bits(eager[alg], eager["one_shot"])]
    checks[name] = check(not problems, seed, "; ".join(problems[:4]), digest(want))


def nccl_contrast(comm: Any, seed: int) -> dict:
    """Does NCCL's result for the first 4096 elements change with the message size? Observed on
    this machine, not asserted. Ours is checked to stay put (and to equal the reference).
    Finite inputs, so NaN payloads cannot inflate NCCL's count of distinct results."""
    import cupy as cp

    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        return {"skipped": f"cupy.cuda.nccl unavailable: {exc}"}
    from detar_cupy.benchmark import _nccl_comm

    gpus = comm.exchange(cp.cuda.runtime.deviceGetPCIBusId(comm.device.id))
    if len(set(gpus)) < len(gpus):
        return {"skipped": "ranks share a GPU (DETAR_SHARE_GPUS=1); NCCL needs one GPU per rank"}
    nc = _nccl_comm(comm)
    total = 1 << 24
    host = [np.random.default_rng([seed, r]).standard_normal(total).astype(np.float16)
            for r in range(comm.world_size)]
    x = cp.asarray(host[comm.rank])
    stream = cp.cuda.get_current_stream()
    sizes = (4096, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
    nccl_prefix, ours_prefix = {}, {}
    for n in sizes:
        out = cp.empty(n, cp.float16)
        nc.allReduce(x.data.ptr, out.data.ptr, n, nccl.NCCL_FLOAT16, nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()
        nccl_prefix[n] = cp.asnumpy(out[:4096]).tobytes()
        ours_prefix[n] = cp.asnumpy(comm.all_reduce(x[:n])[:4096]).tobytes()
    want = reference.all_reduce([h[:4096] for h in host]).tobytes()
    groups: dict[bytes, list[int]] = {}
    for n in sizes:
        groups.setdefault(nccl_prefix[n], []).append(n)
    return {"seed": seed, "sizes": sizes,
            "nccl distinct prefixes": len(groups),
            "nccl sizes per distinct prefix": list(groups.values()),
            "nccl sizes equal to reference": groups.get(want, []),
            "ours distinct prefixes": len(set(ours_prefix.values())),
            "ours equals reference": set(ours_prefix.values()) == {want}}
