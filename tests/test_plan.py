"""Launch plans (CPU): chunks cover every element once, fit the staging buffers the kernels
address, and carry signatures that tell different calls apart."""
from __future__ import annotations

import pytest

from detar_cupy import _plan
from detar_cupy.dtypes import DTYPES


def geom(n: int, stage: int = 64 << 10, ll: int = 8 << 10) -> _plan.Geometry:
    return _plan.Geometry(n, stage, ll, 128)


def footprint_packs(alg: str, n: int, count: int, k: int) -> int:
    """Staging packs one launch uses, mirroring collectives.hip's slot layout."""
    if alg == "one_shot":
        return n * -(-count // k)
    slice_ = -(-(-(-count // n)) // k) * k
    return 2 * n * (slice_ // k)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("alg", ["ll", "one_shot", "two_shot", "auto"])
@pytest.mark.parametrize("dtype", ["int8", "float16", "float32", "complex128"])
@pytest.mark.parametrize("count", [0, 1, 17, 4096, 100_003, 1_000_000])
def test_all_reduce_chunks_cover_and_fit(n, alg, dtype, count):
    g = geom(n)
    size = DTYPES[dtype].itemsize
    k = 16 // size
    launches = _plan.all_reduce(g, dtype, "sum", count, alg)
    at = 0
    for launch in launches:
        assert launch.in_offset == launch.out_offset == at * size
        assert 1 <= launch.grid <= g.max_grid
        kind = launch.kernel.rsplit("_n", 1)[1].split("_", 1)[1]
        if kind == "ll":
            assert launch.count * size <= g.ll_bytes
        else:
            assert footprint_packs(kind, n, launch.count, k) <= g.stage_half_bytes // 16
        at += launch.count
    assert at == count
    assert (count == 0) == (launches[0].count == 0)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_collective_chunks_cover(n):
    g = geom(n)
    for count in (0, 5, 1001, 70_000):
        rs = _plan.reduce_scatter(g, "float32", "max", count)
        assert sum(l.count for l in rs) == count and all(l.aux == count for l in rs)
        assert all(n * -(-l.count // 4) <= g.stage_half_bytes // 16 for l in rs)
        for kind, slots in (("all_gather", n), ("broadcast", 1)):
            ls = _plan.moving(g, kind, 2, count, root=n - 1)
            assert sum(l.count for l in ls) == count
            assert all(slots * -(-l.count // 8) <= g.stage_half_bytes // 16 for l in ls)
            assert all(l.aux == (count if kind == "all_gather" else n - 1) for l in ls)


def test_signatures_tell_calls_apart():
    g = geom(4)
    sigs = {_plan.all_reduce(g, d, op, c, a)[0].sig
            for d in ("float16", "bfloat16") for op in ("sum", "max")
            for c in (1000, 1001) for a in ("ll", "one_shot", "two_shot")}
    assert len(sigs) == 2 * 2 * 2 * 3


def test_auto_choice_is_a_function_of_size_and_world_only():
    for n in range(1, 9):
        prev = 0
        for nbytes in (1 << s for s in range(10, 30)):
            alg = _plan.choose_algorithm(nbytes, n)
            assert alg in ("ll", "one_shot", "two_shot")
            rank = ("ll", "one_shot", "two_shot").index(alg)
            assert rank >= prev  # never goes back to a small-message algorithm as size grows
            prev = rank


def test_unknown_algorithm_and_moving_size_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        _plan.all_reduce(geom(2), "float32", "sum", 10, "ring")
    with pytest.raises(TypeError, match="element size"):
        _plan.moving(geom(2), "all_gather", 3, 10)


def _launch_signatures(g, kind: str, count: int, alg: str = "auto") -> list[int]:
    if kind == "all_reduce":
        return [l.sig for l in _plan.all_reduce(g, "float16", "sum", count, alg)]
    if kind == "reduce_scatter":
        return [l.sig for l in _plan.reduce_scatter(g, "float16", "sum", count)]
    return [l.sig for l in _plan.moving(g, kind, 2, count, 1)]


@pytest.mark.parametrize("kind,alg", [("all_reduce", "one_shot"), ("all_reduce", "two_shot"),
                                      ("all_reduce", "ll"), ("all_reduce", "auto"),
                                      ("reduce_scatter", "-"), ("all_gather", "-"),
                                      ("broadcast", "-")])
def test_chunked_calls_of_different_counts_differ_in_every_launch(kind, alg):
    """Two ranks whose counts differ but both span several chunks: no launch of one may carry
    the signature of a launch of the other, or the shorter call would pair with the longer
    one's next chunk (wrong bits, no error). The default staging, world 2, fp16: 16 Mi vs 24 Mi
    elements, then 8 Mi."""
    g = _plan.Geometry(2, 32 << 20, 256 << 10, 128)
    scale = 2 if kind == "broadcast" else 1  # one broadcast launch carries 16 Mi elements
    a = _launch_signatures(g, kind, scale * 16 << 20, alg)
    b = _launch_signatures(g, kind, scale * 24 << 20, alg)
    c = _launch_signatures(g, kind, scale * 8 << 20, alg)
    assert len(a) > 1 and len(b) > 1
    assert not set(a) & set(b) and not set(b) & set(c)
    # every launch of one call is distinct too (a rank that skipped one chunk is caught)
    assert len(set(b)) == len(b)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_smallest_settings_plan_every_algorithm(n):
    """The smallest staging and LL areas the settings accept still hold one pack per slot at the
    largest world size: every plan makes progress (no zero-element chunks)."""
    from detar_cupy import _settings

    g = _plan.Geometry(n, 32 * _kernels_max_world(), 16, 1)
    assert g.stage_half_bytes // 16 >= 2 * n
    for alg in ("ll", "one_shot", "two_shot"):
        for dtype in ("int8", "float16", "complex128"):
            launches = _plan.all_reduce(g, dtype, "sum", 1000, alg)
            assert sum(l.count for l in launches) == 1000 and all(l.count for l in launches)
    assert _settings.Settings.ENV["staging_bytes"] == "DETAR_STAGING_BYTES"


def _kernels_max_world() -> int:
    from detar_cupy._protocol import MAX_WORLD

    return MAX_WORLD
