"""What a launcher tells each process it starts: torchrun's environment, read into the arguments of
:func:`detar_cupy.init_process_group`. Pure functions of a mapping (``os.environ`` by default).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in every process. Precedence, per value:

- world size, rank, device: an explicit argument, else ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``
  (the device), else (device only) ``rank % GPUs``; world size and rank have no default.
- address of rank 0's rendezvous: an explicit ``host=``/``port=``, else ``DETAR_HOST``/
  ``DETAR_PORT`` (settings made for detar_cupy beat values derived from another tool's), else the
  derived address, else ``127.0.0.1:29517``. The derived host is ``127.0.0.1`` when every rank runs
  on this machine (``LOCAL_WORLD_SIZE == WORLD_SIZE``: loopback needs no auth key) and
  ``MASTER_ADDR`` otherwise; the derived port is ``MASTER_PORT + 1``, because torch's own store
  already listens on ``MASTER_PORT``.

torchrun's environment is used only for the group it describes: when ``n_devices`` or ``rank``
is given and differs from ``WORLD_SIZE``/``RANK`` (a subgroup built by hand), none of it is used,
so that two such groups do not both listen on ``MASTER_PORT + 1``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple


class Launch(NamedTuple):
    """One process's place in a launch, as the launcher's environment gives it."""

    world_size: int
    rank: int
    device: int | None  # LOCAL_RANK
    host: str | None  # where rank 0's rendezvous listens
    port: int | None


def torchrun(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch torchrun describes in ``env``, or None when ``RANK`` and ``WORLD_SIZE`` are both
    unset. ValueError naming the variable for a missing partner or a malformed value."""
    env = os.environ if env is None else env
    have = [name for name in ("RANK", "WORLD_SIZE") if _given(env, name)]
    if not have:
        return None
    if len(have) == 1:
        missing = "WORLD_SIZE" if have == ["RANK"] else "RANK"
        raise ValueError(f"{have[0]} is set but {missing} is not: a launcher like torchrun sets "
                         f"both; set {missing} too, or unset {have[0]} and pass n_devices and rank")
    world = _int(env, "WORLD_SIZE", 1)
    rank = _int(env, "RANK", 0)
    if rank >= world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}: ranks are 0..{world - 1}")
    device = _int(env, "LOCAL_RANK", 0) if _given(env, "LOCAL_RANK") else None
    local = _int(env, "LOCAL_WORLD_SIZE", 1) if _given(env, "LOCAL_WORLD_SIZE") else None
    host = "127.0.0.1" if local == world else (env.get("MASTER_ADDR", "").strip() or None)
    port = None
    if _given(env, "MASTER_PORT"):
        port = _int(env, "MASTER_PORT", 1) + 1
        if port > 65535:
            raise ValueError(f"MASTER_PORT={port - 1} leaves no port above it for detar_cupy's "
                             "rendezvous (MASTER_PORT + 1); set DETAR_PORT")
    return Launch(world, rank, device, host, port)


def resolve(n_devices: int | None, rank: int | None, device: int | None, host: str | None,
            port: int | None, env: Mapping[str, str] | None = None) -> Launch:
    """The arguments of :func:`detar_cupy.init_process_group` after the precedence of the module
    docstring. ValueError when world size or rank is neither given nor in the environment."""
    env = os.environ if env is None else env
    launch = torchrun(env)
    if (launch is not None and (n_devices is None or n_devices == launch.world_size)
            and (rank is None or rank == launch.rank)):
        return Launch(launch.world_size, launch.rank,
                      launch.device if device is None else device,
                      launch.host if host is None and not env.get("DETAR_HOST") else host,
                      launch.port if port is None and not env.get("DETAR_PORT") else port)
    if n_devices is None or rank is None:
        given = "" if launch is None else (f" (torchrun's WORLD_SIZE={launch.world_size} RANK="
                                           f"{launch.rank} describe another group)")
        raise ValueError(f"init_process_group needs the world size and this process's rank: pass "
                         f"n_devices and rank, or start the processes with torchrun; got "
                         f"n_devices={n_devices!r}, rank={rank!r}{given}")
    return Launch(n_devices, rank, device, host, port)


def _given(env: Mapping[str, str], name: str) -> bool:
    """Whether ``name`` is set to something other than blanks."""
    return bool(env.get(name, "").strip())


def _int(env: Mapping[str, str], name: str, low: int) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value
