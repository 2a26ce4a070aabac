"""Function states: what GetFunction says of a function, and whether it can be invoked.

Lambda's fields, as Lambda spells them: ``State`` (``Pending``, ``Active``, ``Inactive``,
``Failed``) with ``StateReason`` and ``StateReasonCode``, and ``LastUpdateStatus``
(``InProgress``, ``Successful``, ``Failed``) with ``LastUpdateStatusReason`` and
``LastUpdateStatusReasonCode``.  boto3's ``function_active_v2`` and
``function_updated_v2`` waiters poll them.

A zip function is ``Active`` / ``Successful`` as soon as it is deployed: its bundle is
unpacked and its packages installed before CreateFunction returns.  An image function's
state is its image's on this node, kept here per manifest digest:

    (deploy) ──▶ Pending, Creating ──mounted──▶ Active ──restart──▶ Inactive, Idle
      │          LastUpdateStatus InProgress      ▲                    │ invoke
      │                                           └──── Pending, Restoring ◀┘
      └─ the mount failed for good ──▶ Failed, InvalidImage | ImageDeleted | ImageAccessDenied
                                       (LastUpdateStatus Failed, same code)

- **Pending** while the image of a new function is pulled or mounted (``Creating``), or
  an Inactive function's image is mounted again (``Restoring``).  An update to a new
  image (UpdateFunctionCode with ``ImageUri``, UpdateFunctionConfiguration with
  ``ImageConfig``) leaves the function ``Active`` with ``LastUpdateStatus`` ``InProgress``
  until the new image is mounted.
- **Active** once the image's root is mounted here.
- **Inactive** when nothing of the image is mounted here any more -- after a restart of
  the node, after ``--image-idle-release-s`` with no instance of its functions (the
  sweeper unmounts it), or after a mount failed for a reason that is not the image's
  (the registry unreachable, a platform error: ``LastUpdateStatus``
  ``Failed``/``InternalError`` if it was a deploy's).  The next invocation mounts it again (Pending, Restoring) and waits.
- **Failed** when the image itself cannot run: an unsafe or corrupt layer, no python3,
  a config that does not resolve (``InvalidImage``), its manifest or a blob gone from
  the registry (``ImageDeleted``), or the registry refusing the node (``ImageAccessDenied``).
  The failure is recorded once per digest and persisted (``images/failures.json``), so
  neither invocations nor a restarted node pull that image again; a deploy of the image
  (CreateFunction, UpdateFunctionCode, UpdateFunctionConfiguration with ImageConfig)
  clears it and tries once more.  A failed update is not rolled back: the function runs
  the new revision, which is Failed until the next deploy.

An invocation (synchronous, Event, DryRun, ``/run``) of a Failed function is a 409
``ResourceConflictException`` as Lambda words it; a synchronous one of a Pending function
waits for the mount, at most the function's Timeout (Lambda refuses at once), then the
same 409 naming Pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart.errors import Conflict, InvalidParameter, WarmstartError
from warmstart.functions import FunctionRecord

log = logging.getLogger(__name__)


class State(enum.Enum):
    PENDING = "Pending"
    ACTIVE = "Active"
    INACTIVE = "Inactive"
    FAILED = "Failed"


class LastUpdateStatus(enum.Enum):
    IN_PROGRESS = "InProgress"
    SUCCESSFUL = "Successful"
    FAILED = "Failed"


class ReasonCode(enum.Enum):
    """``StateReasonCode`` and ``LastUpdateStatusReasonCode`` values warmstart uses (the
    failure codes serve both; ``Idle``, ``Creating`` and ``Restoring`` only the first)."""

    IDLE = "Idle"
    CREATING = "Creating"
    RESTORING = "Restoring"
    INVALID_IMAGE = "InvalidImage"
    IMAGE_DELETED = "ImageDeleted"
    IMAGE_ACCESS_DENIED = "ImageAccessDenied"
    INTERNAL_ERROR = "InternalError"


# StateReasonCode and LastUpdateStatusReasonCode are the same strings in Lambda's model.
StateReasonCode = ReasonCode
LastUpdateStatusReasonCode = ReasonCode


@dataclass(frozen=True)
class FunctionState:
    state: State
    reason: str | None = None
    reason_code: ReasonCode | None = None
    last_update: LastUpdateStatus = LastUpdateStatus.SUCCESSFUL
    last_update_reason: str | None = None
    last_update_code: ReasonCode | None = None

    def fields(self) -> dict[str, str]:
        """The configuration's fields, as Lambda names them (unset ones left out)."""
        out = {"State": self.state.value}
        if self.reason is not None:
            out["StateReason"] = self.reason
        if self.reason_code is not None:
            out["StateReasonCode"] = self.reason_code.value
        out["LastUpdateStatus"] = self.last_update.value
        if self.last_update_reason is not None:
            out["LastUpdateStatusReason"] = self.last_update_reason
        if self.last_update_code is not None:
            out["LastUpdateStatusReasonCode"] = self.last_update_code.value
        return out


ACTIVE = FunctionState(State.ACTIVE)


class NotInvocable(Conflict):
    """An invocation of a function that is not Active (409 ``ResourceConflictException``)."""

    def __init__(self, state: State, code: ReasonCode | None = None, reason: str = "") -> None:
        message = (
            "The operation cannot be performed at this time. The function is currently "
            f"in the following state: {state.value}"
        )
        if code is not None:
            message += f" ({code.value}: {reason})" if reason else f" ({code.value})"
        super().__init__(message)
        self.state = state
        self.code = code


@dataclass(frozen=True)
class ImageFailure:
    """Why an image cannot run on this node (persisted until a deploy of it)."""

    code: ReasonCode
    reason: str
    at: float


def classify(exc: BaseException) -> ReasonCode | None:
    """The reason code of a mount that failed because of the image itself, or None when
    the failure is not the image's (the registry unreachable, a platform error): those are
    not recorded and the next invocation tries again."""
    from warmstart.images import errors as ie

    if isinstance(exc, ie.ImageNotFound):
        return ReasonCode.IMAGE_DELETED
    if isinstance(exc, (ie.AuthError, ie.ImageAccessDenied)):
        return ReasonCode.IMAGE_ACCESS_DENIED
    if isinstance(
        exc, (ie.UnsafeLayer, ie.CorruptLayer, ie.DigestMismatch, ie.EStargzError, InvalidParameter)
    ):
        return ReasonCode.INVALID_IMAGE
    return None


@dataclass(frozen=True)
class _Deploy:
    digest: str
    update: bool  # an update to a new image (the function stays Active meanwhile)


class ImageStates:
    """The state of every image on this node, by manifest digest, and of every image
    function's last deploy.  Failures are kept in ``path`` (JSON) across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready: set[str] = set()
        self._mounting: dict[str, asyncio.Future[Any]] = {}
        self._failures: dict[str, ImageFailure] = self._load()
        self._deploys: dict[str, _Deploy] = {}  # function -> its deploy not settled yet
        self._deploy_failed: dict[str, str] = {}  # function -> why its last deploy failed

    # -- persistence -----------------------------------------------------------------------
    def _load(self) -> dict[str, ImageFailure]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the image failures in %s: %s", self.path, exc)
            return {}
        out: dict[str, ImageFailure] = {}
        for digest, item in raw.items() if isinstance(raw, dict) else ():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                out[digest] = ImageFailure(
                    ReasonCode(item["code"]), str(item["reason"]), float(item["at"])
                )
        return out

    def _save(self) -> None:
        data = {
            d: {"code": f.code.value, "reason": f.reason, "at": f.at}
            for d, f in self._failures.items()
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:  # the state in memory is still right
            log.error("cannot record image failures in %s: %s", self.path, exc)

    # -- what happens to images ------------------------------------------------------------
    def failure(self, digest: str) -> ImageFailure | None:
        return self._failures.get(digest)

    def ready(self, digest: str) -> bool:
        return digest in self._ready

    def mounting(self, digest: str) -> asyncio.Future[Any] | None:
        return self._mounting.get(digest)

    def begin(self, digest: str) -> asyncio.Future[Any]:
        """A mount of ``digest`` starts; its future settles with the outcome."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting when it fails (a premount): its exception is retrieved.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._mounting[digest] = fut
        return fut

    def succeeded(self, digest: str, value: Any) -> None:
        self._ready.add(digest)
        self._settle(digest, None)
        fut = self._mounting.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def failed(self, digest: str, exc: BaseException) -> WarmstartError | BaseException:
        """The mount of ``digest`` failed with ``exc``: recorded (and persisted) if the
        image is at fault.  Returns what the invocation that waited for it raises."""
        self._ready.discard(digest)
        code = classify(exc)
        error: BaseException
        if code is not None:
            reason = f"{type(exc).__name__}: {exc}"[:1000]
            self._failures[digest] = ImageFailure(code, reason, time.time())
            self._save()
            log.warning("image %s failed (%s): %s", digest, code.value, reason)
            error = NotInvocable(State.FAILED, code, reason)
            self._settle(digest, None)
        else:
            error = exc
            self._settle(digest, f"{type(exc).__name__}: {exc}"[:1000])
        fut = self._mounting.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)
        return error

    def abandoned(self, digest: str) -> None:
        """The mount was cancelled (the node is closing)."""
        fut = self._mounting.pop(digest, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def released(self, digest: str) -> None:
        """Nothing of ``digest`` is mounted here any more (and no function uses it)."""
        self._ready.discard(digest)
        if self._failures.pop(digest, None) is not None:
            self._save()

    def retry(self, digest: str) -> None:
        """A deploy names ``digest``: forget its failure, mount it once more."""
        if self._failures.pop(digest, None) is not None:
            self._save()

    def _settle(self, digest: str, transient: str | None) -> None:
        for name, deploy in list(self._deploys.items()):
            if deploy.digest == digest:
                del self._deploys[name]
                if transient is not None:
                    self._deploy_failed[name] = transient

    # -- what happens to functions ---------------------------------------------------------
    def deployed(self, name: str, digest: str, *, update: bool) -> None:
        """Function ``name`` now runs image ``digest``, which is being mounted for it."""
        self._deploy_failed.pop(name, None)
        if digest in self._ready:
            self._deploys.pop(name, None)
        else:
            self._deploys[name] = _Deploy(digest, update)

    def forget(self, name: str) -> None:
        self._deploys.pop(name, None)
        self._deploy_failed.pop(name, None)

    def state(self, rec: FunctionRecord) -> FunctionState:
        """What GetFunction says of ``rec`` on this node."""
        image = rec.image
        if image is None:
            return ACTIVE
        d = image.digest
        failure = self._failures.get(d)
        if failure is not None:
            return FunctionState(
                State.FAILED,
                failure.reason,
                failure.code,
                LastUpdateStatus.FAILED,
                failure.reason,
                failure.code,
            )
        if d in self._ready:
            return ACTIVE
        deploy = self._deploys.get(rec.name)
        if deploy is not None and deploy.digest == d:
            if deploy.update:
                return FunctionState(
                    State.ACTIVE,
                    last_update=LastUpdateStatus.IN_PROGRESS,
                    last_update_reason="The function is being updated: its image is being mounted.",
                )
            return FunctionState(
                State.PENDING,
                "The function is being created: its image is being mounted.",
                ReasonCode.CREATING,
                LastUpdateStatus.IN_PROGRESS,
                "The function is being created.",
            )
        why = self._deploy_failed.get(rec.name)
        last = (
            (LastUpdateStatus.FAILED, why, ReasonCode.INTERNAL_ERROR)
            if why is not None
            else (LastUpdateStatus.SUCCESSFUL, None, None)
        )
        if d in self._mounting:
            return FunctionState(
                State.PENDING,
                "The function's image is being mounted on this node again.",
                ReasonCode.RESTORING,
                *last,
            )
        reason = "Its image is not mounted on this node; the next invocation mounts it."
        if why is not None:
            reason = f"The image could not be mounted ({why}); the next invocation tries again."
        return FunctionState(State.INACTIVE, reason, ReasonCode.IDLE, *last)
