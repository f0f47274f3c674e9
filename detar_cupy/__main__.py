"""Command line: ``python -m detar_cupy [doctor | compile | verify | bench]``.

With no command: on a machine with 2 or more GPUs, spawn one rank per GPU, run a short
determinism check and a short benchmark against NCCL, and print the tables. With one GPU, run the
determinism check with two ranks sharing it (``DETAR_SHARE_GPUS=1``: the same bits, slow calls)
and say that speed needs separate GPUs.
"""
from __future__ import annotations

import argparse
import platform
import sys

from . import __version__


def _gpus() -> tuple[int, str]:
    try:
        import cupy
    except ImportError:
        return 0, "CuPy not installed (pip install 'detar_cupy[cuda12x]' or another extra)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver / no device
        return 0, f"CuPy {cupy.__version__}: no GPU ({exc})"
    build = "ROCm" if cupy.cuda.runtime.is_hip else "CUDA"
    return n, f"CuPy {cupy.__version__} ({build} build), {n} GPU(s)"


def info() -> int:
    """Platform, CuPy build, GPUs, offline kernel compilers reachable."""
    from . import _toolchains

    n, gpu_line = _gpus()
    print(f"detar_cupy {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"GPUs: {gpu_line}")
    for label, probe in (("NVRTC (offline CUDA compile)", _toolchains.nvrtc_available),
                         ("hiprtc (offline ROCm compile)", _toolchains.hiprtc_available)):
        avail = probe()
        print(f"{label}: {'yes' if avail else 'no'}{'' if avail else ' - ' + str(avail.reason)}")
    return n


def doctor(world: int) -> None:
    """Devices, peer-access matrix, and every kernel of this world size compiled through CuPy."""
    import cupy

    from . import _kernels

    rt = cupy.cuda.runtime
    for d in range(world):
        print(f"GPU {d}: {rt.getDeviceProperties(d)['name'].decode()}")
    print("peer access (row can reach column):")
    for a in range(world):
        print("  " + " ".join("-" if a == b else ("Y" if rt.deviceCanAccessPeer(a, b) else "N")
                              for b in range(world)))
    keys = [k for k in _kernels.module_keys() if k.world_size in (0, world)]
    for key in keys:
        for name in _kernels.kernel_names(key):
            _kernels.function(key, name, 0)
    print(f"compiled and loaded {sum(len(_kernels.kernel_names(k)) for k in keys)} kernels "
          f"in {len(keys)} modules for world size {world}")


def verify(world: int) -> bool:
    from ._spawn import spawn
    from ._verify import verify_rank

    per_rank = spawn(verify_rank, world)
    ok = all(passed for rank in per_rank for _, passed in rank)
    for i, (check, _) in enumerate(per_rank[0]):
        passed = all(r[i][1] for r in per_rank)
        print(f"  {'ok  ' if passed else 'FAIL'} {check}")
    print(f"determinism check on {world} GPUs: {'passed' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detar_cupy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("doctor", help="devices, P2P matrix, compile every kernel")
    p_compile = sub.add_parser("compile", help="fill CuPy's kernel cache ahead of the first call")
    p_compile.add_argument("--worlds", default=None,
                           help="comma-separated world sizes (default: 1 to the GPU count)")
    p_compile.add_argument("--jobs", type=int, default=None, help="processes (default: CPUs)")
    p_verify = sub.add_parser("verify", help="short determinism check on all GPUs")
    p_bench = sub.add_parser("bench", help="benchmark against NCCL")
    for p in (p_verify, p_bench):
        p.add_argument("--world", type=int, default=None, help="ranks (default: all GPUs)")
    p_bench.add_argument("--dtypes", default="float16", help="comma-separated, e.g. float16,bfloat16")
    p_bench.add_argument("--min-bytes", type=int, default=0, help="smallest message (bytes)")
    p_bench.add_argument("--max-bytes", type=int, default=256 << 20, help="largest message (bytes)")
    p_bench.add_argument("--out", default=None, help="prefix for the .json and .png files")
    p_bench.add_argument("--no-graphs", action="store_true")
    p_bench.add_argument("--impls", default=None,
                         help="comma-separated subset of auto,ll,one_shot,two_shot,"
                              "nccl_transport,hier_transport,nccl,torch_symm_one_shot,"
                              "torch_symm_two_shot (default: all)")
    args = parser.parse_args(argv)

    gpus = info()
    world = getattr(args, "world", None) or gpus
    if args.command is None:
        if gpus < 1:
            print("no GPU found; the CPU reference (detar_cupy.reference) works anywhere.")
            return 0
        if gpus == 1:
            import os

            from ._sharing import SHARE_ENV

            print(f"one GPU: the determinism check runs 2 ranks sharing it ({SHARE_ENV}=1: the "
                  "same bits, calls about a millisecond each); speed needs separate GPUs, so "
                  "no benchmark")
            os.environ[SHARE_ENV] = "1"  # inherited by the spawned ranks
            return 0 if verify(2) else 1
        ok = verify(world)
        from . import benchmark

        benchmark.run(world, sizes=[s for s in benchmark.DEFAULT_SIZES if s <= 16 << 20])
        return 0 if ok else 1
    if gpus < 1 or (args.command not in ("doctor", "compile") and world < 2):
        print("this command needs GPUs (2 or more for verify/bench)")
        return 2
    if args.command == "doctor":
        doctor(gpus)
        return 0
    if args.command == "compile":
        import os

        from . import _kernels

        worlds = ([int(w) for w in args.worlds.split(",")] if args.worlds
                  else list(range(1, gpus + 1)))
        took = _kernels.precompile(worlds, args.jobs or os.cpu_count() or 1, progress=print)
        print(f"compiled every module for world sizes {worlds} in {took:.1f} s")
        return 0
    if args.command == "verify":
        return 0 if verify(world) else 1
    from . import benchmark

    sizes = [s for s in benchmark.DEFAULT_SIZES if args.min_bytes <= s <= args.max_bytes]
    impls = benchmark.IMPLS if args.impls is None else tuple(args.impls.split(","))
    unknown = sorted(set(impls) - set(benchmark.IMPLS))
    if unknown:
        parser.error(f"unknown --impls {', '.join(unknown)}; "
                     f"choose from {', '.join(benchmark.IMPLS)}")
    benchmark.run(world, sizes=sizes, dtypes=args.dtypes.split(","), impls=impls,
                  out_prefix=args.out, graphs=not args.no_graphs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
