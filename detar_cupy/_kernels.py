"""Kernel renderer: the only path from `hip_src/` to a compiled `cupy.RawModule`.

A module holds every kernel of one ``(dtype, world size)``: all the dtype's ops times the reducing
algorithms. A user's first call with a new dtype compiles one such module (CuPy then keeps it in
its disk cache); grouping by dtype keeps that first compile short while the CI compile matrix can
still batch many keys into one translation unit with :func:`render`.

The dtype-agnostic kernels (all-gather, broadcast) live in modules with ``dtype=None``, one
instantiation per element size so misaligned buffers still move whole elements.

The NCCL transport's kernels (``fold.hip``) are the family ``"nccl"``: per dtype one module of
fold kernels for any world size (``world_size=0``: the number of ranks folded is a parameter), one
dtype-agnostic module (slot copies, call-header stamp and check), and per dtype and node size
G = 2..MAX_WORLD the hierarchical transport's node carry kernels (IPC inside a node).

Kernels are ``extern "C"`` with generated names instead of ``name_expressions``: CuPy 13.3 skips its
disk cache whenever ``name_expressions`` are used.
"""
from __future__ import annotations

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence

from . import _fold_abi, _protocol
from ._protocol import MAX_BLOCKS, MAX_WORLD, THREADS
from .dtypes import DTYPES

__all__ = ["MAX_BLOCKS", "MAX_WORLD", "THREADS", "HEADER_CHECK", "HEADER_STAMP", "ModuleKey",
           "fold_name", "function", "kernel_names", "module_keys", "moving_name", "nccl_keys",
           "node_carry_name", "nop_name", "precompile", "reducing_name", "render",
           "slots_copy_name"]

#: Reducing algorithms and the device entry each one instantiates.
REDUCING = ("ll", "one_shot", "two_shot", "reduce_scatter")
#: Data-moving kernels and the element sizes they are instantiated for.
MOVING = ("all_gather", "broadcast")
MOVING_SIZES = {1: "u8_t", 2: "u16_t", 4: "u32_t", 8: "u64_t", 16: "cdouble_t"}

_OP_FUNCTOR = {"sum": "OpSum", "prod": "OpProd", "min": "OpMin", "max": "OpMax", "avg": "OpAvg"}
_MODE = {"one_shot": "ONE_SHOT", "two_shot": "TWO_SHOT", "reduce_scatter": "REDUCE_SCATTER",
         "all_gather": "ALL_GATHER", "broadcast": "BROADCAST"}
# Rendered in this order, then _fold_abi's definitions, then FOLD_SOURCE.
_SOURCES = ("portability.h", "arith.h", "collectives.hip")
FOLD_SOURCE = "fold.hip"
#: Deliberately wrong renders for the static ISA checks, which must catch each of them.
_WEAKEN = {"flag_scope": "DETAR_WEAKEN_FLAG_SCOPE", "vector": "DETAR_WEAKEN_VECTOR",
           "ftz": "DETAR_WEAKEN_FTZ", "ll_lines": "DETAR_WEAKEN_LL_LINES",
           "wave_release": "DETAR_WEAKEN_WAVE_RELEASE"}

_ENTRY = ('extern "C" __global__ void __launch_bounds__({threads}) {name}({params}) '
          "{{\n  {call};\n}}\n")
# The parameters of every IPC collective (packed once per plan by _launch.Launcher): count is
# this launch's elements, total and chunk place it in the whole call (signature, reports).
_IPC_PARAMS = ("Ctx c, const void* in, void* out, u64_t count, u64_t aux, u64_t sig, "
               "u64_t total, u64_t chunk")


@dataclass(frozen=True)
class ModuleKey:
    """One compiled module: a dtype name (None for the data-moving kernels), a world size (0: any,
    for the NCCL transport's folds) and a family (``"ipc"`` or ``"nccl"``)."""

    dtype: str | None
    world_size: int
    family: str = "ipc"


def reducing_name(dtype: str, op: str, world_size: int, algorithm: str) -> str:
    """extern "C" name of a reducing kernel."""
    return f"detar_{dtype}_{op}_n{world_size}_{algorithm}"


def moving_name(itemsize: int, world_size: int, kind: str) -> str:
    """extern "C" name of a data-moving kernel for elements of ``itemsize`` bytes."""
    return f"detar_copy{itemsize}_n{world_size}_{kind}"


def segments_name(world_size: int) -> str:
    """extern "C" name of the coalescing kernel (gather/scatter of up to SEGMENTS buffers to and
    from one contiguous buffer: detar_cupy._coalesce); parameters (Segments s, pack_t* buf)."""
    return f"detar_segments_n{world_size}"


def nop_name(world_size: int) -> str:
    """extern "C" name of the empty kernel of the data movers' module (same parameters as every
    kernel, no work): what one pre-packed launch costs the host, for the benchmark."""
    return f"detar_nop_n{world_size}"


def fold_name(dtype: str, op: str) -> str:
    """extern "C" name of the NCCL transport's fold kernel (any number of ranks)."""
    return f"detar_{dtype}_{op}_fold"


def node_carry_name(dtype: str, op: str, node_size: int) -> str:
    """extern "C" name of the hierarchical transport's node carry kernel (IPC, G ranks)."""
    return f"detar_{dtype}_{op}_n{node_size}_node_carry"


def slots_copy_name(itemsize: int) -> str:
    """extern "C" name of the NCCL transport's slot copy for elements of ``itemsize`` bytes."""
    return f"detar_copy{itemsize}_slots"


HEADER_STAMP = "detar_header_stamp"
HEADER_CHECK = "detar_header_check"


def nccl_keys() -> list[ModuleKey]:
    """The NCCL transport's modules: per dtype the folds, the dtype-agnostic module, and per dtype
    and node size the node carry kernels."""
    return ([ModuleKey(d, 0, "nccl") for d in (*DTYPES, None)]
            + [ModuleKey(d, g, "nccl") for g in range(2, MAX_WORLD + 1) for d in DTYPES])


def _nccl_entries(key: ModuleKey):
    """(name, parameter list, device call) for every kernel of an NCCL-family ``key``."""
    if key.dtype is None:
        for size in MOVING_SIZES:
            yield slots_copy_name(size), "FoldArgs a", f"copy_slots<{size}>(a)"
        yield HEADER_STAMP, "FoldArgs a", "header_stamp(a)"
        yield HEADER_CHECK, "FoldArgs a", "header_check(a)"
        return
    dt = DTYPES[key.dtype]
    for op in dt.ops:
        functor = _OP_FUNCTOR[op]
        if key.world_size == 0:
            yield fold_name(key.dtype, op), "FoldArgs a", f"fold<{dt.ctype}, {functor}>(a)"
        else:
            yield (node_carry_name(key.dtype, op, key.world_size), "Ctx c, FoldArgs a",
                   f"node_carry<{dt.ctype}, {functor}, {key.world_size}>(c, a)")


def _ipc_entries(key: ModuleKey):
    """(name, parameter list, device call) for every kernel of an IPC-family ``key``."""
    n = key.world_size
    args = "c, (const char*)in, (char*)out, count"
    if key.dtype is None:
        # the host-cost floor of the benchmark: a launch, no work
        yield nop_name(n), _IPC_PARAMS, "(void)c"
        yield segments_name(n), "Segments s, pack_t* buf", "move_segments(s, buf)"
        for size, ctype in MOVING_SIZES.items():
            for kind in MOVING:
                yield (moving_name(size, n, kind), _IPC_PARAMS, f"collective<{ctype}, OpSum, "
                       f"{n}, {_MODE[kind]}>({args}, aux, sig, total, chunk)")
        return
    dt = DTYPES[key.dtype]
    for op in dt.ops:
        functor = _OP_FUNCTOR[op]
        for alg in REDUCING:
            call = (f"ll_all_reduce<{dt.ctype}, {functor}, {n}>({args}, sig, total, chunk)"
                    if alg == "ll" else f"collective<{dt.ctype}, {functor}, {n}, "
                    f"{_MODE[alg]}>({args}, aux, sig, total, chunk)")
            yield reducing_name(key.dtype, op, n, alg), _IPC_PARAMS, call


def _entries(key: ModuleKey):
    """(name, parameter list, device call) for every kernel of ``key``."""
    return _nccl_entries(key) if key.family == "nccl" else _ipc_entries(key)


def kernel_names(key: ModuleKey) -> tuple[str, ...]:
    """The extern "C" kernel names in the module of ``key``."""
    return tuple(name for name, _, _ in _entries(key))


def module_keys() -> list[ModuleKey]:
    """Every module the library can render: all dtypes and world sizes, plus data movers, then
    the NCCL transport's modules."""
    return [ModuleKey(d, n) for n in range(1, MAX_WORLD + 1) for d in (*DTYPES, None)] + nccl_keys()


@functools.lru_cache(maxsize=None)
def _library_source() -> str:
    pkg = resources.files("detar_cupy.hip_src")
    parts = [pkg.joinpath(name).read_text() for name in _SOURCES]
    return "\n".join(parts + [_fold_abi.c_source(), pkg.joinpath(FOLD_SOURCE).read_text()])


def _entry(key: ModuleKey) -> str:
    return "".join(_ENTRY.format(threads=THREADS, name=name, params=params, call=call)
                   for name, params, call in _entries(key))


def render(keys: Sequence[ModuleKey], *, weaken: str | None = None,
           layouts: dict[str, type] | None = None) -> str:
    """One translation unit with the kernels of all ``keys``: the shared constants of
    :mod:`detar_cupy._protocol`, the library source, a ``static_assert`` per field of every
    shared struct, and the ``extern "C"`` entries.

    ``weaken`` renders a deliberately wrong variant for the static ISA tests only (see
    ``_WEAKEN``: block-scope flags, scalar data loads, flushing f32 multiply/divide, 32-bit LL
    line elements, no per-wave release before the barrier). ``layouts`` replaces the ctypes
    layouts the asserts check (tests: a drifted layout must not compile).
    """
    head = _protocol.render_constants()
    if weaken is not None:
        if weaken not in _WEAKEN:
            raise ValueError(f"unknown weaken {weaken!r}; one of {sorted(_WEAKEN)}")
        head = f"#define {_WEAKEN[weaken]} 1\n" + head
    body = "".join(_entry(key) for key in keys)
    return (head + _library_source() + "\n" + _protocol.render_layout_asserts(layouts) + body)


def compile_options(platform: str) -> tuple[str, ...]:
    """Our compile options; CuPy appends its own (language standard, flush-to-zero).

    Contraction into FMA is off: the contract rounds every operation separately.
    """
    if platform == "cuda":
        return ("--fmad=false",)
    if platform == "hip":
        return ("-ffp-contract=off",)
    raise ValueError(f"unknown platform {platform!r}; 'cuda' or 'hip'")


def platform() -> str:
    """'hip' on a ROCm build of CuPy, else 'cuda'."""
    import cupy

    return "hip" if cupy.cuda.runtime.is_hip else "cuda"


@functools.lru_cache(maxsize=None)
def _module(key: ModuleKey, device: int) -> Any:
    # One module per GPU: a loaded module and its function handles belong to one device's
    # context, and a handle launched in another context is invalid. CuPy's disk cache makes the
    # second GPU's compile a cache hit.
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=render([key]), options=compile_options(platform()))


@functools.lru_cache(maxsize=None)
def function(key: ModuleKey, name: str, device: int) -> Any:
    """The ``cupy.cuda.Function`` ``name`` of ``key`` loaded on GPU ``device`` (compiled once per
    process, key and device); its ``ptr`` is the driver handle the lean launcher takes."""
    import cupy

    with cupy.cuda.Device(device):
        return _module(key, device).get_function(name).kernel


def _compile_module(key: ModuleKey) -> ModuleKey:
    import cupy

    function(key, kernel_names(key)[0], cupy.cuda.Device().id)  # compiles the whole module
    return key


def precompile(world_sizes: Sequence[int], jobs: int,
               progress: Callable[[str], Any] | None = None) -> float:
    """Compile every module of ``world_sizes`` in ``jobs`` processes (on the current GPU's
    architecture), filling CuPy's disk cache so that no rank pays the first-use compile (3-6 s per
    module) inside its first collective, where a slow rank keeps its peers waiting. The NCCL
    transport's modules of those node sizes and its world-size-free ones are included. Seconds
    taken."""
    keys = [k for k in module_keys() if k.world_size in world_sizes or k.world_size == 0]
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, key in enumerate(pool.map(_compile_module, keys), 1):
            if progress is not None:
                progress(f"[{i}/{len(keys)}] {key.dtype or 'data movers'} n={key.world_size}")
    return time.perf_counter() - start
