"""detar_cupy: bitwise-deterministic all-reduce (and friends) for multi-GPU Python.

Element i of every result is the left fold over ranks 0..N-1 in a fixed accumulator type, so the
bits are the same on every rank, every run, every message size and every algorithm.
``detar_cupy.reference`` reproduces them on the CPU. GPU entry points need CuPy (see the extras);
importing the package, the reference and the kernel renderer do not.
"""
from . import reference
from ._spawn import init_process_group, spawn
from .communicator import Communicator
from .errors import (CommunicatorClosedError, CommunicatorFailedError, CupyMissingError,
                     DetarError, GpuUnavailableError, MismatchError, PeerTimeoutError,
                     RendezvousError, RendezvousTimeout, WorkerError)

__version__ = "0.1.0"

__all__ = [
    "Communicator", "CommunicatorClosedError", "CommunicatorFailedError", "CupyMissingError",
    "DetarError", "GpuUnavailableError", "MismatchError", "PeerTimeoutError", "RendezvousError", "RendezvousTimeout",
    "WorkerError", "init_process_group", "reference", "spawn", "__version__",
]
