"""A node's cluster settings (``warmstart serve --cluster …``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

NODE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # fullmatch: no trailing newline


@dataclass(frozen=True)
class ClusterSettings:
    endpoints: tuple[str, ...]  # etcd client URLs, tried in order
    node_name: str  # unique in the cluster (a DNS label)
    advertise: str  # the URL other nodes and clients reach this node's API at
    prefix: str = "/warmstart/"  # every key the cluster writes starts with it
    lease_ttl_s: int = 6  # a node whose lease is not refreshed this long is gone
    publish_interval_s: float = 1.0  # how often a node's state is written (≤ 2 s)
    labels: dict[str, str] = field(default_factory=dict)  # key=value, for selectors
    p2p_sources: int = 1  # nodes that fetch one blob from the registry; the rest use peers
    p2p: bool = True  # layers and lazy chunks from peers (off: every node uses the registry)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("--cluster needs at least one etcd URL")
        for url in (*self.endpoints, self.advertise):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise ValueError(f"{url!r} is not a URL like http://HOST:PORT")
        if not NODE_NAME_RE.fullmatch(self.node_name):
            raise ValueError(
                f"node name {self.node_name!r} must be lower-case letters, digits and '-' "
                "(a DNS label, at most 63 characters)"
            )
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"cluster prefix {self.prefix!r} must start and end with '/'")
        if self.p2p_sources < 1:
            raise ValueError("--p2p-sources must be at least 1")
        if self.lease_ttl_s < 2 or not 0 < self.publish_interval_s <= 2:
            raise ValueError("lease TTL must be >= 2 s and the publish interval in (0, 2] s")
