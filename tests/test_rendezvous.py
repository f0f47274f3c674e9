"""CPU tests of detar_cupy._rendezvous: pipes and TCP connect(), ranks run in threads."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import _spawn_workers
import pytest

from detar_cupy import _rendezvous as rdv
from detar_cupy.errors import MismatchError, RendezvousError, RendezvousTimeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_threads(*fns: Callable[[], Any]) -> list[Any]:
    """Run each fn in its own thread; its return value, or the exception it raised."""
    with concurrent.futures.ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        return [f.exception(timeout=30) or f.result() for f in futures]


def exchange_twice(make: Callable[[], rdv.Rendezvous], obj: Any) -> list[Any]:
    with make() as r:
        first = r.exchange(obj)
        r.barrier()
        second = r.exchange((obj, r.rank, r.world_size))
    return [first, second]


def raw_client(port: int, key: bytes) -> Connection:
    """A hand-driven client that completes the auth handshake with rank 0."""
    conn = Connection(socket.create_connection(("127.0.0.1", port), timeout=5).detach())
    assert conn.poll(5)
    challenge = conn.recv_bytes()
    nonce = os.urandom(32)
    conn.send_bytes(rdv._mac(key, b"client", challenge[len(rdv._CHALLENGE):]) + nonce)
    assert conn.poll(5)
    assert conn.recv_bytes() == rdv._WELCOME + rdv._mac(key, b"server", nonce)
    return conn


# ---------------------------------------------------------------- exchange over pipes and TCP

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pipes_exchange(world: int) -> None:
    mesh = rdv.pipe_mesh(world)
    out = run_threads(*[
        lambda r=r: exchange_twice(lambda: rdv.Rendezvous.from_pipes(r, world, mesh[r], timeout=5),
                                   f"obj{r}")
        for r in range(world)])
    objs = [f"obj{r}" for r in range(world)]
    assert out == [[objs, [(o, r, world) for r, o in enumerate(objs)]]] * world


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_connect_exchange(world: int) -> None:
    port = free_port()
    out = run_threads(*[
        lambda r=r: exchange_twice(lambda: rdv.connect(world, r, port=port, timeout=5),
                                   {"rank": r})
        for r in range(world)])
    objs = [{"rank": r} for r in range(world)]
    assert out == [[objs, [(o, r, world) for r, o in enumerate(objs)]]] * world


def test_connect_across_processes() -> None:
    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawn_workers.connect_and_exchange, args=(3, r, port, out))
             for r in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    objs = [f"from {r}" for r in range(3)]
    assert sorted(out.get() for _ in range(3)) == [(r, objs) for r in range(3)]


def test_connect_localhost_without_key() -> None:
    port = free_port()
    out = run_threads(*[lambda r=r: rdv.connect(2, r, host="localhost", port=port,
                                                 timeout=5).exchange(r) for r in range(2)])
    assert out == [[0, 1], [0, 1]]


def test_close_is_idempotent_and_final() -> None:
    mesh = rdv.pipe_mesh(2)
    r = rdv.Rendezvous.from_pipes(1, 2, mesh[1], timeout=1)
    r.close()
    r.close()
    with pytest.raises(RendezvousError, match="closed"):
        r.exchange(1)


# ---------------------------------------------------------------- failures during exchange

def test_pipes_dead_peer_named() -> None:
    mesh = rdv.pipe_mesh(3)
    for conn in mesh[2]:
        conn.close()  # rank 2 exited
    zero = rdv.Rendezvous.from_pipes(0, 3, mesh[0], timeout=5)
    one = rdv.Rendezvous.from_pipes(1, 3, mesh[1], timeout=5)
    err0, err1 = run_threads(lambda: zero.exchange(0), lambda: one.exchange(1))
    assert isinstance(err0, RendezvousError) and "rank 2" in str(err0)
    # rank 0 tells the others why instead of letting them time out
    assert isinstance(err1, RendezvousError) and "rank 2" in str(err1)
    with pytest.raises(RendezvousError, match="closed"):
        zero.exchange(0)  # a failed rendezvous stays failed


def test_pipes_silent_peer_times_out() -> None:
    mesh = rdv.pipe_mesh(3)
    # rank 1 waits longer than rank 0, so it hears rank 0's reason instead of timing out itself
    ranks = [rdv.Rendezvous.from_pipes(r, 3, mesh[r], timeout=t)
             for r, t in enumerate([0.5, 1.5, 0.5])]
    start = time.monotonic()
    err0, err1 = run_threads(lambda: ranks[0].exchange(0), lambda: ranks[1].exchange(1))
    assert time.monotonic() - start < 2.0
    for err in (err0, err1):
        assert isinstance(err, RendezvousTimeout) and "rank 2" in str(err)
        assert "rank 1 did not" not in str(err)


def test_rank0_silent_times_out() -> None:
    mesh = rdv.pipe_mesh(2)
    one = rdv.Rendezvous.from_pipes(1, 2, mesh[1], timeout=0.3)
    with pytest.raises(RendezvousTimeout, match="rank 0 did not answer"):
        one.exchange(1)


# ---------------------------------------------------------------- argument checks (no network)

@pytest.mark.parametrize("world, rank", [(2, 2), (2, -1), (0, 0), (3, 1.0)])
def test_rank_out_of_range(world: int, rank: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"rank|world"):
        rdv.connect(world, rank, timeout=5)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("host", ["10.1.2.3", "example.org", "0.0.0.0", "::"])
@pytest.mark.parametrize("rank", [0, 1])
def test_non_loopback_requires_authkey(host: str, rank: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETAR_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match="DETAR_AUTHKEY"):
        rdv.connect(2, rank, host=host, port=free_port(), timeout=5)


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("10.0.0.1", False), ("0.0.0.0", False), ("::", False), ("example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert rdv._is_loopback(host) is loopback


def test_empty_authkey_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        rdv.connect(2, 0, authkey=b"", port=free_port(), timeout=1)


# ---------------------------------------------------------------- connect() failures

def test_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"127.0.0.1:{port}.*DETAR_PORT") as info:
            rdv.connect(2, 0, port=port, timeout=2)
    assert not isinstance(info.value, RendezvousTimeout)


def test_missing_rank_times_out_naming_it() -> None:
    port = free_port()
    start = time.monotonic()
    err0, err1 = run_threads(lambda: rdv.connect(3, 0, port=port, timeout=1.0),
                             lambda: rdv.connect(3, 1, port=port, timeout=1.5))
    assert time.monotonic() - start < 2.5
    assert isinstance(err0, RendezvousTimeout) and "rank 2 never joined" in str(err0)
    # rank 1 hears the reason from rank 0 rather than waiting out its own, longer timeout
    assert isinstance(err1, RendezvousTimeout) and "rank 2 never joined" in str(err1)


def test_client_without_rank0_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(RendezvousTimeout, match="rank 0 never became reachable"):
        rdv.connect(2, 1, port=free_port(), timeout=0.5)
    assert time.monotonic() - start < 1.5


def test_wrong_authkey_refused_then_right_ranks_join() -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, authkey="right", timeout=5).exchange("zero"))
    with pytest.raises(RendezvousError, match="auth key"):
        rdv.connect(2, 1, port=port, authkey="wrong", timeout=5)
    assert rdv.connect(2, 1, port=port, authkey="right", timeout=5).exchange("one") == \
        ["zero", "one"]
    assert server.result(timeout=5) == ["zero", "one"]


def test_wrong_authkey_gets_nothing_but_the_challenge() -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, authkey="right", timeout=5).exchange("zero"))
    sock = None
    while sock is None:  # the server thread may not listen yet
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.02)
    conn = Connection(sock.detach())
    assert conn.poll(5) and conn.recv_bytes().startswith(rdv._CHALLENGE)
    conn.send_bytes(os.urandom(64))
    assert conn.poll(5) and conn.recv_bytes() == rdv._FAILURE
    assert conn.poll(5)
    with pytest.raises(EOFError):
        conn.recv_bytes()  # closed: no payload, no pickle was ever sent
    assert rdv.connect(2, 1, port=port, authkey="right", timeout=5).exchange("one") == \
        ["zero", "one"]
    assert server.result(timeout=5) == ["zero", "one"]


def test_impostor_rank0_refused_before_hello() -> None:
    """A client does not unpickle, nor send its hello to, a server that lacks the key."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[Any] = []

    def impostor() -> None:
        sock, _ = listener.accept()
        conn = Connection(sock.detach())
        conn.send_bytes(rdv._CHALLENGE + os.urandom(32))
        conn.recv_bytes()
        conn.send_bytes(rdv._WELCOME + os.urandom(32))
        try:
            seen.append(conn.recv_bytes())
        except EOFError:
            seen.append("closed")

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(RendezvousError, match="does not know the auth key"):
        rdv.connect(2, 1, port=port, authkey="key", timeout=5)
    thread.join(5)
    listener.close()
    assert seen == ["closed"]


def test_duplicate_rank_refused() -> None:
    port = free_port()
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def join(rank: int) -> list[Any]:
        return rdv.connect(3, rank, port=port, timeout=5).exchange(rank)

    server, first, second = (pool.submit(join, r) for r in (0, 1, 1))
    done, _ = concurrent.futures.wait([first, second], timeout=5,
                                      return_when=concurrent.futures.FIRST_COMPLETED)
    loser = done.pop()  # the winner waits for rank 2, the loser is refused at once
    assert isinstance(loser.exception(), RendezvousError)
    assert "rank 1 has already joined" in str(loser.exception())
    winner = second if loser is first else first
    third = pool.submit(join, 2)
    assert [f.result(timeout=5) for f in (server, winner, third)] == [[0, 1, 2]] * 3
    pool.shutdown()


def test_world_size_mismatch() -> None:
    port = free_port()
    err0, err1 = run_threads(lambda: rdv.connect(2, 0, port=port, timeout=5),
                             lambda: rdv.connect(3, 1, port=port, timeout=5))
    for err in (err0, err1):
        assert isinstance(err, MismatchError)
        assert "world size 3" in str(err) and "world size 2" in str(err)


def test_server_refuses_bad_hello_and_keeps_waiting() -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, timeout=5).exchange(0))
    while True:
        try:
            conn = raw_client(port, rdv.LOOPBACK_AUTHKEY)
            break
        except ConnectionRefusedError:
            time.sleep(0.02)
    conn.send((rdv.PROTOCOL_VERSION, 2, 5))  # a rank that is out of range for rank 0
    assert conn.poll(5)
    kind, _, message = conn.recv()
    assert kind == "error" and "rank 5 cannot join" in message
    conn.close()
    assert rdv.connect(2, 1, port=port, timeout=5).exchange(1) == [0, 1]
    assert server.result(timeout=5) == [0, 1]


def test_rank_that_left_may_join_again() -> None:
    port = free_port()
    pool = concurrent.futures.ThreadPoolExecutor(3)
    server = pool.submit(lambda: rdv.connect(3, 0, port=port, timeout=5).exchange(0))
    while True:
        try:
            conn = raw_client(port, rdv.LOOPBACK_AUTHKEY)
            break
        except ConnectionRefusedError:
            time.sleep(0.02)
    conn.send((rdv.PROTOCOL_VERSION, 3, 1))
    time.sleep(0.2)  # joined, then gone before the group completes
    conn.close()
    time.sleep(0.2)
    ranks = [pool.submit(lambda r=r: rdv.connect(3, r, port=port, timeout=5).exchange(r))
             for r in (1, 2)]
    assert [f.result(timeout=5) for f in (server, *ranks)] == [[0, 1, 2]] * 3
    pool.shutdown()


# ---------------------------------------------------------------- environment fallbacks

def test_env_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("DETAR_HOST", "127.0.0.1")
    monkeypatch.setenv("DETAR_PORT", str(port))
    monkeypatch.setenv("DETAR_AUTHKEY", "from the environment")
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, timeout=5).exchange(0))
    # the explicit key wins over DETAR_AUTHKEY, and differs from rank 0's
    with pytest.raises(RendezvousError, match="auth key"):
        rdv.connect(2, 1, authkey="explicit", timeout=5)
    assert rdv.connect(2, 1, authkey=b"from the environment", timeout=5).exchange(1) == [0, 1]
    assert server.result(timeout=5) == [0, 1]


def test_env_non_loopback_host_requires_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_HOST", "192.0.2.7")
    monkeypatch.delenv("DETAR_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match=r"192\.0\.2\.7.*DETAR_AUTHKEY"):
        rdv.connect(2, 1, timeout=5)


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_env_bad_port(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETAR_PORT", value)
    with pytest.raises(ValueError, match="DETAR_PORT"):
        rdv.connect(2, 0, timeout=5)


def test_unpicklable_object_fails_on_sender() -> None:
    """Exchanged objects travel by pickle; an unpicklable one fails on the sender, clearly."""
    mesh = rdv.pipe_mesh(2)
    one = rdv.Rendezvous.from_pipes(1, 2, mesh[1], timeout=1)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        one.exchange(threading.Lock())
