"""Transport selection (CPU): node labels from DETAR_NODE or the hostname, node maps, and the
choice every rank computes from the exchanged facts."""
from __future__ import annotations

import pytest

from detar_cupy.transports.select import (NODE_ENV, Choice, NodeMap, check_transport, choose,
                                          node_label, node_p2p)


def layout(*sizes: int) -> NodeMap:
    """Contiguous nodes named a, b, c, ... of the given sizes."""
    return NodeMap.of([chr(ord("a") + k) for k, size in enumerate(sizes) for _ in range(size)])


def test_node_label_is_the_hostname_unless_detar_node_says_otherwise() -> None:
    assert node_label({}, hostname="gpu-host-7") == "gpu-host-7"
    assert node_label({NODE_ENV: "  "}, hostname="h") == "h"
    assert node_label({NODE_ENV: " rack1.node-2 "}, hostname="h") == "rack1.node-2"


@pytest.mark.parametrize("bad", ["two words", "a/b", "x" * 256, "é"])
def test_bad_node_label_names_the_variable(bad: str) -> None:
    with pytest.raises(ValueError, match=NODE_ENV) as info:
        node_label({NODE_ENV: bad}, hostname="h")
    assert repr(bad.strip()) in str(info.value)


def test_node_map_orders_nodes_by_their_lowest_rank() -> None:
    nodes = NodeMap.of(["y", "y", "x", "x", "z"])
    assert nodes.members == ((0, 1), (2, 3), (4,))
    assert nodes.sizes == (2, 2, 1)
    assert nodes.node_of(3) == 1 and nodes.scattered() == []
    assert nodes.describe(0) == "ranks 0-1 on 'y'" and nodes.describe(2) == "rank 4 on 'z'"


def test_scattered_nodes_are_found() -> None:
    nodes = NodeMap.of(["a", "b", "a", "b"])
    assert nodes.members == ((0, 2), (1, 3)) and nodes.scattered() == [0, 1]
    assert nodes.describe(1) == "ranks 1, 3 on 'b'"


def test_node_p2p_reads_only_pairs_inside_a_node() -> None:
    nodes = layout(2, 2)
    rows = [(True, True, False, False), (True, True, False, False),
            (False, False, True, True), (False, False, False, True)]
    assert node_p2p(nodes, rows) == (True, False)  # rank 3 cannot reach rank 2


def test_auto_takes_ipc_on_one_node_with_p2p() -> None:
    got = choose("auto", layout(4), (True,))
    assert got == "ipc" and isinstance(got, Choice) and isinstance(got, str)
    assert "P2P" in got.reason and got.nodes.sizes == (4,)


def test_auto_without_p2p_or_beyond_ipc_is_flat_nccl() -> None:
    got = choose("auto", layout(4), (False,))
    assert got == "nccl" and "P2P" in got.reason
    many = choose("auto", layout(9), (True,))
    assert many == "nccl" and "9 ranks" in many.reason


@pytest.mark.parametrize("sizes", [(2, 2), (4, 4), (2, 2, 2, 2), (8, 8), (1, 3), (3, 2)])
def test_nodes_of_several_gpus_with_p2p_are_hierarchical(sizes) -> None:
    for requested in ("auto", "nccl"):
        got = choose(requested, layout(*sizes), (True,) * len(sizes))
        assert got == "hierarchical", (sizes, got.reason)
        assert got.nodes.sizes == sizes


@pytest.mark.parametrize("labels,why", [
    (["a", "b", "a", "b"], "not contiguous"),
    (["a", "b", "c"], "one rank per node"),
    (["a"] * 9 + ["b"] * 2, "at most 8"),
])
def test_layouts_the_carried_fold_cannot_serve_are_flat(labels, why) -> None:
    nodes = NodeMap.of(labels)
    got = choose("auto", nodes, (True,) * len(nodes.members))
    assert got == "nccl" and why in got.reason and got.reason.startswith("flat")


def test_a_node_without_p2p_makes_it_flat() -> None:
    got = choose("nccl", layout(2, 2), (True, False))
    assert got == "nccl" and "'b'" in got.reason and "P2P" in got.reason


def test_nccl_requested_on_one_node_is_flat_nccl() -> None:
    got = choose("nccl", layout(4), (True,))
    assert got == "nccl" and "one node" in got.reason


def test_ipc_refuses_several_nodes_and_large_worlds() -> None:
    with pytest.raises(ValueError, match="transport='ipc' needs every rank on one node") as info:
        choose("ipc", layout(2, 2), (True, True))
    assert "ranks 0-1 on 'a'; ranks 2-3 on 'b'" in str(info.value)
    with pytest.raises(ValueError, match="at most 8 ranks, got 9"):
        choose("ipc", layout(9), (True,))
    # one node, even without P2P: the IPC transport's own device check explains which pair fails
    assert choose("ipc", layout(4), (False,)) == "ipc"


def test_nccl_world_is_bounded_by_the_report_word() -> None:
    with pytest.raises(ValueError, match="at most 255 ranks, got 256"):
        choose("nccl", NodeMap.of([str(r) for r in range(256)]), (True,) * 256)


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="transport must be one of 'auto', 'ipc', 'nccl', got 'mpi'"):
        check_transport("mpi")
    with pytest.raises(ValueError, match="transport must be one of"):
        choose("hierarchical", layout(2, 2), (True, True))
