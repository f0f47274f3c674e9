"""The kernel renderer's host side (CPU): which module and handle a launch uses."""
from __future__ import annotations

import sys
import types

import pytest

from detar_cupy import _kernels


class _FakeDevice:
    current = 0

    def __init__(self, device: int | None = None) -> None:
        self.id = _FakeDevice.current if device is None else device

    def __enter__(self) -> "_FakeDevice":
        self.saved, _FakeDevice.current = _FakeDevice.current, self.id
        return self

    def __exit__(self, *exc: object) -> None:
        _FakeDevice.current = self.saved


class _FakeModule:
    """Stands in for cupy.RawModule: records the device current when it was made and when each
    function was loaded (a loaded function belongs to that device's context)."""

    made: list = []

    def __init__(self, code: str, options: tuple) -> None:
        self.device = _FakeDevice.current
        _FakeModule.made.append(self)

    def get_function(self, name: str):
        return types.SimpleNamespace(kernel=(name, self.device, _FakeDevice.current))


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch):
    cupy = types.ModuleType("cupy")
    cupy.RawModule = _FakeModule
    cupy.cuda = types.SimpleNamespace(Device=_FakeDevice,
                                      runtime=types.SimpleNamespace(is_hip=False))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    _FakeModule.made = []
    _kernels._module.cache_clear()
    _kernels.function.cache_clear()
    yield cupy
    _kernels._module.cache_clear()
    _kernels.function.cache_clear()


def test_kernel_handles_belong_to_the_device_they_were_loaded_on(fake_cupy) -> None:
    """Two communicators on two GPUs in one process: each gets handles loaded on its own GPU
    (a handle of another context is invalid there), and the per-device caches keep them apart
    whichever GPU is current when the handle is asked for."""
    key = _kernels.ModuleKey("float32", 2)
    name = _kernels.kernel_names(key)[0]
    with _FakeDevice(1):  # the user made GPU 1 current; the communicator uses GPU 0
        on0 = _kernels.function(key, name, 0)
    on1 = _kernels.function(key, name, 1)
    assert on0 == (name, 0, 0) and on1 == (name, 1, 1)
    assert _kernels.function(key, name, 0) is on0  # cached per (key, name, device)
    assert [m.device for m in _FakeModule.made] == [0, 1]


def test_kernel_source_is_ascii() -> None:
    """The runtime compilers read the source through files and APIs whose encoding is not ours
    to choose (a process started in the C locale writes ASCII): keep every byte ASCII."""
    from importlib import resources

    for f in resources.files("detar_cupy.hip_src").iterdir():
        if f.name.endswith((".h", ".hip")):
            text = f.read_bytes()
            bad = [i for i, b in enumerate(text) if b > 127]
            assert not bad, f"{f.name}: non-ASCII byte at offset {bad[0]}"
