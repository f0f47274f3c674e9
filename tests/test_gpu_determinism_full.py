"""The contract on randomized cases (full tier): at least 10,000 cases over world sizes 2 and 4
(gpu_determinism_full.CASES_PER_WORLD each), one spawn per world size.

Opt-in twice over: `-m slow` and ``DETAR_DETERMINISM_FULL=1``. 15-28 s per world size on 2 and 4
H200s once the kernels are compiled. The ranks print progress every 500 cases on stderr (run with
-s), so a time limit still shows how far it got.

Environment: ``DETAR_DETERMINISM_SEED`` (master seed; fresh per session otherwise, printed),
``DETAR_DETERMINISM_CASES`` (cases per world size), ``DETAR_DETERMINISM_REPLAY`` (comma-separated
case numbers: run only those, with the master seed they failed under), ``DETAR_TEST_WORLDS``.
"""
from __future__ import annotations

import os
import time

import pytest

import gpu_determinism
import gpu_determinism_full as full
from gpu_support import need, spawn_with_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DETAR_DETERMINISM_FULL") != "1",
                                 reason="full determinism tier: set DETAR_DETERMINISM_FULL=1")]
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))
SEED = gpu_determinism.master_seed()
CASES = int(os.environ.get("DETAR_DETERMINISM_CASES", full.CASES_PER_WORLD))
REPLAY = tuple(int(i) for i in os.environ.get("DETAR_DETERMINISM_REPLAY", "").split(",") if i)
TIMEOUT_S = 900  # per world size; a few times the estimate


@pytest.mark.parametrize("world", WORLDS)
def test_full_tier(world: int) -> None:
    need(world)
    cases = full.make_cases(world, SEED, CASES)
    if REPLAY:
        cases = [c for c in cases if c.index in REPLAY]
    t0 = time.monotonic()
    per_rank = spawn_with_env(full.run_full, world, full.FULL_ENV, args=(SEED, CASES, REPLAY),
                              timeout=TIMEOUT_S)
    wall = time.monotonic() - t0

    intended = [c.index for c in cases]
    for rank, res in enumerate(per_rank):
        ran = [r[0] for r in res["results"]]
        assert ran == intended, (f"rank {rank} ran {len(ran)} cases, {len(intended)} intended "
                                 f"(master seed {SEED})")
    failures: dict[int, list[str]] = {}
    for i, case in enumerate(cases):
        results = [res["results"][i] for res in per_rank]
        problems = [f"rank {rank}: {detail}" for rank, (_, ok, detail, _) in enumerate(results)
                    if not ok]
        digests = {r[3] for r in results}
        if not problems and len(digests) != 1:  # rank agreement
            problems.append(f"ranks' outputs differ: {sorted(digests)}")
        if problems:
            failures[case.index] = problems
    by_kind = {k: sum(c.kind == k for c in cases) for k in full.KINDS}
    graphs = "" if per_rank[0]["graphs"] else " (graph replay unsupported here: skipped)"
    failed_seeds = ", ".join(f"#{i} seed {cases[intended.index(i)].seed}"
                             for i in list(failures)[:10])
    print(f"determinism full tier, world {world}: {len(cases)} cases {by_kind}, "
          f"{len(cases) - len(failures)} passed, {len(failures)} failed"
          f"{' (' + failed_seeds + ')' if failures else ''}, {wall:.1f} s wall "
          f"({per_rank[0]['seconds']:.1f} s in the cases), master seed {SEED}{graphs}")
    lines = []
    for index, problems in list(failures.items())[:30]:
        lines.append(cases[intended.index(index)].describe())
        lines += [f"    {p}" for p in problems[:4]]
    if failures:
        lines.append(f"replay: DETAR_DETERMINISM_FULL=1 DETAR_DETERMINISM_SEED={SEED} "
                     f"DETAR_DETERMINISM_CASES={CASES} DETAR_TEST_WORLDS={world} "
                     f"DETAR_DETERMINISM_REPLAY={','.join(map(str, list(failures)[:30]))} "
                     f"python3 -m pytest -m slow -s tests/test_gpu_determinism_full.py")
    assert not failures, "\n".join(lines)
