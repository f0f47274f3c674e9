"""Worker of the sustained-load test (module-level: the spawn start method imports it by name).

100,000 back-to-back all-reduces with mixed sizes (1 element to beyond the staging buffer), dtypes,
ops, algorithms, misaligned offsets, fresh/given/in-place outputs. Every rank draws the same call
sequence from one seeded generator. Inputs are slices of per-dtype pools of random data made from
recorded seeds, so every rank can rebuild every rank's pool on the host and compute the reference
of any call itself. A seeded sample (every 50th call) and every call larger than one launch of
one_shot holds are checked bit for bit against detar_cupy.reference; the parent compares the
ranks' digests of those outputs.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from detar_cupy import reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from gpu_cases import random_values

STAGE_HALF = 256 << 10  # DETAR_STAGING_BYTES of the ranks: small, so chunked calls are cheap
LL_BYTES = 32 << 10  # DETAR_LL_BYTES of the ranks
ENV = {"DETAR_STAGING_BYTES": str(STAGE_HALF), "DETAR_LL_BYTES": str(LL_BYTES),
       "DETAR_TIMEOUT": "20"}
NAMES = ("float16", "bfloat16", "float32", "float64", "int32", "uint8")
ALGS = ("ll", "auto", "one_shot", "two_shot")  # ll first: drawn only where the call fits
FLOAT_OPS = ("sum", "prod", "min", "max", "avg")  # int dtypes draw from the first four
MODES = ("new", "out", "in_place")
MAX_BYTES = STAGE_HALF * 5 // 2  # largest call: 2.5 staging halves
LARGE_P = 0.01  # share of calls drawn beyond one one_shot launch (each of them is verified)
VERIFY_EVERY = 50
SLACK = 1024  # pool elements beyond the largest call, room for offsets


def one_shot_cap(world: int, itemsize: int) -> int:
    """Elements one one_shot launch holds (the smallest capacity of one_shot and two_shot)."""
    k = 16 // itemsize
    return min((STAGE_HALF // 16 // world) * k, (STAGE_HALF // 16 // (2 * world)) * world * k)


def plan_calls(world: int, calls: int, seed: int) -> dict[str, list]:
    """The call sequence, identical on every rank: per call dtype, op, algorithm, mode, count,
    input offset, output offset, whether it is large (chunked) and whether it is verified."""
    rng = np.random.default_rng(seed)
    d = rng.integers(0, len(NAMES), calls)
    itemsize = np.array([DTYPES[n].itemsize for n in NAMES])[d]
    cap = np.array([one_shot_cap(world, DTYPES[n].itemsize) for n in NAMES])[d]
    max_count = MAX_BYTES // itemsize
    large = rng.random(calls) < LARGE_P
    # Small calls: log-uniform in [1, cap]; large ones: uniform in (cap, max_count].
    small_n = np.exp2(rng.random(calls) * np.log2(cap)).astype(np.int64).clip(1, cap)
    large_n = cap + 1 + (rng.random(calls) * (max_count - cap)).astype(np.int64)
    count = np.where(large, large_n, small_n)
    fits_ll = count * itemsize <= LL_BYTES
    alg = np.where(fits_ll, rng.integers(0, 4, calls), rng.integers(1, 4, calls))
    is_int = np.array([DTYPES[n].kind == "int" for n in NAMES])[d]
    op = np.where(is_int, rng.integers(0, 4, calls), rng.integers(0, 5, calls))
    mode = rng.integers(0, len(MODES), calls)
    pool_len = max_count + SLACK
    off = (rng.random(calls) * (pool_len - count + 1)).astype(np.int64)
    out_off = (rng.random(calls) * (pool_len - count + 1)).astype(np.int64)
    verify = (np.arange(calls) % VERIFY_EVERY == int(rng.integers(0, VERIFY_EVERY))) | large
    verify[-1] = True
    return {k: v.tolist() for k, v in dict(d=d, op=op, alg=alg, mode=mode, count=count, off=off,
                                            out_off=out_off, large=large, verify=verify).items()}


def _pool_len(world: int, name: str) -> int:
    return MAX_BYTES // DTYPES[name].itemsize + SLACK


def host_pools(world: int, seed: int) -> list[list[np.ndarray]]:
    """pools[dtype index][rank]: every rank's random data, rebuilt the same way on every rank."""
    return [[random_values(np.random.default_rng([seed, i, r]), name, _pool_len(world, name))
             for r in range(world)] for i, name in enumerate(NAMES)]


def _wrong_bits(got: np.ndarray, want: np.ndarray) -> int:
    """Differing bits, NaN against NaN (any payload) not counted."""
    u = f"u{got.itemsize}"
    xor = got.view(u) ^ want.view(u)
    if got.dtype.kind == "f" or got.dtype == numpy_dtype("bfloat16"):
        xor[np.isnan(got) & np.isnan(want)] = 0
    return int(np.unpackbits(xor.view(np.uint8)).sum())


def sustained_rank(comm, calls: int, seed: int) -> dict[str, Any]:
    """Run the call sequence; verify the sample; return counts, timings, failures and a digest."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    t_setup = time.perf_counter()
    plan = plan_calls(world, calls, seed)
    pools = host_pools(world, seed)
    dts = [numpy_dtype(n) for n in NAMES]
    raws = [np.dtype(np.uint16) if n == "bfloat16" else dt for n, dt in zip(NAMES, dts)]
    dev_in = [cp.asarray(pools[i][rank].view(raws[i])) for i in range(len(NAMES))]
    dev_out = [cp.empty_like(a) for a in dev_in]
    dev_scratch = [cp.empty_like(a) for a in dev_in]
    kw_dtype = [n if n == "bfloat16" else None for n in NAMES]  # raw uint16 named as bfloat16
    for i, name in enumerate(NAMES):  # load every module before the clock starts
        comm.all_reduce(dev_in[i][:64], dtype=kw_dtype[i])
    comm.synchronize()
    setup_s = time.perf_counter() - t_setup

    P = plan
    digest = hashlib.sha256()
    verified = large_verified = wrong_bits = 0
    failures: list[str] = []
    ref_s = 0.0
    t0 = time.perf_counter()
    for j in range(calls):
        i, n, off = P["d"][j], P["count"][j], P["off"][j]
        op = FLOAT_OPS[P["op"][j]]
        alg = ALGS[P["alg"][j]]
        mode = MODES[P["mode"][j]]
        x = dev_in[i][off:off + n]
        want = None
        if P["verify"][j]:
            t_ref = time.perf_counter()
            want = reference.all_reduce([pools[i][r][off:off + n] for r in range(world)], op)
            ref_s += time.perf_counter() - t_ref
        if mode == "new":
            out = comm.all_reduce(x, op=op, algorithm=alg, dtype=kw_dtype[i])
        elif mode == "out":
            o = P["out_off"][j]
            out = dev_out[i][o:o + n]
            if want is not None:  # poison: the complement of the answer, every bit wrong
                out.set((~want.view(f"u{want.itemsize}")).view(raws[i]))
            comm.all_reduce(x, out, op=op, algorithm=alg, dtype=kw_dtype[i])
        else:
            o = P["out_off"][j]
            out = dev_scratch[i][o:o + n]
            out[...] = x  # in place on a copy: the input pools stay what every rank rebuilt
            comm.all_reduce(out, out, op=op, algorithm=alg, dtype=kw_dtype[i])
        if want is not None:
            got = cp.asnumpy(out).view(dts[i])
            verified += 1
            large_verified += P["large"][j]
            digest.update(got.tobytes())
            if not reference.bits_equal(got, want):
                bits = _wrong_bits(got, want)
                wrong_bits += bits
                if len(failures) < 10:
                    failures.append(f"call {j}: {NAMES[i]} {op} {alg} {mode} n={n} off={off}: "
                                    f"{bits} wrong bits")
    comm.synchronize()
    wall = time.perf_counter() - t0
    return {"calls": calls, "verified": verified, "large": sum(P["large"]),
            "large_verified": large_verified, "wrong_bits": wrong_bits,
            "failures": failures, "digest": digest.hexdigest(), "wall_s": wall,
            "ref_s": ref_s, "setup_s": setup_s,
            "by_alg": {a: P["alg"].count(k) for k, a in enumerate(ALGS)},
            "by_mode": {m: P["mode"].count(k) for k, m in enumerate(MODES)},
            "max_count_bytes": max(c * DTYPES[NAMES[d]].itemsize
                                   for c, d in zip(P["count"], P["d"]))}
