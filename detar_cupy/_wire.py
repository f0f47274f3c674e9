"""Wire codec for setup values: None, bool, int, str, bytes and tuples/lists of those, to bytes and
back, without pickle (decoding never runs code). A minimal stand-in, to be replaced.

Format: each value is a tag byte, then for int/str/bytes a 4-byte little-endian length and that
many bytes (an int as its signed decimal digits), for tuple/list a 4-byte item count and the items.
"""
from __future__ import annotations

import struct
from typing import Any

_LEN = struct.Struct("<I")
_MAX_DEPTH = 32


def encode(obj: Any) -> bytes:
    """The bytes of ``obj``; TypeError for any other type."""
    parts: list[bytes] = []
    _encode(obj, parts, 0)
    return b"".join(parts)


def _encode(obj: Any, parts: list[bytes], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"value nested deeper than {_MAX_DEPTH} levels")
    if obj is None:
        parts.append(b"N")
    elif obj is True or obj is False:
        parts.append(b"T" if obj else b"F")
    elif isinstance(obj, (int, str, bytes)):
        tag, data = ((b"I", str(int(obj)).encode()) if isinstance(obj, int) else
                     (b"S", obj.encode()) if isinstance(obj, str) else (b"B", bytes(obj)))
        parts += [tag, _LEN.pack(len(data)), data]
    elif isinstance(obj, (tuple, list)):
        parts += [b"(" if isinstance(obj, tuple) else b"[", _LEN.pack(len(obj))]
        for item in obj:
            _encode(item, parts, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(obj).__name__}: setup values are None, bool, int, "
                        "str, bytes and tuples/lists of those")


def decode(data: bytes, peer: str = "") -> Any:
    """The value ``data`` encodes; ValueError (naming ``peer``) for anything malformed."""
    try:
        value, end = _decode(memoryview(data), 0, 0)
        if end != len(data):
            raise ValueError(f"{len(data) - end} trailing bytes")
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
        raise ValueError(f"malformed setup message{' from ' + peer if peer else ''}: "
                         f"{exc}") from None
    return value


def _decode(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
    tag = bytes(view[pos:pos + 1])
    pos += 1
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], pos
    (n,) = _LEN.unpack_from(view, pos)
    pos += _LEN.size
    if tag in (b"(", b"["):
        items = []
        for _ in range(n):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return (tuple(items) if tag == b"(" else items), pos
    if pos + n > len(view):
        raise ValueError("truncated")
    raw = bytes(view[pos:pos + n])
    if tag == b"B":
        return raw, pos + n
    if tag == b"S":
        return raw.decode(), pos + n
    if tag == b"I":
        if not raw.lstrip(b"-").isdigit():
            raise ValueError(f"not an integer: {raw[:20]!r}")
        return int(raw), pos + n
    raise ValueError(f"unknown tag {tag!r}")
