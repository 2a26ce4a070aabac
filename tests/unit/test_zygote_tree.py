"""The import-cache tree's bookkeeping."""

from __future__ import annotations

from warmstart.zygote.tree import ZygoteTree

NP = "numpy==2.4.6"
PD = "pandas==3.1.1"
RQ = "requests==2.34.2"


def test_lookup_picks_the_deepest_subset() -> None:
    tree = ZygoteTree()
    np_node = tree.add({NP})
    pd_node = tree.add({NP, PD})
    rq_node = tree.add({RQ})
    assert tree.find({NP, PD, "six==1"}) is pd_node
    assert tree.find({NP}) is np_node
    assert tree.find({RQ, NP}) in (np_node, rq_node)
    assert tree.find({"six==1"}) is tree.root
    assert pd_node.parent is np_node and pd_node.depth == 2


def test_adding_a_subset_adopts_supersets() -> None:
    tree = ZygoteTree()
    pd_node = tree.add({NP, PD})
    np_node = tree.add({NP})
    assert pd_node.parent is np_node
    assert np_node.parent is tree.root
    assert tree.root.children == [np_node]


def test_growth_follows_demand() -> None:
    tree = ZygoteTree(grow_after=3)
    assert tree.record({NP, PD}) is None
    assert tree.record({NP, PD}) is None
    assert tree.record({NP, PD}) == frozenset({NP, PD})
    tree.add({NP, PD})
    assert tree.record({NP, PD}) is None  # it exists now
    assert tree.record(set()) is None  # the root serves functions without packages


def test_remove_reparents_and_eviction_prefers_old_leaves() -> None:
    tree = ZygoteTree()
    np_node = tree.add({NP})
    pd_node = tree.add({NP, PD})
    rq_node = tree.add({RQ})
    rq_node.last_used = 0.0
    pd_node.last_used = 1.0
    np_node.last_used = 2.0
    assert tree.eviction_order() == [rq_node, pd_node, np_node]
    tree.remove(np_node)
    assert pd_node.parent is tree.root
    assert set(tree.root.children) == {pd_node, rq_node}


def test_max_nodes_bounds_growth() -> None:
    tree = ZygoteTree(grow_after=1, max_nodes=2)
    assert tree.record({NP}) is not None
    tree.add({NP})
    assert tree.record({RQ}) is None
