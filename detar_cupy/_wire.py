"""The rendezvous's wire format: a fixed, versioned binary encoding of small setup values.

Ranks never unpickle what they receive (unpickling runs whatever code the sender chose); they
decode this format, which can only describe data:

    message = version byte (1), then one value
    value   = b"N"                            None
            | b"F" | b"T"                     False | True   (bool is not int)
            | b"i" + 8 bytes                  int, signed 64-bit, big-endian
            | b"s" + u32 length + UTF-8       str
            | b"b" + u32 length + bytes       bytes
            | b"t" + u32 count + values       tuple
            | b"l" + u32 count + values       list

Lengths and counts are big-endian. The decoder is strict: one encoding per value, every length
inside the message, no bytes left over, containers nested at most :data:`MAX_DEPTH` deep, the whole
message at most :data:`MAX_MESSAGE_BYTES`. Anything else is refused with a
:class:`~detar_cupy.errors.RendezvousError` that names the sender; never an exception from
``struct`` or the UTF-8 codec, and never a wait for more data (the caller has the whole message).
"""
from __future__ import annotations

import struct
from typing import Any, NoReturn

from detar_cupy.errors import RendezvousError

#: Version byte that starts every message; a decoder refuses any other.
VERSION = 1
#: Largest message, version byte included. Setup values are handles, settings and ids: a few
#: hundred bytes. The cap bounds what a peer can make a rank buffer.
MAX_MESSAGE_BYTES = 1 << 20
#: Deepest nesting of tuples and lists (a value that is not a container is at depth 0).
MAX_DEPTH = 16
#: What the format carries, for error messages.
TYPES_TEXT = "None, bool, int (64-bit), str, bytes, and tuples and lists of those"

_INT = struct.Struct(">q")
_LENGTH = struct.Struct(">I")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_SIZED = {str: b"s", bytes: b"b"}
_CONTAINERS = {tuple: b"t", list: b"l"}


def encode(value: Any) -> bytes:
    """The message for ``value``.

    Raises :class:`TypeError` for a type the format does not carry (bool, int, str, bytes, tuple
    and list subclasses included: they would come back as the base type), :class:`ValueError` for
    an int outside 64 bits, a str that is not valid Unicode, nesting deeper than
    :data:`MAX_DEPTH` or a message over :data:`MAX_MESSAGE_BYTES`.
    """
    parts = [bytes([VERSION])]
    try:
        _encode(value, parts, 0)
    except _Unsendable as exc:
        where = "value" + "".join(f"[{i}]" for i in reversed(exc.path))
        raise exc.error(f"{where} {exc}") from None
    message = b"".join(parts)
    if len(message) > MAX_MESSAGE_BYTES:
        raise ValueError(f"the value encodes to {len(message)} bytes, over the "
                         f"{MAX_MESSAGE_BYTES}-byte limit of one rendezvous message")
    return message


class _Unsendable(Exception):
    """A part of the value that encode() refuses: the error to raise, what is wrong with the
    part, and where it is (indices, innermost first; the path is built only on failure)."""

    def __init__(self, error: type[Exception], what: str) -> None:
        super().__init__(what)
        self.error = error
        self.path: list[int] = []


def _encode(value: Any, parts: list[bytes], depth: int) -> None:
    kind = type(value)
    if value is None:
        parts.append(b"N")
    elif kind is bool:
        parts.append(b"T" if value else b"F")
    elif kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _Unsendable(ValueError, f"= {value} does not fit a signed 64-bit int")
        parts.append(b"i" + _INT.pack(value))
    elif kind in _SIZED:
        if kind is str:
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _Unsendable(ValueError, f"is not valid Unicode ({exc.reason})") from None
        if len(value) > MAX_MESSAGE_BYTES:  # refused before it is copied into the message
            raise _Unsendable(ValueError, f"has {len(value)} bytes, over the "
                                          f"{MAX_MESSAGE_BYTES}-byte limit of one rendezvous "
                                          f"message")
        parts.append(_SIZED[kind] + _LENGTH.pack(len(value)))
        parts.append(value)
    elif kind in _CONTAINERS:
        if depth == MAX_DEPTH:
            raise _Unsendable(ValueError, f"nests tuples/lists deeper than {MAX_DEPTH} levels")
        parts.append(_CONTAINERS[kind] + _LENGTH.pack(len(value)))
        for i, item in enumerate(value):
            try:
                _encode(item, parts, depth + 1)
            except _Unsendable as exc:
                exc.path.append(i)
                raise
    else:
        raise _Unsendable(TypeError, f"is a {kind.__module__}.{kind.__qualname__}; the "
                                     f"rendezvous carries only {TYPES_TEXT}")


def decode(message: bytes, sender: str) -> Any:
    """The value in ``message``; :class:`~detar_cupy.errors.RendezvousError` naming ``sender``
    (e.g. ``"rank 3"``, ``"10.0.0.7:41234"``) if it is not a valid message."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise RendezvousError(f"{sender} sent a message of {len(message)} bytes, over the "
                              f"{MAX_MESSAGE_BYTES}-byte limit")
    if message[:1] != bytes([VERSION]):
        raise RendezvousError(f"{sender} sent a message that does not start with wire format "
                              f"version {VERSION}: not a detar_cupy peer, or another version")
    reader = _Reader(message, sender)
    value = reader.value(0)
    if reader.pos != len(message):
        reader.fail(f"{len(message) - reader.pos} bytes follow the value")
    return value


class _Reader:
    """Cursor over one message; every read checks that the bytes are there."""

    def __init__(self, message: bytes, sender: str) -> None:
        self.message = message
        self.sender = sender
        self.pos = 1  # after the version byte

    def fail(self, what: str) -> NoReturn:
        raise RendezvousError(f"{self.sender} sent a malformed message: {what} (byte {self.pos} "
                              f"of {len(self.message)})")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.message) - self.pos:
            self.fail(f"{what} needs {n} bytes, {len(self.message) - self.pos} remain")
        chunk = self.message[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def length(self, what: str) -> int:
        value: int = _LENGTH.unpack(self.take(_LENGTH.size, f"the length of {what}"))[0]
        return value

    def value(self, depth: int) -> Any:
        tag = self.take(1, "a type tag")
        if tag == b"N":
            return None
        if tag in (b"F", b"T"):
            return tag == b"T"
        if tag == b"i":
            return _INT.unpack(self.take(_INT.size, "an int"))[0]
        if tag == b"b":
            return self.take(self.length("bytes"), "bytes")
        if tag == b"s":
            data = self.take(self.length("a str"), "a str")
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.fail(f"a str that is not UTF-8 ({exc.reason})")
        if tag in (b"t", b"l"):
            if depth == MAX_DEPTH:
                self.fail(f"tuples/lists nested deeper than {MAX_DEPTH} levels")
            count = self.length("a tuple/list")
            if count > len(self.message) - self.pos:  # every item takes at least one byte
                self.fail(f"a tuple/list of {count} items in {len(self.message) - self.pos} bytes")
            items = [self.value(depth + 1) for _ in range(count)]
            return tuple(items) if tag == b"t" else items
        self.fail(f"unknown type tag {tag!r}")
