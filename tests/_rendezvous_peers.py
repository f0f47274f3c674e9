"""Hand-driven rendezvous peers for the tests: they speak connect()'s protocol frame by frame, so
they can say what a real rank never would."""
from __future__ import annotations

import socket
import time
from typing import Any

from detar_cupy import _rendezvous as rdv
from detar_cupy import _wire


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def knock(port: int, secret: bytes | None = None, timeout: float = 2.0) -> socket.socket:
    """A connection to where rank 0 listens for ``port`` (TCP with a secret, else its Unix
    socket), retrying until it does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if secret is not None:
                return socket.create_connection(("127.0.0.1", port), timeout=timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(rdv._unix_endpoint(port).address)
            except OSError:
                sock.close()
                raise
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Client:
    """A client of rank 0 that takes the handshake one step at a time."""

    def __init__(self, port: int, secret: bytes | None = None, timeout: float = 3.0) -> None:
        self.secret = secret
        self.timeout = timeout
        self.sock = knock(port, secret)
        self.link = rdv._Link(self.sock, "client", "rank 0")

    def send(self, kind: bytes, value: Any) -> None:
        self.link.send(self.link.pack(kind, _wire.encode(value)), self.deadline())

    def recv(self) -> tuple[bytes, Any] | str:
        """(kind, value) of rank 0's next frame, or "closed" or "silent"."""
        try:
            frame = self.link.recv(self.deadline())
        except rdv._Closed:
            return "closed"
        return "silent" if frame is None else (frame[0], _wire.decode(frame[1], "rank 0"))

    def greeting(self) -> bytes:
        """Read rank 0's greeting; its nonce."""
        kind, (_, _, nonce) = self.recv()  # type: ignore[misc]
        assert kind == rdv._GREETING
        return nonce

    def respond(self, key: bytes) -> tuple[bytes, Any] | str:
        """Answer the challenge as one who knows ``key``; rank 0's verdict. Once accepted,
        frames carry MACs under the session key, as rank 0 expects."""
        server_nonce = self.greeting()
        nonce = b"n" * 32
        keyed = rdv._keyed(key)
        self.send(rdv._RESPONSE, (nonce, rdv._proof(keyed, b"client", server_nonce, nonce)))
        verdict = self.recv()
        if verdict[0] == rdv._ACCEPT:
            session = rdv._keyed(rdv._proof(keyed, b"session", server_nonce, nonce))
            self.link.seal(session, server=False)
            self.link.require_seal(session, server=False)
        return verdict

    def enter(self) -> None:
        """Get to where rank 0 reads the hello: past the greeting (and the secret)."""
        if self.secret is None:
            self.greeting()
        else:
            assert self.respond(self.secret)[0] == rdv._ACCEPT

    def hello(self, world: int = 2, rank: int = 1, job: str = "",
              version: int = rdv.PROTOCOL_VERSION) -> tuple[bytes, Any] | str:
        """Send a hello (after enter()); rank 0's answer."""
        self.send(rdv._HELLO, (version, job, world, rank))
        return self.recv()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def close(self) -> None:
        self.link.close()
