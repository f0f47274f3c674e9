"""The ``DETAR_*`` settings: parsed once per communicator, with errors that name the variable, and
compared across ranks field by field (ranks that disagree refuse to start, naming the setting).

Precedence: an explicit argument (where an API takes one) over the ``DETAR_*`` variable over the
default. Pure Python: no CuPy needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

from ._protocol import MAX_BLOCKS, MAX_FIRST_EPOCH, MAX_WORLD
from .errors import MismatchError

DEFAULT_STAGING_BYTES = 32 << 20  # per parity half; larger calls are cut into chunks
DEFAULT_LL_BYTES = 256 << 10  # largest message one LL launch carries
DEFAULT_TIMEOUT_S = 300.0  # device-side spin bound; a peer slower than this is declared gone
#: Longest timeout: the kernels count it in u64 nanoseconds, and a wait of a century is a hang.
MAX_TIMEOUT_S = 1e9

SHARE_ENV = "DETAR_SHARE_GPUS"


def env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """``int(os.environ[name])`` in ``[low, high]``, else ``default``; ValueError naming ``name``."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name}={value} is out of range: it must be {bound}")
    return value


def env_timeout(name: str, default: float) -> float:
    """A timeout setting in seconds (see :func:`check_timeout`); ValueError naming ``name``."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    return check_timeout(text.strip(), name)


def check_timeout(seconds: Any, what: str = "timeout") -> float:
    """``seconds`` as a float if it is a usable timeout, else ValueError naming ``what``."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {seconds!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses NaN
        raise ValueError(f"{what} must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {seconds!r}")
    return value


def env_flag(name: str) -> bool:
    """A 0/1 setting (default 0)."""
    value = os.environ.get(name, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Settings:
    """Every rank's view of the ``DETAR_*`` variables; all fields but ``timeout`` must agree."""

    staging_bytes: int  # DETAR_STAGING_BYTES: per half of the double-buffered staging buffer
    ll_bytes: int  # DETAR_LL_BYTES: the largest message one LL launch carries
    max_blocks: int  # DETAR_MAX_BLOCKS: the largest grid
    share_gpus: bool  # DETAR_SHARE_GPUS: several ranks may use one GPU
    first_epoch: int  # DETAR_FIRST_EPOCH: the first launch's number (tests of long runs)
    timeout: float  # DETAR_TIMEOUT: seconds a device-side wait may last (may differ per rank)

    #: The variable behind each field, for error messages.
    ENV = {"staging_bytes": "DETAR_STAGING_BYTES", "ll_bytes": "DETAR_LL_BYTES",
           "max_blocks": "DETAR_MAX_BLOCKS", "share_gpus": SHARE_ENV,
           "first_epoch": "DETAR_FIRST_EPOCH", "timeout": "DETAR_TIMEOUT"}

    @classmethod
    def from_env(cls) -> "Settings":
        """Read and check every setting. Sizes are rounded down to 16-byte packs; the staging
        half must hold one pack per rank of the largest world (two_shot's N slots of a slice
        plus N gather slots), the LL area at least one line."""
        stage = env_int("DETAR_STAGING_BYTES", DEFAULT_STAGING_BYTES, 32 * MAX_WORLD,
                        1 << 40) // 16 * 16
        ll = env_int("DETAR_LL_BYTES", DEFAULT_LL_BYTES, 16, 1 << 30) // 16 * 16
        return cls(stage, ll, env_int("DETAR_MAX_BLOCKS", MAX_BLOCKS, 1, MAX_BLOCKS),
                   env_flag(SHARE_ENV), env_int("DETAR_FIRST_EPOCH", 1, 1, MAX_FIRST_EPOCH),
                   env_timeout("DETAR_TIMEOUT", DEFAULT_TIMEOUT_S))

    def shared(self) -> tuple:
        """(name, value) pairs every rank must agree on, in a form the rendezvous carries."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "timeout")


def agree(views: Sequence[Sequence[tuple[str, Any]]], extra: str = "") -> None:
    """MismatchError naming every field on which the ranks' ``views`` (one per rank, from
    :meth:`Settings.shared` or any other named fields) disagree."""
    first = dict(views[0])
    differ = []
    for name in first:
        values = [dict(v).get(name) for v in views]
        if any(v != values[0] for v in values):
            label = Settings.ENV.get(name, name)
            differ.append(f"{label}: " + ", ".join(f"rank {r} {_show(v)}"
                                                   for r, v in enumerate(values)))
    if differ:
        raise MismatchError("ranks must agree on these settings: " + "; ".join(differ) + extra)


def _show(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)
