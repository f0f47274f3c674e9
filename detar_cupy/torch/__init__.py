"""PyTorch layer of detar_cupy: deterministic collectives on torch tensors (``pip install
'detar_cupy[torch]'``). It sits above the :class:`~detar_cupy.Communicator` and uses only its
public API; ``import detar_cupy`` never imports torch.

::

    import torch.distributed as dist
    import detar_cupy.torch as dct

    dist.init_process_group("cpu:gloo,cuda:nccl")  # torchrun; then torch.cuda.set_device(...)
    tp = dct.from_process_group()              # any group: setup goes through it (no port, no key)
    tp.all_reduce(x)                           # in place, like dist.all_reduce
    y = tp.all_reduce_out(x, op="avg")         # out of place, for inference code and torch.compile

- **Tensors in, tensors out.** Every dtype of :mod:`detar_cupy.dtypes` that torch has (bfloat16
  natively), zero copy through ``tensor.data_ptr()``: no CuPy array is ever made, so bfloat16
  works with CuPy 13 on ROCm, which has no bfloat16.
- **Names.** torch.distributed's for the forms that write into given tensors (``all_reduce``,
  ``reduce_scatter_tensor``, ``all_gather_into_tensor``, ``broadcast``, ``all_reduce_coalesced``);
  ``*_out`` for the out-of-place forms that return a new tensor (``all_reduce_out``,
  ``reduce_scatter_out``, ``all_gather_out``), as ATen calls variants that write a separate
  output, and as inference engines use them (``y = all_reduce(x)``).
- **Streams.** Without ``stream=``, calls run on torch's current stream on the group's GPU
  (inside ``with torch.cuda.stream(s)`` that is ``s``), so they are ordered after the kernels
  that produced their inputs. (The Communicator's own methods on CuPy arrays use CuPy's current
  stream.) New outputs come from torch's caching allocator on that stream.
- **torch.compile and CUDA graphs.** Under ``torch.compile`` the methods call custom ops
  ``torch.ops.detar.*`` (see :mod:`detar_cupy.torch._ops`) with fake implementations, so a
  tensor-parallel block compiles with ``fullgraph=True``. Calls capture into
  ``torch.cuda.graph`` (make each call shape once before capturing: its first call compiles
  kernels); replays give the same bits.
- **Training.** :func:`register_ddp_comm_hook` (or ``model.register_comm_hook(group,
  ddp_comm_hook)``) reduces DDP's gradient buckets through detar: the same gradient bits for
  every ``bucket_cap_mb`` and run. The collectives are not differentiable, as in
  torch.distributed: a tensor that requires grad while grad mode is on is refused.
- **Errors** are TypeError/ValueError naming the argument, raised before anything is enqueued
  and decided from the call's shape alone, so every rank of a program refuses the same call.
"""
from __future__ import annotations

try:
    import torch
except ImportError as exc:
    raise ImportError("detar_cupy.torch needs PyTorch >= 2.4: pip install 'detar_cupy[torch]' "
                      f"(importing torch failed: {exc})") from exc
if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"detar_cupy.torch needs PyTorch >= 2.4 (torch.library.custom_op), found "
                      f"{torch.__version__}: pip install 'detar_cupy[torch]'")

from ._ddp import DDPHookState, ddp_comm_hook, register_ddp_comm_hook
from ._group import REDUCIBLE, DetarGroup
from ._process_group import ProcessGroupRendezvous, from_process_group

__all__ = ["DDPHookState", "DetarGroup", "ProcessGroupRendezvous", "REDUCIBLE", "ddp_comm_hook",
           "from_process_group", "register_ddp_comm_hook"]
