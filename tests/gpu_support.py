"""Shared helpers of the GPU test modules: how many GPUs there are, and one spawn per world size
whose results the parametrized tests read."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the case modules by name


def gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device: the GPU tests skip
        return 0


GPUS = gpu_count()


def need(world: int) -> None:
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, found {GPUS}")


def spawn_with_env(fn: Callable[..., Any], world: int, env: dict[str, str], args=()) -> list:
    """detar_cupy.spawn with ``env`` set in the ranks' environment."""
    import detar_cupy as dc

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return dc.spawn(fn, world, args=args, timeout=900)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
