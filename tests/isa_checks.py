"""Static checks on compiled kernels: PTX text and AMDGPU disassembly.

Pure functions over text (plus :func:`disassemble`), used by ``test_compile_matrix.py``.

What is checked, per kernel (kernel names carry the algorithm and ``_n<world size>``):

Barrier flags (kernels of the barrier-based algorithms: one_shot, two_shot, reduce_scatter,
all_gather, broadcast, and the hierarchical transport's node_carry; two_shot has two barriers,
the others one; the NCCL transport's fold, copy and header kernels have none):

- PTX: at least one release store (``st.release.sys``, ``red.release.sys``, ``atom.release.sys``/
  ``atom.acq_rel.sys``, or a ``fence.{sc,acq_rel}.sys``/``membar.sys``) and one acquire load
  (``ld.acquire.sys``, ``atom.acquire.sys``/``.acq_rel.sys``, or a system fence) per barrier, and
  no release/acquire-qualified load, store or atomic at a narrower scope (``.cta``, ``.cluster``,
  ``.gpu``). Stand-alone fences at narrower scope (``membar.gl`` from ``__threadfence()``) are
  allowed: they are not flag accesses.
- AMDGPU, from the LLVM AMDGPU memory model as compiled by hiprtc (derived by compiling the same
  atomic with system, agent and workgroup scope; ``test_compile_matrix.py`` re-derives it):

  - gfx908: release = ``s_waitcnt vmcnt(0)``; store. Acquire = load ``glc``; ``s_waitcnt``;
    ``buffer_wbinvl1_vol``. Both identical at agent scope.
  - gfx90a: release = ``buffer_wbl2``; ``s_waitcnt``; store (agent: no ``buffer_wbl2``).
    Acquire = load ``glc``; ``s_waitcnt``; ``buffer_invl2``; ``buffer_wbinvl1_vol`` (agent: no
    ``buffer_invl2``).
  - gfx940: release = ``buffer_wbl2 sc0 sc1``; ``s_waitcnt``; store ``sc0 sc1`` (agent: ``sc1``
    on both; workgroup: store ``sc0``, no ``buffer_wbl2``). Acquire = load ``sc0 sc1``;
    ``s_waitcnt``; ``buffer_inv sc0 sc1`` (agent: ``sc1``; workgroup: load ``sc0``, no
    ``buffer_inv``).

  Per barrier kernel: at least one system-scope release store and one system-scope acquire load
  per barrier, and no release store / acquire load at a narrower scope where the ISA shows it
  (an agent-scope ``buffer_wbl2 sc1`` before a store on gfx940; an acquire-load sequence without
  the system invalidate on gfx90a/gfx940). Stand-alone fences (``__threadfence()``: agent scope)
  are allowed. On gfx908 system and agent scope compile to the same code, so only "at least
  agent" is checkable there (the release side not at all): visibility to peers on gfx908 rests
  on the signal memory being fine-grained.

PTX also: no ``ld.global.nc`` in collective kernels (staging is written by peers while the kernel
runs, and in-place calls alias input and output; the non-coherent path may serve stale data).

float32 arithmetic (the contract: IEEE rounding, then the flush in software, whatever the
compiler's denormal flags):

- PTX: no flushing or approximate float32 multiply or divide in any kernel (``mul``/``div``/
  ``fma``/``mad`` with ``.ftz`` on ``.f32``, ``div.approx``/``div.full``): it would flush results
  that IEEE rounds up to FLT_MIN. ``add``/``sub`` with ``.ftz`` are allowed: the kernels flush
  with them on purpose, since an add of non-subnormal values never rounds into that gap
  (portability.h).
- AMDGPU: every prod/avg kernel of a float32-accumulating dtype (float16, bfloat16, float32,
  complex64) multiplies/divides on the exact float64 path (``v_mul_f64`` or
  ``v_div_scale_f64``; an avg by a power of two is an exact f64 multiply), since the f32
  instructions flush under CuPy's ``-fcuda-flush-denormals-to-zero``.

LL lines (every kernel but the empty one announces through them): on PTX each 16-byte volatile
line access has 64-bit elements (``.v2.b64``), so each {data, flag} half is single-copy atomic by
the PTX model; a ``.v4.u32`` volatile access (32-bit elements) is a violation.

Per-wave release before the block barrier (AMD gfx90a/gfx940; LLVM's workgroup fence of
``__syncthreads()`` waits for no other wave's stores): every barrier of a barrier kernel is an
``s_barrier`` preceded by a system-scope release fence (``buffer_wbl2`` at system scope, then
``s_waitcnt vmcnt(0)``) with no memory instruction in between. gfx908 implements a system
release fence as a bare ``s_waitcnt vmcnt(0)``, which the compiler also emits on its own, so
there the check cannot tell the fence from its absence and is not made.

16-byte data path (one_shot, two_shot, node_carry, and the NCCL transport's fold): at least
``world size`` 16-byte global loads (one per rank in the unrolled fold; the fold, whose number of
ranks is a parameter, at least one): PTX ``ld[.global][...].v4.{b,u,s,f}32`` or
``.v2.{b,u,s,f}64``; AMDGPU ``global_load_dwordx4``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

BARRIER_ALGORITHMS = ("one_shot", "two_shot", "reduce_scatter", "all_gather", "broadcast",
                      "node_carry")
VECTOR_ALGORITHMS = ("one_shot", "two_shot", "node_carry", "_fold")


def barriers_in(name: str) -> int:
    """Device-side barriers in kernel ``name``: 2 for two_shot, 1 for the other barrier kernels,
    0 for LL and anything else."""
    if name.endswith("_ll") or "_ll_" in name:
        return 0
    if "two_shot" in name:
        return 2
    return 1 if any(a in name for a in BARRIER_ALGORITHMS) else 0


def needs_vector_loads(name: str) -> bool:
    return any(a in name for a in VECTOR_ALGORITHMS)


def world_size_of(name: str) -> int:
    m = re.search(r"_n(\d+)_", name + "_")
    return int(m.group(1)) if m else 1


#: float32-accumulating dtypes (the denormal policy applies) and the ops that multiply/divide.
F32_ACC_DTYPES = ("float16", "bfloat16", "float32", "complex64")


def uses_f32_mul_or_div(name: str) -> bool:
    """A reducing kernel whose fold multiplies or divides in float32 (prod or avg over two or
    more ranks: with one, prod multiplies nothing and avg divides by 1, which is no operation;
    the NCCL transport's fold takes any number of ranks)."""
    parts = name.split("_")
    return (len(parts) > 2 and parts[1] in F32_ACC_DTYPES and parts[2] in ("prod", "avg")
            and (world_size_of(name) >= 2 or name.endswith("_fold")))


def uses_lines(name: str) -> bool:
    """Every IPC kernel but the empty one and the coalescing one stores and loads LL lines
    (announce, headers); of the NCCL transport's kernels only the node carry (an IPC barrier)."""
    if name.endswith(("_fold", "_slots")) or name.startswith("detar_header_"):
        return False
    return name.startswith("detar_") and not name.startswith(("detar_nop", "detar_segments"))


@dataclass
class KernelReport:
    """What the checks found in one kernel."""

    name: str
    sys_release: int = 0
    sys_acquire: int = 0
    vector_loads: int = 0
    line_accesses: set = field(default_factory=set)  # PTX: "ld"/"st" seen as .v2.b64 volatile
    wave_releases: int = 0  # AMD: s_barriers preceded by a system release fence
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


# ------------------------------------------------------------------------------------------------
# PTX
# ------------------------------------------------------------------------------------------------

_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(", re.M)
_PTX_FUNC = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.func\b", re.M)


def split_ptx(ptx: str) -> dict[str, str]:
    """Kernel name -> its PTX text (from ``.entry NAME(`` to the next entry or device function:
    the out-of-line cold functions are checked on their own terms, not as part of a kernel)."""
    marks = sorted([(m.start(), m.group(1)) for m in _PTX_ENTRY.finditer(ptx)]
                   + [(m.start(), None) for m in _PTX_FUNC.finditer(ptx)])
    out = {}
    for i, (start, name) in enumerate(marks):
        if name is not None:
            end = marks[i + 1][0] if i + 1 < len(marks) else len(ptx)
            out[name] = ptx[start:end]
    return out


def _ptx_instructions(body: str) -> list[str]:
    lines = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "{", "}", "$")) or line.endswith(":"):
            continue
        if line.startswith("@"):  # predicate guard
            line = line.split(None, 1)[1] if " " in line else ""
        lines.append(line)
    return lines


_SCOPES_NARROW = ("cta", "cluster", "gpu")
_PTX_REL = re.compile(r"^(?:st|red)\.(?:\w+\.)*release\.(sys|gpu|cta|cluster)\b"
                      r"|^atom\.(?:\w+\.)*(?:release|acq_rel)\.(sys|gpu|cta|cluster)\b")
_PTX_ACQ = re.compile(r"^ld\.(?:\w+\.)*acquire\.(sys|gpu|cta|cluster)\b"
                      r"|^atom\.(?:\w+\.)*(?:acquire|acq_rel)\.(sys|gpu|cta|cluster)\b")
_PTX_SYS_FENCE = re.compile(r"^(?:fence\.(?:sc|acq_rel)\.sys|membar\.sys)\b")
_PTX_VEC_LOAD = re.compile(r"^ld\.(?:[\w]+\.)*?(?:v4\.[busf]32|v2\.[busf]64)\b")
_PTX_NOT_MEMORY = re.compile(r"\.(?:param|local|shared|const)\.")
_PTX_NC_LOAD = re.compile(r"^ld\.global(?:\.[\w:]+?)*?\.nc\b")
_PTX_FTZ_F32 = re.compile(r"^(?:mul|div|fma|mad)(?:\.\w+)*\.ftz(?:\.\w+)*\.f32$"
                          r"|^div\.(?:approx|full)(?:\.\w+)*\.f32$")
_PTX_LINE_32 = re.compile(r"^(?:ld|st)\.volatile\.global\.v4\.[bus]32$")
_PTX_LINE_64 = re.compile(r"^(ld|st)\.volatile\.global\.v2\.[bu]64$")


def check_ptx_kernel(name: str, body: str) -> KernelReport:
    """Flag-scope and vector-load checks on one kernel's PTX."""
    rep = KernelReport(name)
    for ins in _ptx_instructions(body):
        op = ins.split()[0] if ins.split() else ""
        m = _PTX_REL.match(op)
        if m:
            scope = m.group(1) or m.group(2)
            if scope == "sys":
                rep.sys_release += 1
            else:
                rep.violations.append(f"release at .{scope} scope (must be .sys): {ins}")
        m = _PTX_ACQ.match(op)
        if m:
            scope = m.group(1) or m.group(2)
            if scope == "sys":
                rep.sys_acquire += 1
            else:
                rep.violations.append(f"acquire at .{scope} scope (must be .sys): {ins}")
        if _PTX_SYS_FENCE.match(op):
            rep.sys_release += 1
            rep.sys_acquire += 1
        if (_PTX_VEC_LOAD.match(op) and ".volatile." not in op  # volatile: LL lines, not data
                and not _PTX_NOT_MEMORY.search(op)):  # a call's return value, spills: not data
            rep.vector_loads += 1
        if _PTX_NC_LOAD.match(op) and (barriers_in(name) or "_ll" in name):
            rep.violations.append(f"non-coherent load (peers write staging during the kernel, "
                                  f"in-place calls alias in and out): {ins}")
        if _PTX_FTZ_F32.match(op):
            rep.violations.append(f"flushing/approximate float32 multiply or divide (results "
                                  f"IEEE rounds up to FLT_MIN would become 0): {ins}")
        if _PTX_LINE_32.match(op):
            rep.violations.append(f"LL line access with 32-bit elements (a {{data, flag}} half "
                                  f"is then not single-copy atomic): {ins}")
        m = _PTX_LINE_64.match(op)
        if m:
            rep.line_accesses.add(m.group(1))
    if uses_lines(name) and rep.line_accesses != {"ld", "st"}:
        rep.violations.append(f"LL lines not accessed as 64-bit-element volatile vectors "
                              f"(found {sorted(rep.line_accesses)} of ld/st .v2.b64)")
    _judge(rep, check_release=True)
    return rep


# ------------------------------------------------------------------------------------------------
# AMDGPU
# ------------------------------------------------------------------------------------------------

_AMD_SYMBOL = re.compile(r"^[0-9a-fA-F]+ <([\w.$]+)>:\s*$", re.M)


def split_amdgpu(disassembly: str) -> dict[str, str]:
    """Kernel name -> its disassembly (``llvm-objdump -d`` output, split at ``<symbol>:``)."""
    marks = [(m.start(), m.group(1)) for m in _AMD_SYMBOL.finditer(disassembly)]
    out = {}
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(disassembly)
        out[name] = disassembly[start:end]
    return out


def _amd_instructions(body: str) -> list[str]:
    out = []
    for line in body.splitlines()[1:]:
        line = line.split("//")[0].strip()
        if line and not line.endswith(":"):
            out.append(re.sub(r"\s+", " ", line))
    return out


def _is_vmem(ins: str) -> bool:
    return ins.startswith(("global_", "flat_", "buffer_load", "buffer_store", "buffer_atomic",
                           "scratch_"))


def _is_vmem_load(ins: str) -> bool:
    op = ins.split()[0]
    return _is_vmem(ins) and ("_load" in op or "_atomic" in op)


def _is_vmem_store(ins: str) -> bool:
    op = ins.split()[0]
    return _is_vmem(ins) and ("_store" in op or "_atomic" in op)


def _bits(ins: str) -> set[str]:
    return {t for t in ins.replace(",", " ").split()[1:] if t in ("sc0", "sc1", "glc", "slc", "nt")}


def _is_cache_op(ins: str) -> bool:
    return ins.startswith(("buffer_wbl2", "buffer_inv", "buffer_wbinvl1"))


def _scan(ins: list[str], i: int, step: int) -> int | None:
    """Index of the nearest memory-touching instruction from ``i`` in direction ``step``,
    skipping waits, ALU and scalar instructions (``None`` if none)."""
    j = i + step
    while 0 <= j < len(ins):
        if _is_vmem(ins[j]) or _is_cache_op(ins[j]):
            return j
        j += step
    return None


def classify_amdgpu(instructions: list[str], arch: str) -> list[tuple[str, str, str]]:
    """The memory-model sequences in an instruction list: (kind, scope, instruction) with kind
    ``release-store``, ``acquire-load`` or ``fence`` and scope ``system``, ``agent``,
    ``agent-or-system`` (gfx908) or ``workgroup``."""
    out = []
    ins = instructions
    for i, s in enumerate(ins):
        op = s.split()[0]
        if op == "buffer_wbl2":  # release side (gfx90a/gfx940)
            if arch == "gfx90a":
                scope = "system"  # agent-scope release needs no L2 writeback on gfx90a
            else:
                b = _bits(s)
                scope = "system" if {"sc0", "sc1"} <= b else ("agent" if "sc1" in b else "workgroup")
            j = _scan(ins, i, +1)
            if j is not None and _is_vmem_store(ins[j]):
                out.append(("release-store", scope, ins[j]))
            else:
                out.append(("fence", scope, s))
        elif op in ("buffer_invl2", "buffer_inv", "buffer_wbinvl1_vol", "buffer_wbinvl1"):
            if op == "buffer_wbinvl1_vol" and i > 0 and ins[i - 1].startswith("buffer_invl2"):
                continue  # second half of gfx90a's system acquire, counted at buffer_invl2
            if op == "buffer_invl2":
                scope = "system"
            elif op == "buffer_inv":
                b = _bits(s)
                scope = "system" if {"sc0", "sc1"} <= b else ("agent" if "sc1" in b else "workgroup")
            else:  # buffer_wbinvl1_vol alone
                scope = "agent-or-system" if arch == "gfx908" else "agent"
            j = _scan(ins, i, -1)
            # an atomic load at agent/system scope carries glc (gfx908/gfx90a) or sc bits
            # (gfx940); a plain load before the invalidate belongs to ordinary code (a fence)
            if j is not None and _is_vmem_load(ins[j]) and _bits(ins[j]) & {"glc", "sc0", "sc1"}:
                out.append(("acquire-load", scope, ins[j]))
            else:
                out.append(("fence", scope, s))
    return out


def check_amdgpu_kernel(name: str, body: str, arch: str) -> KernelReport:
    """Flag-scope and vector-load checks on one kernel's disassembly for ``arch``."""
    rep = KernelReport(name)
    ins = _amd_instructions(body)
    system = ("system", "agent-or-system") if arch == "gfx908" else ("system",)
    for kind, scope, s in classify_amdgpu(ins, arch):
        if kind == "fence":
            continue
        if scope in system:
            if kind == "release-store":
                rep.sys_release += 1
            else:
                rep.sys_acquire += 1
        else:
            rep.violations.append(f"{kind} at {scope} scope (must be system): {s}")
    rep.vector_loads = sum(1 for s in ins if s.split()[0] == "global_load_dwordx4")
    flat16 = sum(1 for s in ins if s.split()[0] == "flat_load_dwordx4")
    if uses_f32_mul_or_div(name):
        # avg by a power of two is an exact f64 multiply (v_mul_f64), by others a division
        if not {s.split()[0] for s in ins} & {"v_mul_f64", "v_div_scale_f64"}:
            rep.violations.append("float32 multiply/divide not on the exact float64 path (the f32 "
                                  "instructions flush results IEEE rounds up to FLT_MIN)")
    if arch != "gfx908" and barriers_in(name):
        rep.wave_releases = _wave_releases(ins, arch)
        if rep.wave_releases < barriers_in(name):
            rep.violations.append(f"{rep.wave_releases} s_barrier(s) preceded by a system-scope "
                                  f"release fence in every wave, need >= {barriers_in(name)} "
                                  f"(one per barrier)")
    # gfx908 has no release marker at any scope above workgroup: the count cannot be checked
    _judge(rep, check_release=(arch != "gfx908"), flat16=flat16)
    return rep


def _wave_releases(ins: list[str], arch: str) -> int:
    """s_barriers whose nearest earlier memory or cache instruction is a system-scope L2
    writeback (``buffer_wbl2``; gfx940: with ``sc0 sc1``) with an ``s_waitcnt vmcnt(0)`` after
    it: every wave has published its own stores before the block barrier."""
    count = 0
    for i, s in enumerate(ins):
        if s.split()[0] != "s_barrier":
            continue
        j = _scan(ins, i, -1)
        if j is None or ins[j].split()[0] != "buffer_wbl2":
            continue
        if arch == "gfx940" and not {"sc0", "sc1"} <= _bits(ins[j]):
            continue
        if any(w.startswith("s_waitcnt") and "vmcnt(0)" in w for w in ins[j + 1:i]):
            count += 1
    return count


def memory_signature(body: str, arch: str) -> tuple:
    """What the memory model makes of a kernel, independent of register allocation and
    scheduling: the ordered (kind, scope) sequences of :func:`classify_amdgpu` and the multiset of
    vector-memory and cache instructions with their cache-policy bits."""
    from collections import Counter

    ins = _amd_instructions(body)
    seq = tuple((k, s) for k, s, _ in classify_amdgpu(ins, arch))
    ops = Counter(" ".join([s.split()[0]] + sorted(_bits(s)))
                  for s in ins if _is_vmem(s) or _is_cache_op(s))
    return seq, tuple(sorted(ops.items()))


# ------------------------------------------------------------------------------------------------

def _judge(rep: KernelReport, *, check_release: bool, flat16: int = 0) -> None:
    nb = barriers_in(rep.name)
    if nb:
        if check_release and rep.sys_release < nb:
            rep.violations.append(f"{rep.sys_release} system-scope release store(s), "
                                  f"need >= {nb} (one per barrier)")
        if rep.sys_acquire < nb:
            rep.violations.append(f"{rep.sys_acquire} system-scope acquire load(s), "
                                  f"need >= {nb} (one per barrier)")
    if needs_vector_loads(rep.name):
        need = world_size_of(rep.name)
        if rep.vector_loads < need:
            extra = f" ({flat16} flat_load_dwordx4: address space not inferred)" if flat16 else ""
            rep.violations.append(f"{rep.vector_loads} 16-byte global load(s), need >= {need} "
                                  f"(one per rank){extra}")


def check_ptx(ptx: str, names) -> dict[str, KernelReport]:
    """Check every kernel in ``names``; a name missing from the PTX is a violation."""
    bodies = split_ptx(ptx)
    out = {}
    for n in names:
        if n not in bodies:
            out[n] = KernelReport(n, violations=["kernel not found in PTX"])
        else:
            out[n] = check_ptx_kernel(n, bodies[n])
    return out


def check_amdgpu(disassembly: str, names, arch: str) -> dict[str, KernelReport]:
    """Check every kernel in ``names``; a name missing from the disassembly is a violation."""
    bodies = split_amdgpu(disassembly)
    out = {}
    for n in names:
        if n not in bodies:
            out[n] = KernelReport(n, violations=["kernel not found in disassembly"])
        else:
            out[n] = check_amdgpu_kernel(n, bodies[n], arch)
    return out


def disassemble(code_object: bytes, arch: str) -> str:
    """``llvm-objdump -d --mcpu=<arch>`` of an AMDGPU code object."""
    from detar_cupy._toolchains import disassemble_amdgpu

    return disassemble_amdgpu(code_object, arch)
