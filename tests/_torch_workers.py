"""CPU helpers of the torch tests: a Communicator stand-in that records the calls the torch layer
makes, and the body of the gloo ranks (module-level: the spawn start method pickles by name)."""
from __future__ import annotations

import traceback
import types
from typing import Any


class RecordingComm:
    """Stands in for a Communicator of ``world_size`` ranks on GPU ``device``: no GPU, no CuPy;
    every ``*_buffers`` call is recorded as (method, args)."""

    def __init__(self, world_size: int = 2, rank: int = 0, device: int = 0) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = types.SimpleNamespace(id=device)
        self.calls: list[tuple[str, tuple]] = []
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_buffers"):
            return lambda *args: self.calls.append((name, args))
        raise AttributeError(name)

    def close(self) -> None:
        self.closed = True


def _error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def gloo_rank(rank: int, world: int, store: str, conn: Any) -> None:
    """One rank of a CPU gloo group: the rendezvous adapter's exchanges over the whole group and
    over subgroups, and the refusals that need a group; reports ("ok", {check: value}) or
    ("error", traceback)."""
    try:
        import torch.distributed as dist

        from detar_cupy import _wire
        from detar_cupy.torch import DetarGroup, ProcessGroupRendezvous, from_process_group
        from detar_cupy.torch import register_ddp_comm_hook

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        out: dict[str, Any] = {}
        rdv = ProcessGroupRendezvous()
        out["rank, world"] = (rdv.rank, rdv.world_size)
        # payloads of different lengths per rank, every type of the codec
        out["world exchange"] = rdv.exchange(("rank", rank, b"\x00" * (1000 * rank),
                                              [None, True, -rank], "é" * rank))
        rdv.barrier()
        out["empty values"] = rdv.exchange(())
        # every rank creates every subgroup (torch's rule); each talks in its own
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        alone = dist.new_group([0])
        mine = pairs[rank // 2]
        sub = ProcessGroupRendezvous(mine)
        out["subgroup rank, world"] = (sub.rank, sub.world_size)
        out["subgroup exchange"] = sub.exchange(rank * 10)
        if rank == 0:
            out["group of one"] = ProcessGroupRendezvous(alone).exchange((1, [2]))
        # a member that sends bytes the codec cannot read: every rank refuses them, naming it
        real = _wire.encode
        if rank == 1:
            _wire.encode = lambda obj: b"\x80garbage"
        try:
            rdv.exchange("fine")
            out["garbage"] = None
        except Exception as exc:
            out["garbage"] = _error(exc)
        finally:
            _wire.encode = real
        sub.close()
        try:
            sub.exchange(None)
            out["closed"] = None
        except Exception as exc:
            out["closed"] = _error(exc)
        # not a member of the group passed
        try:
            from_process_group(pairs[1 - rank // 2])
            out["not a member"] = None
        except Exception as exc:
            out["not a member"] = _error(exc)
        # a DDP model (what register_ddp_comm_hook reads of one: DDP itself would import
        # torch._dynamo, seconds per rank) of the whole group, and detar groups of 2 and 4 ranks
        hooks: list[tuple] = []
        model = types.SimpleNamespace(process_group=dist.group.WORLD,
                                      register_comm_hook=lambda *args: hooks.append(args))
        try:
            register_ddp_comm_hook(model, DetarGroup(RecordingComm(2, rank % 2)))
            out["ddp size mismatch"] = None
        except Exception as exc:
            out["ddp size mismatch"] = _error(exc)
        register_ddp_comm_hook(model, DetarGroup(RecordingComm(4, rank)), "sum")
        out["ddp hook registered"] = [(type(state).__name__, state.op, hook.__name__)
                                      for state, hook in hooks]
        dist.barrier()
        dist.destroy_process_group()
        conn.send(("ok", out))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
