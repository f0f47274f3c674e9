"""Several ranks on one GPU: off by default, on with ``DETAR_SHARE_GPUS=1``.

For developing and testing multi-rank programs on a machine with fewer GPUs than ranks (a
workstation, a one-GPU CI runner). The bits are the contract's, since a kernel does not know
where its peers run, but the calls are slow: without MPS a GPU runs one process's kernels at a
time and switches between processes in time slices, and each call's kernel waits for its peers'
kernels, so a call costs about one switch (around a millisecond) instead of microseconds. Under
MPS the ranks' kernels run side by side; the grid is then cut to the SM count divided by the
ranks per GPU, so that all ranks' blocks fit on the GPU at once (they spin while they wait for
one another).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ._settings import SHARE_ENV, env_flag

SHARE_HINT = (f"set {SHARE_ENV}=1 to let ranks share GPUs, for testing: the bits are the same, "
              "the calls much slower")


def shared_gpus_allowed() -> bool:
    """Whether ``DETAR_SHARE_GPUS`` lets several ranks use one GPU."""
    return env_flag(SHARE_ENV)


def ranks_per_gpu(bus_ids: Sequence[str]) -> int:
    """The most ranks that any one GPU (by PCI bus id) carries."""
    return max(Counter(bus_ids).values())
