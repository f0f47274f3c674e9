"""CPU tests of detar_cupy._wire, the rendezvous's wire format: round trips, and every way a
message can be malformed."""
from __future__ import annotations

import enum
import random
import struct
from typing import Any

import numpy as np
import pytest

from detar_cupy import _wire
from detar_cupy.errors import RendezvousError


def nested(depth: int) -> Any:
    value: Any = "core"
    for level in range(depth):
        value = (value,) if level % 2 else [value]
    return value


# What the library exchanges: settings, IPC handles, an NCCL unique id (CuPy's get_unique_id()
# gives a tuple of 128 C chars: -128..127 where char is signed, 0..255 where it is not), ports,
# digests, reasons.
SETTINGS = (33554432, 262144, 64, False, 1, 132, "0000:1B:00.0")
HANDLES = (bytes(range(64)), bytes(64))
NCCL_ID_SIGNED = tuple(i * 37 % 256 - 128 for i in range(128))
NCCL_ID_UNSIGNED = tuple(i * 37 % 256 for i in range(128))
VALUES = [None, True, False, 0, 1, -1, (1 << 63) - 1, -(1 << 63), "", "détar 日本 \U0001F600",
          b"", bytes(range(256)), (), [], (1,), [None], [1, (2, [3, b"4"])], ((), [], ((),)),
          SETTINGS, HANDLES, NCCL_ID_SIGNED, NCCL_ID_UNSIGNED, [29517, 29518], "RuntimeError: x",
          nested(_wire.MAX_DEPTH)]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_round_trip(value: Any) -> None:
    got = _wire.decode(_wire.encode(value), "peer")
    assert got == value
    assert repr(got) == repr(value)  # tuples stay tuples, lists lists, bools bools


def test_bool_is_not_int() -> None:
    assert _wire.encode(True) != _wire.encode(1)
    assert _wire.decode(_wire.encode(1), "p") is not True
    assert type(_wire.decode(_wire.encode(1), "p")) is int
    assert [type(v) for v in _wire.decode(_wire.encode([True, 1, False, 0]), "p")] == \
        [bool, int, bool, int]


def test_encoding_is_fixed() -> None:
    """The format is a contract between versions: pin a few encodings."""
    assert _wire.encode(None) == b"\x01N"
    assert _wire.encode((True, -2)) == b"\x01t\x00\x00\x00\x02Ti\xff\xff\xff\xff\xff\xff\xff\xfe"
    assert _wire.encode(["é", b"\x00"]) == b"\x01l\x00\x00\x00\x02s\x00\x00\x00\x02\xc3\xa9" \
                                           b"b\x00\x00\x00\x01\x00"


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


@pytest.mark.parametrize("value, path", [
    (1.5, "value"), ({"a": 1}, "value"), ({1}, "value"), (bytearray(b"x"), "value"),
    (memoryview(b"x"), "value"), (object(), "value"), (np.int64(3), "value"),
    (Color.RED, "value"), (Text("x"), "value"), ([1, (2, 3.0)], r"value\[1\]\[1\]"),
    ((None, [b"", {"k"}]), r"value\[1\]\[1\]")])
def test_types_outside_the_format_refused(value: Any, path: str) -> None:
    with pytest.raises(TypeError, match=f"^{path} is a .*carries only None, bool, int"):
        _wire.encode(value)


@pytest.mark.parametrize("value, match", [
    (1 << 63, "does not fit a signed 64-bit int"),
    (-(1 << 63) - 1, "does not fit a signed 64-bit int"),
    ([0, "\ud800"], r"value\[1\] is not valid Unicode"),
    (nested(_wire.MAX_DEPTH + 1), f"deeper than {_wire.MAX_DEPTH}"),
    (bytes(_wire.MAX_MESSAGE_BYTES + 1), "over the .* limit"),
    ("x" * (_wire.MAX_MESSAGE_BYTES + 1), "over the .* limit"),
    ([bytes(_wire.MAX_MESSAGE_BYTES // 2)] * 2, "encodes to .* bytes, over"),
])
def test_limits_refused_on_encoding(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _wire.encode(value)


def refused(message: bytes, match: str = "") -> None:
    with pytest.raises(RendezvousError, match=f"rank 7 sent .*{match}"):
        _wire.decode(message, "rank 7")


COMPLEX = _wire.encode([SETTINGS, HANDLES, None, True, "é", (), nested(3)])


@pytest.mark.parametrize("cut", range(len(COMPLEX)))
def test_every_truncation_refused(cut: int) -> None:
    refused(COMPLEX[:cut])


@pytest.mark.parametrize("garbage", [b"\x00", b"N", COMPLEX[1:]])
def test_trailing_bytes_refused(garbage: bytes) -> None:
    refused(COMPLEX + garbage, "bytes follow the value")


def test_oversize_message_refused() -> None:
    refused(b"\x01b" + struct.pack(">I", _wire.MAX_MESSAGE_BYTES) +
            bytes(_wire.MAX_MESSAGE_BYTES), "over the .* limit")


def test_largest_message_accepted() -> None:
    size = _wire.MAX_MESSAGE_BYTES - 6
    message = b"\x01b" + struct.pack(">I", size) + bytes(size)
    assert len(message) == _wire.MAX_MESSAGE_BYTES
    assert _wire.decode(message, "p") == bytes(size)


def test_deep_nesting_refused() -> None:
    container = b"l" + struct.pack(">I", 1)
    assert _wire.decode(b"\x01" + container * _wire.MAX_DEPTH + b"N", "p") == \
        nested_lists(_wire.MAX_DEPTH)
    refused(b"\x01" + container * (_wire.MAX_DEPTH + 1) + b"N", "nested deeper")


def nested_lists(depth: int) -> Any:
    value = None
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("utf8", [b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xe6\x97"])
def test_bad_utf8_refused(utf8: bytes) -> None:
    refused(b"\x01s" + struct.pack(">I", len(utf8)) + utf8, "not UTF-8")


@pytest.mark.parametrize("tag", sorted(set(range(256)) - set(b"NFTisbtl")))
def test_unknown_tags_refused(tag: int) -> None:
    refused(b"\x01" + bytes([tag]), "unknown type tag")


@pytest.mark.parametrize("message", [b"", b"\x00N", b"\x02N", b"\x80N", b"N"])
def test_wrong_version_refused(message: bytes) -> None:
    refused(message, "wire format version 1")


@pytest.mark.parametrize("message, match", [
    (b"\x01s\xff\xff\xff\xffabc", "a str needs 4294967295 bytes"),
    (b"\x01b\x00\x00\x00\x05abc", "bytes needs 5 bytes, 3 remain"),
    (b"\x01l\xff\xff\xff\xffNNN", "a tuple/list of 4294967295 items in 3 bytes"),
    (b"\x01t\x00\x00\x00\x02Nb", "the length of bytes needs 4 bytes, 0 remain"),
    (b"\x01i\x00\x00", "an int needs 8 bytes"),
])
def test_lying_lengths_refused(message: bytes, match: str) -> None:
    refused(message, match)


def test_mutations_never_escape_as_other_errors() -> None:
    """Random damage to valid messages: a value or a RendezvousError, nothing else."""
    rng = random.Random(12)
    messages = [_wire.encode(v) for v in VALUES[:-1]] + [COMPLEX]
    for _ in range(3000):
        message = bytearray(rng.choice(messages))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7 and len(message) > 1:
                message[rng.randrange(1, len(message))] = rng.randrange(256)
            elif message:
                del message[rng.randrange(len(message)):]
        try:
            _wire.decode(bytes(message), "p")
        except RendezvousError:
            pass
