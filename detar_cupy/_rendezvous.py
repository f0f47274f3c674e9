"""Wiring of ranks and exchange of small values between them.

Used once per communicator, at creation, to swap IPC handles and settings; never on the hot path.
The ranks form a star: rank 0 holds a connection to every other rank, the others one connection to
rank 0. :meth:`Rendezvous.exchange` is an all-gather through rank 0.

Two ways to build one:

- :func:`pipe_mesh` + :meth:`Rendezvous.from_pipes`: for processes started by
  :func:`detar_cupy.spawn`, which hands each child its ends of socket pairs it made itself.
- :func:`connect`: for processes started by someone else (torchrun, mpirun, a scheduler). Rank 0
  listens; the others connect to it.

  - Without a secret, on loopback: a Unix socket in a directory only this user may enter; each
    side checks the other's uid (``SO_PEERCRED``), so no key is needed.
  - With a secret (``authkey=`` or ``DETAR_AUTHKEY``, required off loopback): TCP, a mutual
    HMAC-SHA256 challenge, then a MAC on every frame.

Every connection carries frames ``u32 length | kind byte | one message | [32-byte MAC]``, the
message in the fixed format of :mod:`detar_cupy._wire`.

Threat model
------------
Trusted: the user who started the ranks (a process of that uid can read their memory and
environment anyway), root, and the GPU driver. Not trusted: other local users, and anyone on the
network. What an intruder can do, state by state:

- Before rank 0 listens. TCP: take the port first. Rank 0 then fails ("port in use"), and the
  joining ranks reach the squatter, which cannot answer their challenge without the secret: they
  refuse it and say so. The squatter does learn a joining rank's hello (job, world size, rank:
  nothing secret) and HMACs under the secret of a nonce it chose, so a guessable secret can be
  guessed offline: use a random one. Unix: the socket lives in a 0700 directory of this user
  (``$XDG_RUNTIME_DIR/detar_cupy`` or ``<tmp>/detar_cupy-<uid>``), where another user can
  neither create nor reach it; a directory another user planted is refused.
- While rank 0 waits for the others. Whoever reaches the port may connect. Rank 0 serves all
  clients from one event loop and never waits on one of them: it reads each incrementally into a
  buffer, refuses a frame as soon as a length header over the limit arrives, gives each handshake
  :data:`HANDSHAKE_S` seconds and holds at most :data:`MAX_PENDING` handshakes (a new connection
  pushes out the oldest: a rank finishes its handshake within a round trip, an idle intruder never
  does). A client of another uid (Unix) or without the secret (TCP) is refused before its hello is
  read. A hello from another job (:data:`JOB_VARIABLES`), protocol version or world size, for a rank
  out of range or already taken, is refused to that client alone. No client can make rank 0 fail:
  at worst it times out, and its error lists what it refused.
- After the group formed. Unix: the kernel joins exactly these two processes. TCP: each connection
  has its own session key (an HMAC of the secret and both sides' nonces), and every frame a MAC over
  its direction, sequence number, length and content: a frame injected, replayed, reordered, cut or
  changed on the way is refused with an error naming the peer. An intruder on the path can make
  the rendezvous fail, never make it accept other data.
- Always: nothing received is unpickled, only parsed as data, and every read has a deadline.

Not protected: the confidentiality of what crosses TCP. The values exchanged (settings, the NCCL
unique id, CUDA/HIP IPC handles) travel in the clear. An IPC handle can only be opened on its own
host, but there by any process that can use that GPU, whoever's it is; the NCCL unique id holds
the address of NCCL's own bootstrap, which NCCL does not authenticate. Nor protected: denial of service (flooding the port,
squatting a TCP port before rank 0), and processes of the same user.

Why a shared secret and HMAC, not TLS: the standard library's ``ssl`` needs certificates and keys
provisioned on every host (pre-shared keys only from Python 3.13), while launchers (torchrun,
mpirun, a job script) already carry environment variables to every rank, so ``DETAR_AUTHKEY`` fits
how ranks are started. The rendezvous needs authenticity and integrity, which HMAC-SHA256 with
per-connection keys and sequence numbers gives; what TLS would add is confidentiality, see above.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import multiprocessing
import os
import secrets
import select
import selectors
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, NoReturn

from detar_cupy import _wire
from detar_cupy.errors import MismatchError, RendezvousError, RendezvousTimeout

#: Version of the connect() protocol; ranks speaking different versions refuse each other.
PROTOCOL_VERSION = 2
#: Host used by :func:`connect` when neither ``host=`` nor ``DETAR_HOST`` is given.
DEFAULT_HOST = "127.0.0.1"
#: Port used by :func:`connect` when neither ``port=`` nor ``DETAR_PORT`` is given. On loopback
#: without a secret it names the Unix socket (``rdv-<port>.sock``) instead of a TCP port.
DEFAULT_PORT = 29517
#: Most connections rank 0 holds in their handshake at once.
MAX_PENDING = 64
#: Seconds a connection gets to complete its handshake (at most the connect() timeout).
HANDSHAKE_S = 5.0
#: Where a rank's job identity comes from, first match wins: DETAR_JOB_ID, then what torchrun,
#: Slurm (with the step), PMIx, PMI, Open MPI, PBS and LSF set. Rank 0 refuses ranks of other jobs.
JOB_VARIABLES = ("DETAR_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PMIX_NAMESPACE",
                 "PMI_JOBID", "OMPI_MCA_ess_base_jobid", "PBS_JOBID", "LSB_JOBID")

# Frame kinds. GREETING, RESPONSE, ACCEPT and a refusal of the secret travel before the session
# key exists (TCP); every later frame on TCP carries a MAC.
_GREETING = b"G"  # rank 0 -> joiner: (_NAME, PROTOCOL_VERSION, nonce: 32 bytes on TCP, else b"")
_RESPONSE = b"R"  # joiner -> rank 0 (TCP): (nonce, proof that it knows the secret)
_ACCEPT = b"A"  # rank 0 -> joiner (TCP): (proof that rank 0 knows the secret,)
_HELLO = b"H"  # joiner -> rank 0: (PROTOCOL_VERSION, job, world size, rank)
_WELCOME = b"W"  # rank 0 -> joiner: the group is complete (None)
_VALUE = b"V"  # a rank's exchanged value, as a _wire message
_ERROR = b"E"  # a refusal or an abort: (kind, message), kind "error" | "mismatch" | "timeout"
_NAME = "detar_cupy rendezvous"
_NOTICE_CHARS = 4000
_NOTES = 4  # refusals a timeout error lists
_HEADER = struct.Struct(">I")
_SEQUENCE = struct.Struct(">Q")
_MAC_BYTES = 32
_NONCE_BYTES = 32
# Largest kind + message before the hello is accepted: the handshake messages are a few hundred
# bytes, so a client in its handshake cannot make rank 0 buffer a full message.
_HANDSHAKE_BODY = 1 << 16
_FULL_BODY = 1 + _wire.MAX_MESSAGE_BYTES
_READ_BYTES = 1 << 16
# Rank 0 accepts at most this many connections per turn of its loop, then reads the clients that
# have spoken, so a burst of new connections cannot push out a rank whose answer has arrived.
_ACCEPTS_PER_TURN = MAX_PENDING // 2
# A joining rank that finds nobody listening retries after 1 ms, doubling up to 50 ms: ranks
# started together connect within a millisecond or two of rank 0 listening, and a late rank 0 is
# not hammered.
_DIAL_RETRY_FIRST_S = 0.001
_DIAL_RETRY_MAX_S = 0.05
# Unix sockets whose peer uid the kernel reports (Linux); elsewhere loopback needs a secret too.
_UNIX_CREDENTIALS = hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Closed(RendezvousError):
    """The peer closed or reset the connection."""


class _Link:
    """A connection to one peer, carrying frames; non-blocking underneath.

    Reads are incremental (:meth:`pump` never waits; :meth:`recv` waits at most until its
    deadline) and a frame over :attr:`limit` is refused as soon as its header arrives. After
    :meth:`seal` every frame sent, after :meth:`require_seal` every frame received, carries a MAC
    over its direction, sequence number, length and content.
    """

    def __init__(self, sock: socket.socket, me: str, peer: str,
                 limit: int = _FULL_BODY) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.me = me  # who we are, for error messages: "rank 0"
        self.peer = peer  # who the peer is: "rank 3", "10.0.0.7:41234", "pid 812 (uid 1000)"
        self.limit = limit
        self._inbox = bytearray()
        self._seal: tuple[hmac.HMAC, bytes] | None = None  # (session key, direction) to send
        self._check: tuple[hmac.HMAC, bytes] | None = None  # the same for frames received
        self._sent = self._received = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def seal(self, key: hmac.HMAC, server: bool) -> None:
        """MAC every frame sent from now on with the session ``key`` (see :func:`_keyed`)."""
        self._seal = (key, b"<" if server else b">")

    def require_seal(self, key: hmac.HMAC, server: bool) -> None:
        """Refuse every frame received from now on that lacks a valid MAC under ``key``."""
        self._check = (key, b">" if server else b"<")

    def pack(self, kind: bytes, message: bytes) -> bytes:
        """The frame for ``message``, ready for :meth:`send`; it must be sent (it takes the next
        sequence number)."""
        body = kind + message
        if self._seal is None:
            return _HEADER.pack(len(body)) + body
        tag = _mac(*self._seal, self._sent, body)
        self._sent += 1
        return _HEADER.pack(len(body) + _MAC_BYTES) + body + tag

    def send(self, frames: bytes, deadline: float | None) -> None:
        """Write ``frames``, waiting at most until ``deadline`` for the peer to take them."""
        rest = memoryview(frames)
        while rest:
            try:
                rest = rest[self._sock.send(rest):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise _Closed(f"{self.me}: the connection to {self.peer} is closed or broken "
                              f"(did {self.peer} exit?) ({exc})") from exc
            if rest and not _ready(self._sock, select.POLLOUT, _remaining(deadline)):
                raise RendezvousTimeout(f"{self.me}: {self.peer} did not take what was sent to "
                                        f"it in time (is it still reading?)")

    def offer(self, frames: bytes) -> bool:
        """Write ``frames`` without waiting; False unless the peer took all of them at once.

        For peers that may be hostile or gone: a fresh connection's send buffer takes a few
        hundred bytes at once, so a client that does not is not reading.
        """
        try:
            return self._sock.send(frames) == len(frames)
        except OSError:
            return False

    def pump(self, wait: float | None = 0.0) -> bool:
        """Read what has arrived, waiting at most ``wait`` seconds (None: no limit) for something;
        True if something was read. End of stream raises :class:`_Closed`."""
        try:
            chunk = self._sock.recv(_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            if wait == 0.0 or not _ready(self._sock, select.POLLIN, wait):
                return False
            return self.pump()  # something has arrived: read it without waiting
        except OSError as exc:
            raise _Closed(f"{self.me}: the connection to {self.peer} is broken ({exc})") from exc
        if not chunk:
            raise _Closed(f"{self.me}: {self.peer} closed the connection (did it exit?)")
        self._inbox += chunk
        return True

    def frame(self) -> tuple[bytes, bytes] | None:
        """The next (kind, message) among what has been read, or None until it is complete."""
        if len(self._inbox) < _HEADER.size:
            return None
        size: int = _HEADER.unpack_from(self._inbox)[0]
        tag = 0 if self._check is None else _MAC_BYTES
        if not 1 + tag <= size <= self.limit + tag:
            raise RendezvousError(f"{self.me}: {self.peer} announced a frame of {size} bytes; "
                                  f"frames here hold 1 to {self.limit + tag} bytes")
        if len(self._inbox) < _HEADER.size + size:
            return None
        body = bytes(self._inbox[_HEADER.size:_HEADER.size + size - tag])
        mac = bytes(self._inbox[_HEADER.size + size - tag:_HEADER.size + size])
        del self._inbox[:_HEADER.size + size]
        if self._check is not None:
            if not hmac.compare_digest(mac, _mac(*self._check, self._received, body)):
                raise RendezvousError(
                    f"{self.me}: a frame from {self.peer} failed authentication: it was changed, "
                    f"replayed, reordered or injected on the way (frame {self._received})")
            self._received += 1
        return body[:1], body[1:]

    def recv(self, deadline: float | None) -> tuple[bytes, bytes] | None:
        """The next (kind, message), or None if none is complete by ``deadline``."""
        while (frame := self.frame()) is None:
            if not self.pump(_remaining(deadline)) and _remaining(deadline) == 0.0:
                return None
        return frame

    def credentials(self) -> tuple[int, int]:
        """(pid, uid) of the process at the other end of a Unix socket, as the kernel saw it
        connect."""
        pid, uid, _ = _CREDENTIALS.unpack(
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        return pid, uid

    def close(self) -> None:
        self._sock.close()


def _ready(sock: socket.socket, event: int, timeout: float | None) -> bool:
    """Whether ``sock`` becomes ready for ``event`` (select.POLLIN/POLLOUT) within ``timeout``
    seconds (None: no limit)."""
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _keyed(key: bytes) -> hmac.HMAC:
    """HMAC-SHA256 keyed with ``key``, to copy for each message: keying once is half the work of
    a MAC on a short message."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: hmac.HMAC, direction: bytes, sequence: int, body: bytes) -> bytes:
    """The MAC of frame number ``sequence`` sent in ``direction`` (b">": to rank 0)."""
    mac = key.copy()
    mac.update(direction + _SEQUENCE.pack(sequence) + _HEADER.pack(len(body)))
    mac.update(body)
    return mac.digest()


class Rendezvous:
    """Star of connections between ``world_size`` ranks, seen from one rank.

    Built by :func:`connect` or :meth:`from_pipes`. Every wait (receive or send) lasts at most
    ``timeout`` seconds (``None``: no bound). Any failure closes the rendezvous (its state is no
    longer known); later calls raise :class:`~detar_cupy.errors.RendezvousError`.
    """

    def __init__(self, rank: int, world_size: int, peers: Mapping[int, _Link], *,
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
        """Build rank ``rank``'s side from ``pipe_mesh(world_size)[rank]``; takes over (and
        closes) the connections."""
        peers = range(1, world_size) if rank == 0 else [0]
        if len(conns) != len(peers):
            raise ValueError(f"rank {rank} of {world_size} needs {len(peers)} pipe end(s), "
                             f"got {len(conns)}")
        links = {}
        for peer, conn in zip(peers, conns):
            # The same frames and deadlines as connect()'s sockets: a duplex multiprocessing
            # pipe is a socket pair underneath.
            try:
                sock = socket.socket(fileno=os.dup(conn.fileno()))
            except OSError as exc:
                raise ValueError(f"rank {rank}: the pipe end towards rank {peer} is not a "
                                 f"socket; use the duplex pipes of pipe_mesh()") from exc
            conn.close()
            links[peer] = _Link(sock, f"rank {rank}", f"rank {peer}")
        return cls(rank, world_size, links, timeout=timeout)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def exchange(self, obj: Any) -> list[Any]:
        """All-gather: each rank passes a value; each gets every rank's value, in rank order.

        Collective: every rank must call it. Values are what :mod:`detar_cupy._wire` carries:
        None, bool, int (64-bit), str, bytes, and tuples and lists of those nested at most 16 deep,
        at most 1 MiB encoded per rank. Each rank gets fresh copies, tuples as tuples and lists as
        lists, the same on every rank.

        A rank passing anything else raises :class:`TypeError` (a type the format lacks) or
        :class:`ValueError` (a limit), and tells rank 0 before it leaves, so that the other ranks
        fail at once with a :class:`~detar_cupy.errors.RendezvousError` naming it rather than
        waiting out the timeout. Raises :class:`~detar_cupy.errors.RendezvousTimeout` naming the
        ranks that did not answer in time, and :class:`~detar_cupy.errors.RendezvousError` for a
        lost connection or anything malformed or unauthenticated a peer sent.
        """
        if self._closed:
            raise RendezvousError(f"rank {self._rank}: the rendezvous is closed")
        try:
            message = _wire.encode(obj)
        except (TypeError, ValueError) as exc:
            self._fail(exc, f"rank {self._rank} passed exchange() a value it cannot send: {exc}")
            raise
        if self._world_size == 1:
            return [_wire.decode(message, f"rank {self._rank}")]
        try:
            if self._rank == 0:
                return self._gather(message)
            return self._send_and_wait(message)
        except BaseException as exc:
            self._fail(exc, str(exc) or type(exc).__name__)
            raise

    def barrier(self) -> None:
        """Return once every rank has called :meth:`barrier`."""
        self.exchange(None)

    def close(self) -> None:
        """Close the connections. Idempotent."""
        self._closed = True
        for link in self._peers.values():
            link.close()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _gather(self, message: bytes) -> list[Any]:
        values: list[Any] = [_wire.decode(message, "rank 0")] + [None] * (self._world_size - 1)
        messages = [message] + [b""] * (self._world_size - 1)
        waiting = dict(self._peers)
        deadline = _deadline(self._timeout)
        # One selector over every rank, so that a timeout can name every silent one.
        with selectors.DefaultSelector() as selector:
            for peer, link in waiting.items():
                selector.register(link, selectors.EVENT_READ, peer)
            while True:
                for peer in list(waiting):
                    frame = waiting[peer].frame()
                    if frame is not None:
                        selector.unregister(waiting.pop(peer))
                        kind, messages[peer] = frame
                        values[peer] = _exchanged(kind, messages[peer], "rank 0", f"rank {peer}")
                if not waiting:
                    break
                ready = selector.select(_remaining(deadline))
                if not ready:
                    raise RendezvousTimeout(f"rank 0: {_ranks_text(sorted(waiting))} did not "
                                            f"answer within {self._timeout:g}s")
                for key, _ in ready:
                    waiting[key.data].pump()
        for link in self._peers.values():
            link.send(b"".join(link.pack(_VALUE, m) for m in messages), deadline)
        return values

    def _send_and_wait(self, message: bytes) -> list[Any]:
        link = self._peers[0]
        deadline = _deadline(self._timeout)
        # If rank 0 failed and closed first, the notice it left (or the end of stream) is read
        # below.
        with contextlib.suppress(_Closed):
            link.send(link.pack(_VALUE, message), deadline)
        values = []
        while len(values) < self._world_size:
            frame = link.recv(deadline)
            if frame is None:
                raise RendezvousTimeout(f"rank {self._rank}: rank 0 did not answer within "
                                        f"{self._timeout:g}s")
            values.append(_exchanged(*frame, f"rank {self._rank}", "rank 0"))
        return values

    def _fail(self, exc: BaseException, reason: str) -> None:
        """Close after a failure; first tell the peers why, so that they fail now with this
        reason instead of timing out later with a vaguer one. Best effort: some may be gone."""
        if not self._closed:
            _tell_failure(self._peers.values(), exc, reason)
        self.close()


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
    """Join ``world_size`` processes; every rank calls it with its own ``rank``.

    Rank 0 listens and the others connect to it (retrying, so they may start before rank 0).
    Returns once every rank has joined. Every rank must be given the same host, port and secret
    (or none). ``timeout`` (seconds) bounds all of it, every wait included, and then each
    :meth:`~Rendezvous.exchange` of the rendezvous returned.

    - ``host``: falls back to ``DETAR_HOST``, then ``127.0.0.1`` (loopback: one machine).
    - ``port``: falls back to ``DETAR_PORT``, then 29517 (:data:`DEFAULT_PORT`).
    - ``authkey``: the secret, falling back to ``DETAR_AUTHKEY`` (a ``str`` is UTF-8 encoded).
      Without one, loopback ranks meet on a Unix socket that only this user can reach (no key
      needed: the kernel vouches for the peer's uid), and any other host is refused. With one,
      ranks meet over TCP and every message is authenticated with it; make it random, e.g.
      ``secrets.token_hex(32)``, and keep it secret.
    - Ranks of different jobs on one host are kept apart by the job identity in
      :data:`JOB_VARIABLES` (``DETAR_JOB_ID`` overrides what the launcher set).

    Nothing received is unpickled; see the module's threat model.

    Raises :class:`ValueError` for bad arguments or a missing secret (before any network
    activity), :class:`~detar_cupy.errors.RendezvousTimeout` naming the ranks that did not join in
    time (and what rank 0 refused meanwhile), :class:`~detar_cupy.errors.MismatchError` on a rank
    whose ``world_size`` differs from rank 0's, and :class:`~detar_cupy.errors.RendezvousError` for
    the other failures (port or socket in use, secret refused, duplicate rank, another job, …).
    """
    check_world(world_size, rank)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    host = host or os.environ.get("DETAR_HOST") or DEFAULT_HOST
    port = _resolve_port(port)
    secret = _resolve_secret(host, authkey)
    deadline = time.monotonic() + timeout
    if world_size == 1:
        return Rendezvous(0, 1, {}, timeout=timeout)
    endpoint = _unix_endpoint(port) if secret is None else _tcp_endpoint(host, port, secret)
    if rank == 0:
        peers = _Lobby(world_size, endpoint, deadline, timeout).run()
        return Rendezvous(0, world_size, peers, timeout=timeout)
    return _join(world_size, rank, endpoint, deadline, timeout)


def check_world(world_size: int, rank: int) -> None:
    """ValueError unless ``world_size >= 1`` and ``0 <= rank < world_size``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


class _Endpoint(NamedTuple):
    """Where rank 0 listens."""

    address: Any  # (host, port), or a Unix socket's path
    where: str  # for messages: "unix:/run/user/1000/detar_cupy/rdv-29517.sock", "10.0.0.1:29517"
    secret: bytes | None  # None on a Unix socket: the peer's uid is checked instead


def _tcp_endpoint(host: str, port: int, secret: bytes) -> _Endpoint:
    return _Endpoint((host, port), f"{host}:{port}", secret)


def _unix_endpoint(port: int) -> _Endpoint:
    path = os.path.join(_private_dir(), f"rdv-{port}.sock")
    return _Endpoint(path, f"unix:{path}", None)


def _private_dir() -> str:
    """This user's directory for rendezvous sockets, created if missing: a directory owned by the
    user that no one else may enter. RendezvousError if what is there is not that."""
    uid = os.geteuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private(os.stat, runtime, uid) is None:
        path = os.path.join(runtime, "detar_cupy")
    else:
        path = os.path.join(tempfile.gettempdir(), f"detar_cupy-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RendezvousError(f"cannot create the rendezvous directory {path}: {exc}") from exc
    problem = _private(os.lstat, path, uid)
    if problem:
        raise RendezvousError(f"refusing the rendezvous directory {path}: {problem}; another user "
                              f"may have planted it. Remove it, or point XDG_RUNTIME_DIR or "
                              f"TMPDIR at a directory only you can use")
    return path


def _private(stat_fn: Callable[[str], os.stat_result], path: str, uid: int) -> str | None:
    """Why ``path`` is not a directory of ``uid`` closed to everyone else, or None."""
    try:
        info = stat_fn(path)
    except OSError as exc:
        return f"it cannot be examined ({exc})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != uid:
        return f"it belongs to uid {info.st_uid}, not to this user (uid {uid})"
    if info.st_mode & 0o077:
        return f"its mode {stat.S_IMODE(info.st_mode):#o} lets others in (0o700 expected)"
    return None


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


def _resolve_secret(host: str, authkey: bytes | str | None) -> bytes | None:
    """The secret, or None where a Unix socket checked by uid replaces it."""
    if authkey is None:
        authkey = os.environ.get("DETAR_AUTHKEY") or None
    if authkey is None:
        if not _is_loopback(host):
            raise ValueError(f"host {host!r} is not loopback: set a secret with DETAR_AUTHKEY (or "
                             f"authkey=), the same on every rank, e.g. "
                             f"DETAR_AUTHKEY=$(python3 -c 'import secrets; "
                             f"print(secrets.token_hex(32))')")
        if not _UNIX_CREDENTIALS:
            raise ValueError("this platform cannot check the user of a Unix socket's peer, so "
                             "loopback ranks need a secret too: set DETAR_AUTHKEY (or authkey=)")
        return None
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


def _job_identity() -> str:
    """``"VARIABLE=value"`` of the first of :data:`JOB_VARIABLES` that is set, or ``""``."""
    for name in JOB_VARIABLES:
        value = os.environ.get(name)
        if value:
            if name == "SLURM_JOB_ID":  # steps of one allocation are different jobs to us
                value += "." + os.environ.get("SLURM_STEP_ID", "")
            return f"{name}={value}"
    return ""


def _proof(secret: hmac.HMAC, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    # The role keeps one side's proof from being replayed as the other's, or as the session key.
    mac = secret.copy()
    mac.update(role + server_nonce + client_nonce)
    return mac.digest()


@dataclasses.dataclass
class _Handshake:
    """A connection rank 0 has accepted that has not yet joined."""

    expect: bytes  # the frame it must send next: _RESPONSE (TCP, first) or _HELLO
    nonce: bytes  # rank 0's nonce (TCP)
    deadline: float


class _Lobby:
    """Rank 0's side of :func:`connect`: admits ranks until all have joined.

    One thread and one selector: nothing waits on a single client, so no client can stall the
    others or make rank 0 fail (see the module's threat model).
    """

    def __init__(self, world_size: int, endpoint: _Endpoint, deadline: float,
                 timeout: float) -> None:
        self.world_size = world_size
        self.endpoint = endpoint
        self.job = ""
        self.secret: hmac.HMAC | None = None
        self.deadline = deadline
        self.timeout = timeout
        self.pending: dict[_Link, _Handshake] = {}  # oldest first
        self.joined: dict[int, _Link] = {}
        self.notes: list[str] = []  # the first refusals and departures, for the timeout error
        self.refusals = 0
        self.dropped = 0  # connections that were silent or pushed out
        self.selector = selectors.DefaultSelector()

    def run(self) -> dict[int, _Link]:
        """Every joining rank's link, once all have joined and been welcomed."""
        listener, bound = _listen(self.endpoint)
        try:
            # After listening: the others may be dialing already.
            self.job = _job_identity()
            if self.endpoint.secret is not None:
                self.secret = _keyed(self.endpoint.secret)
            self.selector.register(listener, selectors.EVENT_READ, None)
            self._admit(listener)
            welcome = _wire.encode(None)
            for rank, link in self.joined.items():
                try:
                    link.send(link.pack(_WELCOME, welcome), self.deadline)
                except _Closed as exc:
                    raise RendezvousError(f"rank 0: rank {rank} left during the rendezvous "
                                          f"({exc})") from exc
        except BaseException as exc:
            _tell_failure(self.joined.values(), exc, str(exc) or type(exc).__name__)
            for link in self.joined.values():
                link.close()
            raise
        finally:
            for link in self.pending:  # still in their handshake when the group formed
                link.close()
            self.selector.close()
            listener.close()
            if bound is not None:
                _unlink_if_same(self.endpoint.address, bound)
        return self.joined

    def _admit(self, listener: socket.socket) -> None:
        while len(self.joined) < self.world_size - 1:
            now = time.monotonic()
            if now >= self.deadline:
                raise self._timeout()
            for link in [k for k, h in self.pending.items() if h.deadline <= now]:
                self._drop(link)
            wake = min([self.deadline, *(h.deadline for h in self.pending.values())])
            ready = [key.data for key, _ in self.selector.select(max(0.0, wake - now))]
            # Clients first: a rank whose answer has arrived is read before new connections
            # can push it out.
            for link in ready:
                if link in self.pending:
                    self._advance(link)
                elif link in self.joined.values():
                    self._lost(link)
            if None in ready:
                self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, or the client gave up: make room, carry on
                if self.pending:
                    self._drop(next(iter(self.pending)))
                return
            if len(self.pending) >= MAX_PENDING:
                self._drop(next(iter(self.pending)))
            secret = self.secret
            link = _Link(sock, "rank 0", "", _HANDSHAKE_BODY)
            if secret is None:
                pid, uid = link.credentials()
                link.peer = f"pid {pid} (uid {uid})"
                if uid != os.geteuid():
                    self._refuse(link, f"{link.peer} is another user; only uid {os.geteuid()} "
                                       f"may join")
                    continue
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link.peer = f"{address[0]}:{address[1]}"
            nonce = b"" if secret is None else secrets.token_bytes(_NONCE_BYTES)
            greeting = _wire.encode((_NAME, PROTOCOL_VERSION, nonce))
            if not link.offer(link.pack(_GREETING, greeting)):
                self._drop(link)
                continue
            step = _HELLO if secret is None else _RESPONSE
            deadline = min(self.deadline, time.monotonic() + HANDSHAKE_S)
            self.pending[link] = _Handshake(step, nonce, deadline)
            self.selector.register(link, selectors.EVENT_READ, link)

    def _advance(self, link: _Link) -> None:
        """Take the handshake steps of a client that has something to read."""
        try:
            link.pump()
            while link in self.pending and (frame := link.frame()) is not None:
                self._step(link, self.pending[link], *frame)
        except RendezvousError as exc:  # closed, malformed, unauthenticated: drop only it
            self._refuse(link, str(exc).replace("rank 0: ", "", 1))

    def _step(self, link: _Link, shake: _Handshake, kind: bytes, message: bytes) -> None:
        if kind != shake.expect:
            raise RendezvousError(f"{link.peer} sent a {kind!r} frame where {shake.expect!r} "
                                  f"belongs")
        if kind == _RESPONSE:
            assert self.secret is not None
            secret = self.secret
            nonce, proof = _fields(message, link.peer, bytes, bytes)
            if len(nonce) != _NONCE_BYTES or not hmac.compare_digest(
                    proof, _proof(secret, b"client", shake.nonce, nonce)):
                refusal = ("error", "this rank's secret differs from rank 0's: every rank needs "
                           "the same DETAR_AUTHKEY (or authkey=)")
                link.offer(link.pack(_ERROR, _wire.encode(refusal)))
                raise RendezvousError(f"{link.peer} does not know the secret")
            link.offer(link.pack(_ACCEPT, _wire.encode(
                (_proof(secret, b"server", shake.nonce, nonce),))))
            session = _keyed(_proof(secret, b"session", shake.nonce, nonce))
            link.seal(session, server=True)
            link.require_seal(session, server=True)
            shake.expect = _HELLO
            return
        version, job, world_size, rank = _fields(message, link.peer, int, str, int, int)
        problem = self._check_hello(version, job, world_size, rank)
        if problem is not None:
            link.offer(link.pack(_ERROR, _wire.encode(problem)))
            raise RendezvousError(f"{link.peer}: {problem[1]}")
        del self.pending[link]
        link.peer, link.limit = f"rank {rank}", _FULL_BODY
        self.joined[rank] = link

    def _check_hello(self, version: int, job: str, world_size: int,
                     rank: int) -> tuple[str, str] | None:
        """None if the client may join, else (kind of error, the reason to send it)."""
        if version != PROTOCOL_VERSION:
            return "error", (f"a rank speaks rendezvous protocol {version}, rank 0 speaks "
                             f"{PROTOCOL_VERSION}: install the same detar_cupy version everywhere")
        if job != self.job:
            return "error", (f"rank {rank} belongs to job {job or '(none)'}, rank 0 to job "
                             f"{self.job or '(none)'}: ranks of one job must see the same "
                             f"job identity (set DETAR_JOB_ID alike on all of them)")
        if world_size != self.world_size:
            return "mismatch", (f"rank {rank} was started with world size {world_size}, "
                                f"but rank 0 with world size {self.world_size}")
        if not 0 < rank < self.world_size:
            return "error", (f"rank {rank} cannot join: joining ranks are "
                             f"1..{self.world_size - 1} (rank 0 is the listening process)")
        if rank in self.joined:
            return "error", f"rank {rank} has already joined: two processes were given rank {rank}"
        return None

    def _lost(self, link: _Link) -> None:
        # A joined rank sends nothing until the group is complete: readable means it went away
        # (or broke the protocol). Forget it; it may join again before the deadline.
        rank = next(r for r, joined in self.joined.items() if joined is link)
        with contextlib.suppress(_Closed):
            link.pump()
        del self.joined[rank]
        self._refuse(link, f"rank {rank} left (or spoke out of turn) before the group was "
                           f"complete")

    def _refuse(self, link: _Link, reason: str) -> None:
        self.refusals += 1
        if len(self.notes) < _NOTES:
            self.notes.append(reason)
        self._close(link)

    def _drop(self, link: _Link) -> None:
        self.dropped += 1
        self._close(link)

    def _close(self, link: _Link) -> None:
        with contextlib.suppress(KeyError):  # not registered: refused before its greeting
            self.selector.unregister(link)
        self.pending.pop(link, None)
        link.close()

    def _timeout(self) -> RendezvousTimeout:
        missing = sorted(set(range(1, self.world_size)) - set(self.joined))
        text = (f"rank 0: {_ranks_text(missing)} never joined the rendezvous at "
                f"{self.endpoint.where} within {self.timeout:g}s")
        if self.notes:
            more = self.refusals - len(self.notes)
            text += f"; meanwhile: {'; '.join(self.notes)}" + (f"; {more} more" if more else "")
        if self.dropped:
            text += f"; closed {self.dropped} connection(s) that did not finish a handshake"
        return RendezvousTimeout(text)


def _fields(message: bytes, sender: str, *types: type) -> tuple[Any, ...]:
    """The tuple in ``message``, its items of exactly ``types`` (a bool is not an int)."""
    value = _wire.decode(message, sender)
    if type(value) is not tuple or tuple(type(v) for v in value) != types:
        raise RendezvousError(f"{sender} sent {value!r:.200} where a tuple of "
                              f"({', '.join(t.__name__ for t in types)}) belongs")
    return value


def _listen(endpoint: _Endpoint) -> tuple[socket.socket, tuple[int, int] | None]:
    """A non-blocking listening socket, and for a Unix socket its file's (device, inode)."""
    sock = None
    bound = None
    try:
        if endpoint.secret is not None:
            family, kind, proto, _, address = socket.getaddrinfo(*endpoint.address,
                                                                 type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            # Lets a new run reuse the port while the previous run's sockets linger in
            # TIME_WAIT; binding a port that something is listening on still fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _bind_unix(sock, endpoint.address)
            info = os.stat(endpoint.address)
            bound = (info.st_dev, info.st_ino)
        sock.listen()
        sock.setblocking(False)
    except OSError as exc:
        if sock is not None:
            sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise RendezvousError(f"rank 0 cannot listen on {endpoint.where}: {exc}") from exc
        if endpoint.secret is None:
            raise RendezvousError(
                f"rank 0 cannot listen on {endpoint.where}: another process of this user listens "
                f"there (another job, or a second rank 0?); choose another port with DETAR_PORT "
                f"or port=") from exc
        raise RendezvousError(
            f"rank 0 cannot listen on {endpoint.where}: the port is in use (by another job, "
            f"or was a second process started as rank 0?); choose a free port with "
            f"DETAR_PORT or port=") from exc
    return sock, bound


def _bind_unix(sock: socket.socket, path: str) -> None:
    try:
        sock.bind(path)
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    # The file exists. Left over from a rank 0 that died if connecting to it is refused: then
    # replace it. Anything else (accepted, or slow to answer) means something listens there.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock.bind(path)
            return
        except OSError:
            pass
    raise OSError(errno.EADDRINUSE, f"{path} is in use")


def _unlink_if_same(path: str, bound: tuple[int, int]) -> None:
    # Only the file this rank 0 bound: a later rank 0 may have replaced it.
    with contextlib.suppress(OSError):
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == bound:
            os.unlink(path)


def _join(world_size: int, rank: int, endpoint: _Endpoint, deadline: float,
          timeout: float) -> Rendezvous:
    """A joining rank's side of :func:`connect`."""
    last_error: BaseException | None = None
    reached = False
    pause = _DIAL_RETRY_FIRST_S
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            sock = _dial(endpoint, remaining)
        except OSError as exc:  # nobody listening yet
            last_error = exc
        else:
            reached = True
            link = _Link(sock, f"rank {rank}", f"rank 0 at {endpoint.where}")
            try:
                _enter(link, world_size, rank, endpoint, deadline, timeout)
            except _Closed as exc:
                # Rank 0 pushed this connection out while busy, or went away: dial again.
                link.close()
                last_error = exc
            except BaseException:
                link.close()
                raise
            else:
                link.peer = "rank 0"
                return Rendezvous(rank, world_size, {0: link}, timeout=timeout)
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, _DIAL_RETRY_MAX_S)
    if reached:
        raise RendezvousTimeout(f"rank {rank}: rank 0 at {endpoint.where} did not complete the "
                                f"rendezvous within {timeout:g}s (last error: {last_error})")
    hint = ("; ranks that meet on loopback without a secret must all run as one user, none of "
            "them with DETAR_AUTHKEY" if endpoint.secret is None else "")
    raise RendezvousTimeout(f"rank {rank}: rank 0 never became reachable at {endpoint.where} "
                            f"within {timeout:g}s (last error: {last_error!r}){hint}")


def _dial(endpoint: _Endpoint, timeout: float) -> socket.socket:
    if endpoint.secret is not None:
        sock = socket.create_connection(endpoint.address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(endpoint.address)
    except BaseException:
        sock.close()
        raise
    return sock


def _enter(link: _Link, world_size: int, rank: int, endpoint: _Endpoint, deadline: float,
           timeout: float) -> None:
    """The joining side of the handshake, up to rank 0's welcome."""
    where = endpoint.where
    # What needs no answer first, while rank 0 prepares its greeting.
    hello = _wire.encode((PROTOCOL_VERSION, _job_identity(), world_size, rank))
    secret = None if endpoint.secret is None else _keyed(endpoint.secret)
    stranger = (f"rank {rank}: {where} answered, but not as a detar_cupy rank 0 would (wrong "
                f"DETAR_HOST/DETAR_PORT?)")
    if secret is None:
        pid, uid = link.credentials()
        if uid != os.geteuid():
            raise RendezvousError(f"rank {rank}: the process listening at {where} (pid {pid}) "
                                  f"runs as uid {uid}, not as this user (uid {os.geteuid()}); "
                                  f"refusing to talk to it")

    def expect(kind: bytes) -> tuple[bytes, bytes]:
        try:
            frame = link.recv(deadline)
        except _Closed:
            raise
        except RendezvousError as exc:  # a frame too large, or failing authentication
            raise RendezvousError(f"{stranger} ({exc})") from exc
        if frame is None:
            raise RendezvousTimeout(f"rank {rank}: rank 0 at {where} did not complete the "
                                    f"rendezvous within {timeout:g}s")
        if frame[0] == _ERROR:
            _raise_notice(frame[1], f"rank 0 at {where}",
                          f"rank {rank}: rank 0 at {where} refused this rank")
        if frame[0] != kind:
            raise RendezvousError(stranger)
        return frame

    greeting = _wire.decode(expect(_GREETING)[1], where)
    # (name, version) first, whatever follows in other versions, so that a rank 0 of another
    # version is told apart from a stranger.
    if type(greeting) is not tuple or greeting[:1] != (_NAME,) or len(greeting) < 2:
        raise RendezvousError(stranger)
    if greeting[1] != PROTOCOL_VERSION:
        raise RendezvousError(f"rank {rank}: rank 0 at {where} speaks rendezvous protocol "
                              f"{greeting[1]!r:.20}, this rank {PROTOCOL_VERSION}: install the "
                              f"same detar_cupy version everywhere")
    server_nonce = greeting[-1]
    if tuple(map(type, greeting)) != (str, int, bytes) or len(server_nonce) != (
            0 if secret is None else _NONCE_BYTES):
        raise RendezvousError(stranger)
    if secret is None:
        link.send(link.pack(_HELLO, hello), deadline)
    else:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        response = link.pack(_RESPONSE, _wire.encode(
            (nonce, _proof(secret, b"client", server_nonce, nonce))))
        session = _keyed(_proof(secret, b"session", server_nonce, nonce))
        link.seal(session, server=False)
        # The hello goes with the response, a round trip sooner, before rank 0 has proven that
        # it knows the secret: the hello holds nothing secret, and without the secret no one can
        # pass a forged answer off as rank 0's.
        link.send(response + link.pack(_HELLO, hello), deadline)
        (proof,) = _fields(expect(_ACCEPT)[1], where, bytes)
        if not hmac.compare_digest(proof, _proof(secret, b"server", server_nonce, nonce)):
            raise RendezvousError(f"rank {rank}: the process at {where} does not know the secret "
                                  f"(DETAR_AUTHKEY); refusing to talk to it")
        link.require_seal(session, server=False)
    if _wire.decode(expect(_WELCOME)[1], where) is not None:
        raise RendezvousError(f"rank {rank}: rank 0 at {where} sent a malformed welcome")


def _exchanged(kind: bytes, message: bytes, me: str, sender: str) -> Any:
    """The value of ``sender``'s frame in an exchange, or the failure it reports, raised here."""
    if kind == _ERROR:
        _raise_notice(message, sender, f"{me}: {sender} aborted the exchange")
    if kind != _VALUE:
        raise RendezvousError(f"{me}: {sender} sent a {kind!r} frame in an exchange")
    return _wire.decode(message, sender)


def _raise_notice(message: bytes, sender: str, context: str) -> NoReturn:
    """Raise on this rank the error another rank reported in an _ERROR frame."""
    kind, text = _fields(message, sender, str, str)
    cls = {"timeout": RendezvousTimeout, "mismatch": MismatchError}.get(kind, RendezvousError)
    raise cls(f"{context}: {text}")


def _tell_failure(links: Iterable[_Link], exc: BaseException, reason: str) -> None:
    """Offer each peer an _ERROR frame saying why this rank fails (best effort, never blocks:
    some may be gone), so that they fail now with this reason instead of timing out later."""
    notice = _notice(exc, reason)
    for link in links:
        link.offer(link.pack(_ERROR, notice))


def _notice(exc: BaseException, reason: str) -> bytes:
    """The message of an _ERROR frame telling a peer that this rank failed with ``exc``."""
    kind = ("timeout" if isinstance(exc, RendezvousTimeout) else
            "mismatch" if isinstance(exc, MismatchError) else "error")
    # Any exception's text must fit: cut it short and replace what is not valid Unicode.
    text = reason[:_NOTICE_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
    return _wire.encode((kind, text))


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _ranks_text(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))

