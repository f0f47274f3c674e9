"""Exceptions raised by detar_cupy. All derive from :class:`DetarError`."""
from __future__ import annotations


class DetarError(Exception):
    """Base class of every error this library raises on purpose."""


class CupyMissingError(DetarError, ImportError):
    """A GPU entry point was called but no usable CuPy is installed."""

    def __init__(self, detail: str = "") -> None:
        msg = ("detar_cupy needs CuPy for GPU work; install it with one of the extras: "
               "pip install 'detar_cupy[cuda12x]' | '[cuda13x]' | '[rocm-5-0]' | '[rocm-7-0]'")
        super().__init__(f"{msg} ({detail})" if detail else msg)


class GpuUnavailableError(DetarError, RuntimeError):
    """CuPy is installed but cannot use the GPU asked for (no driver, no device, a device index
    that does not exist)."""


class RendezvousError(DetarError):
    """Ranks could not be wired together (port in use, refused auth key, bad hello …)."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    """Some rank did not join or answer within the rendezvous timeout."""


class WorkerError(DetarError):
    """A rank started by :func:`detar_cupy.spawn` failed; carries its rank and traceback."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "",
                 exitcode: int | None = None) -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode
        text = f"rank {rank} failed: {message}"
        if remote_traceback:
            text += f"\n--- remote traceback of rank {rank} ---\n{remote_traceback}"
        super().__init__(text)


class CommunicatorClosedError(DetarError, RuntimeError):
    """The communicator was used after close()."""


class CommunicatorFailedError(DetarError, RuntimeError):
    """Base of the sticky device-side failures: the communicator refuses further calls."""


class PeerTimeoutError(CommunicatorFailedError, TimeoutError):
    """A peer did not arrive at a device-side barrier within the configured timeout."""


class MismatchError(CommunicatorFailedError, ValueError):
    """Ranks issued different collective calls (count, dtype, op, algorithm or kind)."""
