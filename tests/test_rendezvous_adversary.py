"""Attacks on connect(), CPU only, on loopback: a live rank 0 and joining ranks (threads, or
processes of another user when run as root) against port squatters, rank thieves, forged hellos,
malformed and idle connections, and a man in the middle on TCP.

Every test bounds its own waits (thread joins, socket timeouts). Whatever the attacker sends, no
rank may run its code: the attacker sends pickles whose unpickling creates a file, and the
``marker`` fixture fails the test if that file exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import multiprocessing
import os
import pickle
import resource
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _rendezvous_peers import Client, free_port, knock

from detar_cupy import _rendezvous as rdv
from detar_cupy import _wire
from detar_cupy.errors import MismatchError, RendezvousError

# The key every rank used on loopback before loopback moved to Unix sockets: public, so the
# attacker knows it.
PUBLIC_KEY = b"detar_cupy loopback rendezvous (not a secret)"
SECRET = b"a secret the attacker does not know"
SETUPS = {"loopback": None, "secret": SECRET}
TIMEOUT = 4.0  # rendezvous timeout of the legitimate ranks
BOUND = 10.0  # how long a test waits for a rank before calling it a hang
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run another user")


class Bomb:
    """Unpickling it creates ``path``: proof that the receiver ran the sender's code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (self.path, "w")


class Outcome:
    """fn() in a daemon thread; get() is its value or exception, or "HANG" after ``bound``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = "HANG"
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:
            self.value = exc

    def get(self, bound: float = BOUND) -> Any:
        self.thread.join(bound)
        return self.value


def rank(world: int, r: int, port: int, setup: str, objs: tuple[str, ...] = ("x",),
         timeout: float = TIMEOUT) -> Outcome:
    """A legitimate rank: connects, exchanges ``f"{obj}-{r}"`` for each obj."""
    def run() -> list[Any]:
        with rdv.connect(world, r, port=port, authkey=SETUPS[setup], timeout=timeout) as rv:
            return [rv.exchange(f"{o}-{r}") for o in objs]
    return Outcome(run)


def completed(outcome: Outcome, world: int = 2, objs: tuple[str, ...] = ("x",)) -> bool:
    return outcome.get() == [[f"{o}-{r}" for r in range(world)] for o in objs]


def clear_error(outcome: Outcome) -> bool:
    return isinstance(outcome.get(), RendezvousError)


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("DETAR_JOB_ID", raising=False)


@pytest.fixture
def marker() -> Iterator[Path]:
    # In a directory every user may write to: the victim may run as another user.
    where = Path(tempfile.mkdtemp())
    where.chmod(0o1777)
    path = where / "code-ran"
    yield path
    ran = path.exists()
    shutil.rmtree(where)
    assert not ran, "a rank unpickled the attacker's payload: it ran the attacker's code"


# ---------------------------------------------------------------- the attacker's tools

def old_frame(body: bytes) -> bytes:
    """A frame of the old protocol (multiprocessing.connection): i32 length, body."""
    return struct.pack("!i", len(body)) + body


def old_mac(role: bytes, nonce: bytes) -> bytes:
    return hmac.new(PUBLIC_KEY, role + nonce, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def old_protocol_bomb(sock: socket.socket, marker: Path) -> str:
    """Play a client of the old protocol with the public key; if rank 0 lets it through, send
    a pickle bomb as the hello. What happened, as text."""
    sock.settimeout(3)
    try:
        challenge = recv_exact(sock, struct.unpack("!i", recv_exact(sock, 4))[0])
        sock.sendall(old_frame(old_mac(b"client", challenge[-32:]) + os.urandom(32)))
        sock.sendall(old_frame(pickle.dumps(Bomb(marker))))
        answer = sock.recv(1 << 16)
        return f"answered {answer!r}" if answer else "closed"
    except (OSError, EOFError, struct.error) as exc:
        return f"closed: {exc!r}"


class OldSquatter:
    """Takes the TCP port first and plays rank 0 of the old protocol with the public key: every
    hello is answered with a pickle bomb."""

    def __init__(self, port: int, marker: Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(BOUND)
        self.marker = marker
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, EOFError, struct.error):
            sock, _ = self.listener.accept()
            sock.settimeout(3)
            sock.sendall(old_frame(b"#detar_cupy rendezvous challenge#" + os.urandom(32)))
            answer = recv_exact(sock, struct.unpack("!i", recv_exact(sock, 4))[0])
            sock.sendall(old_frame(b"#detar_cupy welcome#" + old_mac(b"server", answer[-32:])))
            sock.sendall(old_frame(pickle.dumps(Bomb(self.marker))))
            time.sleep(1)

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------- squatter, thief, forged hello

@pytest.mark.parametrize("setup", list(SETUPS))
def test_port_squatter_with_public_key(setup: str, marker: Path) -> None:
    port = free_port()
    squatter = OldSquatter(port, marker)
    try:
        one = rank(2, 1, port, setup)
        time.sleep(0.3)
        zero = rank(2, 0, port, setup)
        outcomes = [zero.get(), one.get()]
    finally:
        squatter.close()
    if setup == "loopback":  # loopback ranks meet on a Unix socket: the squatter never hears
        assert completed(zero) and completed(one), outcomes
    else:  # rank 0 cannot listen; rank 1 refuses the squatter: both say so
        assert "port is in use" in str(outcomes[0])
        assert isinstance(outcomes[1], RendezvousError), outcomes
        assert f"127.0.0.1:{port}" in str(outcomes[1]), outcomes


@pytest.mark.parametrize("setup", list(SETUPS))
def test_rank_thief(setup: str, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connects first and claims rank 1: with the old protocol and the public key (and a bomb),
    then with this protocol, as a process of another job (loopback) or with the public key
    (TCP). Refused each time; the real rank 1 then joins."""
    monkeypatch.setenv("DETAR_JOB_ID", "job-a")
    port = free_port()
    zero = rank(2, 0, port, setup)
    with contextlib.closing(knock(port, SETUPS[setup])) as sock:
        assert old_protocol_bomb(sock, marker).startswith("closed")
    thief = Client(port, SETUPS[setup])
    try:
        if setup == "loopback":
            thief.greeting()
            kind, (_, text) = thief.hello(rank=1, job="DETAR_JOB_ID=job-b")  # type: ignore[misc]
            assert kind == rdv._ERROR and "belongs to job DETAR_JOB_ID=job-b" in text
        else:
            kind, (_, text) = thief.respond(PUBLIC_KEY)  # type: ignore[misc]
            assert kind == rdv._ERROR and "secret differs" in text
        assert thief.recv() == "closed"
    finally:
        thief.close()
    one = rank(2, 1, port, setup)
    assert completed(zero) and completed(one), [zero.get(), one.get()]


@pytest.mark.parametrize("field", ["world_size", "rank", "version", "job"])
def test_forged_hello(field: str, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused to the forger alone: rank 0 keeps waiting and the real rank joins."""
    monkeypatch.setenv("DETAR_JOB_ID", "job-a")
    port = free_port()
    zero = rank(2, 0, port, "loopback")
    forged: dict[str, Any] = {"world": 2, "rank": 1, "job": "DETAR_JOB_ID=job-a"}
    forged.update({"world_size": {"world": 3}, "rank": {"rank": 5},
                   "version": {"version": rdv.PROTOCOL_VERSION + 7},
                   "job": {"job": "DETAR_JOB_ID=job-b"}}[field])
    client = Client(port)
    try:
        client.greeting()
        answer = client.hello(**forged)
        assert answer[0] == rdv._ERROR, f"rank 0 accepted a forged hello: {answer}"
        assert answer[1][0] == ("mismatch" if field == "world_size" else "error")
    finally:
        client.close()
    one = rank(2, 1, port, "loopback")
    assert completed(zero) and completed(one), [zero.get(), one.get()]


def test_duplicate_rank_refused_while_rank0_waits() -> None:
    port = free_port()
    zero = rank(3, 0, port, "loopback")
    first = rank(3, 1, port, "loopback")
    while not os.path.exists(rdv._unix_endpoint(port).address):
        time.sleep(0.01)
    time.sleep(0.3)  # the first rank 1 has joined
    second = rank(3, 1, port, "loopback")
    assert isinstance(second.get(), RendezvousError)
    assert "rank 1 has already joined" in str(second.get())
    two = rank(3, 2, port, "loopback")
    assert all(completed(r, 3) for r in (zero, first, two))


# ---------------------------------------------------------------- malformed and idle input

ATTACKS = {
    "garbage": lambda marker: os.urandom(65536),
    "pickle": lambda marker: old_frame(pickle.dumps(Bomb(marker))),
    "truncated_header": lambda marker: b"\x00\x00",
    "one_byte_then_silence": lambda marker: b"\x00",
    "oversize_length": lambda marker: struct.pack("!I", 0x7FFFFFFF) + b"x" * 100,
}


def send_attack(sock: socket.socket, attack: str, payload: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(payload)
        if attack == "truncated_header":  # and the end of the stream
            sock.shutdown(socket.SHUT_WR)


def hung_up_on(sock: socket.socket, within: float = 1.0) -> bool:
    """Whether the other end closes ``sock`` within ``within`` seconds (what it sends first,
    such as a greeting, is skipped)."""
    sock.settimeout(within)
    try:
        while sock.recv(1 << 16):
            pass
    except socket.timeout:
        return False
    except OSError:  # reset: closed with our bytes unread
        pass
    return True


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_malformed_input(attack: str, setup: str, marker: Path) -> None:
    """Raw bytes at the door, before any handshake: refused as soon as they are wrong (the
    silent client when its handshake time is up), and never in the way of the real rank."""
    port = free_port()
    zero = rank(2, 0, port, setup)
    sock = knock(port, SETUPS[setup])
    try:
        send_attack(sock, attack, ATTACKS[attack](marker))
        assert hung_up_on(sock) is (attack != "one_byte_then_silence")
        start = time.monotonic()
        one = rank(2, 1, port, setup)
        assert completed(zero) and completed(one), [zero.get(), one.get()]
        assert time.monotonic() - start < 1.0  # not held up by the attacker
    finally:
        sock.close()


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_malformed_after_handshake(attack: str, setup: str, marker: Path) -> None:
    """The same from a client past the greeting (and the secret): where the hello belongs."""
    port = free_port()
    zero = rank(2, 0, port, setup)
    client = Client(port, SETUPS[setup])
    try:
        client.enter()
        if attack == "pickle":  # a well-formed (and authenticated) frame around a pickle
            payload = client.link.pack(rdv._HELLO, pickle.dumps(Bomb(marker)))
        else:
            payload = ATTACKS[attack](marker)
        send_attack(client.sock, attack, payload)
        assert hung_up_on(client.sock) is (attack != "one_byte_then_silence")
        start = time.monotonic()
        one = rank(2, 1, port, setup)
        assert completed(zero) and completed(one), [zero.get(), one.get()]
        assert time.monotonic() - start < 1.0
    finally:
        client.close()


@pytest.fixture
def many_fds() -> Iterator[int]:
    """Raise the soft limit of open files to the hard one; how many idle connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield min(1000, hard - 200)  # room for rank 0, the ranks and the test itself
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_idle_connections(setup: str, many_fds: int, marker: Path) -> None:
    """Connections that never say anything: rank 0 keeps accepting, holds at most MAX_PENDING
    of them, and the real rank gets in."""
    port = free_port()
    zero = rank(2, 0, port, setup)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 3
        while len(idle) < many_fds and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                idle.append(knock(port, SETUPS[setup], timeout=0.2))
        assert len(idle) == many_fds, f"only {len(idle)} connections in 3 s: rank 0 is stuck"
        time.sleep(0.2)
        held = [sock for sock in idle if not hung_up_on(sock, within=0.001)]
        assert len(held) <= rdv.MAX_PENDING, f"rank 0 holds {len(held)} idle connections"
        one = rank(2, 1, port, setup)
        assert completed(zero) and completed(one), [zero.get(), one.get()]
        assert not [sock for sock in held if not hung_up_on(sock, within=0.1)]
    finally:
        for sock in idle:
            sock.close()


def test_silent_handshake_closed_after_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdv, "HANDSHAKE_S", 0.3)
    port = free_port()
    zero = rank(2, 0, port, "secret")
    client = Client(port, SECRET)
    try:
        client.greeting()
        start = time.monotonic()
        assert client.recv() == "closed"
        assert 0.2 < time.monotonic() - start < 1.5
    finally:
        client.close()
    one = rank(2, 1, port, "secret")
    assert completed(zero) and completed(one)


def test_rank0_timeout_lists_what_it_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_JOB_ID", "job-a")
    port = free_port()
    zero = rank(2, 0, port, "loopback", timeout=1.0)
    client = Client(port)
    client.greeting()
    client.hello(job="DETAR_JOB_ID=job-b")
    client.close()
    err = zero.get()
    assert isinstance(err, RendezvousError) and "rank 1 never joined" in str(err)
    assert "meanwhile" in str(err) and "job DETAR_JOB_ID=job-b" in str(err)


# ---------------------------------------------------------------- a man in the middle (TCP)

STALL = object()


class Proxy:
    """A man in the middle between a joining rank (which connects to .port) and rank 0 (at
    ``target``), relaying frames: ``mangle(direction, index, frame)`` returns the frames to pass
    on ("up": joiner -> rank 0), or (STALL, bytes) to send those bytes and then fall silent."""

    def __init__(self, target: int, mangle: Callable[[str, int, bytes], Any]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(BOUND)
        self.port = self.listener.getsockname()[1]
        self.target, self.mangle = target, mangle
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            down, _ = self.listener.accept()
            up = knock(self.target, SECRET)
            self.held += [down, up]
            for src, dst, name in ((down, up, "up"), (up, down, "down")):
                threading.Thread(target=self._pump, args=(src, dst, name), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        with contextlib.suppress(OSError, EOFError):
            for index in itertools.count():
                header = recv_exact(src, 4)
                out = self.mangle(direction, index, header + recv_exact(src, *struct.unpack(
                    "!I", header)))
                if out and out[0] is STALL:
                    dst.sendall(out[1])
                    return  # silent from now on; the sockets stay open in self.held
                for frame in out:
                    dst.sendall(frame)

    def close(self) -> None:
        self.listener.close()
        for sock in self.held:
            sock.close()


# The frames of a two-rank group that exchanges twice through the proxy. Up: 0 response,
# 1 hello, 2 and 3 the values of the two exchanges. Down: 0 greeting, 1 accept, 2 welcome, then
# the ranks' values, 3 and 4 for the first exchange, 5 and 6 for the second.
def mitm_run(mangle: Callable[[str, int, bytes], Any],
             timeout: float = TIMEOUT) -> tuple[Outcome, Outcome]:
    port = free_port()
    zero = rank(2, 0, port, "secret", objs=("a", "b"), timeout=timeout)
    proxy = Proxy(port, mangle)
    one = rank(2, 1, proxy.port, "secret", objs=("a", "b"), timeout=timeout)
    zero.get(), one.get()
    proxy.close()
    return zero, one


def test_mitm_passthrough_works() -> None:
    zero, one = mitm_run(lambda direction, index, frame: [frame])
    assert completed(zero, 2, ("a", "b")) and completed(one, 2, ("a", "b"))


def failed_authentication(zero: Outcome, one: Outcome, victim: str) -> None:
    """Both ranks fail clearly and promptly; the one that received the frame says why."""
    assert clear_error(zero) and clear_error(one), [zero.get(), one.get()]
    detected = zero if victim == "rank 0" else one
    assert "failed authentication" in str(detected.get())


def test_replayed_frame() -> None:
    captured: list[bytes] = []

    def replay(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "up" and index == 2:
            captured.append(frame)
        if direction == "up" and index == 3:
            return captured  # the first exchange's value again, in place of the second's
        return [frame]

    failed_authentication(*mitm_run(replay), victim="rank 0")


def test_modified_frame() -> None:
    def modify(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [frame.replace(b"a-1", b"Z-1")] if direction == "up" else [frame]

    failed_authentication(*mitm_run(modify), victim="rank 0")


def test_reordered_frames() -> None:
    held: list[bytes] = []

    def reorder(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "down" and index == 3:  # rank 0's value, then rank 1's: swapped
            held.append(frame)
            return []
        if direction == "down" and index == 4:
            return [frame, *held]
        return [frame]

    failed_authentication(*mitm_run(reorder), victim="rank 1")


def test_injected_frame() -> None:
    def inject(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "down" and index == 3:  # a frame of the attacker's own making
            forged = b"V" + _wire.encode("a-0") + os.urandom(32)
            return [struct.pack("!I", len(forged)) + forged]
        return [frame]

    failed_authentication(*mitm_run(inject), victim="rank 1")


def test_truncated_frame_then_silence() -> None:
    def truncate(direction: str, index: int, frame: bytes) -> Any:
        if direction == "up" and index == 2:
            return STALL, frame[:len(frame) // 2]
        return [frame]

    start = time.monotonic()
    zero, one = mitm_run(truncate, timeout=1.0)
    assert time.monotonic() - start < 3
    assert clear_error(zero) and clear_error(one), [zero.get(), one.get()]
    assert "rank 1 did not answer within 1s" in str(zero.get())


# ---------------------------------------------------------------- other users (root only)

def as_user(uid: int, fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """fn(*args) in a forked child that became ``uid``; (process, pipe with the result)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def body() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        try:
            child.send(fn(*args))
        except BaseException as exc:
            child.send(RendezvousError(f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=body, daemon=True)
    proc.start()
    return proc, parent


def child_result(proc: Any, pipe: Any) -> Any:
    value = pipe.recv() if pipe.poll(BOUND) else "HANG"
    proc.join(1)
    if proc.is_alive():
        proc.kill()
    return value


def nobody_home() -> str:
    """A temporary directory of user nobody: its tempfile.tempdir."""
    home = tempfile.mkdtemp()
    os.chmod(home, 0o755)
    os.chown(home, NOBODY, NOBODY)
    return home


def nobody_rank(world: int, r: int, port: int, home: str) -> Any:
    tempfile.tempdir = home
    os.environ.pop("XDG_RUNTIME_DIR", None)
    with rdv.connect(world, r, port=port, timeout=TIMEOUT) as rv:
        return rv.exchange(f"x-{r}")


def intrude(path: str, port: int, marker: str) -> str:
    """As another user: reach rank 0's Unix socket at ``path``, then try the old protocol on
    TCP. What happened, as text."""
    tried = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(path)
            tried.append(f"unix: connected, then {old_protocol_bomb(sock, Path(marker))}")
    except OSError as exc:
        tried.append(f"unix: {exc!r}")
    try:
        with contextlib.closing(knock(port, SECRET, timeout=0.5)) as sock:
            tried.append(f"tcp: {old_protocol_bomb(sock, Path(marker))}")
    except OSError as exc:
        tried.append(f"tcp: {exc!r}")
    return "; ".join(tried)


@needs_root
def test_other_user_cannot_join(marker: Path) -> None:
    port = free_port()
    zero = rank(2, 0, port, "loopback")
    while not os.path.exists(rdv._unix_endpoint(port).address):
        time.sleep(0.01)
    tried = child_result(*as_user(NOBODY, intrude, rdv._unix_endpoint(port).address, port,
                                  str(marker)))
    assert "unix: PermissionError" in tried and "tcp: ConnectionRefusedError" in tried, tried
    one = rank(2, 1, port, "loopback")
    assert completed(zero) and completed(one), [zero.get(), one.get()]


@needs_root
def test_rank0_refuses_other_user(marker: Path) -> None:
    """Ranks of user nobody; root (another user to them) reaches their socket first and speaks
    the protocol perfectly: refused for its uid."""
    port, home = free_port(), nobody_home()
    path = os.path.join(home, f"detar_cupy-{NOBODY}", f"rdv-{port}.sock")
    try:
        zero = as_user(NOBODY, nobody_rank, 2, 0, port, home)
        deadline = time.monotonic() + BOUND
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(path)
            assert sock.recv(1) == b""  # closed at once, not even greeted
        one = as_user(NOBODY, nobody_rank, 2, 1, port, home)
        got = [child_result(*zero), child_result(*one)]
        assert got == [["x-0", "x-1"]] * 2, got
    finally:
        shutil.rmtree(home)


def fake_rank0(path: str) -> socket.socket:
    """A listener at ``path`` that greets like rank 0 and answers every hello with a welcome."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen()
    listener.settimeout(BOUND)

    def serve() -> None:
        with contextlib.suppress(OSError, RendezvousError):
            sock, _ = listener.accept()
            link = rdv._Link(sock, "impostor", "rank 1")
            link.send(link.pack(rdv._GREETING, _wire.encode((rdv._NAME, rdv.PROTOCOL_VERSION,
                                                            b""))), None)
            link.recv(time.monotonic() + 3)
            link.send(link.pack(rdv._WELCOME, _wire.encode(None)), None)
            time.sleep(1)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@needs_root
def test_rank1_refuses_other_users_rank0(marker: Path) -> None:
    """Root squats the socket where nobody's rank 0 should listen; nobody's rank 1 refuses it."""
    port, home = free_port(), nobody_home()
    private = os.path.join(home, f"detar_cupy-{NOBODY}")
    os.mkdir(private, 0o700)
    os.chown(private, NOBODY, NOBODY)
    squatter = fake_rank0(os.path.join(private, f"rdv-{port}.sock"))
    try:
        got = child_result(*as_user(NOBODY, nobody_rank, 2, 1, port, home))
        assert isinstance(got, RendezvousError), got
        assert "runs as uid 0, not as this user (uid 65534)" in str(got)
    finally:
        squatter.close()
        shutil.rmtree(home)


def test_world_size_forger_cannot_fail_rank0() -> None:
    """A real rank with the wrong world size fails itself (MismatchError), not rank 0."""
    port = free_port()
    zero = rank(2, 0, port, "loopback")
    wrong = rank(3, 1, port, "loopback")
    assert isinstance(wrong.get(), MismatchError)
    one = rank(2, 1, port, "loopback")
    assert completed(zero) and completed(one)
