"""The image cache: images that must stay on the nodes that want them (Knative's caching
``Image``).

``PUT /images/cache/<name>`` with ``{"image": REF}`` (and optionally ``nodes`` or a
``selector``, as for preheat jobs) declares that every selected node keeps ``REF`` in its
content store.  Each entry is one key, ``imagecache/<name>`` (the spec, its creation and
last change); there is no per-node record in etcd: each node says what it holds in the
state it publishes every second (``pins``: name -> state, digest, message), and
``GET /images/cache/<name>`` reads that from the live nodes.

Every node follows ``imagecache/`` (read in full at start and after a lost watch, then
watched) and reconciles its store with it:

- an entry that selects this node and is not pinned here with its reference yet is
  pulled (``images/preheat.py``: a full pull) and pinned under ``imagecache/<name>``
  in the store -- a persistent pin, so the store's LRU never evicts the image, across
  restarts too; a failed pull is retried after 5 s, doubling up to 5 minutes;
- a pin whose entry is gone or no longer selects this node is dropped: the image is an
  ordinary LRU candidate again, and the store shrinks back to its budget.

So a node that joins later, or comes back, pulls what selects it as soon as it has read
the entries; a restarted node with its data dir intact finds its pins in place and pulls
nothing.  A pin follows the digest its reference resolved to when this node pulled it:
after a tag moves, ``PUT`` the entry again with another reference (or the same one
spelled with the digest) to move the nodes to the new image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.cluster.preheat import iso
from warmstart.cluster.selection import NodeView, Selection, check_image, labels_of
from warmstart.errors import InvalidParameter
from warmstart.images.preheat import ByteProgress, Pulled, permanent
from warmstart.lifecycle import Supervisor

if TYPE_CHECKING:
    from warmstart.images.store import Pin

log = logging.getLogger(__name__)

CACHE = "imagecache/"
PIN_PREFIX = "imagecache/"  # the store's pin names: one namespace per kind of pin
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")  # fullmatch: no trailing newline
TICK_S = 5.0
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0


class PinState(StrEnum):
    PULLING = "pulling"
    PINNED = "pinned"
    FAILED = "failed"


class ImagePinner(Protocol):
    async def pin(self, name: str, ref: str, progress: ByteProgress | None = None) -> Pulled: ...

    async def unpin(self, name: str) -> int: ...

    async def pins(self) -> dict[str, Pin]: ...


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidParameter(
            f"cache entry name {name!r} must be lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return name


@dataclass(frozen=True)
class CacheSpec:
    """An image cache entry (``imagecache/<name>``)."""

    name: str
    image: str
    selection: Selection = field(default_factory=Selection)
    created: float = 0.0
    updated: float = 0.0

    FIELDS = frozenset({"image", "nodes", "selector"})

    @classmethod
    def from_body(cls, name: str, body: Any, now: float) -> CacheSpec:
        check_name(name)
        if not isinstance(body, dict):
            raise InvalidParameter('the body must be a JSON object: {"image": "REF"}')
        unknown = sorted(set(body) - cls.FIELDS)
        if unknown:
            raise InvalidParameter(
                f"unknown field(s) {', '.join(unknown)}; a cache entry takes image, and "
                "nodes or selector"
            )
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidParameter('image is required: {"image": "registry/repository:tag"}')
        check_image(image)
        return cls(name, image, Selection.from_json(body), now, now)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "image": self.image,
                **self.selection.to_json(),
                "created": self.created,
                "updated": self.updated,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CacheSpec:
        d = json.loads(raw)
        return cls(
            str(d["name"]),
            str(d["image"]),
            Selection(
                nodes=tuple(d["nodes"]) if d.get("nodes") is not None else None,
                selector=dict(d["selector"]) if d.get("selector") is not None else None,
            ),
            float(d.get("created", 0.0)),
            float(d.get("updated", 0.0)),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "spec": {"image": self.image, **self.selection.to_json()},
            "created": iso(self.created),
            "updated": iso(self.updated),
        }


@dataclass
class _Local:
    """This node's side of one entry (published)."""

    image: str
    state: PinState
    digest: str = ""
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    failures: int = 0
    retry_at: float = 0.0

    def published(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image, "state": self.state.value}
        if self.digest:
            out["digest"] = self.digest
        if self.message:
            out["message"] = self.message
        if self.state is PinState.PULLING:
            out["bytesDone"], out["bytesTotal"] = self.bytes_done, self.bytes_total
        return out


class ImageCache:
    """Image cache entries over etcd, reconciled into this node's store."""

    def __init__(
        self,
        etcd: Etcd,
        view: NodeView,
        images: ImagePinner,
        tasks: Supervisor,
        *,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.images = images
        self.tasks = tasks
        self.clock = clock
        self.tick_s = tick_s
        self.retry_base_s = retry_base_s
        self.specs: dict[str, CacheSpec] = {}  # what etcd holds, as last read
        self.loaded = False  # the specs were read at least once
        self._local: dict[str, _Local] = {}
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    # -- the API -------------------------------------------------------------------------------
    async def put(self, name: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Create or replace an entry; (its description, whether it was created)."""
        spec = CacheSpec.from_body(name, body, self.clock())
        key = CACHE + spec.name
        while True:
            current = await self.etcd.get(key)
            if current is None:
                if await self.etcd.create(key, spec.to_json()):
                    created = True
                    break
                continue
            old = CacheSpec.from_json(current.value)
            spec = CacheSpec(spec.name, spec.image, spec.selection, old.created, spec.updated)
            if await self.etcd.replace(key, current.value, spec.to_json()):
                created = False
                break
        self.specs[spec.name] = spec
        self.wake()
        log.info("image cache %s: %s on %s", spec.name, spec.image, spec.selection.describe())
        return self.status(spec), created

    async def get(self, name: str) -> dict[str, Any] | None:
        check_name(name)
        kv = await self.etcd.get(CACHE + name)
        return None if kv is None else self.status(CacheSpec.from_json(kv.value))

    async def all(self) -> list[dict[str, Any]]:
        kvs, _ = await self.etcd.range(CACHE)
        return [self.status(CacheSpec.from_json(kv.value)) for kv in kvs]

    async def delete(self, name: str) -> bool:
        check_name(name)
        gone = await self.etcd.delete(CACHE + name)
        if gone:
            self.specs.pop(name, None)
            self.wake()
            log.info("image cache %s: deleted", name)
        return gone

    def status(self, spec: CacheSpec) -> dict[str, Any]:
        """The entry and, for every live node it selects, what that node published."""
        nodes: dict[str, Any] = {}
        for member in self.view.live():
            if not spec.selection.matches(member.name, member.labels):
                continue
            if member.name == self.view.name:
                local = self._local.get(spec.name)
                pin = local.published() if local is not None else None
            else:
                pin = (member.state.get("pins") or {}).get(spec.name)
            if not isinstance(pin, dict) or pin.get("image") != spec.image:
                pin = {"image": spec.image, "state": "pending"}
            nodes[member.name] = pin
        pinned = sum(1 for p in nodes.values() if p.get("state") == PinState.PINNED.value)
        return {
            **spec.describe(),
            "desired": len(nodes),
            "pinned": pinned,
            "ready": pinned == len(nodes),
            "nodes": nodes,
        }

    # -- this node ---------------------------------------------------------------------------------
    def published(self) -> dict[str, Any]:
        """What this node holds for the cache (its published ``pins``)."""
        return {name: local.published() for name, local in sorted(self._local.items())}

    def wake(self) -> None:
        self._wake.set()

    async def watch(self) -> None:
        """Keep ``specs`` current: read ``imagecache/``, then follow it."""
        while True:
            try:
                kvs, revision = await self.etcd.range(CACHE)
                specs = {}
                for kv in kvs:
                    with contextlib.suppress(ValueError, KeyError):
                        spec = CacheSpec.from_json(kv.value)
                        specs[spec.name] = spec
                self.specs, self.loaded = specs, True
                self.wake()
                async for event in self.etcd.watch(CACHE, revision + 1):
                    name = event.key[len(CACHE) :]
                    if event.kind == "delete":
                        self.specs.pop(name, None)
                    else:
                        with contextlib.suppress(ValueError, KeyError):
                            self.specs[name] = CacheSpec.from_json(event.value)
                    self.wake()
            except ClusterUnavailable:
                await asyncio.sleep(1.0)

    async def run(self) -> None:
        """Reconcile whenever woken, and every ``tick_s`` (retries)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            if self.loaded:
                await self.reconcile()

    async def reconcile(self) -> None:
        """Pull and pin what selects this node; unpin what no longer does."""
        labels = labels_of(self.view)
        mine = {
            name: spec
            for name, spec in self.specs.items()
            if spec.selection.matches(self.view.name, labels)
        }
        pins = await self.images.pins()
        now = self.clock()
        for name, spec in mine.items():
            if name in self._pulls:
                continue  # reconciled again when it ends
            pin = pins.get(PIN_PREFIX + name)
            local = self._local.get(name)
            if pin is not None and pin.ref == spec.image:
                if local is None or local.state is not PinState.PINNED or local.image != spec.image:
                    self._local[name] = _Local(spec.image, PinState.PINNED, pin.image_id)
                continue
            if local is not None and local.image == spec.image and now < local.retry_at:
                continue
            failures = local.failures if local is not None and local.image == spec.image else 0
            self._local[name] = _Local(spec.image, PinState.PULLING, failures=failures)
            self._pulls[name] = self.tasks.spawn(
                self._pin(name, spec.image), f"image cache {name} {spec.image}"
            )
        for pin_name in pins:
            name = pin_name[len(PIN_PREFIX) :]
            if pin_name.startswith(PIN_PREFIX) and name not in mine and name not in self._pulls:
                await self.images.unpin(pin_name)
                log.info("image cache %s: unpinned here", name)
        for name in [n for n in self._local if n not in mine and n not in self._pulls]:
            del self._local[name]

    async def _pin(self, name: str, image: str) -> None:
        local = self._local[name]

        def on_progress(done: int, total: int) -> None:  # from the pulling thread
            local.bytes_done, local.bytes_total = done, total

        try:
            pulled = await self.images.pin(PIN_PREFIX + name, image, on_progress)
        except Exception as exc:
            local.failures += 1
            reason = f"{type(exc).__name__}: {exc}"
            delay = min(RETRY_MAX_S, self.retry_base_s * 2 ** (local.failures - 1))
            if permanent(exc):
                delay = RETRY_MAX_S  # the image may yet appear; do not hammer the registry
            local.state, local.message = PinState.FAILED, f"{reason} (retrying in {delay:g} s)"
            local.retry_at = self.clock() + delay
            log.warning("image cache %s: cannot pin %s here: %s", name, image, local.message)
        else:
            local.state, local.digest, local.message = PinState.PINNED, pulled.digest, ""
            local.failures = 0
            log.info("image cache %s: %s pinned here (%s)", name, image, pulled.digest)
        finally:
            self._pulls.pop(name, None)
            self.wake()

    async def close(self) -> None:
        for task in list(self._pulls.values()):
            task.cancel()
