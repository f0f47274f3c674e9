"""No hangs: a dead peer and mismatched calls raise clear, sticky errors on every rank.

Opt-in (`-m slow`); run with `-s` to see one line per measurement (detection latency, times).
Every wait here is bounded (run_processes, spawn timeouts), so a stuck rank fails its case
instead of stalling the session. About 3-4 s per dead-peer case (process and CUDA start, the 2 s
timeout, teardown) and 10-15 s per world size for the mismatch group, kernels in the disk
cache."""
from __future__ import annotations

import os
import signal

import pytest

import gpu_reliability as rel
from gpu_support import cached_spawn, need, run_processes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
WORLDS = tuple(int(w) for w in os.environ.get("DETAR_TEST_WORLDS", "2,4").split(","))
MARGIN_S = 1.5  # detection may take the timeout plus this (launch, polling, host wake-up)
MISMATCH_ENV = {"DETAR_TIMEOUT": "20"}  # a mismatch must be seen long before this
MISMATCH_MAX_S = 1.0  # "a fraction of a second": detected in the kernel, not by the timeout
SEED = 5150


@pytest.mark.parametrize("alg", ["one_shot", "two_shot", "ll"])
@pytest.mark.parametrize("world", WORLDS)
def test_dead_peer_raises_peer_timeout_on_every_survivor(world: int, alg: str) -> None:
    need(world)
    victim = world // 2  # world 4: a middle rank, survivors on both sides of it
    port = rel.free_ports(1)[0]
    reports, exitcodes, wall = run_processes(
        rel.dead_peer_rank, world, (world, port, alg, victim, SEED, None),
        report_within_s=60.0, exit_within_s=15.0)
    crashes = {r: rep["crash"] for r, rep in reports.items() if "crash" in rep}
    assert not crashes, crashes
    assert "killed_at" in reports.get(victim, {}), f"the victim never reported: {reports}"
    assert exitcodes[victim] == -signal.SIGKILL, exitcodes
    killed_at = reports[victim]["killed_at"]
    survivors = [r for r in range(world) if r != victim]
    missing = [r for r in survivors if r not in reports]
    assert not missing, f"survivors {missing} never reported (hung?); exit codes {exitcodes}"
    for rank in survivors:
        rep = reports[rank]
        assert rep["timeout"] == rel.TIMEOUT_S, rep
        assert rep["type"] == "PeerTimeoutError", (rank, rep)
        latency = rep["raised_at"] - killed_at
        print(f"dead peer world {world} {alg}: rank {rank} raised PeerTimeoutError "
              f"{latency:.3f} s after rank {victim} was killed (timeout {rel.TIMEOUT_S:g} s); "
              f"group wall {wall:.1f} s")
        assert rep["peer"] == victim, (rank, rep["peer"], rep["text"])
        assert f"rank {victim}" in rep["text"], rep["text"]
        assert latency <= rel.TIMEOUT_S + MARGIN_S, latency
        # Sticky: the next call and check() raise the same error until close().
        for how in ("again", "check"):
            assert rep[how]["type"] == "PeerTimeoutError", (rank, how, rep[how])
            assert rep[how]["same_text"] and rep[how]["peer"] == victim, (rank, how, rep[how])
        assert rep["close"] == "ok", (rank, rep["close"])
        assert rep["close_again"] == "None", (rank, rep["close_again"])
        assert rep["after_close"] == "CommunicatorClosedError", (rank, rep["after_close"])
        assert exitcodes[rank] == 0, f"survivor {rank} exit code {exitcodes[rank]} (-9: killed " \
                                     f"here after not exiting within 15 s)"


def mismatch_results(world: int) -> list:
    """Per-rank results of the one mismatch group of ``world`` ranks (spawned once)."""
    return cached_spawn(("mismatch", world), rel.mismatch_all_variants, world, MISMATCH_ENV,
                        args=(SEED,), timeout=240)


@pytest.mark.parametrize("variant", list(rel.MISMATCHES))
@pytest.mark.parametrize("world", WORLDS)
def test_mismatched_calls_raise_mismatch_on_every_rank(world: int, variant: str) -> None:
    need(world)
    per_rank = mismatch_results(world)
    _, _, fields, exact = rel.MISMATCHES[variant]
    for rank, res in enumerate(per_rank):
        rec = res["variants"][variant]
        print(f"mismatch world {world} {variant}: rank {rank} {rec.get('type')} after "
              f"{rec['elapsed'] * 1e3:.1f} ms; peer {rec.get('peer')} differs {rec.get('differs')}")
        assert rec["type"] == "MismatchError", (rank, rec)
        assert rec["elapsed"] < MISMATCH_MAX_S, (rank, rec["elapsed"])
        # Which peer: the odd rank out, as seen from ranks 0..N-2; one of those from the last.
        if rec["side"] == 0:
            assert rec["peer"] == world - 1, (rank, rec["peer"])
        else:
            assert rec["peer"] in range(world - 1), (rank, rec["peer"])
        # What differs: named in differs, in mine/theirs and in the message.
        differs = rec["differs"]
        assert differs is not None, "MismatchError has no .differs"
        assert set(differs) <= set(rel.FIELDS), differs
        if exact:
            assert differs == fields, (rank, differs)
        else:
            assert set(fields) <= set(differs), (rank, differs)
        mine, theirs = rec["mine"], rec["theirs"]
        assert mine is not None and theirs is not None, rec
        assert set(mine) == set(theirs) == set(rel.FIELDS), (mine, theirs)
        for f in rel.FIELDS:  # consistent with differs (None: the peer's value is unknown)
            if f in differs:
                assert mine[f] != theirs[f], (f, mine, theirs, differs)
            else:
                assert theirs[f] is None or mine[f] == theirs[f], (f, mine, theirs, differs)
        me, peer = rel.first_call(variant, rec["side"]), rel.first_call(variant, 1 - rec["side"])
        for f in fields:
            key = rel.PREDICTABLE[f]
            assert (str(mine[f]), str(theirs[f])) == (str(me[key]), str(peer[key])), (f, mine, theirs)
        for f in differs:
            assert f in rec["text"], (f, rec["text"])
        # Sticky until closed: the same error again from the next call and from check().
        for how in ("again", "check"):
            assert rec[how]["type"] == "MismatchError", (rank, how, rec[how])
            assert rec[how]["same_text"], (rank, how, rec[how])
        assert rec["close"] == "ok", rec["close"]


@pytest.mark.parametrize("world", WORLDS)
def test_fresh_communicator_after_mismatches_is_bit_exact(world: int) -> None:
    need(world)
    per_rank = mismatch_results(world)
    for rank, res in enumerate(per_rank):
        bad = [row for row in res["fresh"] if not row[1]]
        assert not bad, (rank, bad)
    digests = {tuple(row[2] for row in res["fresh"]) for res in per_rank}
    assert len(digests) == 1, "ranks disagree"
    print(f"mismatch world {world}: fresh communicator bit-exact on "
          f"{len(per_rank[0]['fresh'])} calls on every rank")
