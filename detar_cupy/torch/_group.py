"""DetarGroup: a Communicator's collectives on torch tensors, zero copy through ``data_ptr()`` and
the Communicator's ``*_buffers`` entry points, on torch's current stream; routed through the
``detar`` custom ops while ``torch.compile`` traces."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor

from ..dtypes import DTYPES, OPS
from . import _ops

#: torch dtype -> table name (:mod:`detar_cupy.dtypes`), for every table dtype this torch has.
REDUCIBLE: dict[torch.dtype, str] = {
    getattr(torch, name): name for name in DTYPES
    if isinstance(getattr(torch, name, None), torch.dtype)}

#: An op: a name of :data:`detar_cupy.dtypes.OPS`, or a torch.distributed ReduceOp of them.
Op = Union[str, Any]
_OP_NAMES: dict[Any, str] = {name: name for name in OPS}
if torch.distributed.is_available():
    _R = torch.distributed.ReduceOp
    _OP_NAMES.update({_R.SUM: "sum", _R.PRODUCT: "prod", _R.MIN: "min", _R.MAX: "max",
                      _R.AVG: "avg"})

# The stream handle torch's compiled code itself reads (CUDA and ROCm builds): an int from one C
# call, where torch.cuda.current_stream(i).cuda_stream builds a Stream object first.
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
if _current_raw_stream is None:
    def _current_raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream

_is_compiling = torch.compiler.is_compiling


def _op_name(op: Op) -> str:
    """The table name of ``op``; a string the table lacks is left for the Communicator to refuse
    (with the list of ops)."""
    if isinstance(op, str):  # first: torch.compile cannot hash ReduceOp keys of _OP_NAMES
        return op
    name = _OP_NAMES.get(op)
    if name is not None:
        return name
    raise ValueError(f"op {op} is not supported; use one of {', '.join(OPS)} or "
                     "torch.distributed.ReduceOp.SUM, PRODUCT, MIN, MAX, AVG")


def _no_stream(stream: Any) -> None:
    if stream is not None:
        raise ValueError("stream= cannot be used under torch.compile: compiled code runs the "
                         "collective on torch's current stream; call the compiled function "
                         "inside torch.cuda.stream(s) instead")


class DetarGroup:
    """The torch face of a :class:`~detar_cupy.Communicator`: its collectives on CUDA (ROCm)
    tensors of this rank's GPU, with the Communicator's contract (element i is the left fold over
    ranks 0..N-1; the same bits on every rank, run, batch size and algorithm).

    Made by :func:`detar_cupy.torch.from_process_group`, or from a Communicator of
    :func:`detar_cupy.spawn`/:func:`detar_cupy.init_process_group` as ``DetarGroup(comm)``.

    Every collective method is collective (every rank calls it, in the same order, with the same
    shapes, dtypes and ops), is enqueued on ``stream`` (default: torch's current stream on this
    GPU) without waiting, and raises TypeError/ValueError for bad arguments before anything is
    enqueued, plus the Communicator's sticky errors. Tensors must be dense, contiguous, on this
    rank's GPU (:attr:`device`) and must not require grad while grad mode is on: the collectives
    are not differentiable, as in torch.distributed. In-place calls write through the tensor's
    memory as a kernel would, outside autograd (its version counter does not change).
    ``stream`` may be a ``torch.cuda.Stream``, a CuPy stream or a raw handle.

    Names follow torch.distributed (in-place ``all_reduce``, ``reduce_scatter_tensor``,
    ``all_gather_into_tensor``, ``broadcast``); the ``*_out`` methods are the out-of-place forms
    that inference code and compiled graphs use: they leave the input alone and return a new
    tensor. ``op`` is ``"sum"``, ``"prod"``, ``"min"``, ``"max"``, ``"avg"`` or the matching
    ``torch.distributed.ReduceOp``. ``src`` and :attr:`rank` are ranks of this group.
    """

    def __init__(self, communicator: Any, *, process_group: Any = None) -> None:
        self._comm = communicator
        #: This process's rank in the group (for a group of from_process_group: its group rank).
        self.rank: int = communicator.rank
        self.world_size: int = communicator.world_size
        self._index: int = communicator.device.id
        #: This rank's GPU, where every tensor must be.
        self.device = torch.device("cuda", self._index)
        #: The torch.distributed group the setup went through, if any.
        self.process_group = process_group
        self._stream = _current_raw_stream
        self._handle = _ops.register(self)

    @property
    def communicator(self) -> Any:
        """The :class:`~detar_cupy.Communicator` underneath (CuPy arrays, raw buffers)."""
        return self._comm

    @property
    def handle(self) -> int:
        """The int under which the ``torch.ops.detar`` custom ops find this group."""
        return self._handle

    def __repr__(self) -> str:
        return f"DetarGroup(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ---- collectives ---------------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, op: Op = "sum", *, stream: Any = None,
                   algorithm: str = "auto") -> None:
        """Collective: reduce ``tensor`` over the ranks, in place. ``algorithm``: auto, ll,
        one_shot, two_shot (all give the same bits)."""
        if _is_compiling():
            _no_stream(stream)
            torch.ops.detar.all_reduce_(tensor, self._handle, _op_name(op), algorithm)
            return
        self._all_reduce(tensor, op if type(op) is str else _op_name(op), stream, algorithm)

    def all_reduce_out(self, input: Tensor, op: Op = "sum", *, stream: Any = None,
                       algorithm: str = "auto") -> Tensor:
        """Collective: the reduction of ``input`` over the ranks, in a new tensor."""
        if _is_compiling():
            _no_stream(stream)
            return torch.ops.detar.all_reduce(input, self._handle, _op_name(op), algorithm)
        return self._all_reduce_out(input, _op_name(op), stream, algorithm)

    def reduce_scatter_tensor(self, output: Tensor, input: Tensor, op: Op = "sum", *,
                              stream: Any = None) -> None:
        """Collective: rank r's ``output`` receives part r of the reduction of ``input`` (N times
        ``output``'s elements, parts in rank order, flat), with the bits all_reduce gives them."""
        if _is_compiling():
            _no_stream(stream)
            torch.ops.detar.reduce_scatter_into(output, input, self._handle, _op_name(op))
            return
        self._reduce_scatter_into(output, input, _op_name(op), stream)

    def reduce_scatter_out(self, input: Tensor, op: Op = "sum", *, stream: Any = None) -> Tensor:
        """Collective: part r of the reduction of ``input`` split along dim 0, in a new tensor
        of shape ``(input.shape[0] // N, *input.shape[1:])``."""
        if _is_compiling():
            _no_stream(stream)
            return torch.ops.detar.reduce_scatter(input, self._handle, _op_name(op))
        return self._reduce_scatter_out(input, _op_name(op), stream)

    def all_gather_into_tensor(self, output: Tensor, input: Tensor, *,
                               stream: Any = None) -> None:
        """Collective: ``output`` (N times ``input``'s elements) receives every rank's ``input``
        in rank order. Any dtype (bytes are moved, not reduced)."""
        if _is_compiling():
            _no_stream(stream)
            torch.ops.detar.all_gather_into(output, input, self._handle)
            return
        self._all_gather_into(output, input, stream)

    def all_gather_out(self, input: Tensor, *, stream: Any = None) -> Tensor:
        """Collective: every rank's ``input`` concatenated along dim 0 in rank order, in a new
        tensor of shape ``(N * input.shape[0], *input.shape[1:])`` (``(N,)`` for a scalar)."""
        if _is_compiling():
            _no_stream(stream)
            return torch.ops.detar.all_gather(input, self._handle)
        return self._all_gather_out(input, stream)

    def broadcast(self, tensor: Tensor, src: int = 0, *, stream: Any = None) -> None:
        """Collective: copy rank ``src``'s ``tensor`` into every rank's, in place. Any dtype."""
        if _is_compiling():
            _no_stream(stream)
            torch.ops.detar.broadcast_(tensor, self._handle, src)
            return
        self._broadcast(tensor, src, stream)

    def all_reduce_coalesced(self, tensors: Sequence[Tensor], op: Op = "sum", *,
                             stream: Any = None) -> None:
        """Collective: all-reduce every tensor of ``tensors`` in place, with the bits of one
        :meth:`all_reduce` each; one Communicator call per dtype (in order of first appearance),
        so many small tensors cost few launches."""
        if _is_compiling():
            _no_stream(stream)
            torch.ops.detar.all_reduce_coalesced_(list(tensors), self._handle, _op_name(op))
            return
        self._all_reduce_coalesced(tensors, _op_name(op), stream)

    # ---- lifecycle -----------------------------------------------------------------------------
    def barrier(self) -> None:
        """Collective: block until every rank has reached this barrier."""
        self._comm.barrier()

    def synchronize(self) -> None:
        """Wait for torch's current stream on this GPU, then raise the Communicator's sticky
        error (peer timeout, mismatch), if any."""
        self._comm.synchronize(torch.cuda.current_stream(self._index))

    def close(self) -> None:
        """Close the Communicator (the torch group, if any, stays the caller's). Compiled code
        that uses this group fails from now on. Safe to call twice."""
        _ops.unregister(self._handle)
        self._comm.close()

    def __enter__(self) -> DetarGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- eager implementations (also the custom ops' real implementations) ---------------------
    def _resolve(self, stream: Any) -> Any:
        return self._stream(self._index) if stream is None else stream

    def _all_reduce(self, tensor: Tensor, op: str, stream: Any, algorithm: str) -> None:
        name = self._reducible(tensor, "tensor")
        ptr = tensor.data_ptr()
        # the hottest path: _resolve inlined
        self._comm.all_reduce_buffers(ptr, ptr, tensor.numel(), name, op,
                                      self._stream(self._index) if stream is None else stream,
                                      algorithm)

    def _all_reduce_out(self, input: Tensor, op: str, stream: Any, algorithm: str) -> Tensor:
        name = self._reducible(input, "input")
        out = torch.empty_like(input)
        self._comm.all_reduce_buffers(input.data_ptr(), out.data_ptr(), input.numel(), name, op,
                                      self._resolve(stream), algorithm)
        return out

    def _reduce_scatter_into(self, output: Tensor, input: Tensor, op: str, stream: Any) -> None:
        name = self._reduce_scatter_pair(output, input)
        self._comm.reduce_scatter_buffers(input.data_ptr(), output.data_ptr(), output.numel(),
                                          name, op, self._resolve(stream))

    def _reduce_scatter_out(self, input: Tensor, op: str, stream: Any) -> Tensor:
        name = self._reducible(input, "input")
        out = input.new_empty(self._scattered_shape(input))
        self._comm.reduce_scatter_buffers(input.data_ptr(), out.data_ptr(), out.numel(), name,
                                          op, self._resolve(stream))
        return out

    def _all_gather_into(self, output: Tensor, input: Tensor, stream: Any) -> None:
        itemsize = self._all_gather_pair(output, input)
        self._comm.all_gather_buffers(input.data_ptr(), output.data_ptr(), input.numel(),
                                      itemsize, self._resolve(stream))

    def _all_gather_out(self, input: Tensor, stream: Any) -> Tensor:
        itemsize = self._movable(input, "input")
        out = input.new_empty(self._gathered_shape(input))
        self._comm.all_gather_buffers(input.data_ptr(), out.data_ptr(), input.numel(), itemsize,
                                      self._resolve(stream))
        return out

    def _broadcast(self, tensor: Tensor, src: int, stream: Any) -> None:
        itemsize = self._movable(tensor, "tensor")
        self._comm.broadcast_buffers(tensor.data_ptr(), tensor.numel(), itemsize, src,
                                     self._resolve(stream))

    def _all_reduce_coalesced(self, tensors: Sequence[Tensor], op: str, stream: Any) -> None:
        # Every tensor is checked before anything is enqueued. The common case (dense tensors on
        # this GPU, one dtype) in comprehensions, which cost a third of a loop per tensor; any
        # other goes through the checks one tensor at a time, which say what is wrong.
        index = self._index
        try:
            usable = all([t.get_device() == index and t.is_contiguous() and not t.requires_grad
                          for t in tensors])
            dtypes = {t.dtype for t in tensors}
        except Exception:  # not a tensor: the checks below explain
            usable, dtypes = False, set()
        name = REDUCIBLE.get(next(iter(dtypes))) if usable and len(dtypes) == 1 else None
        if name is not None:
            self._comm.all_reduce_coalesced_buffers([t.data_ptr() for t in tensors],
                                                    [t.numel() for t in tensors], name, op,
                                                    self._resolve(stream))
            return
        by_dtype: dict[str, tuple[list[int], list[int]]] = {}
        for i, t in enumerate(tensors):
            ptrs, counts = by_dtype.setdefault(self._reducible(t, f"tensors[{i}]"), ([], []))
            ptrs.append(t.data_ptr())
            counts.append(t.numel())
        handle = self._resolve(stream)
        for name, (ptrs, counts) in by_dtype.items():
            self._comm.all_reduce_coalesced_buffers(ptrs, counts, name, op, handle)

    # ---- argument checks: they depend on the call's shape only, never on pointers, so every
    # rank of a correct program decides alike (a refusal on one rank would leave its peers waiting).
    # The fast path tests get_device(), which is -1 for CPU and meta tensors: on a CUDA (ROCm)
    # build of torch the only tensors with an index >= 0 are on its GPUs.
    def _usable(self, t: Any, what: str) -> None:
        try:
            if t.get_device() == self._index and t.is_contiguous() and not t.requires_grad:
                return
        except Exception:  # not a dense tensor: _explain says what it is
            pass
        self._explain(t, what)

    def _explain(self, t: Any, what: str) -> None:
        """Raise what makes ``t`` unusable; return if nothing does (grad mode is off)."""
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{what} has layout {t.layout}; detar collectives take dense tensors: "
                            f"pass {what}.to_dense()")
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device}, expected this rank's GPU {self.device}: "
                             f"pass {what}.to({str(self.device)!r})")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous (got shape {tuple(t.shape)}, strides "
                             f"{t.stride()}); pass {what}.contiguous(), a copy")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{what} requires grad, but detar collectives are not differentiable "
                             f"(autograd would not see them); pass {what}.detach() or call under "
                             "torch.no_grad()")

    def _reducible(self, t: Any, what: str) -> str:
        """The table dtype name of ``t`` after the checks of :meth:`_usable` (inlined: the hot
        path of every reducing call)."""
        try:
            if t.get_device() == self._index and t.is_contiguous() and not t.requires_grad:
                name = REDUCIBLE.get(t.dtype)
                if name is not None:
                    return name
        except Exception:  # not a dense tensor: _explain says what it is
            pass
        self._explain(t, what)
        name = REDUCIBLE.get(t.dtype)
        if name is None:
            supported = ", ".join(str(d) for d in REDUCIBLE)
            raise TypeError(f"{what} has dtype {t.dtype}, which detar cannot reduce; supported: "
                            f"{supported}")
        return name

    def _movable(self, t: Any, what: str) -> int:
        """The element size of ``t`` after :meth:`_usable` (any dtype: bytes are moved)."""
        self._usable(t, what)
        return t.element_size()

    def _scattered_shape(self, input: Tensor) -> tuple[int, ...]:
        n, shape = self.world_size, tuple(input.shape)
        if not shape or shape[0] % n:
            raise ValueError(f"reduce_scatter_out splits dim 0 of input among {n} ranks, but "
                             f"input has shape {shape}; give input a first dimension that is a "
                             f"multiple of {n}, or call reduce_scatter_tensor with an output of "
                             f"input.numel() // {n} elements")
        return (shape[0] // n, *shape[1:])

    def _gathered_shape(self, input: Tensor) -> tuple[int, ...]:
        shape = tuple(input.shape)
        return (self.world_size * shape[0], *shape[1:]) if shape else (self.world_size,)

    def _same_dtype(self, output: Tensor, input: Tensor) -> None:
        if output.dtype != input.dtype:
            raise TypeError(f"output has dtype {output.dtype}, expected input's {input.dtype}")

    def _reduce_scatter_pair(self, output: Tensor, input: Tensor) -> str:
        name = self._reducible(input, "input")
        self._usable(output, "output")
        self._same_dtype(output, input)
        n, total = self.world_size, input.numel()
        if total % n:
            raise ValueError(f"input has {total} elements, not a multiple of the world size {n}")
        if output.numel() != total // n:
            raise ValueError(f"output has {output.numel()} elements, expected {total // n} "
                             f"(input's {total} divided by the world size {n})")
        return name

    def _all_gather_pair(self, output: Tensor, input: Tensor) -> int:
        itemsize = self._movable(input, "input")
        self._usable(output, "output")
        self._same_dtype(output, input)
        n, count = self.world_size, input.numel()
        if output.numel() != count * n:
            raise ValueError(f"output has {output.numel()} elements, expected {count * n} "
                             f"(input's {count} times the world size {n})")
        return itemsize
