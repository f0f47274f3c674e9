"""Offline kernel compilers: NVRTC and hiprtc without a GPU and without CuPy.

Used by the CI compile matrix (``tests/test_compile_matrix.py``) and by ``python -m detar_cupy
doctor``. Importable with only numpy installed: every compiler is looked up lazily.

- CUDA: NVRTC from the ``nvidia-cuda-nvrtc`` wheel through ``cuda-bindings``
  (``from cuda.bindings import nvrtc``; cuda-bindings finds the wheel's libnvrtc through
  cuda-pathfinder). Compiles for any ``sm_XX`` without a GPU.
- ROCm: hiprtc from ``libamdhip64.so.5`` (Debian bookworm: ``libamdhip64-dev``,
  ``rocm-device-libs``; ROCm 5.2) through ctypes, with ``--gpu-architecture=gfxXXX`` standing in
  for the device hiprtc would otherwise ask the runtime for.

  hiprtc 5.2 resolves the architecture through a fixed table that stops at gfx90d: for gfx940 it
  passes a garbage ISA name to comgr, which then corrupts the heap and aborts the process
  (``munmap_chunk(): invalid pointer``); comgr 5.2 itself has no gfx940 ISA either. For
  architectures missing from hiprtc's table we therefore replay hiprtc's front end on the clang
  driver (clang-15, the compiler Debian's comgr and hipcc are built on): the builtin
  ``hiprtc_runtime.h`` instead of HIP headers, ``__HIPCC_RTC__`` and hiprtc's other options (read
  from comgr's ``AMD_COMGR_EMIT_VERBOSE_LOGS`` trace of hiprtcCompileProgram), then the user's.
  ``tests/test_compile_matrix.py`` checks that on gfx90a this replica gives the same memory-model
  code as hiprtc (same release/acquire sequences, memory instructions and cache bits; register
  allocation differs, hiprtc optimising again after linking the device libraries).

The options CuPy adds to a ``RawModule``'s own are in :func:`cupy_options`; see the comments there
for where each one comes from in CuPy 13.3 and 14.2.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

CUDA_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")
AMD_ARCHS: tuple[str, ...] = ("gfx908", "gfx90a", "gfx940")


class CompileError(RuntimeError):
    """A runtime compiler rejected a source; ``log`` is the compiler's own log."""

    def __init__(self, compiler: str, arch: str, options: Sequence[str], log: str):
        self.compiler = compiler
        self.arch = arch
        self.options = tuple(options)
        self.log = log
        super().__init__(f"{compiler} failed for {arch} with options {list(self.options)}:\n{log}")


@dataclass(frozen=True)
class Availability:
    """Result of a toolchain probe: truthy when usable, else ``reason`` says why not."""

    ok: bool
    reason: str = ""
    detail: str = ""  # version/path information when ok

    def __bool__(self) -> bool:
        return self.ok


# ------------------------------------------------------------------------------------------------
# The options CuPy adds
# ------------------------------------------------------------------------------------------------
#
# What cupy.RawModule(code=..., options=ours) hands to the runtime compiler, in order:
#
#   cupy/_core/core.pyx  assemble_cupy_compiler_options(options)   (13.3 and 14.2 alike):
#       -I<cupy>/_core/include/cupy/_cccl/cub
#       -I<cupy>/_core/include/cupy/_cccl/thrust
#       -I<cupy>/_core/include/cupy/_cccl/libcudacxx
#       <ours>
#       --std=c++11  (13.3: only when no option contains "-std=c++")
#       --std=c++17  (14.x: only when no option contains "-std=" / "--std=")
#       -I<cupy>/_core/include
#       -I<cupy>/_core/include/cupy/_cuda/cuda-1x.y   (CUDA, some NVRTC 11/12 versions; not 13)
#       -I<CUDA_PATH or ROCM_HOME>/include             (when found)
#   cupy/cuda/compiler.py
#     CUDA  _compile_with_cache_cuda():  -ftz=true
#                                        13.3: + _get_extra_include_dir_opts() (-I of the
#                                        nvidia-* wheels' include dirs)
#           compile_using_nvrtc():       -arch=sm_XX  (cubin; -arch=compute_XX only when
#                                        CUPY_COMPILE_WITH_PTX=1 or XX > NVRTC's maximum)
#                                        --device-as-default-execution-space
#                                        (13.3: when NVRTC major >= 12; 14.x: always on CUDA)
#     HIP   _compile_with_cache_hip():   -fcuda-flush-denormals-to-zero
#                                        14.x: + -I<each of hipcc's default include dirs>
#                                        (_environment._get_hipcc_include_dirs())
#           compile_using_nvrtc():       nothing (hiprtc targets the current device; the CI
#                                        passes --gpu-architecture=gfxXXX instead)
#
# Verified against the wheels cupy-rocm-5-0 13.3.0, cupy-cuda13x 14.2.0, cupy-rocm-7-0 14.2.0
# (compiler.py is shared by the CUDA and ROCm builds); for 14.2 on CUDA also by calling
# cupy._core.core.assemble_cupy_compiler_options(()) (-> "--std=c++17").

CUPY_MAJORS: tuple[int, ...] = (13, 14)
_CUPY_DEFAULT_STD = {13: "--std=c++11", 14: "--std=c++17"}


def _has_std(options: Sequence[str], cupy_major: int) -> bool:
    if cupy_major <= 13:
        return any("-std=c++" in o for o in options)
    return any(("-std=" in o) or ("--std=" in o) for o in options)


def cupy_added_options(platform: str, cupy_major: int, options: Sequence[str] = ()) -> tuple[str, ...]:
    """The flags (no include dirs, no architecture) CuPy adds to ``options`` on ``platform``.

    ``platform`` is ``"cuda"`` or ``"hip"``; ``cupy_major`` 13 (13.3) or 14. The language standard
    is only added when ``options`` name none.
    """
    if cupy_major not in CUPY_MAJORS:
        raise ValueError(f"cupy_major must be one of {CUPY_MAJORS}, not {cupy_major!r}")
    std = () if _has_std(options, cupy_major) else (_CUPY_DEFAULT_STD[cupy_major],)
    if platform == "cuda":
        return std + ("-ftz=true", "--device-as-default-execution-space")
    if platform == "hip":
        return std + ("-fcuda-flush-denormals-to-zero",)
    raise ValueError(f"unknown platform {platform!r}; 'cuda' or 'hip'")


def cupy_options(platform: str, cupy_major: int, options: Sequence[str], arch: str, *,
                 include_dir: str | None = None) -> tuple[str, ...]:
    """The full option list CuPy ``cupy_major`` would pass to NVRTC/hiprtc for ``options``.

    ``arch`` is ``sm_XX`` (CUDA: CuPy's ``-arch=sm_XX``) or ``gfxXXX`` (HIP: passed as
    ``--gpu-architecture``, the CI's stand-in for the device hiprtc would query). With
    ``include_dir`` (an existing directory standing in for CuPy's, the CUDA and the ROCm include
    directories) the include options are reproduced too; our sources have no ``#include``, so
    they only exercise the option parser.
    """
    options = tuple(options)
    std = () if _has_std(options, cupy_major) else (_CUPY_DEFAULT_STD[cupy_major],)
    inc = include_dir
    pre = () if inc is None else (f"-I{inc}", f"-I{inc}", f"-I{inc}")
    post = () if inc is None else (f"-I{inc}", f"-I{inc}")
    if platform == "cuda":
        extra_inc = () if (inc is None or cupy_major > 13) else (f"-I{inc}",)
        if not re.fullmatch(r"(sm|compute)_\d+[af]?", arch):
            raise ValueError(f"CUDA arch must look like sm_90 or compute_90, not {arch!r}")
        return (pre + options + std + post + ("-ftz=true",) + extra_inc
                + (f"-arch={arch}", "--device-as-default-execution-space"))
    if platform == "hip":
        if not re.fullmatch(r"gfx[0-9a-f]+", arch):
            raise ValueError(f"HIP arch must look like gfx90a, not {arch!r}")
        hipcc_inc = ()
        if inc is not None and cupy_major >= 14:
            hipcc_inc = tuple(f"-I{d}" for d in hipcc_include_dirs())
        return (pre + options + std + post + ("-fcuda-flush-denormals-to-zero",) + hipcc_inc
                + (f"--gpu-architecture={arch}",))
    raise ValueError(f"unknown platform {platform!r}; 'cuda' or 'hip'")


@functools.lru_cache(maxsize=None)
def hipcc_include_dirs() -> tuple[str, ...]:
    """hipcc's default include directories, found the way CuPy 14 does (empty without hipcc)."""
    hipcc = shutil.which("hipcc")
    if hipcc is None:
        return ()
    env = dict(os.environ)
    env.setdefault("HIP_PLATFORM", "amd")
    try:
        proc = subprocess.run([hipcc, "-x", "hip", "-E", "-v", "/dev/null"], env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"#include <\.\.\.> search starts here:\n(.*?)\nEnd of search list.",
                  proc.stderr, re.S)
    if proc.returncode != 0 or m is None:
        return ()
    return tuple(line.strip() for line in m.group(1).splitlines() if line.strip())


# ------------------------------------------------------------------------------------------------
# NVRTC
# ------------------------------------------------------------------------------------------------

def _nvrtc():
    from cuda.bindings import nvrtc  # noqa: PLC0415  (optional dependency)

    return nvrtc


@functools.lru_cache(maxsize=None)
def nvrtc_available() -> Availability:
    """Whether NVRTC can be used (cuda-bindings + a loadable libnvrtc)."""
    try:
        nvrtc = _nvrtc()
    except Exception as e:  # ImportError, or a broken install
        return Availability(False, f"cuda-bindings not importable ({type(e).__name__}: {e}); "
                                   "install the 'test' extra: pip install -e '.[test]'")
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # libnvrtc not found
        return Availability(False, f"libnvrtc not loadable ({type(e).__name__}: {e}); "
                                   "install nvidia-cuda-nvrtc matching cuda-bindings' major")
    if int(err) != 0:
        return Availability(False, f"nvrtcVersion failed: {err}")
    return Availability(True, detail=f"NVRTC {major}.{minor}")


def nvrtc_version() -> tuple[int, int]:
    err, major, minor = _nvrtc().nvrtcVersion()
    return int(major), int(minor)


@dataclass(frozen=True)
class NvrtcResult:
    ptx: str
    cubin: bytes | None  # present when compiled for a real architecture (-arch=sm_XX)
    log: str


def nvrtc_compile_full(source: str, options: Sequence[str], *, name: str = "detar.cu",
                       arch: str = "") -> NvrtcResult:
    """Compile with exactly ``options`` (which must name the architecture) and return PTX, cubin
    (for ``-arch=sm_XX``) and the log. Raises :class:`CompileError` with the log on failure."""
    nvrtc = _nvrtc()
    opts = [o.encode() for o in options]
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    if int(err) != 0:
        raise CompileError("NVRTC", arch, options, f"nvrtcCreateProgram: {err}")
    try:
        (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.rstrip(b"\0").decode(errors="replace")
        if int(res) != 0:
            raise CompileError("NVRTC", arch, options, f"{res}\n{log}")
        _, n = nvrtc.nvrtcGetPTXSize(prog)
        buf = b" " * n
        nvrtc.nvrtcGetPTX(prog, buf)
        ptx = buf.rstrip(b"\0").decode()
        cubin = None
        err, n = nvrtc.nvrtcGetCUBINSize(prog)
        if int(err) == 0 and n > 0:
            buf = b" " * n
            nvrtc.nvrtcGetCUBIN(prog, buf)
            cubin = bytes(buf)
        return NvrtcResult(ptx, cubin, log)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def nvrtc_syntax_check(source: str, options: Sequence[str]) -> None:
    """Front end only (``-fdevice-syntax-only``: parsing, templates instantiated from the
    kernels, no code generation). Raises :class:`CompileError` with the log on failure."""
    arch = next((o.split("=", 1)[1] for o in options if o.startswith("-arch=")), "")
    nvrtc_compile_full(source, tuple(options) + ("-fdevice-syntax-only",), arch=arch)


def nvrtc_compile(source: str, arch: str, options: Sequence[str] = ()) -> str:
    """PTX of ``source`` for ``arch`` (``sm_90`` or ``compute_90``).

    ``options`` are passed as given, followed by ``-arch=<arch>`` unless they already name one.
    With a real architecture (``sm_XX``, what CuPy uses) NVRTC also runs ptxas, so the inline PTX
    is assembled too.
    """
    opts = tuple(options)
    if not any(o.startswith(("-arch", "--gpu-architecture")) for o in opts):
        opts += (f"-arch={arch}",)
    return nvrtc_compile_full(source, opts, arch=arch).ptx


# The oldest NVRTC CuPy users compile with: CUDA 12.0 (cupy-cuda12x), from the
# ``nvidia-cuda-nvrtc-cu12`` wheel the test extra pins, loaded directly through ctypes. Older
# NVRTCs lack front-end features newer ones have (``__builtin_offsetof`` arrived after 13.0;
# ``-fdevice-syntax-only`` after 12.0), so the matrix generates code with it too.
# It is only ever loaded in a child process of its own: loaded into a process before the NVRTC 13
# of cuda-bindings has compiled there, it breaks that NVRTC, which then rejects options it knows
# ("unrecognized option -fdevice-syntax-only"); a matrix worker whose first job was the legacy
# one failed its later syntax jobs.

def _legacy_nvrtc_lib() -> str | None:
    """Where the CUDA 12 NVRTC library is (found, not loaded)."""
    try:
        import nvidia.cuda_nvrtc  # noqa: PLC0415  (optional: the cu12 wheel)
    except ImportError:
        return None
    for root in getattr(nvidia.cuda_nvrtc, "__path__", ()):
        lib = os.path.join(root, "lib", "libnvrtc.so.12")
        if os.path.exists(lib):
            return lib
    return None


def _in_legacy_child(request: dict) -> dict:
    """_legacy_nvrtc_child's answer to ``request``, from a fresh Python process."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent,
                                                       os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, "-c", f"import {__name__} as t; t._legacy_nvrtc_child()"],
        input=json.dumps(request), capture_output=True, text=True, env=env, check=False)
    try:
        return json.loads(child.stdout)
    except ValueError:
        return {"error": f"the NVRTC 12 process failed (exit {child.returncode}):\n"
                         f"{child.stderr[-4000:]}"}


@functools.lru_cache(maxsize=None)
def legacy_nvrtc_available() -> Availability:
    """Whether the CUDA 12.0 NVRTC wheel (``nvidia-cuda-nvrtc-cu12``) is installed and loads."""
    lib = _legacy_nvrtc_lib()
    if lib is None:
        return Availability(False, "nvidia-cuda-nvrtc-cu12 not installed (the 'test' extra)")
    out = _in_legacy_child({"version": True})
    if "error" in out:
        return Availability(False, out["error"])
    return Availability(True, detail=f"NVRTC {out['version']} ({lib})")


def legacy_nvrtc_compile(source: str, options: Sequence[str]) -> str:
    """PTX of ``source`` from the CUDA 12 NVRTC with exactly ``options`` (in a child process);
    CompileError with the log on failure."""
    if _legacy_nvrtc_lib() is None:
        raise CompileError("NVRTC 12", "", options, "nvidia-cuda-nvrtc-cu12 not installed")
    out = _in_legacy_child({"source": source, "options": list(options)})
    if "error" in out:
        raise CompileError("NVRTC 12", "", options, out["error"])
    return out["ptx"]


def _legacy_nvrtc_child() -> None:
    """The child of _in_legacy_child: a request on stdin ({"version": true}, or {"source",
    "options"}), the answer on stdout ({"version": "12.0"}, {"ptx"} or {"error": the log})."""
    request = json.load(sys.stdin)
    lib_path = _legacy_nvrtc_lib()
    if lib_path is None:
        json.dump({"error": "nvidia-cuda-nvrtc-cu12 not installed"}, sys.stdout)
        return
    # libnvrtc opens its builtins library by name at compile time: load it first
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(lib_path),
                                                  "libnvrtc-builtins.so.12*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(lib_path)
    if request.get("version"):
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        json.dump({"version": f"{major.value}.{minor.value}"}, sys.stdout)
        return
    options = request["options"]
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), request["source"].encode(), b"detar.cu", 0,
                              None, None):
        json.dump({"error": "nvrtcCreateProgram failed"}, sys.stdout)
        return
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        res = lib.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        if res:
            json.dump({"error": log.value.decode(errors="replace")}, sys.stdout)
            return
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        json.dump({"ptx": ptx.value.decode()}, sys.stdout)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------------------------------
# hiprtc (and its replica on clang)
# ------------------------------------------------------------------------------------------------

# ROCm 5 ships hiprtc inside libamdhip64; ROCm 6+ as libhiprtc
_HIP_LIB_NAMES = ("libamdhip64.so.5", "libhiprtc.so.7", "libhiprtc.so.6", "libamdhip64.so")


def _loaded_path(name: str) -> str:
    """The file a library loaded under ``name`` came from (from /proc/self/maps), or ``name``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith(name):
                    return os.path.realpath(path)
    except OSError:
        pass
    return name


@functools.lru_cache(maxsize=None)
def _hip_lib() -> tuple[ctypes.CDLL, str]:
    os.environ.setdefault("HIP_PLATFORM", "amd")
    errors = []
    for name in _HIP_LIB_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
            continue
        if not hasattr(lib, "hiprtcCompileProgram"):
            errors.append(f"{name}: no hiprtcCompileProgram")
            continue
        lib.hiprtcGetErrorString.restype = ctypes.c_char_p
        return lib, _loaded_path(name)
    raise OSError("; ".join(errors))


@functools.lru_cache(maxsize=None)
def hiprtc_available() -> Availability:
    """Whether hiprtc can be used (libamdhip64 with hiprtcCompileProgram)."""
    try:
        lib, path = _hip_lib()
    except OSError as e:
        return Availability(False, f"libamdhip64 with hiprtc not loadable ({e}); on Debian "
                                   "bookworm: apt-get install hipcc libamdhip64-dev rocm-device-libs")
    return Availability(True, detail=f"hiprtc in {path}")


def hip_clang_available() -> Availability:
    """Whether the hiprtc replica (for gfx940 on ROCm 5.2) can run: clang-15 + hiprtc builtins."""
    if hip_clang() is None:
        return Availability(False, "clang-15 not found (Debian: apt-get install clang-15)")
    try:
        _hiprtc_builtin_header()
        _hip_version_triple()
    except OSError as e:
        return Availability(False, f"hiprtc builtins/version unavailable ({e})")
    if rocm_device_lib_dir() is None:
        return Availability(False, "ROCm device libraries not found (Debian: rocm-device-libs)")
    return Availability(True, detail=hip_clang())


@functools.lru_cache(maxsize=None)
def _hiprtc_known_archs() -> frozenset[str] | None:
    """Architectures hiprtc's own ISA table knows: the gfx names stored in libamdhip64 (ROCm 5);
    None (no such table) for other hiprtc libraries."""
    _, path = _hip_lib()
    if not os.path.basename(path).startswith("libamdhip64.so.5"):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return frozenset()
    return frozenset(m.decode() for m in re.findall(rb"(?<=\0)(gfx[0-9a-f]{3,4})(?=\0)", data))


def hiprtc_backend_for(arch: str) -> str:
    """"hiprtc" where libamdhip64's hiprtc knows ``arch``, else "clang" (the hiprtc replica)."""
    known = _hiprtc_known_archs()
    return "hiprtc" if known is None or arch in known else "clang"


def _hiprtc_log(lib, prog) -> str:
    n = ctypes.c_size_t()
    if lib.hiprtcGetProgramLogSize(prog, ctypes.byref(n)) != 0 or n.value == 0:
        return ""
    buf = ctypes.create_string_buffer(n.value)
    lib.hiprtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def hiprtc_compile(source: str, arch: str, options: Sequence[str] = (), *,
                   name: str = "detar.hip", backend: str = "auto") -> bytes:
    """AMDGPU code object (ELF) of ``source`` for ``arch`` (``gfx90a`` …).

    ``options`` are passed as given, after ``--gpu-architecture=<arch>`` unless they already
    name one. ``backend``: ``"hiprtc"``, ``"clang"`` (hiprtc's front end replayed on the clang
    driver, for architectures the installed hiprtc's table lacks) or ``"auto"``.
    Raises :class:`CompileError` with the compiler log on failure.
    """
    opts = tuple(options)
    m = [o for o in opts if o.startswith("--gpu-architecture=")]
    if m:
        arch = m[-1].split("=", 1)[1]
    else:
        opts = (f"--gpu-architecture={arch}",) + opts
    if backend == "auto":
        backend = hiprtc_backend_for(arch)
    if backend == "clang":
        user = tuple(o for o in opts if not o.startswith("--gpu-architecture="))
        return clang_compile_like_hiprtc(source, arch, user, name=name)
    if backend != "hiprtc":
        raise ValueError(f"unknown backend {backend!r}")
    if hiprtc_backend_for(arch) != "hiprtc":
        # hiprtc would abort the whole process (see the module docstring)
        raise CompileError("hiprtc", arch, opts, f"{arch} is not in this hiprtc's ISA table; "
                                                 "use backend='clang'")
    lib, _ = _hip_lib()
    prog = ctypes.c_void_p()
    r = lib.hiprtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if r != 0:
        raise CompileError("hiprtc", arch, opts, f"hiprtcCreateProgram: {lib.hiprtcGetErrorString(r)}")
    try:
        enc = [o.encode() for o in opts]
        arr = (ctypes.c_char_p * len(enc))(*enc)
        r = lib.hiprtcCompileProgram(prog, len(enc), arr)
        if r != 0:
            raise CompileError("hiprtc", arch, opts,
                               f"{lib.hiprtcGetErrorString(r).decode()}\n{_hiprtc_log(lib, prog)}")
        n = ctypes.c_size_t()
        r = lib.hiprtcGetCodeSize(prog, ctypes.byref(n))
        if r != 0 or n.value == 0:
            raise CompileError("hiprtc", arch, opts, f"hiprtcGetCodeSize: {r}")
        buf = ctypes.create_string_buffer(n.value)
        lib.hiprtcGetCode(prog, buf)
        return buf.raw
    finally:
        lib.hiprtcDestroyProgram(ctypes.byref(prog))


def hiprtc_syntax_check(source: str, arch: str, options: Sequence[str] = ()) -> None:
    """hiprtc's front end only (on the clang replica, ``-fsyntax-only``). Raises
    :class:`CompileError` with the log on failure."""
    user = tuple(o for o in options if not o.startswith("--gpu-architecture="))
    clang_compile_like_hiprtc(source, arch, user, syntax_only=True)


# -- hiprtc replica on the clang driver ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hiprtc_builtin_header() -> bytes:
    """hiprtc's implicit ``hiprtc_runtime.h`` (the text hiprtc hands to comgr as an include)."""
    errors = []
    for name in ("libhiprtc-builtins.so.5", "libhiprtc-builtins.so.6", "libhiprtc-builtins.so.7"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError("; ".join(errors))
    size = ctypes.c_size_t.in_dll(lib, "__hipRTC_header_size").value
    start = ctypes.addressof(ctypes.c_char.in_dll(lib, "__hipRTC_header"))
    return ctypes.string_at(start, size)


@functools.lru_cache(maxsize=None)
def _hip_version_triple() -> tuple[int, int, int]:
    """(major, minor, patch) of libamdhip64, from its file name (libamdhip64.so.5.2.21153)."""
    _, path = _hip_lib()
    m = re.search(r"\.so\.(\d+)\.(\d+)\.(\d+)", path)
    if not m:
        raise OSError(f"cannot read the HIP version from {path}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def hiprtc_internal_options(arch: str) -> tuple[str, ...]:
    """What hiprtc 5.2 puts before the user's options when it compiles source to bitcode
    (from comgr's AMD_COMGR_EMIT_VERBOSE_LOGS trace of hiprtcCompileProgram)."""
    ma, mi, pa = _hip_version_triple()
    return ("-O3", "-mllvm", "-amdgpu-prelink", "-mcumode", f"--hip-version={ma}.{mi}.{pa}",
            f"-DHIP_VERSION_MAJOR={ma}", f"-DHIP_VERSION_MINOR={mi}", f"-DHIP_VERSION_PATCH={pa}",
            "-D__HIPCC_RTC__", "-include", "hiprtc_runtime.h", "-std=c++14", "-nogpuinc",
            f"--offload-arch={arch}")


@functools.lru_cache(maxsize=None)
def hip_clang() -> str | None:
    """The clang that Debian's hipcc and comgr are built on (clang-15), or None."""
    for c in ("clang++-15", "/usr/lib/llvm-15/bin/clang++"):
        path = shutil.which(c) or (c if os.path.isfile(c) else None)
        if path:
            return path
    return None


@functools.lru_cache(maxsize=None)
def rocm_device_lib_dir() -> str | None:
    """Where the ROCm device libraries (ocml.bc …) are (Debian: rocm-device-libs)."""
    for pat in ("/usr/lib/x86_64-linux-gnu/amdgcn/bitcode", "/usr/lib/*/amdgcn/bitcode",
                "/opt/rocm/amdgcn/bitcode", "/opt/rocm*/amdgcn/bitcode",
                "/opt/rocm*/lib/llvm/lib/clang/*/lib/amdgcn/bitcode"):
        for d in sorted(glob.glob(pat)):
            if os.path.isfile(os.path.join(d, "ocml.bc")):
                return d
    return None


def clang_compile_like_hiprtc(source: str, arch: str, options: Sequence[str] = (), *,
                              name: str = "detar.hip", syntax_only: bool = False) -> bytes:
    """hiprtc's compilation replayed on the clang driver, for architectures the installed
    hiprtc's table lacks (gfx940 on ROCm 5.2; comgr 5.2 rejects that ISA name too).

    Same front end as hiprtc: hiprtc's implicit ``hiprtc_runtime.h`` (no HIP headers),
    ``__HIPCC_RTC__``, hiprtc's options before the user's; the driver links the same ROCm device
    libraries. Differences: one driver invocation instead of comgr's compile/link/codegen
    actions, so no ``-amdgpu-prelink``. ``syntax_only`` stops after the front end (returns b"").
    """
    import tempfile

    clang = hip_clang()
    if clang is None:
        raise CompileError("clang(hiprtc replica)", arch, options,
                           "clang-15 not found (Debian: apt-get install clang-15, a hipcc dependency)")
    # hiprtc_internal_options() without "-include hiprtc_runtime.h" (given as a file below) and
    # "-mllvm -amdgpu-prelink" (only meaningful before comgr's separate link step)
    ma, mi, pa = _hip_version_triple()
    internal = ["-O3", "-mcumode", f"--hip-version={ma}.{mi}.{pa}", f"-DHIP_VERSION_MAJOR={ma}",
                f"-DHIP_VERSION_MINOR={mi}", f"-DHIP_VERSION_PATCH={pa}", "-D__HIPCC_RTC__",
                "-std=c++14", "-nogpuinc", f"--offload-arch={arch}"]
    with tempfile.TemporaryDirectory(prefix="detar-hiprtc-") as d:
        hdr = os.path.join(d, "hiprtc_runtime.h")
        with open(hdr, "wb") as f:
            f.write(_hiprtc_builtin_header())
        src = os.path.join(d, name)
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        out = os.path.join(d, "out.co")
        libs = rocm_device_lib_dir()
        libs_opt = [f"--rocm-device-lib-path={libs}"] if libs else []
        cmd = [clang, "-x", "hip", "--cuda-device-only", "--no-gpu-bundle-output", *libs_opt,
               "-include", hdr, *internal, *options]
        cmd += ["-fsyntax-only", src] if syntax_only else ["-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if syntax_only and proc.returncode == 0:
            return b""
        if proc.returncode != 0 or not os.path.exists(out):
            raise CompileError("clang(hiprtc replica)", arch, options,
                               f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        with open(out, "rb") as f:
            return f.read()


# ------------------------------------------------------------------------------------------------
# Disassembler
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def llvm_objdump() -> str | None:
    """An llvm-objdump that knows AMDGPU (Debian: llvm-15 or llvm-14), or None."""
    cands = [os.environ.get("DETAR_LLVM_OBJDUMP", "")]
    cands += [f"llvm-objdump-{v}" for v in (19, 18, 17, 16, 15, 14)] + ["llvm-objdump"]
    cands += sorted(glob.glob("/usr/lib/llvm-*/bin/llvm-objdump"), reverse=True)
    for c in cands:
        if not c:
            continue
        path = shutil.which(c) or (c if os.path.isfile(c) else None)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "amdgcn" in out:
            return path
    return None


def objdump_available() -> Availability:
    p = llvm_objdump()
    if p is None:
        return Availability(False, "no AMDGPU-capable llvm-objdump (Debian: apt-get install llvm-15)")
    return Availability(True, detail=p)


def disassemble_amdgpu(code_object: bytes, arch: str) -> str:
    """``llvm-objdump -d --mcpu=<arch>`` of a code object (ELF bytes)."""
    import tempfile

    tool = llvm_objdump()
    if tool is None:
        raise RuntimeError(objdump_available().reason)
    with tempfile.NamedTemporaryFile(suffix=".co") as f:
        f.write(code_object)
        f.flush()
        proc = subprocess.run([tool, "-d", f"--mcpu={arch}", f.name], capture_output=True,
                              text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed: {proc.stderr}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------

def toolchain_report() -> dict[str, Availability]:
    """Availability of every offline toolchain (for the CLI doctor)."""
    return {"nvrtc": nvrtc_available(), "hiprtc": hiprtc_available(),
            "hiprtc replica (clang)": hip_clang_available(), "llvm-objdump": objdump_available()}
