"""The CI compile matrix: every kernel the library can render, compiled offline (no GPU) by NVRTC
for sm_80/sm_90 and by hiprtc for gfx908/gfx90a/gfx940, with the options CuPy itself adds; then
static ISA checks on the output (system-scope barrier flags, 16-byte data loads), and proof that
those checks can fail (deliberately weakened renders must be flagged).

Toolchains: NVRTC from the ``test`` extra (cuda-bindings + nvidia-cuda-nvrtc); hiprtc and
llvm-objdump from Debian (``.ci/run`` installs them). Without one, its tests skip with the reason,
unless ``DETAR_REQUIRE_TOOLCHAINS=1`` (CI), where they fail.

What is compiled (tier ``DETAR_MATRIX``: ``ci`` by default, ``full`` for everything; see TIERS):

- full codegen + ISA checks: the CuPy 14 option set, exactly CuPy's flags except that CUDA uses
  ``-arch=compute_XX`` (PTX; CuPy's ``CUPY_COMPILE_WITH_PTX`` mode) since ptxas would double the
  time; HIP adds ``--gpu-architecture=gfxXXX``. Tier ``full``: every module on every target.
  Tier ``ci``: every module on some target of each platform (CUDA: all on sm_90; ROCm: world
  sizes spread over gfx908/gfx90a/gfx940, each of which also gets the largest one), i.e. every
  dtype/op/algorithm on every target. Modules are batched into translation units
  (``render(keys)``) compiled in parallel processes.
- the NCCL transport's modules (``fold.hip``): its folds, copies and header kernels (world size
  0: any) get full code generation on every target; its node carry kernels (per node size) are
  spread over the targets by world size like the IPC modules.
- cubin: CuPy's exact ``-arch=sm_XX`` (NVRTC runs ptxas) on every dtype's module at one world
  size (CUBIN_WORLD) and on the NCCL transport's fold modules, for both CUDA targets: every
  inline-asm site assembled for each target.
- front end: every module, syntax only (NVRTC ``-fdevice-syntax-only``; hiprtc's front end on
  the clang replica with ``-fsyntax-only``), on every target whose full-codegen share is partial,
  and for every other CuPy version's option set that differs in more than include directories
  (CuPy 13.3: ``--std=c++11`` where ours name no standard: a front-end matter).
- must-fail: ``render(..., weaken="flag_scope" | "vector")`` for one target per ISA rule set
  (sm_90, gfx908, gfx90a, gfx940); every affected kernel must be flagged.

Knobs (local use; CI sets none): ``DETAR_MATRIX`` (tier), ``DETAR_MATRIX_WORKERS`` (processes,
default: CPU count), ``DETAR_MATRIX_BATCH`` (modules per translation unit, default 6),
``DETAR_MATRIX_TARGETS`` (comma-separated subset, e.g. ``sm_90,gfx90a``; printed in the summary),
``DETAR_COMPILE_SUMMARY`` (a file to write the summary to; ``.ci/run`` checks it).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

import isa_checks as I
from detar_cupy import _kernels as K
from detar_cupy import _toolchains as T

pytestmark = pytest.mark.toolchain

REQUIRE = os.environ.get("DETAR_REQUIRE_TOOLCHAINS", "") == "1"

TARGETS: tuple[tuple[str, str], ...] = (
    ("cuda", "sm_80"), ("cuda", "sm_90"), ("hip", "gfx908"), ("hip", "gfx90a"), ("hip", "gfx940"))
#: one target per ISA rule set for the must-fail renders (sm_80's PTX comes from the same
#: NVRTC and inline asm as sm_90's)
WEAKEN_TARGETS = ("sm_90", "gfx908", "gfx90a", "gfx940")
#: the weakenings each of those targets can show: LL line elements are a PTX rule (HIP's lines
#: are two 8-byte atomics by construction), the per-wave release is checkable where the
#: system release fence has its own instruction (not gfx908: see isa_checks)
WEAKENINGS = {
    "sm_90": ("flag_scope", "vector", "ftz", "ll_lines"),
    "gfx908": ("flag_scope", "vector", "ftz"),
    "gfx90a": ("flag_scope", "vector", "ftz", "wave_release"),
    "gfx940": ("flag_scope", "vector", "ftz", "wave_release"),
}
#: modules of the must-fail renders: all barrier algorithms (reducing + data-moving modules, the
#: hierarchical transport's node carry) and the NCCL transport's folds (vector loads)
WEAKEN_KEYS = (("float32", 2, "ipc"), (None, 2, "ipc"), ("float32", 2, "nccl"),
               ("float32", 0, "nccl"))
PRIMARY_CUPY = 14
#: world size of the cubin (ptxas) sample: every dtype's module, so every inline-asm site
CUBIN_WORLD = 2


def _platform(arch: str) -> str:
    return "cuda" if arch.startswith("sm_") else "hip"


def _need(avail: T.Availability, what: str) -> None:
    if not avail:
        if REQUIRE:
            pytest.fail(f"{what} is required (DETAR_REQUIRE_TOOLCHAINS=1) but unavailable: "
                        f"{avail.reason}", pytrace=False)
        pytest.skip(f"{what} unavailable: {avail.reason}")


def _availability(arch: str) -> T.Availability:
    if _platform(arch) == "cuda":
        return T.nvrtc_available()
    # the clang replica compiles gfx940 and runs the front-end checks of every HIP target
    for a in (T.hiprtc_available(), T.hip_clang_available(), T.objdump_available()):
        if not a:
            return a
    return T.Availability(True)


def _selected_targets() -> tuple[tuple[str, str], ...]:
    sel = os.environ.get("DETAR_MATRIX_TARGETS", "").strip()
    if not sel:
        return TARGETS
    want = {s.strip() for s in sel.split(",") if s.strip()}
    unknown = want - {a for _, a in TARGETS}
    if unknown:
        raise ValueError(f"DETAR_MATRIX_TARGETS: unknown {sorted(unknown)}")
    return tuple(t for t in TARGETS if t[1] in want)


# ------------------------------------------------------------------------------------------------
# option sets
# ------------------------------------------------------------------------------------------------

# an existing (empty) directory standing in for CuPy's -I directories
_INCLUDE_DIR = os.path.join(tempfile.gettempdir(), "detar-cupy-ci-include")
os.makedirs(_INCLUDE_DIR, exist_ok=True)


def option_sets(platform: str, arch: str) -> dict[str, tuple[str, ...]]:
    """label -> full option list, for each CuPy version; versions whose options differ from
    an earlier one only in include directories are left out (their compile would be the same)."""
    ours = K.compile_options(platform)
    out: dict[str, tuple[str, ...]] = {}
    seen = []
    for major in (PRIMARY_CUPY,) + tuple(m for m in T.CUPY_MAJORS if m != PRIMARY_CUPY):
        opts = T.cupy_options(platform, major, ours, arch, include_dir=_INCLUDE_DIR)
        sem = tuple(o for o in opts if not o.startswith("-I"))
        if sem in seen:
            continue
        seen.append(sem)
        out[f"cupy{major}"] = opts
    return out


# ------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    arch: str
    label: str  # cupy14, cupy13, ...
    mode: str  # "full", "cubin", "syntax" or "legacy" (PTX from the CUDA 12.0 NVRTC)
    options: tuple[str, ...]
    keys: tuple[tuple[str | None, int, str], ...]  # (dtype, world size, family) of ModuleKeys
    weaken: str | None = None

    @property
    def platform(self) -> str:
        return _platform(self.arch)


@dataclass
class Result:
    job: Job
    modules: int
    kernels: int
    seconds: float = 0.0
    error: str | None = None
    bad: dict[str, list[str]] = field(default_factory=dict)  # kernel -> violations
    checked_flags: int = 0  # barrier kernels whose flags were checked
    checked_vectors: int = 0  # kernels whose data loads were checked
    cubin_bytes: int = 0
    flagged: list[str] = field(default_factory=list)  # must-fail: kernels flagged


def run_job(job: Job) -> Result:
    """Render, compile, check (runs in a worker process)."""
    keys = [K.ModuleKey(*k) for k in job.keys]
    names = [nm for k in keys for nm in K.kernel_names(k)]
    res = Result(job, len(keys), len(names))
    src = K.render(keys, weaken=job.weaken)
    t0 = time.perf_counter()
    try:
        if job.mode == "syntax":
            if job.platform == "cuda":
                T.nvrtc_syntax_check(src, job.options)
            else:
                T.hiprtc_syntax_check(src, job.arch, job.options)
            res.seconds = time.perf_counter() - t0
            return res
        if job.mode == "legacy":
            ptx = T.legacy_nvrtc_compile(src, job.options)
            res.seconds = time.perf_counter() - t0
            reports = I.check_ptx(ptx, names)
        elif job.platform == "cuda":
            out = T.nvrtc_compile_full(src, job.options, arch=job.arch)
            res.cubin_bytes = len(out.cubin or b"")
            res.seconds = time.perf_counter() - t0
            reports = I.check_ptx(out.ptx, names)
        else:
            co = T.hiprtc_compile(src, job.arch, job.options)
            res.seconds = time.perf_counter() - t0
            reports = I.check_amdgpu(I.disassemble(co, job.arch), names, job.arch)
    except T.CompileError as e:
        res.seconds = time.perf_counter() - t0
        log = str(e)
        res.error = log if len(log) < 20000 else log[:20000] + "\n... (log truncated)"
        return res
    for n, rep in reports.items():
        if I.barriers_in(n):
            res.checked_flags += 1
        if I.needs_vector_loads(n):
            res.checked_vectors += 1
        if rep.violations:
            res.bad[n] = rep.violations
    res.flagged = sorted(res.bad)
    return res


def _batches(keys, size):
    keys = list(keys)
    return [tuple(keys[i:i + size]) for i in range(0, len(keys), size)]


def _ptx_only(options: tuple[str, ...]) -> tuple[str, ...]:
    """CuPy's CUDA options with -arch=sm_XX turned into -arch=compute_XX: NVRTC stops at PTX
    (what CuPy does with CUPY_COMPILE_WITH_PTX=1); ptxas would double the matrix's CUDA time."""
    return tuple(o.replace("-arch=sm_", "-arch=compute_") for o in options)


#: World sizes compiled with full code generation + ISA checks, per target and tier.
#: "full": everything everywhere (~1700 CPU-s on the CI's CPU class with the current kernels:
#: ~15 min on 2 cores, over the CI budget). "ci" (default): every variant still goes through full
#: code generation on each platform (CUDA: all on sm_90; ROCm: the world sizes spread over the
#: three gfx targets), and every target compiles every dtype/op/algorithm at the smallest, a
#: middle and the largest world size; every target also runs the front end on every variant, and
#: both CUDA targets run ptxas (CuPy's exact -arch=sm_XX) on every dtype (CUBIN_WORLD).
_ALL_N = tuple(range(1, K.MAX_WORLD + 1))
TIERS: dict[str, dict[str, tuple[int, ...]]] = {
    "full": {a: _ALL_N for _, a in TARGETS},
    "ci": {"sm_90": _ALL_N, "sm_80": (2,),
           "gfx90a": (1, 4, 7, K.MAX_WORLD), "gfx940": (2, 5, K.MAX_WORLD),
           "gfx908": (3, 6, K.MAX_WORLD)},
}


def tier() -> str:
    t = os.environ.get("DETAR_MATRIX", "ci").strip() or "ci"
    if t not in TIERS:
        raise ValueError(f"DETAR_MATRIX={t!r}: one of {sorted(TIERS)}")
    return t


def full_world_sizes(arch: str) -> tuple[int, ...]:
    return tuple(sorted(set(TIERS[tier()][arch])))


def full_codegen(key: K.ModuleKey, arch: str) -> bool:
    """Whether ``key`` gets full code generation on ``arch``: its world size is in the tier's
    share of ``arch``; the NCCL transport's folds (world size 0: any) on every target."""
    return key.world_size == 0 or key.world_size in full_world_sizes(arch)


def cubin_sample() -> tuple[tuple[str | None, int, str], ...]:
    """The modules of the cubin and legacy-NVRTC jobs: the IPC modules at CUBIN_WORLD and the
    NCCL transport's folds (any world size); their node carry kernels add no inline asm."""
    return tuple((k.dtype, k.world_size, k.family) for k in K.module_keys()
                 if (k.family, k.world_size) in (("ipc", CUBIN_WORLD), ("nccl", 0)))


def build_jobs(targets) -> list[Job]:
    batch = int(os.environ.get("DETAR_MATRIX_BATCH", "6"))
    allkeys = [(k.dtype, k.world_size, k.family) for k in K.module_keys()]
    # the IPC modules at one world size and the NCCL transport's folds (any world size) hold
    # every inline-asm site; its node carry kernels add none of their own
    cubin_keys = cubin_sample()
    jobs = []
    for platform, arch in targets:
        if not _availability(arch):
            continue
        sets = option_sets(platform, arch)
        (label, opts), *others = sets.items()
        full_opts = _ptx_only(opts) if platform == "cuda" else opts
        sizes = full_world_sizes(arch)
        for b in _batches([k for k in allkeys if full_codegen(K.ModuleKey(*k), arch)], batch):
            jobs.append(Job(arch, label, "full", full_opts, b))
        if platform == "cuda":
            # CuPy's exact -arch=sm_XX (PTX + ptxas -> cubin) on every dtype's module at one
            # world size: every inline-asm site through ptxas for this target
            jobs.append(Job(arch, label, "cubin", opts, cubin_keys))
            if arch == "sm_90" and T.legacy_nvrtc_available():
                # the oldest NVRTC of CuPy's CUDA 12 wheels, with CuPy 13.3's options: every
                # dtype's module through its front end and code generation
                legacy = _ptx_only(T.cupy_options("cuda", 13, K.compile_options("cuda"), arch,
                                                  include_dir=_INCLUDE_DIR))
                jobs.append(Job(arch, "cupy13", "legacy", legacy, cubin_keys))
        if sizes != _ALL_N:  # every variant through this target's front end
            jobs.append(Job(arch, label, "syntax", opts, tuple(allkeys)))
        for olabel, oopts in others:  # front end only, one translation unit
            jobs.append(Job(arch, olabel, "syntax", oopts, tuple(allkeys)))
        for w in WEAKENINGS.get(arch, ()):
            jobs.append(Job(arch, label, "full", full_opts, WEAKEN_KEYS, weaken=w))
    # most expensive first for load balance (cost grows with world size)
    cost = {"full": 1.0, "cubin": 2.0, "syntax": 0.02, "legacy": 1.0}
    jobs.sort(key=lambda j: -cost[j.mode] * sum(1 + n for _, n, _ in j.keys))
    return jobs


@dataclass
class Matrix:
    results: list[Result]
    wall: float
    workers: int
    targets: tuple[tuple[str, str], ...]

    def of(self, arch: str, *, mode: str = "full", weaken: str | None = None) -> list[Result]:
        return [r for r in self.results
                if r.job.arch == arch and r.job.mode == mode and r.job.weaken == weaken]


def run_matrix(targets) -> Matrix:
    jobs = build_jobs(targets)
    workers = int(os.environ.get("DETAR_MATRIX_WORKERS", "0")) or (os.cpu_count() or 2)
    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) <= 1:
        results = [run_job(j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that loaded the libraries
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            results = list(ex.map(run_job, jobs))
    return Matrix(results, time.perf_counter() - t0, workers, tuple(targets))


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    return run_matrix(_selected_targets())


def _target_params(archs=None):
    return [pytest.param(a, id=a) for _, a in TARGETS if archs is None or a in archs]


def _skip_unselected(arch: str) -> None:
    if arch not in {a for _, a in _selected_targets()}:
        pytest.skip(f"{arch} not in DETAR_MATRIX_TARGETS")


# ------------------------------------------------------------------------------------------------
# tests: toolchains and the scope encoding they produce
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["nvrtc", "hiprtc", "hip-clang (hiprtc replica)", "llvm-objdump"])
def test_toolchain_available(what):
    probe = {"nvrtc": T.nvrtc_available, "hiprtc": T.hiprtc_available,
             "hip-clang (hiprtc replica)": T.hip_clang_available,
             "llvm-objdump": T.objdump_available}[what]
    _need(probe(), what)


def test_cupy_options_order():
    """The option lists follow CuPy 13.3 / 14.2 (see detar_cupy/_toolchains.py)."""
    cu14 = T.cupy_options("cuda", 14, ("--fmad=false",), "sm_90")
    assert cu14 == ("--fmad=false", "--std=c++17", "-ftz=true", "-arch=sm_90",
                    "--device-as-default-execution-space")
    cu13 = T.cupy_options("cuda", 13, ("--fmad=false",), "sm_80")
    assert cu13[:2] == ("--fmad=false", "--std=c++11")
    hip13 = T.cupy_options("hip", 13, ("-ffp-contract=off",), "gfx90a")
    assert hip13 == ("-ffp-contract=off", "--std=c++11", "-fcuda-flush-denormals-to-zero",
                     "--gpu-architecture=gfx90a")
    # a standard of our own suppresses CuPy's
    assert "--std=c++17" not in T.cupy_options("hip", 14, ("-std=c++14",), "gfx940")
    assert T.cupy_added_options("cuda", 13, ("-std=c++14",)) == (
        "-ftz=true", "--device-as-default-execution-space")
    with_inc = T.cupy_options("cuda", 13, (), "sm_90", include_dir="/x")
    assert with_inc[:3] == ("-I/x",) * 3 and with_inc.count("-I/x") == 6


_SCOPE_SRC = """
#define S(name, scope) \\
extern "C" __global__ void st_##name(unsigned* p, unsigned v) { \\
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, scope); } \\
extern "C" __global__ void ld_##name(unsigned* p, unsigned* o) { \\
  o[threadIdx.x] = __hip_atomic_load(p, __ATOMIC_ACQUIRE, scope); }
S(system, __HIP_MEMORY_SCOPE_SYSTEM)
S(agent, __HIP_MEMORY_SCOPE_AGENT)
S(workgroup, __HIP_MEMORY_SCOPE_WORKGROUP)
struct __attribute__((aligned(16))) v4 { unsigned x, y, z, w; };
extern "C" __global__ void copy16(const v4* a, v4* b) { b[threadIdx.x] = a[threadIdx.x]; }
extern "C" __global__ void copy4(const unsigned* a, unsigned* b) { b[threadIdx.x] = a[threadIdx.x]; }
"""

# what classify_amdgpu must find in the release store / acquire load compiled at each scope
# (None: the ISA shows nothing, e.g. agent-scope release on gfx90a is only an s_waitcnt)
_EXPECTED_SCOPES = {
    "gfx908": {"st_system": None, "st_agent": None, "st_workgroup": None,
               "ld_system": "agent-or-system", "ld_agent": "agent-or-system", "ld_workgroup": None},
    "gfx90a": {"st_system": "system", "st_agent": None, "st_workgroup": None,
               "ld_system": "system", "ld_agent": "agent", "ld_workgroup": None},
    "gfx940": {"st_system": "system", "st_agent": "agent", "st_workgroup": None,
               "ld_system": "system", "ld_agent": "agent", "ld_workgroup": None},
}


@pytest.mark.parametrize("arch", [a for _, a in TARGETS if _platform(a) == "hip"])
def test_amdgpu_scope_encoding(arch):
    """Re-derives the table in isa_checks: the same atomic compiled at system, agent and
    workgroup scope, and what the classifier reads from each."""
    _need(_availability(arch), f"hiprtc toolchain for {arch}")
    dis = I.disassemble(T.hiprtc_compile(_SCOPE_SRC, arch, ("-O3",)), arch)
    bodies = I.split_amdgpu(dis)
    for name, want in _EXPECTED_SCOPES[arch].items():
        found = [(k, s) for k, s, _ in I.classify_amdgpu(I._amd_instructions(bodies[name]), arch)
                 if k != "fence"]
        kind = "release-store" if name.startswith("st_") else "acquire-load"
        assert found == ([] if want is None else [(kind, want)]), (name, found, bodies[name])
    if arch == "gfx908":
        # system and agent scope are the same instructions on gfx908: the reason the flag check
        # there can only say "at least agent scope"
        ins = {n: I._amd_instructions(b) for n, b in bodies.items()}
        assert ins["st_system"] == ins["st_agent"] and ins["ld_system"] == ins["ld_agent"]
    assert sum(s.startswith("global_load_dwordx4") for s in I._amd_instructions(bodies["copy16"]))
    assert not any(s.startswith("global_load_dwordx4") for s in I._amd_instructions(bodies["copy4"]))


_PTX_SCOPE_SRC = """
extern "C" __global__ void st_sys(unsigned* p, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory"); }
extern "C" __global__ void ld_gpu(unsigned* p, unsigned* o) {
  unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  o[0] = v; }
"""


def test_ptx_scope_reading():
    _need(T.nvrtc_available(), "nvrtc")
    ptx = T.nvrtc_compile(_PTX_SCOPE_SRC, "sm_90", ("--std=c++17",))
    bodies = I.split_ptx(ptx)
    st = I.check_ptx_kernel("st_sys", bodies["st_sys"])
    assert (st.sys_release, st.sys_acquire, st.violations) == (1, 0, [])
    ld = I.check_ptx_kernel("ld_gpu", bodies["ld_gpu"])
    assert ld.sys_acquire == 0 and any(".gpu scope" in v for v in ld.violations)


def test_hiprtc_replica_matches_hiprtc():
    """gfx940 goes through the clang replica of hiprtc. On gfx90a, where both work, the replica
    must give hiprtc's memory-model code for real modules: the same release/acquire sequences and
    the same memory instructions with the same cache bits (register allocation and scheduling
    differ: hiprtc optimises before and after linking the device libraries, the driver once)."""
    _need(_availability("gfx90a"), "hiprtc toolchain")
    opts = next(iter(option_sets("hip", "gfx90a").values()))
    for key in (K.ModuleKey("float16", 3), K.ModuleKey(None, 5), K.ModuleKey("float16", 2, "nccl")):
        src = K.render([key])
        a = I.split_amdgpu(I.disassemble(T.hiprtc_compile(src, "gfx90a", opts, backend="hiprtc"),
                                         "gfx90a"))
        b = I.split_amdgpu(I.disassemble(T.hiprtc_compile(src, "gfx90a", opts, backend="clang"),
                                         "gfx90a"))
        for n in K.kernel_names(key):
            assert I.memory_signature(a[n], "gfx90a") == I.memory_signature(b[n], "gfx90a"), n


def test_layout_drift_fails_to_compile():
    """Host and kernels share their structs through static_asserts on every field offset: a
    host layout with two same-size fields swapped (which no size check would notice) must not
    compile."""
    import ctypes

    from detar_cupy import _protocol

    _need(T.nvrtc_available(), "NVRTC")
    fields = list(_protocol.Ctx._fields_)
    i, j = [k for k, (n, *_) in enumerate(fields) if n in ("start_flags", "mid_flags")]
    fields[i], fields[j] = fields[j], fields[i]
    drifted = type("Ctx", (ctypes.Structure,), {"_fields_": fields})
    key = [K.ModuleKey(None, 1)]
    opts = option_sets("cuda", "sm_90")[f"cupy{PRIMARY_CUPY}"]
    T.nvrtc_syntax_check(K.render(key), opts)  # the true layout compiles
    with pytest.raises(T.CompileError, match="Ctx.start_flags must sit at byte"):
        T.nvrtc_syntax_check(K.render(key, layouts={"Ctx": drifted,
                                                    "Report": _protocol.Report,
                                                    "State": _protocol.State}), opts)


def test_compile_error_carries_log():
    _need(T.nvrtc_available(), "nvrtc")
    with pytest.raises(T.CompileError) as ei:
        T.nvrtc_compile('extern "C" __global__ void k() { undeclared_thing(); }', "sm_90")
    assert "undeclared_thing" in ei.value.log


# ------------------------------------------------------------------------------------------------
# tests: the matrix
# ------------------------------------------------------------------------------------------------

def _results_or_skip(matrix: Matrix, arch: str, **kw) -> list[Result]:
    """Results of ``arch`` (default: the full-matrix translation units), skipping/failing when
    the target was not selected or its toolchain is missing."""
    _skip_unselected(arch)
    _need(_availability(arch), f"toolchain for {arch}")
    rs = matrix.of(arch, **kw)
    assert rs, f"no jobs ran for {arch} {kw}"
    return rs


def _fail_on_errors(rs: list[Result]) -> None:
    errs = [r for r in rs if r.error]
    if errs:
        r = errs[0]
        keys = ", ".join(f"{d}/n{n}/{f}" for d, n, f in r.job.keys)
        pytest.fail(f"{len(errs)} of {len(rs)} translation units failed to compile for "
                    f"{r.job.arch} ({r.job.label}, {r.job.mode}); first: modules [{keys}]\n"
                    f"{r.error}", pytrace=False)


@pytest.mark.parametrize("arch", _target_params())
def test_matrix_compiles(matrix, arch):
    """Every module, every kernel: compiled with CuPy 14's options (full codegen)."""
    rs = _results_or_skip(matrix, arch)
    _fail_on_errors(rs)
    want = [k for k in K.module_keys() if full_codegen(k, arch)]
    assert sum(r.modules for r in rs) == len(want)
    assert sum(r.kernels for r in rs) == sum(len(K.kernel_names(k)) for k in want)
    if _platform(arch) == "cuda":
        assert all(r.cubin_bytes == 0 for r in rs)  # -arch=compute_XX: PTX only


@pytest.mark.parametrize("arch", _target_params([a for p, a in TARGETS if p == "cuda"]))
def test_matrix_cubin_sample(matrix, arch):
    """CuPy's exact CUDA options (-arch=sm_XX: NVRTC runs ptxas) on every dtype's module at one
    world size, so every inline-asm site is assembled for this target."""
    rs = _results_or_skip(matrix, arch, mode="cubin")
    _fail_on_errors(rs)
    assert all(r.cubin_bytes > 0 for r in rs), "NVRTC gave no cubin for -arch=sm_XX"
    bad = [r for r in rs if r.bad]
    assert not bad, f"ISA check failures on {arch}:\n{_violations(bad)}"


def test_matrix_legacy_nvrtc(matrix):
    """Every dtype's module (one world size) through NVRTC 12.0, the oldest of CuPy's CUDA 12
    wheels, with CuPy 13.3's options: front-end features a newer NVRTC has and an older lacks
    fail here, not on a user's first call. The PTX passes the same ISA checks."""
    _skip_unselected("sm_90")
    if REQUIRE:
        assert T.legacy_nvrtc_available(), T.legacy_nvrtc_available().reason
    elif not T.legacy_nvrtc_available():
        pytest.skip(T.legacy_nvrtc_available().reason)
    rs = matrix.of("sm_90", mode="legacy")
    assert rs, "no legacy NVRTC job ran"
    _fail_on_errors(rs)
    assert sum(r.modules for r in rs) == len(cubin_sample())
    bad = [r for r in rs if r.bad]
    assert not bad, f"ISA check failures with NVRTC 12.0:\n{_violations(bad)}"


_LEGACY_THEN_NVRTC13 = """
from detar_cupy import _kernels as K, _toolchains as T
src = K.render([K.ModuleKey("int8", 1)])
opts = T.cupy_options("cuda", 13, K.compile_options("cuda"), "sm_90", include_dir=%r)
assert T.legacy_nvrtc_available(), T.legacy_nvrtc_available().reason
T.legacy_nvrtc_compile(src, opts)
T.nvrtc_syntax_check(src, opts)  # NVRTC 13's first use in this process
print("ok")
"""


def test_legacy_nvrtc_leaves_nvrtc13_working():
    """The CUDA 12.0 NVRTC and the NVRTC 13 share no process: a fresh process (a matrix
    worker) that runs a legacy job first can still use NVRTC 13 afterwards. Loading NVRTC 12 in
    the process made NVRTC 13 reject -fdevice-syntax-only as an unrecognized option."""
    _need(T.nvrtc_available(), "nvrtc")
    _need(T.legacy_nvrtc_available(), "legacy nvrtc")
    with tempfile.TemporaryDirectory() as include:
        child = subprocess.run([sys.executable, "-c", _LEGACY_THEN_NVRTC13 % include],
                               capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-3000:]


@pytest.mark.parametrize("platform", ["cuda", "hip"])
def test_matrix_covers_every_variant_per_platform(platform):
    """Whatever the tier, every module gets full code generation on some target of each
    platform."""
    covered = set()
    for p, a in TARGETS:
        if p == platform:
            covered |= set(full_world_sizes(a))
    assert covered == set(_ALL_N), (tier(), platform, sorted(covered))


@pytest.mark.parametrize("arch", _target_params())
def test_matrix_front_end(matrix, arch):
    """Every variant through this target's front end: with CuPy 14's options where the target's
    full-codegen share is partial, and with each other CuPy version's option set (13.3:
    --std=c++11 unless ours name a standard)."""
    _skip_unselected(arch)
    _need(_availability(arch), f"toolchain for {arch}")
    rs = matrix.of(arch, mode="syntax")
    others = list(option_sets(_platform(arch), arch))[1:]
    if not rs:
        assert not others and full_world_sizes(arch) == _ALL_N
        pytest.skip("all variants fully compiled, and every CuPy version passes the same "
                    "options but include dirs")
    _fail_on_errors(rs)
    for label in {r.job.label for r in rs}:
        assert sum(r.modules for r in rs if r.job.label == label) == len(K.module_keys())


def _violations(rs: list[Result], limit: int = 25) -> str:
    lines = []
    for r in rs:
        for n, v in r.bad.items():
            lines.append(f"{n}: " + "; ".join(v[:4]))
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


@pytest.mark.parametrize("arch", _target_params())
def test_isa_flags_and_vectors(matrix, arch):
    """Barrier flags at system scope and 16-byte data loads, in every kernel compiled."""
    rs = _results_or_skip(matrix, arch)
    _fail_on_errors(rs)
    assert sum(r.checked_flags for r in rs) > 0 and sum(r.checked_vectors for r in rs) > 0
    bad = [r for r in rs if r.bad]
    assert not bad, f"ISA check failures on {arch}:\n{_violations(bad)}"


def _weakened_kernels(which: str, arch: str) -> list[str]:
    names = [n for k in WEAKEN_KEYS for n in K.kernel_names(K.ModuleKey(*k))]
    if which in ("flag_scope", "wave_release"):
        return [n for n in names if I.barriers_in(n)]
    if which == "ftz":  # PTX: float32 mul/div flush; AMD: the f64 path of prod/avg is gone
        if _platform(arch) == "cuda":  # inline PTX: avg's division by 1 at N = 1 is there too
            return [n for n in names if I.uses_f32_mul_or_div(n) or (
                n.split("_")[1] in I.F32_ACC_DTYPES and n.split("_")[2] == "avg")]
        return [n for n in names if I.uses_f32_mul_or_div(n)]
    if which == "ll_lines":
        return [n for n in names if I.uses_lines(n)]
    return [n for n in names if I.needs_vector_loads(n)]


@pytest.mark.parametrize("arch,which", [pytest.param(a, w, id=f"{a}-{w}")
                                        for a in WEAKEN_TARGETS for w in WEAKENINGS[a]])
def test_weakened_render_is_caught(matrix, arch, which):
    """The checks can fail: a render with weakened flags, scalar data loads, flushing float32
    arithmetic, 32-bit LL line elements or no per-wave release is flagged in every affected
    kernel."""
    rs = _results_or_skip(matrix, arch, weaken=which)
    _fail_on_errors(rs)
    must = set(_weakened_kernels(which, arch))
    assert must, "nothing to weaken?"
    flagged = {n for r in rs for n in r.flagged}
    missed = sorted(must - flagged)
    assert not missed, f"weakened ({which}) kernels not flagged on {arch}: {missed}"


def test_matrix_summary(matrix, capsys):
    """Prints what ran (outside pytest's capture, so it is in every CI log) and writes it to
    $DETAR_COMPILE_SUMMARY if set."""
    lines = [f"compile matrix (tier {tier()}): {len(matrix.results)} translation units on "
             f"{matrix.workers} worker processes, wall {matrix.wall:.1f} s"]
    if os.environ.get("DETAR_MATRIX_TARGETS"):
        lines.append(f"  (restricted by DETAR_MATRIX_TARGETS={os.environ['DETAR_MATRIX_TARGETS']})")
    lines.append(f"  {'target':8} {'compiler':28} {'options':7} {'mode':16} {'TUs':>4} "
                 f"{'modules':>7} {'kernels':>7} {'cpu s':>8} {'errors':>6} {'ISA bad':>7}  world sizes")
    groups: dict[tuple, list[Result]] = {}
    for r in matrix.results:
        mode = r.job.mode if r.job.weaken is None else f"weak:{r.job.weaken}"
        groups.setdefault((r.job.arch, r.job.label, mode), []).append(r)
    order = {a: i for i, (_, a) in enumerate(TARGETS)}
    for (arch, label, mode), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][2])):
        if mode == "legacy":
            comp = T.legacy_nvrtc_available().detail.split(" (")[0]
        elif _platform(arch) == "cuda":
            comp = "NVRTC %d.%d" % T.nvrtc_version()
        elif mode == "syntax":
            comp = "clang-15 (hiprtc f.end)"
        else:
            comp = "hiprtc" if T.hiprtc_backend_for(arch) == "hiprtc" else "clang-15 (hiprtc replica)"
        sizes = sorted({n for r in rs for _, n, _ in r.job.keys})
        if mode == "full" and _platform(arch) == "cuda":
            mode = "full (ptx)"
        lines.append(f"  {arch:8} {comp:28} {label:7} {mode:16} {len(rs):4d} "
                     f"{sum(r.modules for r in rs):7d} {sum(r.kernels for r in rs):7d} "
                     f"{sum(r.seconds for r in rs):8.1f} {sum(1 for r in rs if r.error):6d} "
                     f"{sum(len(r.bad) for r in rs):7d}  {','.join(map(str, sizes))}")
    for _, arch in TARGETS:
        if arch in {a for _, a in matrix.targets} and not _availability(arch):
            lines.append(f"  {arch:8} NOT RUN: {_availability(arch).reason}")
    for platform in ("cuda", "hip"):
        arch = next(a for p, a in TARGETS if p == platform)
        for label, opts in option_sets(platform, arch).items():
            shown = [o for o in opts if not o.startswith("-I")]
            lines.append(f"  options {platform} {label}: {' '.join(shown)} "
                         f"(+ {sum(o.startswith('-I') for o in opts)} include dirs)")
    lines.append("  (full (ptx): -arch=sm_XX -> -arch=compute_XX; cubin: CuPy's exact options)")
    text = "\n".join(lines)
    with capsys.disabled():
        print("\n" + text, flush=True)
    path = os.environ.get("DETAR_COMPILE_SUMMARY")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    assert matrix.results, "the compile matrix ran nothing"
