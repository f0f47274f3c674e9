"""The benchmark's bookkeeping (CPU): merging per-rank rows, tables, plots, progress lines and
the measurement plan, on synthetic rows including torch symmetric-memory ones."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from detar_cupy import benchmark


def _row(impl: str, nbytes: int, eager: float, graph: float | None = None, wrong: int = 0,
         dtype: str = "bfloat16") -> dict:
    row = {"dtype": dtype, "bytes": nbytes, "count": nbytes // 2, "impl": impl,
           "eager_us": eager, "wrong": wrong}
    if graph is not None:
        row["graph_us"] = graph
    return row


def _env(gpu: str) -> dict:
    return {"env": {"world_size": 2, "gpu": gpu, "cupy": "14.2.0", "nccl": 22809,
                    "torch": "2.11.0", "driver": "580.159.04"}}


def _per_rank() -> list[list[dict]]:
    note = {"torch_symm": "torch_symm_two_shot: graph capture failed, eager only: RuntimeError"}
    rank0 = [_row("one_shot", 1024, 6.0, 5.0), _row("nccl", 1024, 9.0, 6.0, wrong=0),
             _row("torch_symm_one_shot", 1024, 7.0, 5.5, wrong=3),
             _row("torch_symm_two_shot", 1024, 8.0, None, wrong=3),
             {"host": {"all_reduce_us": 7.0, "bare_launch_us": 5.0}}, _env("H100"), note]
    # rank 1: slower in places, rows in another order (matched by key, not position)
    rank1 = [_row("nccl", 1024, 9.5, 5.0), _row("one_shot", 1024, 6.5, 4.0, wrong=0),
             _row("torch_symm_two_shot", 1024, 8.5, None, wrong=5),
             _row("torch_symm_one_shot", 1024, 6.0, 6.0, wrong=3),
             {"host": {"all_reduce_us": 7.5, "bare_launch_us": 4.5}}, _env("H100 #2"), note]
    return [rank0, rank1]


def test_merge_takes_the_slowest_rank_and_ratios_to_nccl() -> None:
    rows, host = benchmark.merge(_per_rank(), 2)
    by_impl = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == ["one_shot", "nccl", "torch_symm_one_shot",
                                         "torch_symm_two_shot"]
    assert by_impl["one_shot"]["eager_us"] == 6.5 and by_impl["one_shot"]["graph_us"] == 5.0
    assert by_impl["torch_symm_one_shot"]["graph_us"] == 6.0
    assert by_impl["torch_symm_two_shot"]["wrong"] == 5
    assert "graph_us" not in by_impl["torch_symm_two_shot"]
    assert by_impl["torch_symm_one_shot"]["speedup_eager"] == pytest.approx(9.5 / 7.0)
    assert by_impl["torch_symm_one_shot"]["speedup_graph"] == pytest.approx(6.0 / 6.0)
    assert "speedup_graph" not in by_impl["torch_symm_two_shot"]
    assert by_impl["nccl"]["busbw_GBs"] == pytest.approx(1024 / 9.5 / 1e3)  # 2(N-1)/N = 1
    assert host == {"all_reduce_us": 7.5, "bare_launch_us": 5.0}
    json.dumps(rows)


def test_context_keeps_environment_and_notes_once() -> None:
    ctx = benchmark.context(_per_rank())
    assert ctx["env"]["gpu"] == "H100" and ctx["env"]["gpus"] == ["H100", "H100 #2"]
    assert ctx["env"]["torch"] == "2.11.0"
    assert ctx["notes"] == [{"torch_symm": "torch_symm_two_shot: graph capture failed, eager "
                                           "only: RuntimeError"}]
    json.dumps(ctx)


def test_table_lists_torch_rows_with_informational_wrong_counts() -> None:
    rows, _ = benchmark.merge(_per_rank(), 2)
    text = benchmark.table(rows)
    lines = {line.split()[3]: line for line in text.splitlines()[2:]}  # size is "1 KiB"
    assert set(lines) == {"one_shot", "nccl", "torch_symm_one_shot", "torch_symm_two_shot"}
    assert "(5)" in lines["torch_symm_two_shot"] and "(0)" in lines["nccl"]
    assert " 0 " in lines["one_shot"] and "(" not in lines["one_shot"]
    assert lines["torch_symm_two_shot"].split()[5] == "-"  # no graph time
    assert lines["torch_symm_one_shot"].split()[5] == "6.0"
    assert "1 KiB" in lines["nccl"]


def test_plot_draws_rows_with_and_without_graph_times(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    rows, _ = benchmark.merge(_per_rank(), 2)
    path = tmp_path / "bench.png"
    assert benchmark.plot(rows, 2, str(path))
    assert path.stat().st_size > 0


def test_progress_line_and_sizes() -> None:
    assert (benchmark.progress_line(12, 60, "float16", 64 << 10, "one_shot", 6.14, 5.2)
            == "[12/60] float16 64 KiB one_shot eager 6.1 us graph 5.2 us")
    assert (benchmark.progress_line(1, 2, "bfloat16", 256 << 20, "torch_symm_two_shot", 1700.0,
                                    None) == "[1/2] bfloat16 256 MiB torch_symm_two_shot eager "
                                             "1700.0 us")
    assert [benchmark.size_label(n) for n in (512, 1536, 1 << 10, 3 << 20, 1 << 30)] == [
        "512 B", "1.5 KiB", "1 KiB", "3 MiB", "1 GiB"]


def test_measurement_plan_keeps_order_and_filters() -> None:
    def runs(name: str, nbytes: int, impl: str) -> bool:
        return not (impl == "ll" and nbytes > 4096) and not (impl.startswith("torch")
                                                              and name == "float16")

    plan = benchmark.measurement_plan((1024, 1 << 20), ("float16", "bfloat16"),
                                      benchmark.IMPLS, runs)
    assert [(n, b) for n, b, _ in plan] == [("float16", 1024), ("float16", 1 << 20),
                                            ("bfloat16", 1024), ("bfloat16", 1 << 20)]
    transports = ["nccl_transport", "hier_transport"]
    assert plan[0][2] == ["auto", "ll", "one_shot", "two_shot", *transports, "nccl"]
    assert plan[3][2] == ["auto", "one_shot", "two_shot", *transports, "nccl",
                          "torch_symm_one_shot", "torch_symm_two_shot"]
    assert sum(len(p[2]) for p in plan) == 7 + 6 + 9 + 8


def test_wrong_elements_counts_elements_not_bytes() -> None:
    want = np.arange(6, dtype=np.float32)
    got = want.copy()
    got.view(np.uint8)[[1, 2, 9]] ^= 1  # two bytes of element 0, one of element 2
    assert benchmark.wrong_elements(got, want) == 2
    assert benchmark.wrong_elements(want.view(np.uint32), want) == 0  # raw bits compare alike
    assert benchmark.wrong_elements(np.empty(0, np.uint16), np.empty(0, np.float16)) == 0


def test_command_output_is_text_or_none() -> None:
    assert benchmark.command_output([sys.executable, "-c", "print(' topo ')"]) == "topo"
    coloured = "print('\\x1b[4mGPU0\\x1b[0m NV18')"
    assert benchmark.command_output([sys.executable, "-c", coloured]) == "GPU0 NV18"
    assert benchmark.command_output([sys.executable, "-c", "import sys; sys.exit(3)"]) is None
    assert benchmark.command_output(["detar-no-such-command"]) is None
    assert benchmark.command_output([sys.executable, "-c", "import time; time.sleep(5)"],
                                    timeout_s=0.2) is None
