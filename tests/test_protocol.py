"""The host side of the kernel protocol: signatures, struct layouts and failure reports (CPU)."""
from __future__ import annotations

import ctypes
import pytest

from detar_cupy import _protocol
from detar_cupy.dtypes import DTYPES, OP_CODES
from detar_cupy.errors import MismatchError, PeerTimeoutError


def _sig(kind: str, dtype: str = "float16", op: str = "sum", count: int = 1000, aux: int = 0,
         chunk: int = 0, length: int | None = None) -> int:
    return _protocol.call_signature(kind, DTYPES[dtype].code, OP_CODES[op], count, aux, chunk,
                                    length)


def test_every_shared_field_is_pinned_in_the_rendered_source() -> None:
    """The renderer asserts the offset of every field and the size of every struct the kernels
    share with the host (the compile matrix compiles it; a drifted layout fails there)."""
    from detar_cupy import _kernels

    src = _kernels.render([_kernels.ModuleKey(None, 1)])
    for cname, cls in (("Ctx", _protocol.Ctx), ("Report", _protocol.Report),
                       ("State", _protocol.State)):
        assert f"struct {cname} {{" in src
        for name, *_ in cls._fields_:
            off = getattr(cls, name).offset
            assert f"__builtin_offsetof({cname}, {name}) == {off}" in src, (cname, name)
        assert f"sizeof({cname}) == {ctypes.sizeof(cls)}" in src
    for name, value in _protocol.SHARED_CONSTANTS.items():
        assert f"#define {name} {value}\n" in src
        assert src.count(f"#define {name} ") == 1, f"{name} is defined twice"


def test_state_image_starts_every_block_at_the_first_epoch() -> None:
    for first in (1, 2**31 - 2, 2**32 - 2, _protocol.MAX_FIRST_EPOCH):
        image = _protocol.State.from_buffer_copy(_protocol.state_image(first))
        assert image.word == 0 and set(image.epoch) == {first - 1}
    for bad in (0, _protocol.MAX_FIRST_EPOCH + 1):
        with pytest.raises(ValueError, match="first epoch"):
            _protocol.state_image(bad)


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


def test_signature_covers_the_whole_call_not_only_the_chunk() -> None:
    """Two calls whose counts differ but whose first chunks have the same length must differ in
    every chunk's signature (else the shorter call pairs with the longer one's next chunk)."""
    first_of_16mi = _sig("one_shot", count=16 << 20, chunk=0, length=4 << 20)
    first_of_24mi = _sig("one_shot", count=24 << 20, chunk=0, length=4 << 20)
    assert first_of_16mi != first_of_24mi
    assert _sig("one_shot", count=1 << 24, chunk=1, length=1 << 20) != _sig(
        "one_shot", count=1 << 24, chunk=2, length=1 << 20)


def _report(code: int, peer: int, where: int, sig: int, peer_sig: int = 0, count: int = 1000,
            peer_count: int = 0, aux: int = 0, peer_aux: int = 0, chunk: int = 0,
            peer_chunk: int = 0) -> _protocol.Report:
    r = _protocol.Report()
    r.word, r.epoch, r.sig, r.peer_sig = code | peer << 8 | where << 16, 17, sig, peer_sig
    r.count, r.aux, r.peer_count, r.peer_aux = count, aux, peer_count, peer_aux
    r.chunk, r.peer_chunk = chunk, peer_chunk
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
                peer_count=unknown, peer_aux=unknown, peer_chunk=unknown)
    err = _protocol.decode_error(r, 0, 300.0)
    assert err.differs == ("count",) and err.theirs["count"] is None


def test_mismatch_report_of_a_chunked_call_names_the_counts() -> None:
    r = _report(_protocol.ERR_MISMATCH, 1, 1, _sig("two_shot", count=16 << 20, length=4 << 20),
                _sig("two_shot", count=24 << 20, length=4 << 20), count=16 << 20,
                peer_count=24 << 20)
    err = _protocol.decode_error(r, 0, 10.0)
    assert err.differs == ("count",)
    assert f"count={16 << 20}" in str(err) and f"count={24 << 20}" in str(err)


def test_timeout_report_names_the_peer_and_the_launch() -> None:
    r = _report(_protocol.ERR_TIMEOUT, 2, 2, _sig("two_shot", "float32", count=65536), count=65536)
    err = _protocol.decode_error(r, 1, 2.5)
    assert isinstance(err, PeerTimeoutError) and err.peer == 2
    text = str(err)
    assert "peer rank 2" in text and "mid barrier" in text and "2.5 s" in text
    assert "two_shot" in text and "count=65536" in text


def test_the_largest_first_epoch_travels_in_the_settings_exchange(monkeypatch) -> None:
    """Every rank sends its settings through the rendezvous (signed 64-bit ints on the wire):
    the largest first epoch the setting accepts must fit, the next one is refused by name."""
    from detar_cupy import _wire
    from detar_cupy._settings import Settings

    monkeypatch.setenv("DETAR_FIRST_EPOCH", str(_protocol.MAX_FIRST_EPOCH))
    shared = Settings.from_env().shared()
    assert _wire.decode(_wire.encode(shared), "test") == shared
    monkeypatch.setenv("DETAR_FIRST_EPOCH", str(_protocol.MAX_FIRST_EPOCH + 1))
    with pytest.raises(ValueError, match="DETAR_FIRST_EPOCH"):
        Settings.from_env()
