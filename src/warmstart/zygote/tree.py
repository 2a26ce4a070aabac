"""The import-cache tree: which zygote should a new instance fork from, and which to grow.

Every node stands for a set of packages (``name==version``) that its zygote process has
imported; a child's set is a strict superset of its parent's.  The root holds only the
runtime and the standard library.  A function whose packages are P is served by the
deepest node whose set is a subset of P (SOCK's lookup).  The tree grows from demand:
every cold start of a package set is counted, and once a set has been asked for
``grow_after`` times, a node for it is planned under its best existing ancestor.  When
the zygotes' memory exceeds the budget, the least recently used leaves go first.

This module is pure bookkeeping (no processes), so it is unit-tested on its own.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

PackageSet = frozenset[str]


@dataclass(eq=False)
class Node:
    packages: PackageSet
    parent: Node | None
    children: list[Node] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    forks: int = 0
    memory_bytes: int = 0
    handle: object | None = None  # the zygote process, owned by the zygote manager

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


class ZygoteTree:
    def __init__(self, *, grow_after: int = 2, max_nodes: int = 32) -> None:
        self.root = Node(frozenset(), None)
        self.grow_after = grow_after
        self.max_nodes = max_nodes
        self.demand: Counter[PackageSet] = Counter()

    def nodes(self) -> list[Node]:
        return list(self.root.walk())

    def find(self, packages: Iterable[str]) -> Node:
        """The deepest node whose packages are all among ``packages``."""
        want = frozenset(packages)
        node = self.root
        while True:
            fits = [c for c in node.children if c.packages <= want]
            if not fits:
                return node
            # Prefer the child that covers most of what is wanted.
            node = max(fits, key=lambda c: (len(c.packages), -c.depth))

    def exact(self, packages: Iterable[str]) -> Node | None:
        want = frozenset(packages)
        for node in self.root.walk():
            if node.packages == want:
                return node
        return None

    def record(self, packages: Iterable[str]) -> PackageSet | None:
        """Count a start for this package set; return a set worth a new zygote, if any."""
        want = frozenset(packages)
        if not want:
            return None
        self.demand[want] += 1
        if self.demand[want] < self.grow_after or self.exact(want) is not None:
            return None
        if len(self.nodes()) >= self.max_nodes:
            return None
        return want

    def add(self, packages: Iterable[str]) -> Node:
        """Insert a node for ``packages`` under its deepest subset; adopt supersets below."""
        want = frozenset(packages)
        existing = self.exact(want)
        if existing is not None:
            return existing
        parent = self.find(want)
        node = Node(want, parent)
        # Children of the parent that are supersets of the new node move under it.
        for child in list(parent.children):
            if want < child.packages:
                parent.children.remove(child)
                child.parent = node
                node.children.append(child)
        parent.children.append(node)
        return node

    def remove(self, node: Node) -> None:
        """Drop a node; its children move up to its parent (their packages still fit)."""
        if node is self.root or node.parent is None:
            raise ValueError("the root zygote is never removed")
        parent = node.parent
        parent.children.remove(node)
        for child in node.children:
            child.parent = parent
            parent.children.append(child)
        node.children = []

    def eviction_order(self) -> list[Node]:
        """Leaves first, least recently used first (never the root)."""
        candidates = [n for n in self.root.walk() if n is not self.root]
        return sorted(candidates, key=lambda n: (len(n.children) > 0, n.last_used))
