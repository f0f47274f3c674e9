"""CPU tests of detar_cupy.torch: import hygiene, the custom ops' registration and fake
implementations (shapes under FakeTensorMode, torch.compile with fullgraph=True), the eager layer's
argument handling against a recording stand-in Communicator, and the rendezvous adapter over a real
gloo group of 4 processes. No GPU, no CuPy; skipped without torch (except the hygiene checks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from _torch_workers import RecordingComm, gloo_rank
from gpu_support import run_processes

try:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import detar_cupy.torch as dct
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed "
                                                        "(pip install 'detar_cupy[torch]')")
ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


# ---------------------------------------------------------------- import hygiene (torch or not)

def test_importing_detar_cupy_does_not_import_torch() -> None:
    done = run_python("import detar_cupy, detar_cupy.reference, sys; "
                      "assert 'torch' not in sys.modules, 'torch was imported'")
    assert done.returncode == 0, done.stderr


def test_the_torch_layer_without_torch_names_the_extra() -> None:
    done = run_python("import sys; sys.modules['torch'] = None; import detar_cupy.torch")
    assert done.returncode != 0
    assert "ImportError: detar_cupy.torch needs PyTorch >= 2.4: pip install " \
           "'detar_cupy[torch]'" in done.stderr, done.stderr


# ---------------------------------------------------------------- custom ops

OPS = {
    "all_reduce": "detar::all_reduce(Tensor input, int group, str op, str algorithm) -> Tensor",
    "all_reduce_": "detar::all_reduce_(Tensor(a!) tensor, int group, str op, str algorithm) "
                   "-> ()",
    "reduce_scatter": "detar::reduce_scatter(Tensor input, int group, str op) -> Tensor",
    "reduce_scatter_into": "detar::reduce_scatter_into(Tensor(a!) output, Tensor input, "
                           "int group, str op) -> ()",
    "all_gather": "detar::all_gather(Tensor input, int group) -> Tensor",
    "all_gather_into": "detar::all_gather_into(Tensor(a!) output, Tensor input, int group) "
                       "-> ()",
    "broadcast_": "detar::broadcast_(Tensor(a!) tensor, int group, int src) -> ()",
    "all_reduce_coalesced_": "detar::all_reduce_coalesced_(Tensor(a!)[] tensors, int group, "
                             "str op) -> ()",
}


@pytest.fixture
def group() -> Any:
    g = dct.DetarGroup(RecordingComm(world_size=2))
    yield g
    g.close()


@needs_torch
def test_every_collective_is_a_registered_op() -> None:
    for name, schema in OPS.items():
        assert str(getattr(torch.ops.detar, name).default._schema) == schema


@needs_torch
def test_fake_implementations_give_the_output_shapes(group: Any) -> None:
    ops, h = torch.ops.detar, group.handle
    with FakeTensorMode():
        x = torch.empty(8, 3, device="cuda", dtype=torch.bfloat16)
        for out, shape in ((ops.all_reduce(x, h, "sum", "auto"), (8, 3)),
                           (ops.reduce_scatter(x, h, "avg"), (4, 3)),
                           (ops.all_gather(x, h), (16, 3)),
                           (ops.all_gather(torch.empty((), device="cuda"), h), (2,))):
            assert (tuple(out.shape), out.device) == (shape, x.device)
            assert out.dtype == x.dtype or out.dtype == torch.float32
        assert ops.all_reduce_(x, h, "max", "ll") is None
        # (views of fake CUDA tensors need a CUDA build: separate tensors here)
        half = torch.empty(4, 3, device="cuda", dtype=torch.bfloat16)
        assert ops.reduce_scatter_into(half, x, h, "sum") is None
        assert ops.all_gather_into(x, half, h) is None
        assert ops.broadcast_(torch.empty(5, 2, device="cuda", dtype=torch.bool), h, 1) is None
        assert ops.all_reduce_coalesced_([x, half.float()], h, "sum") is None
        with pytest.raises(ValueError, match="splits dim 0 of input among 2 ranks"):
            ops.reduce_scatter(torch.empty(7, device="cuda"), h, "sum")
        with pytest.raises(ValueError, match=r"output has 5 elements, expected 8 \(input's 4 times"):
            ops.all_gather_into(torch.empty(5, device="cuda"), torch.empty(4, device="cuda"), h)
        with pytest.raises(TypeError, match="torch.bool, which detar cannot reduce"):
            ops.all_reduce(torch.empty(4, device="cuda", dtype=torch.bool), h, "sum", "auto")


@needs_torch
def test_a_closed_group_is_named_when_its_handle_is_used() -> None:
    g = dct.DetarGroup(RecordingComm())
    g.close()
    with FakeTensorMode(), pytest.raises(ValueError, match=f"no open DetarGroup has handle "
                                                           f"{g.handle}: the group was closed"):
        torch.ops.detar.all_reduce(torch.empty(2, device="cuda"), g.handle, "sum", "auto")


def tp_block(g: Any) -> Callable:
    """A tensor-parallel block using every collective (weights are inputs)."""
    def block(x: Any, w1: Any, w2: Any) -> Any:
        h = torch.relu(x @ w1)  # column parallel
        y = g.all_reduce_out(h @ w2, torch.distributed.ReduceOp.SUM)  # row parallel
        part = g.reduce_scatter_out(y, "avg")  # sequence parallel
        y = g.all_gather_out(part * 2)
        g.all_reduce(y, "max")
        g.broadcast(y, 1)
        z = y + 1
        g.all_reduce_coalesced([y, z])
        out = torch.empty_like(y)
        g.all_gather_into_tensor(out, part + 1)
        small = torch.empty_like(part)
        g.reduce_scatter_tensor(small, z)
        return y, out, small
    return block


@needs_torch
@pytest.mark.parametrize("backend", ["record", "aot_eager"])
def test_a_tensor_parallel_block_compiles_with_fullgraph(group: Any, backend: str) -> None:
    graphs: list[Any] = []

    def record(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    block = torch.compile(tp_block(group), fullgraph=True,
                          backend=record if backend == "record" else backend)
    with FakeTensorMode(), torch.no_grad():
        x = torch.empty(8, 16, device="cuda", dtype=torch.bfloat16)
        w1 = torch.empty(16, 32, device="cuda", dtype=torch.bfloat16)
        w2 = torch.empty(32, 16, device="cuda", dtype=torch.bfloat16)
        y, out, small = block(x, w1, w2)
    assert [tuple(t.shape) for t in (y, out, small)] == [(8, 16), (8, 16), (4, 16)]
    assert y.dtype == torch.bfloat16
    assert group.communicator.calls == []  # traced, never run eagerly
    if backend == "record":
        code = graphs[0].code
        called = [name for name in OPS if f"torch.ops.detar.{name}(" in code]
        assert sorted(called) == sorted(OPS), code
        assert f"torch.ops.detar.all_reduce(matmul_1, {group.handle}, 'sum', 'auto')" in code


# ---------------------------------------------------------------- the eager layer's arguments

@pytest.fixture
def pointers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CUDA tensors get an address, so eager calls reach the (recording) Communicator."""
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0x1000)


@needs_torch
@pytest.mark.usefixtures("pointers")
def test_eager_calls_reach_the_buffer_entry_points(group: Any) -> None:
    calls = group.communicator.calls
    with FakeTensorMode():
        x = torch.empty(8, 3, device="cuda", dtype=torch.bfloat16)
        group.all_reduce(x, torch.distributed.ReduceOp.AVG, stream=7, algorithm="two_shot")
        y = group.all_reduce_out(x, stream=7)
        part = group.reduce_scatter_out(x, "max", stream=7)
        group.reduce_scatter_tensor(part, x, stream=7)
        both = group.all_gather_out(part, stream=7)
        group.all_gather_into_tensor(both, part, stream=7)
        group.broadcast(torch.empty(3, device="cuda", dtype=torch.bool), 1, stream=7)
        ints = torch.empty(5, device="cuda", dtype=torch.int32)
        pair = torch.empty(2, 3, device="cuda", dtype=torch.bfloat16)
        group.all_reduce_coalesced([x, ints, pair, ints], "sum", stream=7)
    assert (tuple(y.shape), tuple(part.shape), tuple(both.shape)) == ((8, 3), (4, 3), (8, 3))
    p = 0x1000
    assert calls == [
        ("all_reduce_buffers", (p, p, 24, "bfloat16", "avg", 7, "two_shot")),
        ("all_reduce_buffers", (p, p, 24, "bfloat16", "sum", 7, "auto")),
        ("reduce_scatter_buffers", (p, p, 12, "bfloat16", "max", 7)),
        ("reduce_scatter_buffers", (p, p, 12, "bfloat16", "sum", 7)),
        ("all_gather_buffers", (p, p, 12, 2, 7)),
        ("all_gather_buffers", (p, p, 12, 2, 7)),
        ("broadcast_buffers", (p, 3, 1, 1, 7)),
        # grouped by dtype, in order of first appearance
        ("all_reduce_coalesced_buffers", ([p, p], [24, 6], "bfloat16", "sum", 7)),
        ("all_reduce_coalesced_buffers", ([p, p], [5, 5], "int32", "sum", 7)),
    ]


def bad_calls(g: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Refused calls, each with the kind of tensor it gets (made inside FakeTensorMode)."""
    cuda = {"device": "cuda"}
    x = torch.empty(8, 4, **cuda)
    # x.t(): a view, which fake CUDA tensors cannot make on a CPU-only torch
    transposed = torch.empty_strided((4, 8), (1, 4), **cuda)
    return [
        ("not a tensor", lambda: g.all_reduce([1.0, 2.0])),
        ("cpu tensor", lambda: g.all_reduce_out(torch.empty(4))),
        ("another gpu", lambda: g.all_reduce(torch.empty(4, device="cuda:1"))),
        ("non-contiguous", lambda: g.all_reduce(transposed)),
        ("sparse", lambda: g.all_reduce(torch.zeros(4).to_sparse())),
        ("unsupported dtype", lambda: g.all_reduce(torch.empty(4, dtype=torch.bool, **cuda))),
        ("requires grad", lambda: g.all_reduce_out(torch.empty(4, requires_grad=True, **cuda))),
        ("unknown ReduceOp", lambda: g.all_reduce(x, torch.distributed.ReduceOp.BAND)),
        ("indivisible dim 0", lambda: g.reduce_scatter_out(torch.empty(3, 4, **cuda))),
        ("scalar reduce_scatter", lambda: g.reduce_scatter_out(torch.empty((), **cuda))),
        ("output dtype", lambda: g.reduce_scatter_tensor(torch.empty(16, dtype=torch.half,
                                                                     **cuda), x)),
        ("output size", lambda: g.reduce_scatter_tensor(torch.empty(15, **cuda), x)),
        ("gather output size", lambda: g.all_gather_into_tensor(x, x)),
        ("gather output on cpu", lambda: g.all_gather_into_tensor(torch.empty(64), x)),
        ("coalesced: one bad tensor", lambda: g.all_reduce_coalesced([x, transposed])),
    ]


EXPECTED = {
    "not a tensor": (TypeError, "tensor must be a torch.Tensor, got list"),
    "cpu tensor": (ValueError, "input is on cpu, expected this rank's GPU cuda:0: pass "
                               "input.to('cuda:0')"),
    "another gpu": (ValueError, "tensor is on cuda:1, expected this rank's GPU cuda:0"),
    "non-contiguous": (ValueError, "tensor must be contiguous (got shape (4, 8), strides "
                                   "(1, 4)); pass tensor.contiguous(), a copy"),
    "sparse": (TypeError, "tensor has layout torch.sparse_coo; detar collectives take dense"),
    "unsupported dtype": (TypeError, "tensor has dtype torch.bool, which detar cannot reduce; "
                                     "supported: torch.float16, torch.bfloat16"),
    "requires grad": (ValueError, "input requires grad, but detar collectives are not "
                                  "differentiable"),
    "unknown ReduceOp": (ValueError, "op RedOpType.BAND is not supported"),
    "indivisible dim 0": (ValueError, "splits dim 0 of input among 2 ranks, but input has "
                                      "shape (3, 4)"),
    "scalar reduce_scatter": (ValueError, "input has shape ()"),
    "output dtype": (TypeError, "output has dtype torch.float16, expected input's torch.float32"),
    "output size": (ValueError, "output has 15 elements, expected 16 (input's 32 divided by "
                                "the world size 2)"),
    "gather output size": (ValueError, "output has 32 elements, expected 64 (input's 32 times "
                                       "the world size 2)"),
    "gather output on cpu": (ValueError, "output is on cpu"),
    "coalesced: one bad tensor": (ValueError, "tensors[1] must be contiguous"),
}


@needs_torch
@pytest.mark.usefixtures("pointers")
def test_bad_arguments_are_refused_alike_on_every_rank_before_anything_is_enqueued() -> None:
    # Two ranks on one GPU (as with DETAR_SHARE_GPUS=1): the refusals must not differ at all.
    ranks = [dct.DetarGroup(RecordingComm(2, rank, device=0)) for rank in (0, 1)]
    seen: list[dict[str, tuple[type, str]]] = []
    for g in ranks:
        with FakeTensorMode():
            calls = bad_calls(g)
            refused = {}
            for label, call in calls:
                with pytest.raises(Exception) as info:
                    call()
                refused[label] = (type(info.value), str(info.value))
        seen.append(refused)
        assert g.communicator.calls == []
        g.close()
    assert seen[0] == seen[1]
    for label, (kind, needle) in EXPECTED.items():
        got_kind, text = seen[0][label]
        assert got_kind is kind and needle in text, (label, got_kind, text)
    assert set(seen[0]) == set(EXPECTED)


@needs_torch
@pytest.mark.usefixtures("pointers")
def test_a_tensor_that_requires_grad_is_accepted_with_grad_mode_off(group: Any) -> None:
    with FakeTensorMode(), torch.no_grad():
        group.all_reduce(torch.empty(4, device="cuda", requires_grad=True), stream=1)
    assert [c[0] for c in group.communicator.calls] == ["all_reduce_buffers"]


@needs_torch
def test_close_closes_the_communicator_and_the_handle() -> None:
    comm = RecordingComm()
    with dct.DetarGroup(comm) as g:
        assert (g.rank, g.world_size, g.device) == (0, 2, torch.device("cuda", 0))
        assert repr(g) == "DetarGroup(rank=0, world_size=2, device=cuda:0)"
    assert comm.closed


@needs_torch
def test_from_process_group_needs_torch_distributed() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="needs an initialized torch.distributed"):
        dct.from_process_group()


# ---------------------------------------------------------------- over a real gloo group

@pytest.fixture(scope="module")
def gloo_reports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    store = tmp_path_factory.mktemp("gloo") / "store"
    # generous bounds: 4 fresh interpreters importing torch on a loaded 2-core machine
    reports, exitcodes, wall = run_processes(gloo_rank, 4, (4, str(store)),
                                             report_within_s=240.0, exit_within_s=60.0)
    print(f"4 gloo ranks: {wall:.1f} s")
    for rank in range(4):
        assert rank in reports, (reports, exitcodes)
        assert reports[rank][0] == "ok", reports[rank][1]
    assert exitcodes == [0, 0, 0, 0]
    return {rank: report[1] for rank, report in reports.items()}


@needs_torch
def test_exchange_over_the_default_group(gloo_reports: dict) -> None:
    want = [("rank", r, b"\x00" * (1000 * r), [None, True, -r], "é" * r) for r in range(4)]
    for rank, out in gloo_reports.items():
        assert out["rank, world"] == (rank, 4)
        assert out["world exchange"] == want
        assert out["empty values"] == [(), (), (), ()]


@needs_torch
def test_exchange_over_subgroups(gloo_reports: dict) -> None:
    for rank, out in gloo_reports.items():
        first = rank // 2 * 2
        assert out["subgroup rank, world"] == (rank % 2, 2)
        assert out["subgroup exchange"] == [first * 10, first * 10 + 10]
    assert gloo_reports[0]["group of one"] == [(1, [2])]


@needs_torch
def test_what_the_adapter_and_from_process_group_refuse(gloo_reports: dict) -> None:
    for rank, out in gloo_reports.items():
        kind, text = out["garbage"]
        assert kind == "RendezvousError" and text.startswith("rank 1 sent a message"), text
        assert out["closed"] == ("RendezvousError", f"rank {rank % 2}: the rendezvous is closed")
        kind, text = out["not a member"]
        assert kind == "ValueError" and f"(global rank {rank}) is not a member" in text, text
        kind, text = out["ddp size mismatch"]
        assert kind == "ValueError" and text.startswith(
            "the model's process group has 4 ranks but the DetarGroup has 2"), text
        assert out["ddp hook registered"] == [("DDPHookState", "sum", "ddp_comm_hook")]


def test_coalesced_tensors_reach_the_communicator_in_order_per_dtype() -> None:
    """The one-dtype path (comprehensions) and the mixed path (one call per dtype) hand the
    communicator every tensor's address and count, in order. CPU tensors stand in for the GPU's
    (a group whose device index is -1, the index torch gives CPU tensors)."""
    comm = RecordingComm(world_size=2)
    g = dct.DetarGroup(comm)
    try:
        g._index = -1
        one = [torch.zeros(n, dtype=torch.bfloat16) for n in (3, 256, 1)]
        g.all_reduce_coalesced(one, "avg", stream=7)
        mixed = [torch.zeros(5, dtype=torch.float32), torch.zeros(2, dtype=torch.float16),
                 torch.zeros(9, dtype=torch.float32)]
        g.all_reduce_coalesced(mixed, stream=7)
        g.all_reduce_coalesced([], stream=7)
    finally:
        g.close()
    assert comm.calls == [
        ("all_reduce_coalesced_buffers",
         ([t.data_ptr() for t in one], [3, 256, 1], "bfloat16", "avg", 7)),
        ("all_reduce_coalesced_buffers",
         ([mixed[0].data_ptr(), mixed[2].data_ptr()], [5, 9], "float32", "sum", 7)),
        ("all_reduce_coalesced_buffers", ([mixed[1].data_ptr()], [2], "float16", "sum", 7)),
    ]
