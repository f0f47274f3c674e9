"""A/B of two versions of the library's kernels: graph-replay time per all_reduce.

    python bench/ab_kernels.py OLD_PACKAGE_DIR [--world 1|2] [--aligned-only] [--repeats N]
                               [--alone ROUNDS] [--out FILE.json]

OLD_PACKAGE_DIR holds an earlier version of the package renamed ``detar_old`` (``git archive
<commit> detar_cupy`` with every ``detar_cupy`` replaced by ``detar_old``). Both versions build a
communicator in the same process(es) and are timed interleaved, minimum over repeats of the mean
time per replayed call (50 calls captured per graph), so drift of the machine between processes
does not enter the comparison. World 1: one process, a copy kernel with the contract's
conversions. World 2: two ranks spawned on the GPUs there are (DETAR_SHARE_GPUS=1 on one GPU:
time slices dominate, so only large differences would show).

Rows: fp16 and fp32 sum and prod at 1 KiB - 1 MiB with every algorithm; fp16 inputs that start
one element into their buffer (``x[1:]``: the old kernels went element by element, the new ones
use 16-byte loads but for the first and last packs) at 1 MiB and 64 MiB (left out with
``--aligned-only``).

The order in which the versions are built and timed biases a single run by about 0.7 % at 1 KiB
on an H200 (an A/A run, the current package against an identical copy: 1.007 with the copy built
first, 0.992 with the current package first), so every row is measured in both orders and reports
their geometric mean (A/A: 1.000; ``--repeats`` sets the timed repeats per order).

Sharing a process has a cost of its own at 1 KiB: on an H200 the current kernels take 1.81 us
per 1 KiB call next to a copy of themselves and 1.89-1.91 us when a third communicator (of any
version, never called) was built first, while 64 KiB calls do not move (bench/NOTES.md, v6
kernels), presumably through where the buffers land. The two versions allocate different
buffers, so a 1 KiB ratio in one process can carry a few percent of that. ``--alone ROUNDS``
(world 1) times each version in a process of its own instead, ROUNDS processes per version,
alternating (the first version flips every round); a row reports the geometric mean over rounds
of each version's time, with the per-round ratios beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CALLS = 50
REPEATS = 7
LL_BYTES = 256 << 10  # both versions' default DETAR_LL_BYTES: the largest LL message


def _world_one(package):
    rdv = package._rendezvous.Rendezvous(0, 1, {})
    return package.communicator.Communicator._from_rendezvous(rdv, 0)


def _graph_us(cp, call, stream) -> float:
    stream.begin_capture()
    for _ in range(CALLS):
        call()
    graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    graph.launch(stream)
    stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) * 1e3 / CALLS


def _cases(aligned_only: bool = False):
    for name in ("float16", "float32"):
        for op in ("sum", "prod"):
            for nbytes in (1 << 10, 64 << 10, 1 << 20):
                for alg in ("ll", "one_shot", "two_shot"):
                    yield name, op, alg, nbytes, 0
    if aligned_only:  # e.g. an "old" variant that assumes aligned buffers (measurement only)
        return
    for nbytes in (1 << 20, 64 << 20):
        for alg in ("one_shot", "two_shot"):
            yield "float16", "sum", alg, nbytes, 1


def measure(comms: dict, sync, aligned_only: bool = False, repeats: int = REPEATS) -> list[dict]:
    """Rows {case, version: us} for every case, the versions timed alternately."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    rows = []
    for name, op, alg, nbytes, offset in _cases(aligned_only):
        count = nbytes // cp.dtype(name).itemsize
        buf = cp.random.default_rng(0).standard_normal(count + offset).astype(name)
        x, out = buf[offset:], cp.empty(count + offset, name)[offset:]
        row = {"dtype": name, "op": op, "algorithm": alg, "bytes": nbytes,
               "offset_elements": offset}
        times = {v: [] for v in comms}
        for _ in range(repeats):
            for version, comm in comms.items():
                if alg == "ll" and nbytes > LL_BYTES:
                    continue
                sync()
                times[version].append(_graph_us(
                    cp, lambda: comm.all_reduce(x, out, op=op, stream=stream, algorithm=alg),
                    stream))
        for version, t in times.items():
            row[version] = min(t) if t else None
        rows.append(row)
    return rows


ORDERS = ("old_first", "new_first")
ORDER_LABELS = ("old 1st", "new 1st")


def _both_orders(make: dict, sync, aligned_only: bool, repeats: int) -> list[dict]:
    """measure() twice: communicators built (and timed) old first, then new first. The rows'
    times are the geometric means of the two orders, so the order's own bias (see above) enters
    both versions alike; each row keeps its per-order times under "parts"."""
    by_order = {}
    for order in ORDERS:
        comms = {}
        try:
            for version in (("old", "new") if order == "old_first" else ("new", "old")):
                comms[version] = make[version]()
            by_order[order] = measure(comms, sync, aligned_only, repeats)
        finally:
            for comm in comms.values():
                comm.close()
    rows = []
    for per_order in zip(*(by_order[o] for o in ORDERS)):
        row = {k: v for k, v in per_order[0].items() if k not in ("old", "new")}
        for version in ("old", "new"):
            times = [r[version] for r in per_order]
            row[version] = statistics.geometric_mean(times) if all(times) else None
        row["parts"] = {label: {"old": r["old"], "new": r["new"]}
                        for label, r in zip(ORDER_LABELS, per_order)}
        rows.append(row)
    return rows


def _packages(old_dir: str) -> dict:
    """{"old": the package in old_dir, "new": this one}."""
    sys.path.insert(0, old_dir)
    import detar_old

    import detar_cupy

    return {"old": detar_old, "new": detar_cupy}


def _rank(comm, old_dir: str, aligned_only: bool, repeats: int):
    packages = _packages(old_dir)
    from gpu_reliability import free_ports  # the tests directory is on the path

    def group(package):
        port = comm.exchange(free_ports(1)[0] if comm.rank == 0 else None)[0]
        return package.init_process_group(comm.world_size, comm.rank, port=port,
                                          device=comm.device.id, timeout=60)

    return _both_orders({v: lambda p=p: group(p) for v, p in packages.items()},
                        lambda: comm.exchange(None), aligned_only, repeats)


def _ratio(r: dict) -> float:
    return r["new"] / r["old"] if r.get("old") and r.get("new") else float("nan")


def _alone(old_dir: str, aligned_only: bool, repeats: int, rounds: int) -> list[dict]:
    """World 1, each version in a process of its own: ``rounds`` processes per version,
    alternating. Rows as _both_orders's, the parts being the rounds."""
    per_round = []
    for i in range(rounds):
        times = {}
        for version in (("old", "new") if i % 2 == 0 else ("new", "old")):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, os.path.abspath(__file__), old_dir, "--only", version,
                       "--repeats", str(repeats), "--out", f.name]
                subprocess.run(cmd + (["--aligned-only"] if aligned_only else []), check=True)
                with open(f.name) as g:
                    times[version] = json.load(g)["rows"]
        per_round.append(times)
    rows = []
    for k, first in enumerate(per_round[0]["old"]):
        row = {key: v for key, v in first.items() if key not in ("old", "new")}
        parts = {f"round {i + 1}": {v: t[v][k][v] for v in ("old", "new")}
                 for i, t in enumerate(per_round)}
        for version in ("old", "new"):
            ts = [p[version] for p in parts.values()]
            row[version] = statistics.geometric_mean(ts) if all(ts) else None
        row["parts"] = parts
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old_dir")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--aligned-only", action="store_true",
                        help="leave out the rows of buffers that start one element in")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="timed repeats per row and version (the minimum is kept)")
    parser.add_argument("--alone", type=int, default=0, metavar="ROUNDS",
                        help="world 1: time each version in a process of its own, ROUNDS each")
    parser.add_argument("--only", choices=("old", "new"), help=argparse.SUPPRESS)  # --alone's
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if (args.alone or args.only) and args.world != 1:
        parser.error("--alone times world size 1 only")
    started = time.time()
    if args.only:
        package = _packages(os.path.abspath(args.old_dir))[args.only]
        comm = _world_one(package)
        try:
            rows = measure({args.only: comm}, lambda: None, args.aligned_only, args.repeats)
        finally:
            comm.close()
        with open(args.out, "w") as f:
            json.dump({"world": 1, "rows": rows}, f)
        return
    if args.alone:
        rows = _alone(os.path.abspath(args.old_dir), args.aligned_only, args.repeats, args.alone)
    elif args.world == 1:
        packages = _packages(os.path.abspath(args.old_dir))
        rows = _both_orders({v: lambda p=p: _world_one(p) for v, p in packages.items()},
                            lambda: None, args.aligned_only, args.repeats)
    else:
        import detar_cupy

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        rows = detar_cupy.spawn(_rank, args.world, args=(os.path.abspath(args.old_dir),
                                                           args.aligned_only, args.repeats))[0]
    labels = list(rows[0]["parts"])
    print(f"{'dtype':8} {'op':5} {'algorithm':9} {'bytes':>9} {'off':>3} {'old us':>8} "
          f"{'new us':>8} {'new/old':>7} " + " ".join(f"{label:>7}" for label in labels))
    for r in rows:
        print(f"{r['dtype']:8} {r['op']:5} {r['algorithm']:9} {r['bytes']:9d} "
              f"{r['offset_elements']:3d} {r['old'] or float('nan'):8.2f} "
              f"{r['new'] or float('nan'):8.2f} {_ratio(r):7.3f} "
              + " ".join(f"{_ratio(r['parts'][label]):7.3f}" for label in labels))
    aligned = [r for r in rows if r["old"] and r["new"] and not r["offset_elements"]]
    print("geometric mean new/old over aligned rows: "
          + ", ".join(f"{name} {statistics.geometric_mean([_ratio(pick(r)) for r in aligned]):.3f}"
                      for name, pick in [("all", lambda r: r)]
                      + [(label, lambda r, label=label: r["parts"][label]) for label in labels])
          + f" ({time.time() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"world": args.world, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
