"""The host side of the kernel protocol: signatures, struct layouts and failure reports (CPU)."""
from __future__ import annotations

import ctypes
import re
from importlib import resources

import pytest

from detar_cupy import _protocol
from detar_cupy.dtypes import DTYPES, OP_CODES
from detar_cupy.errors import MismatchError, PeerTimeoutError


def _sig(kind: str, dtype: str = "float16", op: str = "sum", count: int = 1000, aux: int = 0) -> int:
    return _protocol.call_signature(kind, DTYPES[dtype].code, OP_CODES[op], count, aux)


def test_layouts_match_the_kernel_source() -> None:
    src = resources.files("detar_cupy.hip_src").joinpath("collectives.hip").read_text()
    m = re.search(r"static_assert\(sizeof\(Report\) == (\d+) && sizeof\(Ctx\) == "
                  r"5 \* MAX_N \* 8 \+ (\d+) \* 8", src)
    assert m, "collectives.hip no longer asserts the layouts"
    assert ctypes.sizeof(_protocol.Report) == int(m.group(1))
    assert ctypes.sizeof(_protocol.Ctx) == 5 * 8 * 8 + int(m.group(2)) * 8


@pytest.mark.parametrize("kind", _protocol.KINDS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_signature_carries_kind_dtype_op_exactly(kind: str, dtype: str) -> None:
    for op in DTYPES[dtype].ops:
        d = _protocol.describe_launch(_sig(kind, dtype, op), 1000, 0)
        if kind in ("all_gather", "broadcast"):
            assert d["collective"] == kind
        else:
            assert (d["dtype"], d["op"]) == (dtype, op)
            assert d["algorithm"] == (kind if kind != "reduce_scatter" else "-")


def test_signature_changes_with_count_and_aux() -> None:
    sigs = {_sig("one_shot", count=c) for c in range(2000)}
    assert len(sigs) == 2000
    assert _sig("reduce_scatter", aux=5) != _sig("reduce_scatter", aux=6)


def _report(code: int, peer: int, where: int, sig: int, peer_sig: int = 0, count: int = 1000,
            peer_count: int = 0, aux: int = 0, peer_aux: int = 0) -> _protocol.Report:
    r = _protocol.Report()
    r.word, r.epoch, r.sig, r.peer_sig = code | peer << 8 | where << 16, 17, sig, peer_sig
    r.count, r.aux, r.peer_count, r.peer_aux = count, aux, peer_count, peer_aux
    return r


@pytest.mark.parametrize("theirs,differs", [
    (dict(count=1001), ("count",)),
    (dict(dtype="bfloat16"), ("dtype",)),
    (dict(op="max"), ("op",)),
    (dict(kind="two_shot"), ("algorithm",)),
    (dict(kind="reduce_scatter", aux=4000), ("collective", "algorithm", "aux")),
])
def test_mismatch_report_names_what_differs(theirs: dict, differs: tuple) -> None:
    kind = theirs.pop("kind", "one_shot")
    peer_count, peer_aux = theirs.get("count", 1000), theirs.get("aux", 0)
    r = _report(_protocol.ERR_MISMATCH, 3, 1, _sig("one_shot"), _sig(kind, **theirs),
                peer_count=peer_count, peer_aux=peer_aux)
    err = _protocol.decode_error(r, 0, 300.0)
    assert isinstance(err, MismatchError)
    assert err.peer == 3 and err.differs == differs
    assert err.mine["count"] == 1000 and err.theirs["count"] == peer_count
    assert "launch #17" in str(err) and all(f in str(err) for f in differs)


def test_mismatch_without_the_peers_descriptor_still_names_count() -> None:
    unknown = (1 << 64) - 1
    r = _report(_protocol.ERR_MISMATCH, 1, 3, _sig("ll"), _sig("ll", count=7),
                peer_count=unknown, peer_aux=unknown)
    err = _protocol.decode_error(r, 0, 300.0)
    assert err.differs == ("count",) and err.theirs["count"] is None


def test_timeout_report_names_the_peer_and_the_launch() -> None:
    r = _report(_protocol.ERR_TIMEOUT, 2, 2, _sig("two_shot", "float32", count=65536), count=65536)
    err = _protocol.decode_error(r, 1, 2.5)
    assert isinstance(err, PeerTimeoutError) and err.peer == 2
    text = str(err)
    assert "peer rank 2" in text and "mid barrier" in text and "2.5 s" in text
    assert "two_shot" in text and "count=65536" in text
