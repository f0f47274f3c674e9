"""Wiring of ranks and exchange of small Python objects between them.

Used once per communicator, at creation, to swap IPC handles and metadata; never on the hot path.
The ranks form a star: rank 0 holds a connection to every other rank, the others one connection to
rank 0. :meth:`Rendezvous.exchange` is an all-gather through rank 0.

Two ways to build one:

- :func:`pipe_mesh` + :meth:`Rendezvous.from_pipes`: for processes started by
  :func:`detar_cupy.spawn`, which hands each child its pipe ends.
- :func:`connect`: for processes started by someone else (torchrun, mpirun, a scheduler). Rank 0
  listens on TCP ``host:port``; the others connect to it. Both sides prove they know the auth key
  (HMAC challenge-response) before any pickled object crosses the connection.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import ipaddress
import multiprocessing
import os
import socket
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from detar_cupy.errors import MismatchError, RendezvousError, RendezvousTimeout

#: Version of the connect() handshake; ranks speaking different versions refuse each other.
PROTOCOL_VERSION = 1
#: Host used by :func:`connect` when neither ``host=`` nor ``DETAR_HOST`` is given.
DEFAULT_HOST = "127.0.0.1"
#: Port used by :func:`connect` when neither ``port=`` nor ``DETAR_PORT`` is given.
DEFAULT_PORT = 29517
#: Auth key used on loopback when none is given. It is public, so it is NOT a secret: it only keeps
#: two unrelated jobs on one machine from joining each other by accident.
LOOPBACK_AUTHKEY = b"detar_cupy loopback rendezvous (not a secret)"

_CHALLENGE = b"#detar_cupy rendezvous challenge#"
_WELCOME = b"#detar_cupy welcome#"
_FAILURE = b"#detar_cupy auth key refused#"
_NONCE_BYTES = 32
# The handshake messages are a few dozen bytes; a larger one is not from a detar_cupy peer.
_MAX_HANDSHAKE_BYTES = 256
# A joining rank that finds nobody listening retries after 1 ms, doubling up to 50 ms: ranks
# started together connect within a millisecond or two of rank 0 listening, and a late rank 0 is
# not hammered.
_DIAL_RETRY_FIRST_S = 0.001
_DIAL_RETRY_MAX_S = 0.05


class Rendezvous:
    """Star of connections between ``world_size`` ranks, seen from one rank.

    ``peers`` maps peer rank to connection: on rank 0 every rank ``1 .. world_size-1``, on the other
    ranks just rank 0. Every receive waits at most ``timeout`` seconds (``None``: no bound). Any
    failure closes the rendezvous (its state is no longer known); later calls raise
    :class:`~detar_cupy.errors.RendezvousError`. The objects exchanged should be small (handles,
    metadata): a send is not bounded by the timeout.
    """

    def __init__(self, rank: int, world_size: int, peers: Mapping[int, Connection], *,
                 timeout: float | None = 60.0) -> None:
        check_world(world_size, rank)
        expected = set(range(1, world_size)) if rank == 0 else {0}
        if set(peers) != expected:
            raise ValueError(f"rank {rank} of {world_size} needs connections to ranks "
                             f"{sorted(expected)}, got {sorted(peers)}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")
        self._rank = rank
        self._world_size = world_size
        self._peers = dict(peers)
        self._timeout = timeout
        self._closed = False

    @classmethod
    def from_pipes(cls, rank: int, world_size: int, conns: Sequence[Connection], *,
                   timeout: float | None = 60.0) -> Rendezvous:
        """Build rank ``rank``'s side from ``pipe_mesh(world_size)[rank]``."""
        peers = range(1, world_size) if rank == 0 else [0]
        if len(conns) != len(peers):
            raise ValueError(f"rank {rank} of {world_size} needs {len(peers)} pipe end(s), "
                             f"got {len(conns)}")
        return cls(rank, world_size, dict(zip(peers, conns)), timeout=timeout)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def exchange(self, obj: Any) -> list[Any]:
        """All-gather: each rank passes a picklable object; each gets all of them in rank order."""
        if self._closed:
            raise RendezvousError(f"rank {self._rank}: the rendezvous is closed")
        if self._world_size == 1:
            return [obj]
        try:
            return self._gather(obj) if self._rank == 0 else self._send_and_wait(obj)
        except BaseException as exc:
            if self._rank == 0:
                self._abort(exc)
            self.close()
            raise

    def barrier(self) -> None:
        """Return once every rank has called :meth:`barrier`."""
        self.exchange(None)

    def close(self) -> None:
        """Close the connections. Idempotent."""
        self._closed = True
        for conn in self._peers.values():
            conn.close()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _gather(self, obj: Any) -> list[Any]:
        values: list[Any] = [obj] + [None] * (self._world_size - 1)
        waiting: dict[Any, int] = {conn: peer for peer, conn in self._peers.items()}
        deadline = _deadline(self._timeout)
        # wait() on all connections at once, so that a timeout can name every silent rank.
        while waiting:
            ready = wait(list(waiting), timeout=_remaining(deadline))
            if not ready:
                raise RendezvousTimeout(f"rank 0: {_ranks_text(sorted(waiting.values()))} did "
                                        f"not answer within {self._timeout:g}s")
            for conn in ready:
                peer = waiting.pop(conn)
                values[peer] = self._recv(peer, self._peers[peer], deadline)
        for peer, conn in self._peers.items():
            _send(conn, ("ok", values), f"rank 0: lost the connection to rank {peer}")
        return values

    def _send_and_wait(self, obj: Any) -> list[Any]:
        conn = self._peers[0]
        # If rank 0 failed and closed first, the notice it left (or EOF) is read below.
        with contextlib.suppress(OSError):
            conn.send(obj)
        reply = self._recv(0, conn, _deadline(self._timeout))
        if reply[0] == "ok":
            values: list[Any] = reply[1]
            return values
        _raise_remote(reply[1], f"rank {self._rank}: rank 0 aborted the exchange: {reply[2]}")

    def _recv(self, peer: int, conn: Connection, deadline: float | None) -> Any:
        try:
            ready = conn.poll(_remaining(deadline))
            if ready:
                return conn.recv()
        except (EOFError, OSError) as exc:
            raise RendezvousError(f"rank {self._rank}: the connection to rank {peer} is closed "
                                  f"or broken (did rank {peer} exit?)") from exc
        raise RendezvousTimeout(f"rank {self._rank}: rank {peer} did not answer within "
                                f"{self._timeout:g}s")

    def _abort(self, exc: BaseException) -> None:
        # Tell the other ranks why, so that they fail now with rank 0's reason instead of
        # timing out later with a vaguer one. Best effort: some of them may be gone.
        notice = ("error", _kind(exc), str(exc) or type(exc).__name__)
        for conn in self._peers.values():
            with contextlib.suppress(OSError):
                conn.send(notice)


def pipe_mesh(world_size: int) -> list[list[Connection]]:
    """Pipes for a star of ``world_size`` ranks; entry ``r`` is what rank ``r`` passes to
    :meth:`Rendezvous.from_pipes`: on rank 0 the ends towards ranks 1, 2, …, on rank ``r > 0`` the
    end towards rank 0.

    The caller (the parent process) must close its copies after handing them to the children,
    or a rank's death will not show up as a closed connection on the other side.
    """
    check_world(world_size, 0)
    mesh: list[list[Connection]] = [[] for _ in range(world_size)]
    for rank in range(1, world_size):
        towards_rank, towards_zero = multiprocessing.Pipe(duplex=True)
        mesh[0].append(towards_rank)
        mesh[rank].append(towards_zero)
    return mesh


def connect(world_size: int, rank: int, *, host: str | None = None, port: int | None = None,
            authkey: bytes | str | None = None, timeout: float = 60.0) -> Rendezvous:
    """Join ``world_size`` processes over TCP; every rank calls it with its own ``rank``.

    Rank 0 listens on ``host:port`` and the others connect to it (retrying until ``timeout``, so
    they may start before rank 0). Returns once every rank has joined.

    - ``host``: falls back to ``DETAR_HOST``, then ``127.0.0.1`` (loopback: one machine).
    - ``port``: falls back to ``DETAR_PORT``, then 29517 (:data:`DEFAULT_PORT`).
    - ``authkey``: falls back to ``DETAR_AUTHKEY`` (a ``str`` is UTF-8 encoded). It is required,
      and should be a secret, when ``host`` is not loopback: whoever knows it can make this process
      unpickle data, that is, run code. On loopback it defaults to the public
      :data:`LOOPBACK_AUTHKEY`, which only keeps unrelated jobs from joining each other.

    Raises :class:`ValueError` for bad arguments (before any network activity),
    :class:`~detar_cupy.errors.RendezvousTimeout` naming the ranks that did not join in time,
    :class:`~detar_cupy.errors.MismatchError` when ranks disagree on ``world_size``, and
    :class:`~detar_cupy.errors.RendezvousError` for the other failures (port in use, auth key
    refused, duplicate rank, …).
    """
    check_world(world_size, rank)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    host = host or os.environ.get("DETAR_HOST") or DEFAULT_HOST
    address = (host, _resolve_port(port))
    key = _resolve_authkey(host, authkey)
    deadline = time.monotonic() + timeout
    if world_size == 1:
        return Rendezvous(0, 1, {}, timeout=timeout)
    if rank == 0:
        return _serve(world_size, address, key, deadline, timeout)
    return _join(world_size, rank, address, key, deadline, timeout)


def check_world(world_size: int, rank: int) -> None:
    """ValueError unless ``world_size >= 1`` and ``0 <= rank < world_size``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def _resolve_port(port: int | None) -> int:
    if port is None:
        text = os.environ.get("DETAR_PORT")
        if not text:
            return DEFAULT_PORT
        try:
            port = int(text)
        except ValueError:
            raise ValueError(f"DETAR_PORT must be a port number, got {text!r}") from None
    # Port 0 would let rank 0 pick a port that the other ranks cannot know.
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535 (port= or DETAR_PORT), got {port!r}")
    return port


def _resolve_authkey(host: str, authkey: bytes | str | None) -> bytes:
    if authkey is None:
        authkey = os.environ.get("DETAR_AUTHKEY") or None
    if authkey is None:
        if not _is_loopback(host):
            raise ValueError(f"host {host!r} is not loopback: set a secret auth key with "
                             f"DETAR_AUTHKEY (or authkey=), the same on every rank")
        return LOOPBACK_AUTHKEY
    key = authkey.encode() if isinstance(authkey, str) else bytes(authkey)
    if not key:
        raise ValueError("the auth key (authkey= or DETAR_AUTHKEY) must not be empty")
    return key


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _serve(world_size: int, address: tuple[str, int], key: bytes, deadline: float,
           timeout: float) -> Rendezvous:
    # One thread, event driven: wait() on the listening socket and on every connection still
    # in its handshake, bounded by the deadline. Nothing blocks on a single client, so a client
    # that connects and stays silent (or sends a wrong key) cannot stall the others, and no
    # helper thread is left blocked in accept() after a timeout.
    listener = _listen(address, world_size)
    shaking: dict[Connection, bytes | None] = {}  # connection -> our nonce, None once authenticated
    joined: dict[int, Connection] = {}
    try:
        while len(joined) < world_size - 1:
            waitables: list[Any] = [listener, *shaking, *joined.values()]
            ready = wait(waitables, timeout=_remaining(deadline))
            if not ready:
                missing = sorted(set(range(1, world_size)) - set(joined))
                raise RendezvousTimeout(
                    f"rank 0: {_ranks_text(missing)} never joined the rendezvous at "
                    f"{_where(address)} within {timeout:g}s")
            for obj in ready:
                if obj is listener:
                    _accept(listener, shaking)
                elif obj in shaking:
                    _advance(obj, shaking.pop(obj), key, world_size, joined, shaking)
                else:
                    # A joined rank sends nothing until the group is complete: readable means
                    # it went away. Forget it; it may join again before the deadline.
                    peer = next(r for r, c in joined.items() if c is obj)
                    joined.pop(peer).close()
        for peer, conn in joined.items():
            _send(conn, ("ok", None), f"rank 0: rank {peer} left during the rendezvous")
    except BaseException as exc:
        notice = ("error", _kind(exc), str(exc) or type(exc).__name__)
        for conn in joined.values():
            with contextlib.suppress(OSError):
                conn.send(notice)
            conn.close()
        for conn in shaking:
            conn.close()
        raise
    finally:
        listener.close()
    return Rendezvous(0, world_size, joined, timeout=timeout)


def _listen(address: tuple[str, int], world_size: int) -> socket.socket:
    sock = None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        # Lets a new run reuse the port while the previous run's sockets linger in TIME_WAIT;
        # binding a port that something is listening on still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(world_size)
    except OSError as exc:
        if sock is not None:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RendezvousError(
                f"rank 0 cannot listen on {_where(address)}: the port is in use (by another job, "
                f"or was a second process started as rank 0?); choose a free port with "
                f"DETAR_PORT or port=") from exc
        raise RendezvousError(f"rank 0 cannot listen on {_where(address)}: {exc}") from exc
    return sock


def _accept(listener: socket.socket, shaking: dict[Connection, bytes | None]) -> None:
    try:
        sock, _ = listener.accept()
    except OSError:  # the client gave up between connect and accept
        return
    conn = Connection(sock.detach())
    nonce = os.urandom(_NONCE_BYTES)
    try:
        conn.send_bytes(_CHALLENGE + nonce)
    except OSError:
        conn.close()
        return
    shaking[conn] = nonce


def _advance(conn: Connection, nonce: bytes | None, key: bytes, world_size: int,
             joined: dict[int, Connection], shaking: dict[Connection, bytes | None]) -> None:
    """Take the next handshake step of a client that has something to read."""
    # A client that half-sends a message and then stalls would block this recv; clients get
    # here only by connecting to rank 0's port, and this is accepted to keep the server simple.
    try:
        if nonce is not None:
            answer = conn.recv_bytes(_MAX_HANDSHAKE_BYTES)
            proof, client_nonce = answer[:-_NONCE_BYTES], answer[-_NONCE_BYTES:]
            if not hmac.compare_digest(proof, _mac(key, b"client", nonce)):
                # Refused before anything else: the client got nothing but our nonce.
                conn.send_bytes(_FAILURE)
                conn.close()
                return
            conn.send_bytes(_WELCOME + _mac(key, b"server", client_nonce))
            shaking[conn] = None
            return
        hello = conn.recv()  # safe to unpickle: the client proved it knows the key
        kind, problem = _check_hello(hello, world_size, joined)
    except Exception:  # the client went away or spoke garbage: drop it, keep waiting for others
        conn.close()
        return
    if problem is None:
        joined[hello[2]] = conn
        return
    with contextlib.suppress(OSError):
        conn.send(("error", kind, problem))
    conn.close()
    if kind == "mismatch":
        raise MismatchError(problem)


def _check_hello(hello: Any, world_size: int,
                 joined: Mapping[int, Connection]) -> tuple[str, str | None]:
    """("ok", None) if the client may join, else (kind of error, the reason to send it)."""
    version, their_world, rank = hello
    if version != PROTOCOL_VERSION:
        return "error", (f"a rank speaks rendezvous protocol {version}, rank 0 speaks "
                         f"{PROTOCOL_VERSION}: install the same detar_cupy version everywhere")
    if their_world != world_size:
        return "mismatch", (f"rank {rank} was started with world size {their_world}, "
                            f"but rank 0 with world size {world_size}")
    if not (isinstance(rank, int) and 0 < rank < world_size):
        return "error", (f"rank {rank!r} cannot join: joining ranks are 1..{world_size - 1} "
                         f"(rank 0 is the listening process)")
    if rank in joined:
        return "error", f"rank {rank} has already joined: two processes were given rank {rank}"
    return "ok", None


def _join(world_size: int, rank: int, address: tuple[str, int], key: bytes, deadline: float,
          timeout: float) -> Rendezvous:
    conn = _dial(rank, address, deadline, timeout)
    where = _where(address)

    def recv(unpickle: bool = False) -> Any:
        # Every read is bounded by the deadline, also against something that is not rank 0.
        try:
            if conn.poll(_remaining(deadline)):
                return conn.recv() if unpickle else conn.recv_bytes(_MAX_HANDSHAKE_BYTES)
        except (EOFError, OSError) as exc:
            raise RendezvousError(f"rank {rank}: rank 0 at {where} closed the connection "
                                  f"during the rendezvous ({exc!r})") from exc
        raise RendezvousTimeout(f"rank {rank}: rank 0 at {where} did not complete the "
                                f"rendezvous within {timeout:g}s")

    try:
        challenge = recv()
        if not challenge.startswith(_CHALLENGE):
            raise RendezvousError(f"rank {rank}: {where} answered, but it is not a detar_cupy "
                                  f"rank 0 (wrong DETAR_HOST/DETAR_PORT?)")
        own_nonce = os.urandom(_NONCE_BYTES)
        conn.send_bytes(_mac(key, b"client", challenge[len(_CHALLENGE):]) + own_nonce)
        verdict = recv()
        if verdict == _FAILURE:
            raise RendezvousError(f"rank {rank}: rank 0 at {where} refused this rank's auth key; "
                                  f"every rank needs the same DETAR_AUTHKEY (or authkey=)")
        expected = _WELCOME + _mac(key, b"server", own_nonce)
        if not hmac.compare_digest(verdict, expected):
            raise RendezvousError(f"rank {rank}: the process at {where} does not know the auth "
                                  f"key (DETAR_AUTHKEY); refusing to talk to it")
        conn.send((PROTOCOL_VERSION, world_size, rank))
        reply = recv(unpickle=True)
        if reply[0] != "ok":
            _raise_remote(reply[1], f"rank {rank}: rank 0 refused to complete the rendezvous: "
                                    f"{reply[2]}")
    except BaseException:
        conn.close()
        raise
    return Rendezvous(rank, world_size, {0: conn}, timeout=timeout)


def _dial(rank: int, address: tuple[str, int], deadline: float, timeout: float) -> Connection:
    """Connect to rank 0, retrying until the deadline: it may not be listening yet."""
    last_error: OSError | None = None
    pause = _DIAL_RETRY_FIRST_S
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            sock = socket.create_connection(address, timeout=remaining)
        except OSError as exc:
            last_error = exc
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, _DIAL_RETRY_MAX_S)
            continue
        sock.settimeout(None)  # reads are bounded by Connection.poll from here on
        return Connection(sock.detach())
    raise RendezvousTimeout(f"rank {rank}: rank 0 never became reachable at {_where(address)} "
                            f"within {timeout:g}s (last error: {last_error!r})")


def _mac(key: bytes, role: bytes, nonce: bytes) -> bytes:
    # The role is part of the MAC so that one side's proof can never be replayed as the other's.
    return hmac.new(key, role + nonce, hashlib.sha256).digest()


def _send(conn: Connection, obj: Any, failure: str) -> None:
    try:
        conn.send(obj)
    except OSError as exc:
        raise RendezvousError(f"{failure} ({exc!r})") from exc


def _kind(exc: BaseException) -> str:
    if isinstance(exc, RendezvousTimeout):
        return "timeout"
    return "mismatch" if isinstance(exc, MismatchError) else "error"


def _raise_remote(kind: str, message: str) -> NoReturn:
    """Raise on this rank the kind of error another rank reported."""
    cls = {"timeout": RendezvousTimeout, "mismatch": MismatchError}.get(kind, RendezvousError)
    raise cls(message)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _ranks_text(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))


def _where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
