"""GPU checks of detar_cupy.torch, run inside spawned ranks (module-level, so spawn pickles them by
name). Ranks made by detar_cupy.spawn get a Communicator and wrap it in a DetarGroup; ranks of a
torch.distributed group (raw processes of gpu_support.run_processes) build theirs with
from_process_group. Every result is compared with detar_cupy.reference bit for bit."""
from __future__ import annotations

import hashlib
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from detar_cupy import reference
from detar_cupy.dtypes import DTYPES, numpy_dtype
from detar_cupy.torch import REDUCIBLE, DetarGroup, from_process_group, register_ddp_comm_hook
from gpu_cases import TEST_ENV, random_values

TORCH_DTYPES = {name: dtype for dtype, name in REDUCIBLE.items()}
STAGE_HALF = int(TEST_ENV["DETAR_STAGING_BYTES"])


def np_dtype(name: str) -> np.dtype:
    return np.dtype(np.bool_) if name == "bool" else numpy_dtype(name)


def to_device(a: np.ndarray, name: str, device: Any) -> torch.Tensor:
    """A tensor on ``device`` with ``a``'s bytes and shape, of table dtype ``name`` (or bool)."""
    dtype = torch.bool if name == "bool" else TORCH_DTYPES[name]
    if a.size == 0:  # an empty uint8 tensor may have stride 0, which view() refuses
        return torch.empty(a.shape, dtype=dtype, device=device)
    raw = torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy())
    return raw.to(device).view(dtype).reshape(a.shape)


def to_host(t: torch.Tensor) -> np.ndarray:
    """The bytes of ``t`` as a numpy array of its dtype (bfloat16 through ml_dtypes)."""
    name = "bool" if t.dtype == torch.bool else REDUCIBLE[t.dtype]
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return flat.view(np_dtype(name)).reshape(tuple(t.shape))


def values(seed: int, rank: int, name: str, count: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rank])
    if name == "bool":
        return rng.integers(0, 2, count).astype(np.bool_)
    return random_values(rng, name, count)


def poisoned(count: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.full((count * itemsize,), 0xA5, dtype=torch.uint8, device=device).view(dtype)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()[:16]


def compare(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    got, want = got.reshape(-1), want.reshape(-1)
    if reference.bits_equal(got, want):
        return True, ""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False, f"{got.size} elements of {got.dtype}, expected {want.size} of {want.dtype}"
    bad = np.nonzero(got.view(np.uint8) != want.view(np.uint8))[0]
    i = int(bad[0]) // got.itemsize
    return False, f"{bad.size} differing bytes; first element {i}: got {got[i]!r} want {want[i]!r}"


def group_of(comm: Any) -> DetarGroup:
    group = DetarGroup(comm)
    torch.cuda.set_device(group.device)
    return group


# ---- every dtype, op and form on tensors --------------------------------------------------------

@dataclass(frozen=True)
class Case:
    kind: str  # all_reduce | reduce_scatter | all_gather | broadcast | coalesced
    dtype: str  # a table name, "bool", or "mixed"/"cupy" for coalesced
    op: str
    count: int  # elements per rank (reduce_scatter: per part)
    form: str  # inplace | out-<algorithm> | tensor | out | tensors | cupy
    seed: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.dtype}-{self.op}-n{self.count}-{self.form}"


def cases(world: int, seed0: int = 7000) -> list[Case]:
    """The tensor cases of one world size (the same list in every process)."""
    out: list[Case] = []
    seed = seed0

    def add(*args: Any) -> None:
        nonlocal seed
        seed += 1
        out.append(Case(*args, seed))

    algorithms = ("ll", "one_shot", "two_shot")
    for name, dt in DTYPES.items():
        if name not in TORCH_DTYPES:
            continue
        chunked = STAGE_HALF * 3 // 2 // dt.itemsize + 3  # more than a staging half: chunks
        for op in dt.ops:
            for i, count in enumerate((1, 1000 + world, chunked)):
                add("all_reduce", name, op, count, "inplace")
                add("all_reduce", name, op, count, f"out-{algorithms[i]}")
        for i, op in enumerate(dt.ops):
            add("reduce_scatter", name, op, 333, "tensor" if i % 2 == 0 else "out")
    for name in (*TORCH_DTYPES, "bool"):
        for count, form in ((5, "tensor"), (1001, "out")):
            add("all_gather", name, "-", count, form)
        add("broadcast", name, "-", 1001, "inplace")
    add("coalesced", "mixed", "sum", 0, "tensors")
    add("coalesced", "float32", "sum", 0, "cupy")
    return out


COALESCED = (("bfloat16", 100), ("float32", 33), ("bfloat16", 1), ("int32", 7),
             ("float16", 4099), ("float32", 0))


def run_tensor_case(group: DetarGroup, case: Case) -> tuple[bool, str, str]:
    world, rank, dev = group.world_size, group.rank, group.device
    if case.kind == "coalesced":
        return _coalesced(group, case)
    n_in = case.count * world if case.kind == "reduce_scatter" else case.count
    inputs = [values(case.seed, r, case.dtype, n_in) for r in range(world)]
    x = to_device(inputs[rank], case.dtype, dev)
    detail = ""
    if case.kind == "all_reduce":
        want = reference.all_reduce(inputs, case.op)
        if case.form == "inplace":
            group.all_reduce(x, case.op)
            got = x
        else:
            got = group.all_reduce_out(x, case.op, algorithm=case.form[len("out-"):])
            if not reference.bits_equal(to_host(x), inputs[rank]):
                detail = "all_reduce_out changed its input; "
    elif case.kind == "reduce_scatter":
        want = reference.reduce_scatter(inputs, case.op)[rank]
        if case.form == "tensor":
            got = poisoned(case.count, x.dtype, dev)
            group.reduce_scatter_tensor(got, x, case.op)
        else:
            got = group.reduce_scatter_out(x.reshape(world, case.count), case.op)
            if tuple(got.shape) != (1, case.count):
                detail = f"shape {tuple(got.shape)}; "
    elif case.kind == "all_gather":
        want = np.concatenate(inputs)
        if case.form == "tensor":
            got = poisoned(case.count * world, x.dtype, dev)
            group.all_gather_into_tensor(got, x)
        else:
            got = group.all_gather_out(x.reshape(1, case.count))
            if tuple(got.shape) != (world, case.count):
                detail = f"shape {tuple(got.shape)}; "
    else:
        root = case.seed % world
        want = inputs[root]
        if rank != root:
            x.view(torch.uint8).fill_(0xA5)
        group.broadcast(x, root)
        got = x
    group.synchronize()
    host = to_host(got)
    ok, why = compare(host, want)
    return ok and not detail, detail + why, digest(host)


def _coalesced(group: DetarGroup, case: Case) -> tuple[bool, str, str]:
    world, rank = group.world_size, group.rank
    specs = COALESCED if case.form == "tensors" else (("float32", 100), ("float32", 3))
    inputs = [[values(case.seed + i, r, name, n) for r in range(world)]
              for i, (name, n) in enumerate(specs)]
    if case.form == "tensors":
        bufs = [to_device(ins[rank], name, group.device) for ins, (name, _) in zip(inputs, specs)]
        group.all_reduce_coalesced(bufs, case.op)
        group.synchronize()
        got = [to_host(t) for t in bufs]
    else:  # CuPy arrays through the Communicator's own method: CuPy's current stream
        import cupy as cp

        bufs = [cp.asarray(ins[rank]) for ins in inputs]
        group.communicator.all_reduce_coalesced(bufs, case.op)
        group.communicator.synchronize()
        got = [cp.asnumpy(a) for a in bufs]
    problems = []
    for i, (have, ins) in enumerate(zip(got, inputs)):
        ok, why = compare(have, reference.all_reduce(ins, case.op))
        if not ok:
            problems.append(f"buffer {i}: {why}")
    return not problems, "; ".join(problems), digest(np.concatenate([g.view(np.uint8)
                                                                        for g in got]))


def run_tensor_cases(comm: Any, seed0: int) -> dict:
    """{case id: (ok, detail, digest)} for every case of :func:`cases`."""
    group = group_of(comm)
    results = {}
    for case in cases(group.world_size, seed0):
        try:
            results[case.id] = run_tensor_case(group, case)
        except Exception as exc:
            results[case.id] = (False, f"{type(exc).__name__}: {exc}", "")
    return results


# ---- streams ------------------------------------------------------------------------------------

SLEEP_CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms of one SM spinning


def side_stream(comm: Any, seed: int, trials: int = 20) -> dict:
    """The input of each trial is poisoned, then written only after a long kernel, all on a side
    stream; the all-reduce is called inside ``torch.cuda.stream(side)`` without ``stream=``. It
    must read the written input every time. The control makes the same call on CuPy's current
    stream (observed, not asserted: it races with the side stream)."""
    group = group_of(comm)
    world, rank = group.world_size, group.rank
    inputs = [values(seed, r, "bfloat16", 1 << 16) for r in range(world)]
    want = reference.all_reduce(inputs)
    src = to_device(inputs[rank], "bfloat16", group.device)
    x = torch.empty_like(src)
    side = torch.cuda.Stream(group.device)
    side.wait_stream(torch.cuda.current_stream())
    wrong, control_wrong = [], 0
    for trial in range(trials + 2):
        with torch.cuda.stream(side):
            x.view(torch.uint8).fill_(0xFF)  # NaN in every element
            torch.cuda._sleep(SLEEP_CYCLES)
            x.copy_(src)
            if trial < trials:
                group.all_reduce(x)
            else:  # control: CuPy's current stream does not wait for `side`
                ptr = x.data_ptr()
                comm.all_reduce_buffers(ptr, ptr, x.numel(), "bfloat16")
        side.synchronize()
        comm.synchronize()
        host = to_host(x)
        if trial < trials:
            good = digest(host)  # what every rank must agree on (the control may race)
        if not reference.bits_equal(host, want):
            if trial < trials:
                wrong.append(trial)
            else:
                control_wrong += 1
    return {"trials": trials, "wrong trials": wrong, "control wrong": control_wrong,
            "digest": good}


# ---- torch.compile and CUDA graphs --------------------------------------------------------------

DETAR_OPS = ("all_reduce", "all_reduce_", "reduce_scatter", "all_gather")


def compiled_block(comm: Any, seed: int) -> dict:
    """A tensor-parallel block compiled by inductor with fullgraph=True: the graph calls the detar
    ops, and every collective's output equals the reference of the ranks' compiled partials."""
    from torch._inductor.compile_fx import compile_fx

    group = group_of(comm)
    world, rank, dev = group.world_size, group.rank, group.device
    batch, hidden, ffn = 64, 256, 512
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=gen).bfloat16().to(dev)
    w1 = (torch.randn(hidden, ffn, generator=gen) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(ffn, hidden, generator=gen) / ffn ** 0.5).bfloat16()
    shard = slice(rank * ffn // world, (rank + 1) * ffn // world)
    w1, w2 = w1[:, shard].contiguous().to(dev), w2[shard].contiguous().to(dev)
    graphs: list[str] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    def block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple:
        p = torch.relu(x @ w1) @ w2  # this rank's partial sum (row-parallel w2)
        y = group.all_reduce_out(p)
        s = group.reduce_scatter_out(p, "avg")  # sequence parallel: this rank's rows
        a = group.all_gather_out(s)
        q = p * 2
        group.all_reduce(q, "max")
        return p, y, s, a, q

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    with torch.no_grad():
        first = [to_host(t) for t in compiled(x, w1, w2)]
        second = [to_host(t) for t in compiled(x, w1, w2)]
    group.synchronize()
    partials = [np.frombuffer(b, dtype=first[0].dtype).reshape(batch, hidden)
                for b in comm.exchange(first[0].tobytes())]
    doubled = [(p.astype(np.float32) * 2).astype(p.dtype) for p in partials]  # exact
    want = {"all_reduce_out": reference.all_reduce(partials),
            "reduce_scatter_out": reference.reduce_scatter(partials, "avg")[rank],
            "all_gather_out": reference.all_reduce(partials, "avg"),
            "in-place all_reduce": reference.all_reduce(doubled, "max")}
    problems = []
    for (label, expect), got in zip(want.items(), first[1:]):
        ok, why = compare(got, expect)
        if not ok:
            problems.append(f"{label}: {why}")
    problems += [f"second call differs in output {i}" for i in range(5)
                 if first[i].tobytes() != second[i].tobytes()]
    missing = [op for op in DETAR_OPS if f"torch.ops.detar.{op}(" not in "".join(graphs)]
    return {"graphs": len(graphs), "missing ops": missing, "problems": problems,
            # what every rank holds alike (the reduce-scatter's part is this rank's own)
            "digest": digest(np.concatenate([first[i].reshape(-1).view(np.uint8)
                                             for i in (1, 3, 4)]))}


def opcheck_rank(comm: Any) -> dict:
    """torch.library.opcheck of every detar op on real tensors (world size 1): schema, fake
    implementation, autograd registration and AOT dispatch agree with the real implementation."""
    group = group_of(comm)
    x = torch.randn(8, 4, device=group.device).bfloat16()
    h = group.handle
    samples: dict[str, tuple] = {
        "all_reduce": (x, h, "sum", "auto"),
        "all_reduce_": (x.clone(), h, "avg", "two_shot"),
        "reduce_scatter": (x, h, "max"),
        "reduce_scatter_into": (torch.empty_like(x), x, h, "sum"),
        "all_gather": (x, h),
        "all_gather_into": (torch.empty_like(x), x, h),
        "broadcast_": (x.clone(), h, 0),
        "all_reduce_coalesced_": ([x.clone(), x.float()], h, "sum"),
    }
    out = {}
    for name, args in samples.items():
        try:
            torch.library.opcheck(getattr(torch.ops.detar, name).default, args)
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def graph_replay(comm: Any, seed: int, replays: int = 100) -> dict:
    """One torch.cuda.graph holding every collective, replayed with fresh inputs copied into its
    static inputs before each replay (outputs poisoned): every replay gives the reference."""
    group = group_of(comm)
    world, rank, dev = group.world_size, group.rank, group.device
    count = 5000 + 2 * world  # more than TEST_ENV's LL area (8 KiB)
    static = {"in": torch.empty(count, dtype=torch.bfloat16, device=dev),
              "inplace": torch.empty(count, dtype=torch.bfloat16, device=dev),
              "scatter": torch.empty(world, 77, dtype=torch.float16, device=dev)}
    outs: dict[str, torch.Tensor] = {}

    def body() -> None:
        outs["out"] = group.all_reduce_out(static["in"], algorithm="two_shot")
        group.all_reduce(static["inplace"], "avg")
        outs["part"] = group.reduce_scatter_out(static["scatter"], "max")
        outs["gathered"] = group.all_gather_out(outs["part"])

    # Every call shape once before capturing (its first call compiles and loads kernels), on a
    # side stream as torch recommends.
    warm = torch.cuda.Stream(dev)
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        body()
    torch.cuda.current_stream().wait_stream(warm)
    group.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    problems = []
    for replay in range(replays):
        s = seed + 10 * replay
        ins = {"in": [values(s, r, "bfloat16", count) for r in range(world)],
               "inplace": [values(s + 1, r, "bfloat16", count) for r in range(world)],
               "scatter": [values(s + 2, r, "float16", world * 77) for r in range(world)]}
        for key, per_rank in ins.items():
            static[key].copy_(to_device(per_rank[rank], REDUCIBLE[static[key].dtype],
                                        dev).reshape(static[key].shape))
        for out in outs.values():
            out.view(torch.uint8).fill_(0xA5)
        graph.replay()
        group.synchronize()
        part = reference.reduce_scatter(ins["scatter"], "max")
        want = {"out": reference.all_reduce(ins["in"]),
                "inplace": reference.all_reduce(ins["inplace"], "avg"),
                "part": part[rank], "gathered": np.concatenate(part)}
        got = {"out": outs["out"], "inplace": static["inplace"], "part": outs["part"],
               "gathered": outs["gathered"]}
        for key in want:
            ok, why = compare(to_host(got[key]), want[key])
            if not ok:
                problems.append(f"replay {replay} {key}: {why}")
    return {"replays": replays, "problems": problems[:8], "failed": len(problems)}


# ---- bad inputs ---------------------------------------------------------------------------------

def bad_inputs(comm: Any) -> list[tuple[str, str, str]]:
    """(label, exception type or "ok", message) for each refused call, and for the calls that
    must work however the ranks' pointers differ; the parent requires every rank's rows to be
    identical."""
    import re

    group = group_of(comm)
    world, dev = group.world_size, group.device
    x = torch.ones(8, 4, device=dev)
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("cpu tensor", lambda: group.all_reduce(torch.ones(4))),
        ("non-contiguous", lambda: group.all_reduce(x.t())),
        ("strided slice", lambda: group.all_reduce_out(x.reshape(-1)[::2])),
        ("unsupported dtype", lambda: group.all_reduce(x.bool())),
        ("requires grad", lambda: group.all_reduce_out(torch.ones(4, device=dev,
                                                                  requires_grad=True))),
        ("in place on a leaf that requires grad",
         lambda: group.all_reduce(torch.ones(4, device=dev, requires_grad=True))),
        ("unknown op", lambda: group.all_reduce(x, "median")),
        ("avg of ints", lambda: group.all_reduce(x.int(), "avg")),
        ("unknown ReduceOp", lambda: group.all_reduce(x, torch.distributed.ReduceOp.BAND)),
        ("unknown algorithm", lambda: group.all_reduce(x, algorithm="ring")),
        ("indivisible dim 0", lambda: group.reduce_scatter_out(torch.ones(world * 3 + 1, 4,
                                                                          device=dev))),
        ("output size", lambda: group.reduce_scatter_tensor(torch.ones(3, device=dev), x)),
        ("output dtype", lambda: group.all_gather_into_tensor(
            torch.ones(world * 32, device=dev, dtype=torch.half), x)),
        ("broadcast root", lambda: group.broadcast(x, world)),
        ("not a tensor", lambda: group.all_reduce(np.ones(4))),
    ]
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", (dev.index + 1) % torch.cuda.device_count())
        calls.append(("another GPU", lambda: group.all_reduce(torch.ones(4, device=other))))
    rows = []
    for label, call in calls:
        try:
            call()
            rows.append((label, "no exception", ""))
        except Exception as exc:
            # the GPU index is the only thing that may differ per rank (one GPU each)
            rows.append((label, type(exc).__name__, re.sub(r"cuda:\d+", "cuda:N", str(exc))))
    rows.append(_must_work(group))
    return rows


def _must_work(group: DetarGroup) -> tuple[str, str, str]:
    """Calls whose pointers differ per rank and must still work on every rank: a misaligned view
    and an output that overlaps the input at another rank's part (a private copy is made)."""
    world, rank, dev = group.world_size, group.rank, group.device
    inputs = [values(11, r, "bfloat16", 1 + 1001) for r in range(world)]
    x = to_device(inputs[rank], "bfloat16", dev)[1:]  # 2 bytes past the allocation's start
    group.all_reduce(x)
    ok1, why1 = compare(to_host(x), reference.all_reduce([i[1:] for i in inputs]))
    per = 100
    ins = [values(12, r, "float32", per * world) for r in range(world)]
    buf = to_device(ins[rank], "float32", dev)
    group.reduce_scatter_tensor(buf[:per], buf)  # rank 0's supported alias, others' overlap
    group.synchronize()
    ok2, why2 = compare(to_host(buf[:per]), reference.reduce_scatter(ins)[rank])
    return ("misaligned view and overlapping output work", "ok" if ok1 and ok2 else "failed",
            why1 + why2)


# ---- host time ----------------------------------------------------------------------------------

def host_time(comm: Any, reps: int = 30, calls: int = 200) -> dict:
    """Host microseconds per call (median of ``reps`` blocks of ``calls`` calls, the kinds
    interleaved so drift hits all alike; the device is synchronised between blocks, untimed)."""
    import cupy as cp

    group = group_of(comm)
    dev = group.device
    t = torch.zeros(1024, dtype=torch.float16, device=dev)
    a = cp.zeros(1024, cp.float16)
    many = [torch.zeros(256, dtype=torch.float16, device=dev) for _ in range(64)]

    def eight_calls() -> None:
        for t_i in many[:8]:
            group.all_reduce(t_i)

    kinds: dict[str, Callable[[], Any]] = {
        "tensor in place (DetarGroup.all_reduce)": lambda: group.all_reduce(t),
        "CuPy array in place (Communicator.all_reduce)": lambda: comm.all_reduce(a, a),
        "tensor through Communicator.all_reduce (CuPy view)": lambda: comm.all_reduce(t, t),
        "tensor out of place (DetarGroup.all_reduce_out)": lambda: group.all_reduce_out(t),
        "all_reduce_coalesced of 64 tensors of 256": lambda: group.all_reduce_coalesced(many),
        "8 single all_reduce calls of 256": eight_calls,
    }
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(reps + 1):  # the first round warms up
        for label, fn in kinds.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            torch.cuda.synchronize(dev)
            if rep:
                samples[label].append(elapsed / calls * 1e6)
    group.synchronize()
    out = {label: float(np.median(v)) for label, v in samples.items()}
    index = dev.index
    getters: dict[str, Callable[[], Any]] = {
        "torch._C._cuda_getCurrentRawStream(i)": lambda: torch._C._cuda_getCurrentRawStream(index),
        "torch.cuda.current_stream(i).cuda_stream": lambda: torch.cuda.current_stream(index)
        .cuda_stream,
        "cupy.cuda.get_current_stream(i).ptr": lambda: cp.cuda.get_current_stream(index).ptr,
    }
    for label, fn in getters.items():
        start = time.perf_counter()
        for _ in range(100_000):
            fn()
        out[f"stream getter {label}"] = (time.perf_counter() - start) / 100_000 * 1e6
    return out


# ---- ranks of a torch.distributed group (raw processes) ---------------------------------------

def _torch_rank(rank: int, world: int, backend: str, store: str) -> None:
    """Environment, GPU and torch.distributed of one raw rank. With several ranks per GPU, NCCL
    takes them only if each looks like its own host (NCCL_HOSTID; it then talks over sockets)."""
    os.environ.update(TEST_ENV)
    os.environ["NCCL_HOSTID"] = f"detar-test-rank-{rank}"
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                         world_size=world)


def _reduced_over(group: DetarGroup, members: list[int], seed: int) -> tuple[bool, str]:
    """all_reduce of bf16 inputs seeded by global rank, over ``members`` (global ranks in group
    rank order), compared with the reference."""
    me = torch.distributed.get_rank()
    inputs = [values(seed, r, "bfloat16", 4099) for r in members]
    x = to_device(values(seed, me, "bfloat16", 4099), "bfloat16", group.device)
    group.all_reduce(x)
    group.synchronize()
    return compare(to_host(x), reference.all_reduce(inputs))


def process_groups_rank(rank: int, world: int, store: str, conn: Any) -> None:
    """Four ranks as 2 (TP) x 2 (DP) over an NCCL default group: a DetarGroup for the default
    group, for this rank's TP group and for its DP group, each set up through that group."""
    try:
        dist = torch.distributed
        _torch_rank(rank, world, "nccl", store)
        out: dict[str, Any] = {}
        tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        layouts = {"default": (None, list(range(world))),
                   "tp": (tp_groups[rank // 2], [rank // 2 * 2, rank // 2 * 2 + 1]),
                   "dp": (dp_groups[rank % 2], [rank % 2, rank % 2 + 2])}
        for name, (pg, members) in layouts.items():
            group = from_process_group(pg)
            expect = (members.index(rank), len(members),
                      torch.device("cuda", torch.cuda.current_device()))
            out[f"{name} rank, size, device"] = ((group.rank, group.world_size, group.device)
                                                 == expect)
            out[f"{name} all_reduce"] = _reduced_over(group, members, 300 + len(name))
            out[f"{name} process group kept"] = group.process_group is (
                dist.group.WORLD if pg is None else pg)
            group.close()
        dist.destroy_process_group()
        conn.send(("ok", out))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


CAPS_MB = (25.0, 0.5, 0.05)


def ddp_rank(rank: int, world: int, store: str, conn: Any) -> None:
    """DDP (gloo underneath, detar through the comm hook) trained for 3 steps with three bucket
    caps, twice each: every gradient and final parameter bit must be the same in all six
    runs, and the first step's gradients the reference mean of the ranks' local gradients."""
    try:
        _torch_rank(rank, world, "gloo", store)
        dev = torch.device("cuda", torch.cuda.current_device())
        group = from_process_group()
        torch.backends.cuda.matmul.allow_tf32 = False

        def model() -> torch.nn.Module:
            torch.manual_seed(0)
            # 8 x 257 KiB of parameters: several buckets for every cap below 2 MiB, also where
            # torch caps the first bucket at 1 MiB
            layers = [torch.nn.Linear(256, 256) for _ in range(8)]
            return torch.nn.Sequential(*[m for layer in layers
                                         for m in (layer, torch.nn.GELU())]).to(dev)

        def batch(step: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(1000 * step + rank)
            return torch.randn(32, 256, generator=gen).to(dev)

        def grads(m: torch.nn.Module) -> list[np.ndarray]:
            return [to_host(p.grad) for p in m.parameters()]

        local = model()
        local(batch(0)).square().mean().backward()
        # one exchange per parameter: a rendezvous message holds at most 1 MiB
        want = [reference.all_reduce([np.frombuffer(b, np.float32)
                                      for b in group.communicator.exchange(g.tobytes())], "avg")
                for g in grads(local)]
        # the hook's calls, counted per step: one per bucket
        calls = [0]
        reduce = group.all_reduce

        def counted(*args: Any, **kwargs: Any) -> None:
            calls[0] += 1
            reduce(*args, **kwargs)

        group.all_reduce = counted  # type: ignore[method-assign]
        runs: dict[str, Any] = {}
        for cap in CAPS_MB:
            for run in range(2):
                ddp = torch.nn.parallel.DistributedDataParallel(model(), device_ids=[dev],
                                                                bucket_cap_mb=cap)
                register_ddp_comm_hook(ddp, group)
                opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
                steps = []
                for step in range(3):
                    opt.zero_grad()
                    calls[0] = 0
                    ddp(batch(step)).square().mean().backward()
                    steps.append(grads(ddp.module))
                    opt.step()
                params = [to_host(p.detach()) for p in ddp.module.parameters()]
                first_ok = all(compare(g.reshape(-1), w)[0] for g, w in zip(steps[0], want))
                runs[f"cap {cap} MB run {run}"] = {
                    "grads": digest(np.concatenate([g.reshape(-1) for s in steps for g in s])),
                    "params": digest(np.concatenate([p.reshape(-1) for p in params])),
                    "first step is the reference mean": first_ok,
                    "buckets in the last step": calls[0]}
        group.close()
        torch.distributed.destroy_process_group()
        conn.send(("ok", runs))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
