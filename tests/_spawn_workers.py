"""Module-level functions for the spawn tests: the spawn start method pickles them by reference."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from detar_cupy._rendezvous import Rendezvous


class FakeComm:
    """Stands in for the Communicator: no GPU, just the rendezvous."""

    def __init__(self, rendezvous: Rendezvous, device: int) -> None:
        self.rendezvous = rendezvous
        self.rank = rendezvous.rank
        self.world_size = rendezvous.world_size
        self.device = device

    def close(self) -> None:
        self.rendezvous.close()


def make_fake_comm(rendezvous: Rendezvous, device: int) -> FakeComm:
    return FakeComm(rendezvous, device)


def _record_pid(comm: FakeComm, pid_dir: str) -> None:
    Path(pid_dir, f"{comm.rank}.pid").write_text(str(os.getpid()))


def gather(comm: FakeComm, tag: str) -> tuple[Any, ...]:
    seen = comm.rendezvous.exchange((comm.rank, comm.device))
    comm.rendezvous.barrier()
    return comm.rank, comm.world_size, comm.device, tag, seen


def raise_on(comm: FakeComm, bad_rank: int, pid_dir: str) -> int:
    _record_pid(comm, pid_dir)
    if comm.rank == bad_rank:
        raise ValueError(f"boom from rank {comm.rank}")
    time.sleep(60)
    return comm.rank


def sigkill_on(comm: FakeComm, bad_rank: int, pid_dir: str) -> int:
    _record_pid(comm, pid_dir)
    if comm.rank == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    return comm.rank


def sigkill_before_exchange(comm: FakeComm, bad_rank: int, pid_dir: str) -> list[Any]:
    """The other ranks notice the dead peer in exchange() and report a RendezvousError."""
    _record_pid(comm, pid_dir)
    if comm.rank == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return comm.rendezvous.exchange(comm.rank)


def exit_on(comm: FakeComm, bad_rank: int, code: int) -> int:
    if comm.rank == bad_rank:
        os._exit(code)
    time.sleep(60)
    return comm.rank


def sleep(comm: FakeComm, pid_dir: str) -> None:
    _record_pid(comm, pid_dir)
    time.sleep(60)


def unpicklable_on(comm: FakeComm, bad_rank: int) -> Any:
    return threading.Lock() if comm.rank == bad_rank else comm.rank


def connect_and_exchange(world: int, rank: int, port: int, authkey: str | None,
                         out: Any) -> None:
    """A rank started by someone else than spawn(): joins with connect(), reports to out."""
    from detar_cupy._rendezvous import connect

    with connect(world, rank, port=port, authkey=authkey, timeout=20) as rendezvous:
        out.put((rank, rendezvous.exchange(f"from {rank}")))
        rendezvous.barrier()
