"""CPU tests of detar_cupy._rendezvous: pipes, and connect() over a Unix socket and TCP; ranks run
in threads. Attacks on it are in test_rendezvous_adversary.py, the wire format in test_wire.py."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _spawn_workers
import pytest
from _rendezvous_peers import Client, free_port

from detar_cupy import _rendezvous as rdv
from detar_cupy import _wire
from detar_cupy.errors import MismatchError, RendezvousError, RendezvousTimeout


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


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's Unix sockets in a directory of its own."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


# ---------------------------------------------------------------- exchange over pipes and sockets

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pipes_exchange(world: int) -> None:
    mesh = rdv.pipe_mesh(world)
    out = run_threads(*[
        lambda r=r: exchange_twice(lambda: rdv.Rendezvous.from_pipes(r, world, mesh[r], timeout=5),
                                   f"obj{r}")
        for r in range(world)])
    objs = [f"obj{r}" for r in range(world)]
    assert out == [[objs, [(o, r, world) for r, o in enumerate(objs)]]] * world


@pytest.mark.parametrize("authkey", [None, "secret"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_connect_exchange(world: int, authkey: str | None) -> None:
    port = free_port()
    out = run_threads(*[
        lambda r=r: exchange_twice(
            lambda: rdv.connect(world, r, port=port, authkey=authkey, timeout=5),
            ("rank", r, [b"\x00handle", None, True]))
        for r in range(world)])
    objs = [("rank", r, [b"\x00handle", None, True]) for r in range(world)]
    assert out == [[objs, [(o, r, world) for r, o in enumerate(objs)]]] * world


@pytest.mark.parametrize("authkey", [None, "test"])
def test_connect_across_processes(authkey: str | None) -> None:
    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawn_workers.connect_and_exchange,
                         args=(3, r, port, authkey, out)) for r in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    objs = [f"from {r}" for r in range(3)]
    assert sorted(out.get() for _ in range(3)) == [(r, objs) for r in range(3)]


def test_connect_localhost_without_key(private_runtime_dir: Path) -> None:
    port = free_port()
    path = private_runtime_dir / "detar_cupy" / f"rdv-{port}.sock"
    pool = concurrent.futures.ThreadPoolExecutor(2)
    zero = pool.submit(lambda: rdv.connect(2, 0, host="localhost", port=port,
                                           timeout=5).exchange(0))
    while not path.exists():  # rank 0 listens on a Unix socket in the private directory
        time.sleep(0.01)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    one = pool.submit(lambda: rdv.connect(2, 1, host="localhost", port=port,
                                          timeout=5).exchange(1))
    assert [f.result(timeout=5) for f in (zero, one)] == [[0, 1], [0, 1]]
    assert not path.exists()  # removed once the group has formed
    pool.shutdown()


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


def test_loopback_needs_a_key_without_unix_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdv, "_UNIX_CREDENTIALS", False)
    monkeypatch.delenv("DETAR_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match="DETAR_AUTHKEY"):
        rdv.connect(2, 1, port=free_port(), timeout=5)


@pytest.mark.parametrize("env, want", [
    ({}, ""),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"}, "SLURM_JOB_ID=77.3"),
    ({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "abc"}, "TORCHELASTIC_RUN_ID=abc"),
    ({"DETAR_JOB_ID": "mine", "PMIX_NAMESPACE": "prterun-1"}, "DETAR_JOB_ID=mine"),
    ({"PMI_JOBID": "", "LSB_JOBID": "12"}, "LSB_JOBID=12"),
])
def test_job_identity(env: dict[str, str], want: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*rdv.JOB_VARIABLES, "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rdv._job_identity() == want


# ---------------------------------------------------------------- the private socket directory

def test_runtime_dir_used_when_private(private_runtime_dir: Path) -> None:
    assert rdv._private_dir() == str(private_runtime_dir / "detar_cupy")


@pytest.mark.parametrize("problem", ["missing", "group", "not_a_dir"])
def test_tmp_dir_when_runtime_dir_is_not_private(problem: str, tmp_path: Path,
                                                 private_runtime_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if problem == "missing":
        private_runtime_dir.rmdir()
    elif problem == "group":
        private_runtime_dir.chmod(0o750)
    else:
        private_runtime_dir.rmdir()
        private_runtime_dir.write_text("")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = Path(rdv._private_dir())
    assert path == tmp_path / f"detar_cupy-{os.geteuid()}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


@pytest.mark.parametrize("problem, match", [
    ("mode", "mode 0o755 lets others in"),
    ("symlink", "symbolic link"),
    ("file", "not a directory"),
    ("owner", "belongs to uid 65534"),
])
def test_planted_tmp_dir_refused(problem: str, match: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if problem == "owner" and os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    planted = tmp_path / f"detar_cupy-{os.geteuid()}"
    if problem == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        planted.symlink_to(tmp_path / "elsewhere")
    elif problem == "file":
        planted.write_text("")
    else:
        planted.mkdir(mode=0o700)
        if problem == "mode":
            planted.chmod(0o755)
        else:
            os.chown(planted, 65534, 65534)
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=f"refusing .*{planted}.*{match}"):
        rdv.connect(2, 1, port=free_port(), timeout=5)
    assert time.monotonic() - start < 1


# ---------------------------------------------------------------- connect() failures

def test_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"127.0.0.1:{port}.*DETAR_PORT") as info:
            rdv.connect(2, 0, port=port, authkey="k", timeout=2)
    assert not isinstance(info.value, RendezvousTimeout)


def test_unix_socket_in_use() -> None:
    port = free_port()
    path = rdv._unix_endpoint(port).address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(path)
        busy.listen()
        with pytest.raises(RendezvousError, match=f"unix:{path}: another process .*DETAR_PORT"):
            rdv.connect(2, 0, port=port, timeout=2)
        assert os.path.exists(path)  # left alone


def test_stale_unix_socket_replaced() -> None:
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(rdv._unix_endpoint(port).address)  # a rank 0 that died without cleaning up
    out = run_threads(*[lambda r=r: rdv.connect(2, r, port=port, timeout=5).exchange(r)
                        for r in range(2)])
    assert out == [[0, 1], [0, 1]]


def test_missing_rank_times_out_naming_it() -> None:
    port = free_port()
    start = time.monotonic()
    err0, err1 = run_threads(lambda: rdv.connect(3, 0, port=port, timeout=1.0),
                             lambda: rdv.connect(3, 1, port=port, timeout=1.5))
    assert time.monotonic() - start < 2.5
    assert isinstance(err0, RendezvousTimeout) and "rank 2 never joined" in str(err0)
    # rank 1 hears the reason from rank 0 rather than waiting out its own, longer timeout
    assert isinstance(err1, RendezvousTimeout) and "rank 2 never joined" in str(err1)


@pytest.mark.parametrize("authkey", [None, "k"])
def test_client_without_rank0_times_out(authkey: str | None) -> None:
    start = time.monotonic()
    with pytest.raises(RendezvousTimeout, match="rank 0 never became reachable"):
        rdv.connect(2, 1, port=free_port(), authkey=authkey, timeout=0.5)
    assert time.monotonic() - start < 1.5


def test_secret_on_one_rank_only_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETAR_AUTHKEY", raising=False)
    port = free_port()
    err0, err1 = run_threads(lambda: rdv.connect(2, 0, port=port, authkey="k", timeout=0.5),
                             lambda: rdv.connect(2, 1, port=port, timeout=0.5))
    assert isinstance(err0, RendezvousTimeout)
    assert isinstance(err1, RendezvousTimeout) and "none of them with DETAR_AUTHKEY" in str(err1)


def test_wrong_authkey_refused_then_right_ranks_join() -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, authkey="right", timeout=5).exchange("zero"))
    with pytest.raises(RendezvousError, match="secret differs .*DETAR_AUTHKEY"):
        rdv.connect(2, 1, port=port, authkey="wrong", timeout=5)
    assert rdv.connect(2, 1, port=port, authkey="right", timeout=5).exchange("one") == \
        ["zero", "one"]
    assert server.result(timeout=5) == ["zero", "one"]


def test_wrong_authkey_gets_nothing_but_the_greeting() -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, authkey="right", timeout=5).exchange("zero"))
    client = Client(port, secret=b"right")
    kind, (error, text) = client.respond(b"wrong")  # type: ignore[misc]
    assert (kind, error) == (rdv._ERROR, "error") and "DETAR_AUTHKEY" in text
    assert client.recv() == "closed"  # and nothing else
    client.close()
    assert rdv.connect(2, 1, port=port, authkey="right", timeout=5).exchange("one") == \
        ["zero", "one"]
    assert server.result(timeout=5) == ["zero", "one"]


def test_impostor_rank0_refused() -> None:
    """A client refuses a server that cannot prove it knows the secret: it sent the impostor its
    response and its hello (nothing secret), and nothing more."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[Any] = []

    def impostor() -> None:
        sock, _ = listener.accept()
        link = rdv._Link(sock, "impostor", "rank 1")
        greeting = (rdv._NAME, rdv.PROTOCOL_VERSION, os.urandom(32))
        link.send(link.pack(rdv._GREETING, _wire.encode(greeting)), None)
        link.send(link.pack(rdv._ACCEPT, _wire.encode((os.urandom(32),))), None)
        try:
            while True:
                seen.append(link.recv(time.monotonic() + 5)[0])
        except rdv._Closed:
            seen.append("closed")

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(RendezvousError, match="does not know the secret"):
        rdv.connect(2, 1, port=port, authkey="key", timeout=5)
    thread.join(5)
    listener.close()
    assert seen == [rdv._RESPONSE, rdv._HELLO, "closed"]


def test_not_a_rank0_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def web_server() -> None:
            sock, _ = listener.accept()
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            time.sleep(1)
            sock.close()

        thread = threading.Thread(target=web_server)
        thread.start()
        start = time.monotonic()
        with pytest.raises(RendezvousError, match=f"127.0.0.1:{port} answered, but not as a "
                                                  f"detar_cupy rank 0 would"):
            rdv.connect(2, 1, port=port, authkey="key", timeout=5)
        assert time.monotonic() - start < 1
        thread.join(5)


def test_rank0_of_another_version_named() -> None:
    """A greeting starts with (name, version) in every version: a joining rank tells a rank 0
    of another version apart from a stranger."""
    port = free_port()
    path = rdv._unix_endpoint(port).address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()

        def future_rank0() -> None:
            sock, _ = listener.accept()
            link = rdv._Link(sock, "rank 0", "rank 1")
            greeting = (rdv._NAME, rdv.PROTOCOL_VERSION + 1, b"", "more", 7)
            link.send(link.pack(rdv._GREETING, _wire.encode(greeting)), None)
            time.sleep(1)
            sock.close()

        thread = threading.Thread(target=future_rank0)
        thread.start()
        with pytest.raises(RendezvousError, match=f"speaks rendezvous protocol "
                                                  f"{rdv.PROTOCOL_VERSION + 1}, this rank "
                                                  f"{rdv.PROTOCOL_VERSION}"):
            rdv.connect(2, 1, port=port, timeout=5)
        thread.join(5)


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
    """The rank with the other world size fails at once; rank 0 keeps waiting for the rank it
    needs (that rank may have been an intruder), and says what it refused when it gives up."""
    port = free_port()
    err0, err1 = run_threads(lambda: rdv.connect(2, 0, port=port, timeout=1),
                             lambda: rdv.connect(3, 1, port=port, timeout=5))
    assert isinstance(err1, MismatchError)
    assert isinstance(err0, RendezvousTimeout) and "rank 1 never joined" in str(err0)
    for err in (err0, err1):
        assert "world size 3" in str(err) and "world size 2" in str(err)


@pytest.mark.parametrize("authkey", [None, "k"])
def test_server_refuses_bad_hello_and_keeps_waiting(authkey: str | None) -> None:
    port = free_port()
    server = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: rdv.connect(2, 0, port=port, authkey=authkey, timeout=5).exchange(0))
    client = Client(port, authkey and authkey.encode())
    client.enter()
    kind, (error, message) = client.hello(rank=5)  # type: ignore[misc]
    assert (kind, error) == (rdv._ERROR, "error") and "rank 5 cannot join" in message
    client.close()
    assert rdv.connect(2, 1, port=port, authkey=authkey, timeout=5).exchange(1) == [0, 1]
    assert server.result(timeout=5) == [0, 1]


def test_rank_that_left_may_join_again() -> None:
    port = free_port()
    pool = concurrent.futures.ThreadPoolExecutor(3)
    server = pool.submit(lambda: rdv.connect(3, 0, port=port, timeout=5).exchange(0))
    client = Client(port)
    client.enter()
    client.send(rdv._HELLO, (rdv.PROTOCOL_VERSION, "", 3, 1))
    time.sleep(0.2)  # joined, then gone before the group completes
    client.close()
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
    with pytest.raises(RendezvousError, match="secret differs"):
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


# ---------------------------------------------------------------- what exchange() carries

@pytest.mark.parametrize("sender", [0, 2])
@pytest.mark.parametrize("bad, error", [(threading.Lock(), TypeError), ({"a": 1}, TypeError),
                                        (1.5, TypeError), (1 << 64, ValueError)])
def test_unsendable_value_fails_on_sender_and_peers_learn(sender: int, bad: Any,
                                                          error: type) -> None:
    """The sender raises before anything leaves it; the others fail at once, naming it."""
    mesh = rdv.pipe_mesh(3)
    ranks = [rdv.Rendezvous.from_pipes(r, 3, mesh[r], timeout=10) for r in range(3)]
    start = time.monotonic()
    out = run_threads(*[lambda r=r: ranks[r].exchange(bad if r == sender else r)
                        for r in range(3)])
    assert time.monotonic() - start < 2
    for r, got in enumerate(out):
        if r == sender:
            assert type(got) is error and "value" in str(got)
        else:
            assert isinstance(got, RendezvousError)
            assert f"rank {sender} passed exchange() a value it cannot send" in str(got)
    with pytest.raises(RendezvousError, match="closed"):
        ranks[sender].exchange(0)


def test_exchange_gives_fresh_copies_with_types_kept() -> None:
    value = ((1, 2), [3, (4,)], b"\xff", "é", True, 1, None)
    mesh = rdv.pipe_mesh(2)
    out = run_threads(*[lambda r=r: rdv.Rendezvous.from_pipes(r, 2, mesh[r]).exchange(value)
                        for r in range(2)])
    assert out == [[value, value]] * 2
    assert type(out[0][1][1]) is list and type(out[0][1][4]) is bool
    assert out[0][0] is not value


def test_single_rank_checks_values_too() -> None:
    with pytest.raises(TypeError, match="float"):
        rdv.connect(1, 0, timeout=1).exchange(1.0)
    assert rdv.connect(1, 0, timeout=1).exchange([1, (2,)]) == [[1, (2,)]]


def test_largest_value_passes_and_larger_fails_on_sender() -> None:
    mesh = rdv.pipe_mesh(2)
    ranks = [rdv.Rendezvous.from_pipes(r, 2, mesh[r], timeout=10) for r in range(2)]
    # the largest bytes value: the version byte, tag and length take 6 of the message's bytes
    big = bytes(_wire.MAX_MESSAGE_BYTES - 6)
    out = run_threads(*[lambda r=r: ranks[r].exchange(big) for r in range(2)])
    assert out == [[big, big]] * 2
    out = run_threads(*[lambda r=r: ranks[r].exchange(big + b"!" if r else 0) for r in range(2)])
    assert isinstance(out[0], RendezvousError) and isinstance(out[1], ValueError)


@pytest.mark.parametrize("authkey", [None, "k"])
def test_exchange_over_connect_times_out_naming_rank(authkey: str | None) -> None:
    port = free_port()
    # rank 1 waits longer than rank 0, so it hears rank 0's reason instead of timing out itself
    made = run_threads(*[lambda r=r, t=t: rdv.connect(3, r, port=port, authkey=authkey, timeout=t)
                         for r, t in enumerate([0.5, 1.5, 0.5])])
    start = time.monotonic()
    err0, err1 = run_threads(lambda: made[0].exchange(0), lambda: made[1].exchange(1))
    assert time.monotonic() - start < 1.2
    assert isinstance(err0, RendezvousTimeout) and "rank 2 did not answer" in str(err0)
    assert isinstance(err1, RendezvousTimeout) and "rank 2 did not answer" in str(err1)
    made[2].close()
