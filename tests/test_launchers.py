"""CPU tests of detar_cupy._launchers: torchrun's environment read into init_process_group's
arguments (init_process_group() itself under a faked torchrun: tests/test_spawn.py)."""
from __future__ import annotations

import pytest

from detar_cupy import _launchers
from detar_cupy._launchers import Launch

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node7.cluster", "MASTER_PORT": "29500"}


def test_outside_torchrun_there_is_no_launch() -> None:
    assert _launchers.torchrun({}) is None
    assert _launchers.torchrun({"RANK": " ", "WORLD_SIZE": ""}) is None


def test_one_machine_rendezvous_on_loopback_above_master_port() -> None:
    assert _launchers.torchrun(TORCHRUN) == Launch(4, 1, 1, "127.0.0.1", 29501)


def test_several_machines_rendezvous_at_master_addr() -> None:
    env = {**TORCHRUN, "LOCAL_WORLD_SIZE": "2"}
    assert _launchers.torchrun(env) == Launch(4, 1, 1, "node7.cluster", 29501)
    bare = {"RANK": "0", "WORLD_SIZE": "2"}  # another launcher: no address, no local rank
    assert _launchers.torchrun(bare) == Launch(2, 0, None, None, None)


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK must be an integer, got 'one'"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1, got 0"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK must be >= 0, got -1"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "65535"}, "set DETAR_PORT"),
])
def test_malformed_environment_names_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _launchers.torchrun(env)


def test_precedence_explicit_then_detar_settings_then_torchrun() -> None:
    assert _launchers.resolve(None, None, None, None, None, TORCHRUN) == \
        Launch(4, 1, 1, "127.0.0.1", 29501)
    assert _launchers.resolve(4, 1, 3, "10.0.0.1", 4000, TORCHRUN) == \
        Launch(4, 1, 3, "10.0.0.1", 4000)
    env = {**TORCHRUN, "DETAR_HOST": "10.0.0.2", "DETAR_PORT": "5000"}
    # left to connect(), which reads DETAR_HOST/DETAR_PORT itself
    assert _launchers.resolve(None, None, None, None, None, env) == Launch(4, 1, 1, None, None)
    # outside torchrun nothing is derived
    assert _launchers.resolve(2, 0, None, None, None, {}) == Launch(2, 0, None, None, None)


def test_torchrun_environment_of_another_group_is_not_used() -> None:
    # a hand-made subgroup must not listen on MASTER_PORT + 1 like the whole job's group
    assert _launchers.resolve(2, 1, None, None, None, TORCHRUN) == Launch(2, 1, None, None, None)
    with pytest.raises(ValueError, match="describe another group"):
        _launchers.resolve(2, None, None, None, None, TORCHRUN)


def test_world_size_and_rank_are_required_outside_a_launcher() -> None:
    with pytest.raises(ValueError, match="pass n_devices and rank, or start the processes with "
                                         "torchrun; got n_devices=None, rank=None"):
        _launchers.resolve(None, None, None, None, None, {})
