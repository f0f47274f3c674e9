"""The CI compile matrix: every kernel the library can render, compiled offline (no GPU) by NVRTC
for sm_80/sm_90 and by hiprtc for gfx908/gfx90a/gfx940, with the options CuPy itself adds; then
static ISA checks on the output (system-scope barrier flags, 16-byte data loads), and proof that
those checks can fail (deliberately weakened renders must be flagged).

Toolchains: NVRTC from the ``test`` extra (cuda-bindings + nvidia-cuda-nvrtc); hiprtc and
llvm-objdump from Debian (``.ci/run`` installs them). Without one, its tests skip with the reason,
unless ``DETAR_REQUIRE_TOOLCHAINS=1`` (CI), where they fail.

What is compiled:

- full: the CuPy 14 option set (exactly CuPy's flags; CUDA with CuPy's ``-arch=sm_XX``, so NVRTC
  also runs ptxas and yields a cubin; HIP with ``--gpu-architecture``), every module, every target,
  then the ISA checks. Modules are batched into translation units (``render(keys)``), compiled in
  parallel processes.
- front end: every other CuPy option set that differs in more than include directories (CuPy
  13.3: ``--std=c++11`` where ours name no standard), every module, syntax only (NVRTC
  ``-fdevice-syntax-only``; hiprtc's front end on the clang replica with ``-fsyntax-only``): the
  language standard only matters to the front end.
- must-fail: ``render(..., weaken="flag_scope" | "vector")`` for one target per ISA rule set
  (sm_90, gfx908, gfx90a, gfx940); every affected kernel must be flagged.

Knobs (local use; CI sets none): ``DETAR_MATRIX_WORKERS`` (processes, default: CPU count),
``DETAR_MATRIX_BATCH`` (modules per translation unit, default 6), ``DETAR_MATRIX_TARGETS``
(comma-separated subset, e.g. ``sm_90,gfx90a``; printed in the summary), ``DETAR_COMPILE_SUMMARY``
(a file to write the summary to; ``.ci/run`` checks it).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
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
#: modules of the must-fail renders: all barrier algorithms (reducing + data-moving modules)
WEAKEN_KEYS = (("float32", 2), (None, 2))
PRIMARY_CUPY = 14


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
    for a in (T.hiprtc_available(), T.objdump_available()):
        if not a:
            return a
    if T.hiprtc_backend_for(arch) != "hiprtc" or arch != "gfx90a":
        a = T.hip_clang_available()  # gfx940 (replica) and the front-end checks need it
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

_INCLUDE_DIR = tempfile.mkdtemp(prefix="detar-cupy-include-")  # stands in for CuPy's -I dirs


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
    mode: str  # "full", "syntax"
    options: tuple[str, ...]
    keys: tuple[tuple[str | None, int], ...]
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
    keys = [K.ModuleKey(d, n) for d, n in job.keys]
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
        if job.platform == "cuda":
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


def build_jobs(targets) -> list[Job]:
    batch = int(os.environ.get("DETAR_MATRIX_BATCH", "6"))
    allkeys = [(k.dtype, k.world_size) for k in K.module_keys()]
    jobs = []
    for platform, arch in targets:
        if not _availability(arch):
            continue
        sets = option_sets(platform, arch)
        for i, (label, opts) in enumerate(sets.items()):
            mode = "full" if i == 0 else "syntax"
            size = batch if mode == "full" else len(allkeys)  # front end: one TU
            for b in _batches(allkeys, size):
                jobs.append(Job(arch, label, mode, opts, b))
        if arch in WEAKEN_TARGETS:
            opts = next(iter(sets.values()))
            for w in ("flag_scope", "vector"):
                jobs.append(Job(arch, next(iter(sets)), "full", opts, WEAKEN_KEYS, weaken=w))
    # biggest first for load balance: full before syntax, larger world sizes first
    jobs.sort(key=lambda j: (j.mode != "full", -sum(n for _, n in j.keys)))
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
        strip = lambda n: [l.split("//")[0].split(None, 0) for l in bodies[n].splitlines()[1:]]
        assert strip("st_system") == strip("st_agent") and strip("ld_system") == strip("ld_agent")
    assert sum(s.startswith("global_load_dwordx4") for s in I._amd_instructions(bodies["copy16"]))
    assert not any("dwordx4" in s for s in I._amd_instructions(bodies["copy4"]))


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
    """gfx940 goes through the clang replica of hiprtc: on gfx90a, where both work, it must give
    hiprtc's instructions for a real module."""
    _need(_availability("gfx90a"), "hiprtc toolchain")
    _need(T.hip_clang_available(), "hip-clang (hiprtc replica)")
    src = K.render([K.ModuleKey("float16", 3)])
    opts = next(iter(option_sets("hip", "gfx90a").values()))
    a = T.hiprtc_compile(src, "gfx90a", opts, backend="hiprtc")
    b = T.hiprtc_compile(src, "gfx90a", opts, backend="clang")

    def body(co):
        return [l.split("//")[0].strip() for l in I.disassemble(co, "gfx90a").splitlines()[3:]]

    assert body(a) == body(b)


def test_compile_error_carries_log():
    _need(T.nvrtc_available(), "nvrtc")
    with pytest.raises(T.CompileError) as ei:
        T.nvrtc_compile('extern "C" __global__ void k() { undeclared_thing(); }', "sm_90")
    assert "undeclared_thing" in ei.value.log


# ------------------------------------------------------------------------------------------------
# tests: the matrix
# ------------------------------------------------------------------------------------------------

def _results_or_skip(matrix: Matrix, arch: str, **kw) -> list[Result]:
    _skip_unselected(arch)
    _need(_availability(arch), f"toolchain for {arch}")
    rs = matrix.of(arch, **kw)
    assert rs, f"no jobs ran for {arch} {kw}"
    return rs


def _fail_on_errors(rs: list[Result]) -> None:
    errs = [r for r in rs if r.error]
    if errs:
        r = errs[0]
        keys = ", ".join(f"{d}/n{n}" for d, n in r.job.keys)
        pytest.fail(f"{len(errs)} of {len(rs)} translation units failed to compile for "
                    f"{r.job.arch} ({r.job.label}, {r.job.mode}); first: modules [{keys}]\n"
                    f"{r.error}", pytrace=False)


@pytest.mark.parametrize("arch", _target_params())
def test_matrix_compiles(matrix, arch):
    """Every module, every kernel: compiled with CuPy 14's options (full codegen)."""
    rs = _results_or_skip(matrix, arch)
    _fail_on_errors(rs)
    assert sum(r.modules for r in rs) == len(K.module_keys())
    assert sum(r.kernels for r in rs) == sum(len(K.kernel_names(k)) for k in K.module_keys())
    if _platform(arch) == "cuda":
        assert all(r.cubin_bytes > 0 for r in rs), "NVRTC gave no cubin for -arch=sm_XX"


@pytest.mark.parametrize("arch", _target_params())
def test_matrix_front_end_other_cupy(matrix, arch):
    """Other CuPy versions' option sets (13.3: --std=c++11 unless ours name a standard)."""
    _skip_unselected(arch)
    _need(_availability(arch), f"toolchain for {arch}")
    rs = matrix.of(arch, mode="syntax")
    if not rs:
        pytest.skip("every CuPy version passes the same options but include dirs: "
                    + repr(option_sets(_platform(arch), arch)))
    _fail_on_errors(rs)
    assert sum(r.modules for r in rs) == len(K.module_keys())


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


def _weakened_kernels(which: str) -> list[str]:
    names = [n for d, s in WEAKEN_KEYS for n in K.kernel_names(K.ModuleKey(d, s))]
    if which == "flag_scope":
        return [n for n in names if I.barriers_in(n)]
    return [n for n in names if I.needs_vector_loads(n)]


@pytest.mark.parametrize("which", ["flag_scope", "vector"])
@pytest.mark.parametrize("arch", _target_params(WEAKEN_TARGETS))
def test_weakened_render_is_caught(matrix, arch, which):
    """The checks can fail: a render with weakened flags / scalar data loads is flagged in every
    affected kernel."""
    rs = _results_or_skip(matrix, arch, weaken=which)
    _fail_on_errors(rs)
    must = set(_weakened_kernels(which))
    assert must, "nothing to weaken?"
    flagged = {n for r in rs for n in r.flagged}
    missed = sorted(must - flagged)
    assert not missed, f"weakened ({which}) kernels not flagged on {arch}: {missed}"


def test_matrix_summary(matrix, capsys):
    """Prints what ran (outside pytest's capture, so it is in every CI log) and writes it to
    $DETAR_COMPILE_SUMMARY if set."""
    lines = [f"compile matrix: {len(matrix.results)} translation units on {matrix.workers} "
             f"worker processes, wall {matrix.wall:.1f} s"]
    if os.environ.get("DETAR_MATRIX_TARGETS"):
        lines.append(f"  (restricted by DETAR_MATRIX_TARGETS={os.environ['DETAR_MATRIX_TARGETS']})")
    lines.append(f"  {'target':8} {'compiler':28} {'options':7} {'mode':10} {'TUs':>4} "
                 f"{'modules':>7} {'kernels':>7} {'cpu s':>8} {'errors':>6} {'ISA bad':>7}")
    groups: dict[tuple, list[Result]] = {}
    for r in matrix.results:
        mode = r.job.mode if r.job.weaken is None else f"weak:{r.job.weaken}"
        groups.setdefault((r.job.arch, r.job.label, mode), []).append(r)
    order = {a: i for i, (_, a) in enumerate(TARGETS)}
    for (arch, label, mode), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][2])):
        if _platform(arch) == "cuda":
            comp = "NVRTC %d.%d" % T.nvrtc_version()
        elif mode == "syntax":
            comp = "clang-15 (hiprtc fe)"
        else:
            comp = "hiprtc" if T.hiprtc_backend_for(arch) == "hiprtc" else "clang-15 (hiprtc replica)"
        lines.append(f"  {arch:8} {comp:28} {label:7} {mode:10} {len(rs):4d} "
                     f"{sum(r.modules for r in rs):7d} {sum(r.kernels for r in rs):7d} "
                     f"{sum(r.seconds for r in rs):8.1f} {sum(1 for r in rs if r.error):6d} "
                     f"{sum(len(r.bad) for r in rs):7d}")
    for _, arch in TARGETS:
        if arch in {a for _, a in matrix.targets} and not _availability(arch):
            lines.append(f"  {arch:8} NOT RUN: {_availability(arch).reason}")
    for platform in ("cuda", "hip"):
        arch = next(a for p, a in TARGETS if p == platform)
        for label, opts in option_sets(platform, arch).items():
            shown = [o for o in opts if not o.startswith("-I")]
            lines.append(f"  options {platform} {label}: {' '.join(shown)} "
                         f"(+ {sum(o.startswith('-I') for o in opts)} include dirs)")
    text = "\n".join(lines)
    with capsys.disabled():
        print("\n" + text, flush=True)
    path = os.environ.get("DETAR_COMPILE_SUMMARY")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    assert matrix.results, "the compile matrix ran nothing"
