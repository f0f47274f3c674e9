"""GPU correctness cases, run inside spawned ranks (module-level so spawn can pickle by name).

Every rank derives every rank's input from the case seed, so it can compute the reference itself
and compare its own output bit for bit; outputs are poisoned before each call. A rank returns, per
case, (ok, detail, digest of its output bytes) so the parent also checks that all ranks agree.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from detar_cupy import reference
from detar_cupy.dtypes import DTYPES, numpy_dtype

# Small buffers make chunking cheap to reach: these are set in the ranks' environment.
TEST_ENV = {"DETAR_STAGING_BYTES": str(64 << 10), "DETAR_LL_BYTES": str(8 << 10),
            "DETAR_TIMEOUT": "20"}
STAGE_HALF = 64 << 10
ALGORITHMS = ("ll", "one_shot", "two_shot", "auto")


@dataclass(frozen=True)
class Case:
    kind: str  # all_reduce | reduce_scatter | all_gather | broadcast
    dtype: str
    op: str
    algorithm: str
    count: int
    in_offset: int  # elements: input is a slice x[in_offset:] of a larger buffer (misalignment)
    out_offset: int
    in_place: bool
    seed: int

    @property
    def id(self) -> str:
        place = "inplace" if self.in_place else "outofplace"
        return (f"{self.kind}-{self.dtype}-{self.op}-{self.algorithm}-n{self.count}"
                f"-off{self.in_offset}.{self.out_offset}-{place}")


def random_values(rng: np.random.Generator, name: str, count: int) -> np.ndarray:
    """Random elements of dtype ``name`` with specials sprinkled in (never all zeros)."""
    dt = DTYPES[name]
    if dt.kind == "int":
        return rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8).view(numpy_dtype(name))
    comp = np.float64 if name in ("float64", "complex128") else np.float32
    parts = 2 if dt.kind == "complex" else 1
    vals = rng.standard_normal(count * parts) * np.exp2(rng.integers(-8, 9, count * parts))
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 65504.0, 1e30])
    mask = rng.random(count * parts) < 0.02
    vals[mask] = rng.choice(specials, mask.sum())
    vals = vals.astype(comp)
    if dt.kind == "complex":
        return vals.view(numpy_dtype(name))
    return vals.astype(numpy_dtype(name))


def rank_inputs(case: Case, world: int, count: int) -> list[np.ndarray]:
    return [random_values(np.random.default_rng([case.seed, r]), case.dtype, count)
            for r in range(world)]


def expected(case: Case, world: int, rank: int) -> np.ndarray:
    if case.kind == "all_reduce":
        return reference.all_reduce(rank_inputs(case, world, case.count), case.op)
    if case.kind == "reduce_scatter":
        return reference.reduce_scatter(rank_inputs(case, world, case.count * world), case.op)[rank]
    if case.kind == "all_gather":
        return reference.all_gather(rank_inputs(case, world, case.count))
    return reference.broadcast(rank_inputs(case, world, case.count), root=case.seed % world)


def cases(world: int, seed0: int = 1000) -> list[Case]:
    """The case list of the quick tier for one world size (identical in every process)."""
    out: list[Case] = []
    seed = seed0
    big = STAGE_HALF * 3 // 2  # bytes: larger than a staging half, so chunked

    def add(*args) -> None:
        nonlocal seed
        seed += 1
        out.append(Case(*args, seed))

    for name, dt in DTYPES.items():
        k = 16 // dt.itemsize
        counts = [0, 1, 7, 3 * k * world + 5, 1000 + world, big // dt.itemsize + 3]
        for op in dt.ops:
            for alg in ALGORITHMS:
                for i, count in enumerate(counts):
                    offs = (1, 0) if i == 3 else (0, 1) if i == 4 else (0, 0)
                    add("all_reduce", name, op, alg, count, *offs, i % 2 == 1)
        add("reduce_scatter", name, "sum", "-", 1000 + 3, 0, 0, False)
        add("reduce_scatter", name, dt.ops[-1], "-", big // dt.itemsize // world + 1, 1, 0, False)
    for name in ("uint8", "float16", "float32", "float64", "complex128"):
        for count, off in ((0, 0), (5, 0), (1001, 1), (STAGE_HALF // 2 + 9, 0)):
            add("all_gather", name, "-", "-", count, off, 0, False)
            add("broadcast", name, "-", "-", count, off, 0, True)
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()[:16]


def run_case(comm, case: Case):
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    n_in = case.count * world if case.kind == "reduce_scatter" else case.count
    host_in = rank_inputs(case, world, n_in)[rank]
    np_dt = numpy_dtype(case.dtype)
    buf = cp.asarray(np.concatenate([random_values(np.random.default_rng(7), case.dtype,
                                                   case.in_offset), host_in]))
    x = buf[case.in_offset:]
    want = expected(case, world, rank)
    kwargs = {} if case.algorithm in ("-",) else {"algorithm": case.algorithm}
    if case.in_place:
        out = x
    else:
        n_out = want.size
        obuf = cp.asarray(np.frombuffer(np.random.default_rng(case.seed).bytes(
            (n_out + case.out_offset) * np_dt.itemsize), dtype=np_dt))  # poison
        out = obuf[case.out_offset:]
    if case.kind == "all_reduce":
        got = comm.all_reduce(x, out, op=case.op, **kwargs)
    elif case.kind == "reduce_scatter":
        got = comm.reduce_scatter(x, None if case.in_place else out, op=case.op)
    elif case.kind == "all_gather":
        got = comm.all_gather(x, out)
    else:
        if rank != case.seed % world:
            x[...] = cp.asarray(random_values(np.random.default_rng(case.seed + 99), case.dtype,
                                              case.count))  # poison non-roots
        got = comm.broadcast(x, root=case.seed % world)
    comm.synchronize()
    host = cp.asnumpy(got).reshape(-1)
    ok = reference.bits_equal(host, want.reshape(-1))
    detail = ""
    if not ok:
        bad = np.nonzero(host.view(np.uint8) != want.reshape(-1).view(np.uint8))[0]
        first = int(bad[0]) // np_dt.itemsize if bad.size else -1
        detail = (f"{bad.size} differing bytes, first element {first}: got "
                  f"{host[first] if first >= 0 else '?'} want {want.reshape(-1)[first] if first >= 0 else '?'}")
    return ok, detail, _digest(host)


def run_cases(comm, world: int, seed0: int):
    """Every case of :func:`cases` on this rank: {case id: (ok, detail, digest)}."""
    return _run_all(comm, cases(world, seed0))


def _run_all(comm, selected: list[Case]):
    results = {}
    for case in selected:
        try:
            results[case.id] = run_case(comm, case)
        except Exception as exc:  # report per case; a sticky device error fails the rest loudly
            results[case.id] = (False, f"{type(exc).__name__}: {exc}", "")
    return results


SHARED_STRIDE = 12  # the shared-GPU test runs every 12th case of the quick tier


def run_shared_cases(comm, world: int, seed0: int):
    """On ranks that share GPUs: (grid cap, SM count, {case id: (ok, detail, digest)}) for every
    SHARED_STRIDE-th case of :func:`cases`."""
    sms = comm.device.attributes["MultiProcessorCount"]
    return comm.geometry.max_grid, sms, _run_all(comm, cases(world, seed0)[::SHARED_STRIDE])
