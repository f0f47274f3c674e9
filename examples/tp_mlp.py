"""A tensor-parallel MLP in bfloat16 whose output bits do not depend on the batch size.

Each rank holds a slice of the MLP (column-parallel first layer, row-parallel second) and the
ranks' partial outputs are summed by an all-reduce. With detar_cupy every row comes out with the
same bits for batch sizes 1..64, and alone, and in every run. The same partial outputs summed by
torch.distributed's NCCL all-reduce can change with the batch size: NCCL picks its algorithm by
message size, and with it the order of the sum (on 4 ranks; a sum of 2 has one order).

    python examples/tp_mlp.py [--ranks N]        # starts N ranks itself (default 2)
    torchrun --nproc-per-node N examples/tp_mlp.py

With fewer GPUs than ranks the ranks share GPUs: detar_cupy then needs DETAR_SHARE_GPUS=1 and
NCCL a distinct NCCL_HOSTID per rank (it then talks over sockets); this script sets both.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F

import detar_cupy.torch as dct

HIDDEN, FFN, MAX_BATCH = 1024, 4096, 64


def partial_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """This rank's share of the MLP's output. The batch is padded to MAX_BATCH so that the matmuls
    always have one shape, hence one cuBLAS kernel: a row's bits then do not depend on the batch
    size here either (only the all-reduce could make them)."""
    padded = x.new_zeros(MAX_BATCH, HIDDEN)
    padded[: len(x)] = x
    return (F.gelu(padded @ w1) @ w2)[: len(x)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # compare bit patterns, not values (NaN, -0.0)


def run() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gpus = torch.cuda.device_count()
    if world > gpus:
        os.environ["DETAR_SHARE_GPUS"] = "1"
        os.environ["NCCL_HOSTID"] = f"tp-mlp-rank-{rank}"
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % gpus)
    dist.init_process_group("nccl")
    tp = dct.from_process_group()  # set up through torch's group: no port, no key

    gen = torch.Generator().manual_seed(0)  # the same weights and inputs on every rank
    w1 = torch.randn(HIDDEN, FFN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(FFN, HIDDEN, generator=gen) / FFN ** 0.5
    x = torch.randn(MAX_BATCH, HIDDEN, generator=gen).bfloat16().cuda()
    mine = slice(rank * FFN // world, (rank + 1) * FFN // world)
    w1 = w1[:, mine].contiguous().bfloat16().cuda()
    w2 = w2[mine].contiguous().bfloat16().cuda()

    detar, nccl = {}, {}
    with torch.no_grad():
        # batch sizes 1..64 (the first b rows), then every row alone
        for key in [("batch", b) for b in range(1, MAX_BATCH + 1)] + \
                   [("row", i) for i in range(MAX_BATCH)]:
            rows = x[: key[1]] if key[0] == "batch" else x[key[1]: key[1] + 1]
            part = partial_mlp(rows, w1, w2)
            detar[key] = tp.all_reduce_out(part)
            nccl[key] = part.clone()
            dist.all_reduce(nccl[key])

    def changed(out: dict) -> int:
        """How many batch sizes or lone rows give rows whose bits differ from the full batch's."""
        full = bits(out["batch", MAX_BATCH])
        return sum(not torch.equal(bits(y), full[:len(y)] if kind == "batch" else full[i:i + 1])
                   for (kind, i), y in out.items())

    detar_changed, nccl_changed = changed(detar), changed(nccl)
    digest = hashlib.sha256(bits(detar["batch", MAX_BATCH]).cpu().numpy().tobytes()).hexdigest()
    if rank == 0:
        cases = 2 * MAX_BATCH
        print(f"{world} ranks, bf16 MLP {HIDDEN}x{FFN}, batch sizes 1..{MAX_BATCH} and each row "
              f"alone ({cases} cases):")
        print(f"detar_cupy:               {detar_changed} of {cases} cases change a row's bits")
        print(f"torch.distributed (NCCL): {nccl_changed} of {cases} cases change a row's bits")
        print(f"detar_cupy output digest: {digest[:16]}")
    tp.close()
    dist.destroy_process_group()
    if detar_changed:
        raise SystemExit(f"rank {rank}: detar_cupy's rows changed with the batch size")


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run()


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        run()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    ranks = parser.parse_args().ranks
    with socket.socket() as sock:  # a free port for torch's store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(ranks, port), nprocs=ranks)


if __name__ == "__main__":
    main()
