"""Randomized determinism cases (full tier), run inside spawned ranks.

Cases are drawn from a master seed (identical in every process, the parent included): mostly
all_reduce, also reduce_scatter, all_gather and broadcast; every dtype with each of its ops; the
algorithms auto, ll, one_shot and two_shot; element counts log-uniform from 0 to four staging
halves, a few up to 32 (many chunks), and some exactly at chunk boundaries; misaligned input and
output offsets; in-place calls; the current stream or a non-blocking one; some replayed from a
CUDA graph. The ranks run with gpu_cases.TEST_ENV's small buffers, so chunking is cheap.

Per case, on every rank: inputs with specials (gpu_cases.random_values) from the case seed, the
output buffer poisoned and guarded on both sides; the result compared with detar_cupy.reference,
the guards and (out of place) the input checked untouched. An all_reduce is repeated with a second
algorithm (byte-equal to the first), then a random slice of the input with a third algorithm
(byte-equal to that slice of the first result). A reduce_scatter is checked against an all_reduce
of the same input. Each rank returns a digest of an output every rank must hold identically (for
reduce_scatter: that all_reduce), which the parent compares.

The first cases of a run are fixed by design (a chunked all_reduce for every dtype and op with
one_shot, two_shot and ll; a chunked reduce_scatter for every dtype; a chunked all_gather and
broadcast for every element size); their inputs and offsets are still random.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from detar_cupy import reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from gpu_cases import STAGE_HALF, TEST_ENV
from gpu_determinism import capture, difference, digest, inputs, say, to_device, to_host

FULL_ENV = TEST_ENV  # the ranks' environment: gpu_cases' small buffers
LL_BYTES = int(TEST_ENV["DETAR_LL_BYTES"])
CASES_PER_WORLD = 6000
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
KIND_WEIGHTS = (0.80, 0.08, 0.06, 0.06)
ALGORITHMS = ("auto", "ll", "one_shot", "two_shot")
LL_MAX_BYTES = 16 * LL_BYTES  # ll beyond this would be dozens of 8 KiB launches per call
GUARD_BYTES = 32  # poisoned bytes after every output: a 16-byte store past the end shows up


@dataclass(frozen=True)
class Case:
    """One randomized case; ``seed`` determines its inputs, poison and guards."""

    index: int
    seed: int
    kind: str
    dtype: str
    op: str  # "-" for all_gather and broadcast
    # all_reduce: (first, second, slice call); reduce_scatter: (its all_reduce cross-check,)
    algorithms: tuple[str, ...]
    count: int  # elements per rank; for reduce_scatter the output count (input: count * world)
    in_offset: int  # elements: the input starts this far into its device buffer
    out_offset: int
    in_place: bool
    root: int  # broadcast
    window: tuple[int, int]  # all_reduce: [lo, hi) of the slice call
    side_stream: bool
    graph: bool  # all_reduce: the second call is also captured in a CUDA graph and replayed

    def describe(self) -> str:
        """One line with everything needed to recognise (and replay) the case."""
        algs = "/".join(self.algorithms) or "-"
        extra = [f"root {self.root}"] if self.kind == "broadcast" else []
        extra += ["in place"] if self.in_place else []
        extra += [f"slice {self.window[0]}:{self.window[1]}"] if self.kind == "all_reduce" else []
        extra += ["side stream"] if self.side_stream else []
        extra += ["graph"] if self.graph else []
        return (f"case #{self.index} seed {self.seed}: {self.kind} {self.dtype} {self.op} {algs} "
                f"n={self.count} offsets {self.in_offset}/{self.out_offset}"
                + "".join(f", {e}" for e in extra))


def chunk_elements(world: int, itemsize: int) -> dict[str, int]:
    """Elements per launch of each algorithm with FULL_ENV's buffers (mirrors _plan)."""
    k = 16 // itemsize
    packs = STAGE_HALF // 16
    return {"ll": LL_BYTES // 16 * k, "one_shot": packs // world * k,
            "two_shot": packs // (2 * world) * world * k}


def _count(rng: np.random.Generator, world: int, itemsize: int) -> int:
    """Elements per rank: mostly log-uniform up to four staging halves, some 0, some at chunk
    boundaries, a few up to 32 halves."""
    u = rng.random()
    if u < 0.03:
        return 0
    if u < 0.08:  # a chunk boundary of some algorithm, or one element either side of it
        cap = chunk_elements(world, itemsize)[str(rng.choice(("ll", "one_shot", "two_shot")))]
        return max(0, cap * int(rng.integers(1, 4)) + int(rng.integers(-1, 2)))
    if u < 0.085:  # a few large calls: many chunks
        lo, hi = 4 * STAGE_HALF, 32 * STAGE_HALF
    else:
        lo, hi = itemsize, 4 * STAGE_HALF
    return max(1, int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) // itemsize)


def _offset(rng: np.random.Generator) -> int:
    """Elements between a buffer's start and the view a call gets: half the time misaligned."""
    return 0 if rng.random() < 0.5 else int(rng.integers(1, 16))


def _algorithms(rng: np.random.Generator, nbytes: int, n: int) -> tuple[str, ...]:
    """``n`` algorithms for a message of ``nbytes`` per rank (distinct where there are enough)."""
    allowed = [a for a in ALGORITHMS if a != "ll" or nbytes <= LL_MAX_BYTES]
    return tuple(str(a) for a in rng.choice(allowed, size=n, replace=n > len(allowed)))


def _random_case(index: int, rng: np.random.Generator, world: int) -> Case:
    kind = str(rng.choice(KINDS, p=KIND_WEIGHTS))
    name = str(rng.choice(list(DTYPES)))
    dt = DTYPES[name]
    count = _count(rng, world, dt.itemsize)
    if kind in ("reduce_scatter", "all_gather"):  # per-rank piece of a message of that size
        count //= world
    op, algs, window = "-", (), (0, 0)
    if kind == "all_reduce":
        op = str(rng.choice(dt.ops))
        first, second = _algorithms(rng, count * dt.itemsize, 2)
        third = _algorithms(rng, count * dt.itemsize, 1)
        algs = (first, second) + third
        lo = int(rng.integers(0, count + 1))
        window = (lo, int(rng.integers(lo, count + 1)))
    elif kind == "reduce_scatter":
        op = str(rng.choice(dt.ops))
        algs = _algorithms(rng, count * world * dt.itemsize, 1)
    in_place = kind == "broadcast" or (kind == "all_reduce" and rng.random() < 0.25)
    return Case(index=index, seed=int(rng.integers(1 << 62)), kind=kind, dtype=name, op=op,
                algorithms=algs, count=count, in_offset=_offset(rng), out_offset=_offset(rng),
                in_place=in_place, root=int(rng.integers(world)) if kind == "broadcast" else 0,
                window=window, side_stream=bool(rng.random() < 0.3),
                graph=kind == "all_reduce" and not in_place and bool(rng.random() < 0.05))


def _fixed_cases(world: int, rng: np.random.Generator) -> list[tuple]:
    """(kind, dtype, op, algorithms, count) that every run covers: chunked calls for every dtype
    and op (all_reduce: one_shot then two_shot, ll on a slice), every element size."""
    out = []
    for name, dt in DTYPES.items():
        count = 3 * STAGE_HALF // dt.itemsize + int(rng.integers(1, 64))
        out += [("all_reduce", name, op, ("one_shot", "two_shot", "ll"), count) for op in dt.ops]
        out.append(("reduce_scatter", name, dt.ops[-1], ("two_shot",), count // world + 1))
    for name in ("uint8", "float16", "float32", "float64", "complex128"):
        count = 3 * STAGE_HALF // DTYPES[name].itemsize + int(rng.integers(1, 64))
        out += [("all_gather", name, "-", (), count // world + 1),
                ("broadcast", name, "-", (), count)]
    return out


def make_cases(world: int, master: int, n: int) -> list[Case]:
    """The ``n`` cases of a run (the same list in every process for the same arguments)."""
    rng = np.random.default_rng([master, world])
    cases = []
    for index, (kind, name, op, algs, count) in enumerate(_fixed_cases(world, rng)[:n]):
        lo = int(rng.integers(0, count + 1))
        cases.append(Case(index=index, seed=int(rng.integers(1 << 62)), kind=kind, dtype=name,
                          op=op, algorithms=algs, count=count, in_offset=_offset(rng),
                          out_offset=_offset(rng), in_place=kind == "broadcast",
                          root=int(rng.integers(world)) if kind == "broadcast" else 0,
                          window=(lo, int(rng.integers(lo, count + 1))),
                          side_stream=bool(rng.random() < 0.3), graph=False))
    cases += [_random_case(index, rng, world) for index in range(len(cases), n)]
    return cases


# ---- running a case ---------------------------------------------------------------------------

class _Buffer:
    """A device buffer of poison, a guard region, and the view a call reads or writes."""

    def __init__(self, host: np.ndarray, offset: int, n: int) -> None:
        self.host = host  # what the whole buffer held when it was uploaded
        self.offset, self.n = offset, n
        self.device = to_device(host)
        self.view = self.device[offset:offset + n]

    def check(self, name: str, *, data_unchanged: bool) -> tuple[np.ndarray, str]:
        """(the view's bytes now, '' or which bytes that must not change did)."""
        now = to_host(self.device, name)
        lo, hi = self.offset, self.offset + self.n
        regions = [("bytes before the view", slice(0, lo)),
                   ("guard after the view", slice(hi, None))]
        if data_unchanged:
            regions.append(("input", slice(lo, hi)))
        problems = [f"{where} changed: {d}" for where, s in regions
                    if (d := difference(now[s], self.host[s], exact=True))]
        return now[lo:hi], "; ".join(problems)


def _poison(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    dt = numpy_dtype(name)
    return np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt)


def _buffer(rng: np.random.Generator, name: str, offset: int, data: np.ndarray | None,
            n: int) -> _Buffer:
    """Poison, then ``data`` (or poison) of ``n`` elements, then the guard."""
    guard = max(1, GUARD_BYTES // numpy_dtype(name).itemsize)
    middle = _poison(rng, name, n) if data is None else data
    return _Buffer(np.concatenate([_poison(rng, name, offset), middle, _poison(rng, name, guard)]),
                   offset, n)


def run_case(comm: Any, case: Case, side: Any, cap: Any, graphs: bool) -> tuple[bool, str, str]:
    """(passed, what failed, digest of an output every rank holds identically)."""
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    rng = np.random.default_rng([case.seed, world + 1])  # poison and guards
    n_in = case.count * world if case.kind == "reduce_scatter" else case.count
    ins = inputs(case.seed, world, n_in, case.dtype)
    src = _buffer(rng, case.dtype, case.in_offset, ins[rank], n_in)
    stream = side if case.side_stream else cp.cuda.get_current_stream()
    problems: list[str] = []

    def expect(label: str, text: str) -> None:
        if text:
            problems.append(f"{label}: {text}")

    if case.kind == "broadcast":
        cp.cuda.Device().synchronize()  # uploads land before another stream reads them
        comm.broadcast(src.view, root=case.root, stream=stream)
        comm.synchronize(stream)
        got, untouched = src.check(case.dtype, data_unchanged=False)
        expect("buffer", untouched)
        expect("vs reference", difference(got, reference.broadcast(ins, case.root), exact=True))
        return not problems, "; ".join(problems), digest(got)

    if case.kind == "all_gather":
        dst = _buffer(rng, case.dtype, case.out_offset, None, n_in * world)
        cp.cuda.Device().synchronize()
        comm.all_gather(src.view, dst.view, stream=stream)
        comm.synchronize(stream)
        got, untouched = dst.check(case.dtype, data_unchanged=False)
        expect("output buffer", untouched)
        expect("input", src.check(case.dtype, data_unchanged=True)[1])
        expect("vs reference", difference(got, reference.all_gather(ins), exact=True))
        return not problems, "; ".join(problems), digest(got)

    full_want = reference.all_reduce(ins, case.op)
    if case.kind == "reduce_scatter":
        dst = _buffer(rng, case.dtype, case.out_offset, None, case.count)
        cp.cuda.Device().synchronize()
        comm.reduce_scatter(src.view, dst.view, op=case.op, stream=stream, dtype=case.dtype)
        comm.synchronize(stream)
        got, untouched = dst.check(case.dtype, data_unchanged=False)
        expect("output buffer", untouched)
        expect("input", src.check(case.dtype, data_unchanged=True)[1])
        lo, hi = rank * case.count, (rank + 1) * case.count
        expect("vs reference", difference(got, full_want[lo:hi], exact=False))
        whole = to_host(comm.all_reduce(src.view, op=case.op, algorithm=case.algorithms[0],
                                        dtype=case.dtype), case.dtype)
        expect(f"vs all_reduce {case.algorithms[0]}", difference(got, whole[lo:hi], exact=True))
        expect("all_reduce vs reference", difference(whole, full_want, exact=False))
        return not problems, "; ".join(problems), digest(whole)

    # all_reduce: first algorithm (in place or into a poisoned buffer) on the case's stream
    first, second, third = case.algorithms
    pristine = src.view.copy()

    def call(alg: str, x: Any, out: Any, on: Any) -> None:
        comm.all_reduce(x, out, op=case.op, stream=on, algorithm=alg, dtype=case.dtype)
        comm.synchronize(on)

    def restore() -> None:  # an in-place call overwrote the input
        src.view[...] = pristine
        cp.cuda.Device().synchronize()

    dst = src if case.in_place else _buffer(rng, case.dtype, case.out_offset, None, n_in)
    cp.cuda.Device().synchronize()
    call(first, src.view, dst.view, stream)
    got, untouched = dst.check(case.dtype, data_unchanged=False)
    expect(f"{first} output buffer", untouched)
    if not case.in_place:
        expect("input", src.check(case.dtype, data_unchanged=True)[1])
    expect(f"{first} vs reference", difference(got, full_want, exact=False))

    # second algorithm on the current stream: the same bytes
    if case.in_place:
        restore()
    dst2 = src if case.in_place else _buffer(rng, case.dtype, case.out_offset, None, n_in)
    cp.cuda.Device().synchronize()
    call(second, src.view, dst2.view, cp.cuda.get_current_stream())
    got2, untouched = dst2.check(case.dtype, data_unchanged=False)
    expect(f"{second} output buffer", untouched)
    expect(f"{second} vs {first}", difference(got2, got, exact=True))

    # a slice of the input at any offset: the same bytes as that slice of the full result
    if case.in_place:
        restore()
    lo, hi = case.window
    part = _buffer(rng, case.dtype, 0, None, hi - lo)
    cp.cuda.Device().synchronize()
    call(third, src.view[lo:hi], part.view, cp.cuda.get_current_stream())
    got3, untouched = part.check(case.dtype, data_unchanged=False)
    expect(f"slice {third} output buffer", untouched)
    expect(f"slice [{lo}:{hi}] {third} vs {first}", difference(got3, got[lo:hi], exact=True))

    if case.graph and graphs:  # out of place only: replays must not fold their own output
        dst4 = _buffer(rng, case.dtype, case.out_offset, None, n_in)
        cp.cuda.Device().synchronize()
        graph = capture(cap, lambda: comm.all_reduce(src.view, dst4.view, op=case.op, stream=cap,
                                                     algorithm=second, dtype=case.dtype))
        for replay in range(2):
            with cap:  # poisoned again on the replay stream, ordered before the replay
                dst4.view.fill(0)
            graph.launch(cap)
            comm.synchronize(cap)
            got4, untouched = dst4.check(case.dtype, data_unchanged=False)
            expect(f"graph replay {replay} output buffer", untouched)
            expect(f"graph replay {replay} vs {first}", difference(got4, got, exact=True))
    return not problems, "; ".join(problems), digest(got)


def _can_capture(cap: Any) -> bool:
    """Whether this CuPy build captures graphs (not CuPy 13 on ROCm). On CUDA it must."""
    import cupy as cp

    if not cp.cuda.runtime.is_hip:
        return True
    try:
        capture(cap, lambda: None)
    except Exception:
        return False
    return True


def run_full(comm: Any, master: int, n_cases: int, only: tuple = ()) -> dict:
    """Run this world's cases (only the indices in ``only``, if given) on this rank:
    {"results": [(index, passed, detail, digest)], "seconds": float, "graphs": bool}."""
    import cupy as cp

    cases = make_cases(comm.world_size, master, n_cases)
    if only:
        cases = [c for c in cases if c.index in only]
    side, cap = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    graphs = _can_capture(cap)
    results, failed = [], 0
    t0 = time.perf_counter()
    for done, case in enumerate(cases, 1):
        try:
            ok, detail, out_digest = run_case(comm, case, side, cap, graphs)
        except Exception as exc:  # reported per case; a sticky device error fails the rest fast
            ok, detail, out_digest = False, f"{type(exc).__name__}: {exc}", ""
        failed += not ok
        results.append((case.index, ok, detail, out_digest))
        if done % 500 == 0 or done == len(cases):
            say(comm, f"[determinism full, world {comm.world_size}] {done}/{len(cases)} cases, "
                      f"{failed} failed, {time.perf_counter() - t0:.1f} s")
    return {"results": results, "seconds": time.perf_counter() - t0, "graphs": graphs}
