"""detar_cupy.torch on GPUs: every dtype, op and form on tensors bit-exact against the reference,
torch's current stream, from_process_group (default group and the TP/DP subgroups of a 2x2 layout,
over NCCL), custom ops under torch.compile(fullgraph=True) and opcheck, torch.cuda.graph replay, the
DDP hook across runs and bucket sizes, bad inputs refused alike on every rank, the example and the
README's snippet, and the host time of a call. Skips without torch, a GPU torch sees, or enough GPUs (DETAR_SHARE_GPUS=1
runs the multi-rank tests with ranks sharing GPUs; NCCL then needs a NCCL_HOSTID per rank, which
the ranks set). NCCL is used only where torch.distributed needs it, with few calls."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpu_cases import TEST_ENV
from gpu_support import cached_spawn, need, run_processes, spawn_with_env

torch = pytest.importorskip("torch")
import gpu_torch  # noqa: E402  (needs torch)

pytestmark = pytest.mark.gpu
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2").split(","))
SEED = 7000
ROOT = Path(__file__).resolve().parents[1]


def need_torch(world: int) -> None:
    need(world)
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU (a CPU-only torch?)")


def torch_ranks(target: Any, world: int, tmp_path: Path, within_s: float = 300.0) -> dict:
    """Reports of ``world`` raw ranks of a torch.distributed group (a file store in tmp_path)."""
    reports, exitcodes, wall = run_processes(target, world, (world, str(tmp_path / "store")),
                                             report_within_s=within_s, exit_within_s=60.0)
    print(f"{world} torch.distributed ranks: {wall:.1f} s")
    for rank in range(world):
        assert rank in reports, (rank, reports, exitcodes)
        assert reports[rank][0] == "ok", f"rank {rank}:\n{reports[rank][1]}"
    assert exitcodes == [0] * world, exitcodes
    return {rank: report[1] for rank, report in reports.items()}


@pytest.mark.parametrize("world,case_id", [(w, c.id) for w in WORLDS
                                           for c in gpu_torch.cases(w, SEED)])
def test_tensor_case(world: int, case_id: str) -> None:
    need_torch(world)
    per_rank = cached_spawn(("torch cases", world), gpu_torch.run_tensor_cases, world, TEST_ENV,
                            args=(SEED,), timeout=600)
    for rank, results in enumerate(per_rank):
        ok, detail, _ = results[case_id]
        assert ok, f"rank {rank}: {detail}"
    if not case_id.startswith("reduce_scatter"):  # each rank holds a different part there
        assert len({results[case_id][2] for results in per_rank}) == 1, "ranks disagree"


def test_input_written_on_a_side_stream_is_read_after_it_is_written() -> None:
    need_torch(2)
    per_rank = spawn_with_env(gpu_torch.side_stream, 2, TEST_ENV, args=(SEED,), timeout=300)
    for rank, res in enumerate(per_rank):
        print(f"rank {rank}: {res}")
        assert res["wrong trials"] == [], res
    assert len({res["digest"] for res in per_rank}) == 1


def test_from_process_group_default_and_tp_dp_subgroups_over_nccl(tmp_path: Path) -> None:
    need_torch(4)
    reports = torch_ranks(gpu_torch.process_groups_rank, 4, tmp_path)
    for rank, checks in reports.items():
        for name, value in checks.items():
            ok = value[0] if isinstance(value, tuple) else value
            assert ok is True, (rank, name, value)
        assert len(checks) == 9


def test_custom_ops_under_torch_compile_fullgraph() -> None:
    need_torch(2)
    per_rank = spawn_with_env(gpu_torch.compiled_block, 2, TEST_ENV, args=(SEED,), timeout=600)
    for rank, res in enumerate(per_rank):
        assert res["graphs"] == 1 and res["missing ops"] == [], (rank, res)
        assert res["problems"] == [], (rank, res["problems"])
    assert len({res["digest"] for res in per_rank}) == 1


def test_opcheck_of_every_op() -> None:
    need_torch(1)
    (results,) = spawn_with_env(gpu_torch.opcheck_rank, 1, TEST_ENV, timeout=600)
    assert results == {name: "ok" for name in results} and len(results) == 8, results


def test_cuda_graph_replays_with_fresh_inputs_are_exact() -> None:
    need_torch(2)
    per_rank = spawn_with_env(gpu_torch.graph_replay, 2, TEST_ENV, args=(SEED,), timeout=600)
    for rank, res in enumerate(per_rank):
        assert res["failed"] == 0, (rank, res)
        assert res["replays"] == 100


def test_ddp_gradients_are_identical_across_runs_and_bucket_sizes(tmp_path: Path) -> None:
    need_torch(2)
    reports = torch_ranks(gpu_torch.ddp_rank, 2, tmp_path)
    for rank, runs in reports.items():
        print(f"rank {rank}: " + "; ".join(f"{k}: {v['buckets in the last step']} buckets"
                                           for k, v in runs.items()))
        assert len(runs) == 6
        assert all(run["first step is the reference mean"] for run in runs.values()), runs
        assert len({(run["grads"], run["params"]) for run in runs.values()}) == 1, runs
        buckets = [runs[f"cap {cap} MB run 0"]["buckets in the last step"]
                   for cap in gpu_torch.CAPS_MB]
        assert buckets == sorted(set(buckets)), f"smaller caps, more buckets: {buckets}"
    assert reports[0] == reports[1]


def test_bad_inputs_are_refused_alike_on_every_rank() -> None:
    need_torch(2)
    per_rank = spawn_with_env(gpu_torch.bad_inputs, 2, TEST_ENV, timeout=300)
    assert per_rank[0] == per_rank[1], "ranks refused differently"
    expected = {
        "cpu tensor": ("ValueError", "tensor is on cpu, expected this rank's GPU cuda:N"),
        "non-contiguous": ("ValueError", "tensor must be contiguous (got shape (4, 8)"),
        "strided slice": ("ValueError", "input must be contiguous"),
        "unsupported dtype": ("TypeError", "torch.bool, which detar cannot reduce"),
        "requires grad": ("ValueError", "input requires grad, but detar collectives are not "
                                        "differentiable"),
        "in place on a leaf that requires grad": ("ValueError", "tensor requires grad"),
        "unknown op": ("ValueError", "unknown op 'median'"),
        "avg of ints": ("TypeError", "op 'avg' is not defined for dtype 'int32'"),
        "unknown ReduceOp": ("ValueError", "op RedOpType.BAND is not supported"),
        "unknown algorithm": ("ValueError", "unknown algorithm 'ring'"),
        "indivisible dim 0": ("ValueError", "splits dim 0 of input among 2 ranks"),
        "output size": ("ValueError", "output has 3 elements, expected 16"),
        "output dtype": ("TypeError", "output has dtype torch.float16, expected input's "
                                      "torch.float32"),
        "broadcast root": ("ValueError", "root 2 is not a rank"),
        "not a tensor": ("TypeError", "tensor must be a torch.Tensor, got ndarray"),
        "another GPU": ("ValueError", "tensor is on cuda:N, expected this rank's GPU cuda:N"),
        "misaligned view and overlapping output work": ("ok", ""),
    }
    for label, kind, text in per_rank[0]:
        want_kind, needle = expected[label]
        assert kind == want_kind and needle in text, (label, kind, text)
    assert len(per_rank[0]) == len(expected) - (torch.cuda.device_count() < 2)


def run_example(ranks: int) -> tuple[str, str]:
    """(output, digest line) of examples/tp_mlp.py with ``ranks`` ranks."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tp_mlp.py"), "--ranks",
                           str(ranks)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    assert re.search(r"^detar_cupy: +0 of 128 cases change a row's bits$", done.stdout,
                     re.MULTILINE), done.stdout
    digest = re.search(r"detar_cupy output digest: (\w+)", done.stdout)
    assert digest, done.stdout
    return done.stdout, digest.group(1)


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_example_runs_and_is_batch_invariant(ranks: int) -> None:
    need_torch(ranks)
    _, first = run_example(ranks)
    if ranks == 2:  # and identical across runs
        assert run_example(ranks)[1] == first


def test_the_readme_example_runs_under_torchrun(tmp_path: Path) -> None:
    need_torch(2)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## With PyTorch"):]
    script = tmp_path / "tp.py"
    start = section.index("```python\n") + len("```python\n")
    script.write_text(section[start:section.index("\n```", start)])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line.split() for line in done.stdout.splitlines() if line[:2] in ("0 ", "1 "))
    assert [line[0] for line in lines] == ["0", "1"], done.stdout
    assert lines[0][1:] == lines[1][1:], f"ranks disagree: {lines}"


def test_a_tensor_call_is_not_re_imported() -> None:
    """A regression guard, not a speed target (those live in bench/): a tensor call that
    re-imported the tensor into CuPy cost 3.3 times a CuPy call; the direct path costs what the
    CuPy path does plus torch's attribute reads (5.63 against 5.04 us on an H200)."""
    need_torch(1)
    (times,) = spawn_with_env(gpu_torch.host_time, 1, {}, timeout=600)
    for label, us in times.items():
        print(f"{us:8.2f} us  {label}")
    tensor = times["tensor in place (DetarGroup.all_reduce)"]
    cupy = times["CuPy array in place (Communicator.all_reduce)"]
    assert tensor <= 1.5 * cupy, f"tensor call {tensor:.2f} us, CuPy call {cupy:.2f} us"
