"""Which nodes an image operation is for: a list of names, a label selector, or every node.

Preheat jobs and image cache entries name their nodes the way Kubernetes objects do:
``{"nodes": ["node1", "node2"]}`` (exactly those), ``{"selector": {"zone": "a"}}`` (every
node whose labels -- ``warmstart serve --label KEY=VALUE`` -- include all of those), or
neither (every node).  ``NodeView`` is what the controllers need to know of the cluster:
this node's name and lease, and the live nodes with their labels (``Membership`` is one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from warmstart.cluster.membership import Member
from warmstart.cluster.settings import NODE_NAME_RE
from warmstart.errors import InvalidParameter
from warmstart.images.errors import InvalidReference
from warmstart.images.reference import Reference

# A label key or value as ``--label`` takes them (Kubernetes' syntax, prefix included).
LABEL_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
MAX_NODES = 1000


class NodeView(Protocol):
    """This node and the live nodes, as the image controllers see the cluster."""

    name: str
    lease: int  # this node's lease (0 while it has none)

    def live(self) -> list[Member]:
        """Every live node, this one included, by name."""
        ...


@dataclass(frozen=True)
class Selection:
    nodes: tuple[str, ...] | None = None  # exactly these node names
    selector: dict[str, str] | None = field(default=None)  # nodes whose labels include these

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Selection:
        """``nodes`` and ``selector`` from a request body (at most one of them); the
        caller's mistakes are ``InvalidParameter``."""
        nodes, selector = body.get("nodes"), body.get("selector")
        if nodes is not None and selector is not None:
            raise InvalidParameter("give either nodes or selector, not both")
        if nodes is not None:
            if (
                not isinstance(nodes, list)
                or not nodes
                or not all(isinstance(n, str) for n in nodes)
            ):
                raise InvalidParameter('nodes must be a non-empty list of node names: ["node1"]')
            if len(nodes) > MAX_NODES:
                raise InvalidParameter(f"nodes may name at most {MAX_NODES} nodes")
            for name in nodes:
                if not NODE_NAME_RE.fullmatch(name):
                    raise InvalidParameter(
                        f"nodes: {name!r} is not a node name (lower-case letters, digits, '-')"
                    )
            return cls(nodes=tuple(dict.fromkeys(nodes)))
        if selector is not None:
            if isinstance(selector, str):
                selector = parse_selector(selector)
            if not isinstance(selector, dict) or not selector:
                raise InvalidParameter(
                    'selector must be an object of labels, {"key": "value"}, or "key=value,..."'
                )
            for key, value in selector.items():
                if not isinstance(value, str) or not LABEL_RE.match(key):
                    raise InvalidParameter(
                        f"selector: {key!r} is not a label key with a string value"
                    )
                if not LABEL_VALUE_RE.match(value):
                    raise InvalidParameter(f"selector: {value!r} is not a label value")
            return cls(selector=dict(selector))
        return cls()

    def to_json(self) -> dict[str, Any]:
        if self.nodes is not None:
            return {"nodes": list(self.nodes)}
        if self.selector is not None:
            return {"selector": dict(self.selector)}
        return {}

    @property
    def everywhere(self) -> bool:
        return self.nodes is None and self.selector is None

    def matches(self, name: str, labels: dict[str, str]) -> bool:
        if self.nodes is not None:
            return name in self.nodes
        if self.selector is not None:
            return all(labels.get(k) == v for k, v in self.selector.items())
        return True

    def select(self, members: Sequence[Member]) -> list[str]:
        """The names of ``members`` this selection takes, in order."""
        return [m.name for m in members if self.matches(m.name, m.labels)]

    def describe(self) -> str:
        if self.nodes is not None:
            return "nodes " + ", ".join(self.nodes)
        if self.selector is not None:
            return "nodes labelled " + ",".join(f"{k}={v}" for k, v in self.selector.items())
        return "every node"


def parse_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value...]`` (the CLI's ``--selector``) as a dict."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise InvalidParameter(f"selector: {item.strip()!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def check_image(image: str) -> str:
    """``image`` if it is an image reference; else a 400 that says why."""
    try:
        Reference.parse(image)
    except InvalidReference as exc:
        raise InvalidParameter(f"image {image!r} is not a valid image reference: {exc}") from exc
    return image


def labels_of(view: NodeView) -> dict[str, str]:
    """This node's labels, from the live table (which always holds this node)."""
    for member in view.live():
        if member.name == view.name:
            return dict(member.labels)
    return {}
