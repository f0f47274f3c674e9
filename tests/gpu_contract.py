"""GPU workers for the contract's edge cases (module-level: spawned ranks import them by name).

Every worker derives every rank's inputs from seeds, computes the reference itself, poisons
outputs first (the complement of the expected bits), and returns rows (label, ok, detail,
digest of the output) so the parent also checks that the ranks agree.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

import gpu_cases
from detar_cupy import reference
from detar_cupy.dtypes import numpy_dtype

FLT_MIN = 0x00800000
FLOATS = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")
ALL_REDUCE_ALGS = ("ll", "one_shot", "two_shot")


def _uint(itemsize: int) -> Any:
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.uint64}[itemsize]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()[:16]


def _raw(name: str) -> Any:
    """The array dtype carrying ``name`` on the GPU (CuPy 13 has no bfloat16: uint16)."""
    return np.uint16 if name == "bfloat16" else numpy_dtype(name)


def _poison(cp, want: np.ndarray, name: str) -> Any:
    """A device array holding the complement of ``want``'s bits: every element must be written."""
    words = ~np.ascontiguousarray(want).view(np.uint8)
    return cp.asarray(words).view(_raw(name))


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    g, w = np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)
    bad = np.flatnonzero(g != w)
    if not bad.size:
        return ""
    i = int(bad[0]) // want.itemsize
    size = want.itemsize
    return (f"{bad.size} differing bytes; element {i}: got "
            f"{g[i * size:(i + 1) * size][::-1].tobytes().hex()} want "
            f"{w[i * size:(i + 1) * size][::-1].tobytes().hex()}")


def _row(label: str, got: np.ndarray, want: np.ndarray) -> tuple:
    ok = reference.bits_equal(got, want)
    return label, ok, "" if ok else _first_difference(got, want), _digest(got)


def _all_reduce_rows(comm, label: str, name: str, op: str, inputs: list[np.ndarray],
                     algs=ALL_REDUCE_ALGS) -> list[tuple]:
    """all_reduce of rank-ordered host ``inputs`` (each rank sends its own) with every algorithm,
    out of place into a poisoned output; rows against the reference."""
    import cupy as cp

    want = reference.all_reduce(inputs, op)
    x = cp.asarray(np.ascontiguousarray(inputs[comm.rank]).view(_raw(name)))
    rows = []
    for alg in algs:
        out = _poison(cp, want, name)
        comm.all_reduce(x, out, op=op, algorithm=alg, dtype=name)
        comm.synchronize()
        rows.append(_row(f"{label} {name} {op} {alg}", cp.asnumpy(out).view(want.dtype), want))
    return rows


# ---- float32 results at the FLT_MIN boundary, and NaN bits -------------------------------------
def _f32(words) -> np.ndarray:
    return np.array(words, np.uint32).view(np.float32)


def _n_flt_min(world: int) -> int:
    """The float32 bits of N * FLT_MIN (exact: a small integer times a power of two)."""
    return int(np.array([world * 2.0**-126], np.float32).view(np.uint32)[0])


def boundary_inputs(name: str, op: str, world: int) -> list[np.ndarray] | None:
    """Hand-made inputs whose exact float32 results sit at the FLT_MIN boundary: just below it
    (IEEE rounds up to FLT_MIN), at the midpoint (ties to FLT_MIN), and just under the midpoint
    (flushed to zero) — with both signs. None where the op cannot reach the boundary."""
    below_one = [0x3F7FFFFF, 0x3F7FFFFE, 0x3F7FFFF0, 0x3F800000, 0x3F800001, 0x3F7FFFFF]
    near_min = [FLT_MIN, FLT_MIN + 1, FLT_MIN + 2, FLT_MIN, FLT_MIN + 16, 0x80800000]
    if name in ("float32", "complex64"):
        if op == "prod":
            a, b = _f32(below_one), _f32(near_min)
            rows = [a, b] + [_f32([0x3F800000] * len(below_one))] * (world - 2)
        elif op == "avg":
            # sums just under N*FLT_MIN (0x00FFFFFF for N = 2: the quotient is the midpoint
            # below FLT_MIN, which ties to FLT_MIN), then / N
            base = _n_flt_min(world)
            top = [base - 1, base - 2, base - 3, base, (base - 1) | 0x80000000, base + 1]
            rows = [_f32(top)] + [_f32([0] * len(top))] * (world - 1)
        elif op == "sum":
            rows = [_f32(near_min), _f32([0x80800001, 0x80800000, 0x807FFFFF, 0x00000001,
                                          0x80800010, 0x00800000])]
            rows += [_f32([0] * len(near_min))] * (world - 2)
        else:
            return None
        if name == "complex64":  # real and imaginary parts both at the boundary
            rows = [np.stack([r, r[::-1]], axis=1).reshape(-1).view(np.complex64) for r in rows]
        return rows
    if name == "bfloat16" and op in ("prod", "avg"):
        hi = lambda words: np.array([w >> 16 for w in words], np.uint16).view(  # noqa: E731
            numpy_dtype("bfloat16"))
        if op == "prod":
            rows = [hi([0x3F7F0000, 0x3F7E0000, 0x3F800000, 0x3F810000]),
                    hi([0x00800000, 0x00810000, 0x80800000, 0x00800000])]
            return rows + [hi([0x3F800000] * 4)] * (world - 2)
        base = _n_flt_min(world) & 0xFFFF0000
        rows = [hi([base - 0x10000, base - 0x20000, (base - 0x10000) | 0x80000000, base])]
        return rows + [hi([0] * 4)] * (world - 1)
    return None


def nan_inputs(name: str, op: str, world: int) -> list[np.ndarray]:
    """inf - inf, 0 * inf, NaNs of both signs and odd payloads in every position, per dtype."""
    dt = numpy_dtype(name)
    comp = {"complex64": np.float32, "complex128": np.float64}.get(name)
    base = np.dtype(comp) if comp else dt
    width = base.itemsize * 8
    if name == "bfloat16":
        inf, nan_a, nan_b = 0x7F80, 0xFFC1, 0x7F81
    elif name == "float16":
        inf, nan_a, nan_b = 0x7C00, 0xFE01, 0x7C01
    elif width == 32:
        inf, nan_a, nan_b = 0x7F800000, 0xFFC00123, 0x7F800001
    else:
        inf, nan_a, nan_b = 0x7FF0000000000000, 0xFFF8000000000123, 0x7FF0000000000001
    sign = 1 << (width - 1)
    one = {16: 0x3C00 if name == "float16" else 0x3F80, 32: 0x3F800000,
           64: 0x3FF0000000000000}[width]
    uint = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    r0 = [inf, inf, 0, nan_a, one, nan_b, inf | sign, 0]
    r1 = [inf | sign, 0, inf, one, nan_b, nan_a, inf, nan_b]
    rows = [np.array(r0, uint), np.array(r1, uint)]
    rows += [np.array([one] * len(r0), uint)] * (world - 2)
    if comp:  # imaginary parts: the same patterns reversed
        rows = [np.stack([r, r[::-1]], axis=1).reshape(-1) for r in rows]
    return [r.view(dt) for r in rows]


def boundary_rank(comm, seed: int) -> list[tuple]:
    """Every float dtype and op, every all_reduce algorithm: the FLT_MIN boundary cases and the
    NaN cases, bit for bit against the reference (which gives the canonical NaN)."""
    from detar_cupy.dtypes import DTYPES

    world = comm.world_size
    rows = []
    for name in FLOATS:
        for op in DTYPES[name].ops:
            inputs = boundary_inputs(name, op, world)
            if inputs is not None:
                rows += _all_reduce_rows(comm, "FLT_MIN", name, op, inputs)
            rows += _all_reduce_rows(comm, "NaN", name, op, nan_inputs(name, op, world))
    return rows


def random_boundary_inputs(rng: np.random.Generator, name: str, op: str, world: int,
                           n: int) -> tuple[list[np.ndarray], int]:
    """``n`` boundary-biased samples per rank (float32 components): products of a factor within
    a few ulps of 1 and a value within a few ulps of +-FLT_MIN (prod), or sums near
    +-N*FLT_MIN divided by N (avg). Returns the inputs and how many reference results land in
    the band where flushing hardware and IEEE rounding disagree (exact value in
    [FLT_MIN - 2^-150, FLT_MIN): rounded up to FLT_MIN)."""
    comps = 2 if name == "complex64" else 1
    m = n * comps
    sign = rng.integers(0, 2, m, dtype=np.uint32) << 31
    if op == "prod":
        one = (0x3F800000 + rng.integers(-40, 40, m)).astype(np.uint32)
        small = (FLT_MIN + rng.integers(0, 40, m)).astype(np.uint32) | sign
        rows = [one.view(np.float32), small.view(np.float32)]
        rows += [np.ones(m, np.float32)] * (world - 2)
    else:  # avg: rank 0 holds values just under N*FLT_MIN, the others zeros
        top = (_n_flt_min(world) - rng.integers(0, 64, m)).astype(np.uint32) | sign
        rows = [top.view(np.float32)] + [np.zeros(m, np.float32)] * (world - 1)
    if name == "bfloat16":  # the top halves (bf16 values), kept on the same grid
        rows = [(r.view(np.uint32) >> 16).astype(np.uint16).view(numpy_dtype("bfloat16"))
                for r in rows]
    elif name == "complex64":
        rows = [r.view(np.complex64) for r in rows]
    # exact values in the band, evaluated in float64 (exact for one product of two floats)
    band = 0
    if name != "bfloat16":
        parts = [np.ascontiguousarray(r).view(np.float32).astype(np.float64) for r in rows]
        exact = np.prod(parts, axis=0) if op == "prod" else np.sum(parts, axis=0) / world
        lo, hi = 2.0**-126 - 2.0**-150, 2.0**-126
        band = int(np.count_nonzero((np.abs(exact) >= lo) & (np.abs(exact) < hi)))
    return rows, band


def random_boundary_rank(comm, seed: int, n: int) -> list[tuple]:
    """float32, bfloat16 and complex64 prod and avg over ``n`` boundary-biased samples each, with
    every algorithm (LL only where it holds the message: one_shot and two_shot always)."""
    import cupy as cp

    rows = []
    for i, name in enumerate(("float32", "bfloat16", "complex64")):
        for j, op in enumerate(("prod", "avg")):
            rng = np.random.default_rng([seed, i, j])
            inputs, band = random_boundary_inputs(rng, name, op, comm.world_size, n)
            want = reference.all_reduce(inputs, op)
            x = cp.asarray(np.ascontiguousarray(inputs[comm.rank]).view(_raw(name)))
            for alg in ("one_shot", "two_shot"):
                out = _poison(cp, want, name)
                comm.all_reduce(x, out, op=op, algorithm=alg, dtype=name)
                comm.synchronize()
                label = f"{name} {op} {alg} n={n} ({band} in the rounding band)"
                rows.append(_row(label, cp.asnumpy(out).view(want.dtype), want))
    return rows


# ---- epochs: a communicator that starts late in its life --------------------------------------
FIRST_EPOCHS = (2**31 - 3, 2**32 - 3, 2**63 - 3)


def _mixed_sequence(comm, seed: int) -> list[tuple]:
    """A mixed sequence over every kernel kind and grid size (LL on one block, one_shot and
    two_shot on many, reduce_scatter, all_gather, broadcast), each call checked bit for bit."""
    import cupy as cp

    from gpu_cases import random_values

    world, rank = comm.world_size, comm.rank
    rows = []
    steps = [("all_reduce", "ll", 300), ("all_reduce", "two_shot", 70_000),
             ("all_reduce", "one_shot", 5_000), ("reduce_scatter", "-", 9_000),
             ("all_reduce", "ll", 3), ("all_gather", "-", 4_001), ("broadcast", "-", 20_000),
             ("all_reduce", "two_shot", 200_003), ("all_reduce", "auto", 100),
             ("all_reduce", "one_shot", 1), ("all_reduce", "ll", 2_000)]
    for i, (kind, alg, count) in enumerate(steps):
        n_in = count * world if kind == "reduce_scatter" else count
        host = [random_values(np.random.default_rng([seed, i, r]), "float32", n_in)
                for r in range(world)]
        x = cp.asarray(host[rank])
        if kind == "all_reduce":
            want = reference.all_reduce(host)
            out = _poison(cp, want, "float32")
            comm.all_reduce(x, out, algorithm=alg)
        elif kind == "reduce_scatter":
            want = reference.reduce_scatter(host)[rank]
            out = _poison(cp, want, "float32")
            comm.reduce_scatter(x, out)
        elif kind == "all_gather":
            want = reference.all_gather(host)
            out = _poison(cp, want, "float32")
            comm.all_gather(x, out)
        else:
            want = host[i % world]
            out = x if rank == i % world else _poison(cp, want, "float32")
            comm.broadcast(out, root=i % world)
        comm.synchronize()
        rows.append(_row(f"{kind} {alg} n={count}", cp.asnumpy(out), want))
    return rows


def epochs_rank(comm, seed: int) -> dict:
    """For each first epoch: a fresh communicator (init_process_group on an agreed port with
    DETAR_FIRST_EPOCH set on every rank) runs the mixed sequence twice; the launches cross the
    epoch's old 32-bit wrap points (2^31: signed distance, 2^32: low word) or 2^63."""
    import detar_cupy as dc
    from gpu_reliability import free_ports

    ports = comm.exchange(free_ports(len(FIRST_EPOCHS)) if comm.rank == 0 else None)[0]
    out = {}
    for first, port in zip(FIRST_EPOCHS, ports):
        os.environ["DETAR_FIRST_EPOCH"] = str(first)
        try:
            with dc.init_process_group(comm.world_size, comm.rank, port=port,
                                       device=comm.device.id, timeout=60) as c:
                out[first] = _mixed_sequence(c, seed) + _mixed_sequence(c, seed + 1)
        finally:
            del os.environ["DETAR_FIRST_EPOCH"]
    return out


# ---- buffers: layouts per rank for the same call shape -----------------------------------------
def _view(cp, host: np.ndarray, byte_offset: int) -> Any:
    """A device copy of ``host`` starting ``byte_offset`` bytes into a fresh allocation: a view
    whose address need not be aligned to its element size."""
    raw = np.ascontiguousarray(host).view(np.uint8)
    buf = cp.zeros(raw.size + 32, cp.uint8)
    buf[byte_offset:byte_offset + raw.size] = cp.asarray(raw)
    return buf[byte_offset:byte_offset + raw.size].view(host.dtype)


def _poisoned_view(cp, want: np.ndarray, byte_offset: int) -> Any:
    return _view(cp, (~np.ascontiguousarray(want).view(np.uint8)).view(want.dtype), byte_offset)


def misaligned_rank(comm, seed: int) -> list[tuple]:
    """Inputs and outputs at byte offsets 0..15 (different on every rank, so the same call shape
    meets different alignments): every collective and all_reduce algorithm, float16, float32,
    float64 and complex128 (int16 for the data movers), bit for bit."""
    import cupy as cp

    from gpu_cases import random_values

    world, rank = comm.world_size, comm.rank
    rows = []
    case = 0
    for name in ("float16", "float32", "float64", "complex128"):
        for count in (1, 37, 5003, 70_001):
            case += 1
            host = [random_values(np.random.default_rng([seed, case, r]), name, count)
                    for r in range(world)]
            off_in = (3 * case + 5 * rank) % 16
            off_out = (7 * case + 3 * rank + 1) % 16
            x = _view(cp, host[rank], off_in)
            want = reference.all_reduce(host)
            for alg in ALL_REDUCE_ALGS + ("auto",):
                out = _poisoned_view(cp, want, off_out)
                comm.all_reduce(x, out, algorithm=alg)
                comm.synchronize()
                rows.append(_row(f"all_reduce {name} {alg} n={count} off {off_in}/{off_out}",
                                 cp.asnumpy(out), want))
            inplace = _view(cp, host[rank], off_out)
            comm.all_reduce(inplace, inplace, op="max" if name != "complex128" else "sum")
            comm.synchronize()
            rows.append(_row(f"all_reduce in place {name} n={count} off {off_out}",
                             cp.asnumpy(inplace), reference.all_reduce(
                                 host, "max" if name != "complex128" else "sum")))
            rs_host = [random_values(np.random.default_rng([seed, case, r, 1]), name,
                                     count * world) for r in range(world)]
            rs_want = reference.reduce_scatter(rs_host)[rank]
            out = _poisoned_view(cp, rs_want, off_out)
            comm.reduce_scatter(_view(cp, rs_host[rank], off_in), out)
            comm.synchronize()
            rows.append(_row(f"reduce_scatter {name} n={count} off {off_in}/{off_out}",
                             cp.asnumpy(out), rs_want))
            ag_want = reference.all_gather(host)
            out = _poisoned_view(cp, ag_want, off_out)
            comm.all_gather(x, out)
            comm.synchronize()
            rows.append(_row(f"all_gather {name} n={count} off {off_in}/{off_out}",
                             cp.asnumpy(out), ag_want))
            root = case % world
            buf = _view(cp, host[rank], off_in) if rank == root else _poisoned_view(
                cp, host[root], off_in)
            comm.broadcast(buf, root=root)
            comm.synchronize()
            rows.append(_row(f"broadcast {name} n={count} off {off_in}", cp.asnumpy(buf),
                             host[root]))
    # the view of the report: an 8-byte aligned complex128 (cp.zeros(2001, 'f8')[1:])
    host = [random_values(np.random.default_rng([seed, 99, r]), "complex128", 1000)
            for r in range(world)]
    f8 = cp.zeros(2001, cp.float64)
    x = f8[1:].view(cp.complex128)
    # filled bytewise: CuPy's own complex128 copy kernel would trap on this address too
    f8[1:].view(cp.uint8)[...] = cp.asarray(np.ascontiguousarray(host[rank]).view(np.uint8))
    want = reference.all_reduce(host)
    for alg in ALL_REDUCE_ALGS:
        out = cp.zeros(2001, cp.float64)[1:].view(cp.complex128)
        comm.all_reduce(x, out, algorithm=alg)
        comm.synchronize()
        rows.append(_row(f"complex128 8-byte aligned view {alg}", cp.asnumpy(out), want))
    return rows


def aliasing_rank(comm, seed: int) -> list[tuple]:
    """NCCL-style in-place layouts (all_gather from this rank's part of the output,
    reduce_scatter into this rank's slice of the input), and overlaps that differ per rank for
    the same call shape (the input as rank 0's part of the output on every rank; in place on one
    rank, out of place on the others): every rank completes, bit for bit, and the same call on
    every rank stays the same call."""
    import cupy as cp

    from gpu_cases import random_values

    world, rank = comm.world_size, comm.rank
    rows = []
    for i, (name, count) in enumerate((("float16", 1001), ("float32", 70_003),
                                       ("complex128", 513))):
        host = [random_values(np.random.default_rng([seed, i, r]), name, count)
                for r in range(world)]
        ag_want = reference.all_gather(host)
        # all_gather(out[r*c:(r+1)*c], out): the input is this rank's own part
        out = _poison(cp, ag_want, name)
        out[rank * count:(rank + 1) * count] = cp.asarray(host[rank])
        comm.all_gather(out[rank * count:(rank + 1) * count], out)
        comm.synchronize()
        rows.append(_row(f"all_gather own part {name} n={count}", cp.asnumpy(out), ag_want))
        # the input is rank 0's part on every rank: rank 0 in place, the others overlapping
        out = _poison(cp, ag_want, name)
        out[:count] = cp.asarray(host[rank])
        comm.all_gather(out[:count], out)
        comm.synchronize()
        rows.append(_row(f"all_gather from part 0 {name} n={count}", cp.asnumpy(out), ag_want))
        rs_host = [random_values(np.random.default_rng([seed, i, r, 7]), name, count * world)
                   for r in range(world)]
        rs_want = reference.reduce_scatter(rs_host)
        # reduce_scatter(x, x[r*c:(r+1)*c]): the output is this rank's own slice of the input
        x = cp.asarray(rs_host[rank])
        comm.reduce_scatter(x, x[rank * count:(rank + 1) * count])
        comm.synchronize()
        rows.append(_row(f"reduce_scatter into own slice {name} n={count}",
                         cp.asnumpy(x[rank * count:(rank + 1) * count]), rs_want[rank]))
        # into slice 0 on every rank
        x = cp.asarray(rs_host[rank])
        comm.reduce_scatter(x, x[:count])
        comm.synchronize()
        rows.append(_row(f"reduce_scatter into slice 0 {name} n={count}",
                         cp.asnumpy(x[:count]), rs_want[rank]))
        # all_reduce: in place on rank 0, overlapping by one element on rank 1, fresh elsewhere
        ar_want = reference.all_reduce(host)
        buf = cp.zeros(count + 1, dtype=_raw(name))
        buf[:count] = cp.asarray(host[rank])
        if rank == 0:
            comm.all_reduce(buf[:count], buf[:count])
            got = buf[:count]
        elif rank == 1:
            got = buf[1:]
            comm.all_reduce(buf[:count], got)
        else:
            got = comm.all_reduce(buf[:count])
        comm.synchronize()
        rows.append(_row(f"all_reduce per-rank aliasing {name} n={count}", cp.asnumpy(got),
                         ar_want))
    return rows


# ---- chunked calls whose counts differ ---------------------------------------------------------
def chunked_mismatch_rank(comm) -> dict:
    """Ranks 0..N-2 all-reduce 2 * C float16 elements with one_shot, the last rank 3 * C, where C
    is what one launch holds (every launch of both calls is then exactly C elements long: only a
    signature covering the whole call tells them apart); then every rank all-reduces C more.
    Every rank must raise MismatchError at the first call (never return, never time out)."""
    import time

    import cupy as cp

    from gpu_errors import capacities

    cap = capacities(comm.world_size, 2, gpu_cases.STAGE_HALF, 8 << 10)["one_shot"]
    n = 2 * cap if comm.rank < comm.world_size - 1 else 3 * cap
    comm.all_reduce(cp.ones(7, cp.float16), algorithm="one_shot")  # loads the kernels
    comm.synchronize()
    start = time.perf_counter()
    try:
        comm.all_reduce(cp.ones(n, cp.float16), algorithm="one_shot")
        comm.synchronize()
        comm.all_reduce(cp.ones(cap, cp.float16), algorithm="one_shot")
        comm.synchronize()
    except Exception as exc:
        return {"type": type(exc).__name__, "elapsed": time.perf_counter() - start,
                "differs": tuple(getattr(exc, "differs", ()) or ()), "text": str(exc)}
    return {"type": None, "elapsed": time.perf_counter() - start}


def coalesced_rank(comm, seed: int) -> list[tuple]:
    """all_reduce_coalesced of 150 arrays (more than one gather launch holds) of sizes 0..3000,
    some starting at odd byte offsets, for float16, bfloat16, float32 and complex128: each array
    bit for bit what its own all_reduce gives."""
    import cupy as cp

    from gpu_cases import random_values

    world, rank = comm.world_size, comm.rank
    rows = []
    for i, (name, op) in enumerate((("float16", "sum"), ("bfloat16", "max"), ("float32", "prod"),
                                    ("complex128", "avg"))):
        rng = np.random.default_rng([seed, i])
        sizes = [int(v) for v in rng.integers(0, 3000, 150)]
        sizes[:3] = [0, 1, 7]
        hosts = [[random_values(np.random.default_rng([seed, i, j, r]), name, n)
                  for r in range(world)] for j, n in enumerate(sizes)]
        arrays = [_view(cp, np.ascontiguousarray(h[rank]).view(_raw(name)), (j * 5) % 16)
                  for j, h in enumerate(hosts)]
        comm.all_reduce_coalesced(arrays, op, dtype=name)
        comm.synchronize()
        for j, (a, h) in enumerate(zip(arrays, hosts)):
            want = reference.all_reduce(h, op)
            rows.append(_row(f"coalesced {name} {op} #{j} n={sizes[j]}",
                             cp.asnumpy(a).view(want.dtype), want))
    return rows
