"""The function state machine (``worker/states.py``) without a server: what each image
event does to a function's State and LastUpdateStatus, and what survives a restart."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from warmstart.errors import PlatformError
from warmstart.functions import FunctionConfig, FunctionRecord
from warmstart.functions.models import ImageSource
from warmstart.images.errors import AuthError, ImageNotFound, RegistryError, UnsafeLayer
from warmstart.worker.states import (
    ImageStates,
    LastUpdateStatus,
    NotInvocable,
    ReasonCode,
    State,
    classify,
)

DIGEST = "sha256:" + "a" * 64


def on_a_loop(test: Callable[[Path], Coroutine[Any, Any, None]]) -> Callable[[Path], None]:
    """Run an async test on a fresh event loop (the futures need a running loop)."""

    @functools.wraps(test)
    def run(tmp_path: Path) -> None:
        asyncio.run(test(tmp_path))

    return run


def image_fn(name: str = "fn", digest: str = DIGEST) -> FunctionRecord:
    image = ImageSource(uri="r/x:1", digest=digest, size=1, command=("app.handler",))
    return FunctionRecord.new(name, FunctionConfig("app.handler"), "a" * 64, 1, image=image)


def summary(states: ImageStates, rec: FunctionRecord) -> tuple[str, str | None, str]:
    s = states.state(rec)
    return s.state.value, s.reason_code.value if s.reason_code else None, s.last_update.value


def test_zip_functions_are_active(tmp_path: Path) -> None:
    states = ImageStates(tmp_path / "f.json")
    rec = FunctionRecord.new("z", FunctionConfig("h.handler"), "b" * 64, 1)
    assert states.state(rec).fields() == {"State": "Active", "LastUpdateStatus": "Successful"}


@on_a_loop
async def test_create_mount_restart_and_reactivation(tmp_path: Path) -> None:
    states = ImageStates(tmp_path / "f.json")
    rec = image_fn()
    states.deployed("fn", DIGEST, update=False)
    assert summary(states, rec) == ("Pending", "Creating", "InProgress")
    fut = states.begin(DIGEST)
    assert summary(states, rec) == ("Pending", "Creating", "InProgress")
    states.succeeded(DIGEST, "layout")
    assert fut.result() == "layout"
    assert states.state(rec).fields() == {"State": "Active", "LastUpdateStatus": "Successful"}
    # A restarted node: nothing mounted, nothing in progress.
    states = ImageStates(tmp_path / "f.json")
    assert summary(states, rec) == ("Inactive", "Idle", "Successful")
    states.begin(DIGEST)
    assert summary(states, rec) == ("Pending", "Restoring", "Successful")
    states.succeeded(DIGEST, None)
    assert summary(states, rec) == ("Active", None, "Successful")


@on_a_loop
async def test_an_update_stays_active_while_in_progress(tmp_path: Path) -> None:
    states = ImageStates(tmp_path / "f.json")
    old, new = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    states.begin(old)
    states.succeeded(old, None)
    states.deployed("fn", new, update=True)
    assert summary(states, image_fn(digest=new)) == ("Active", None, "InProgress")
    states.begin(new)
    states.failed(new, UnsafeLayer("entry '../x' has a '..' component"))
    s = states.state(image_fn(digest=new))
    assert (s.state, s.reason_code, s.last_update, s.last_update_code) == (
        State.FAILED,
        ReasonCode.INVALID_IMAGE,
        LastUpdateStatus.FAILED,
        ReasonCode.INVALID_IMAGE,
    )


@on_a_loop
async def test_a_failure_persists_until_a_deploy_or_the_image_goes(tmp_path: Path) -> None:
    path = tmp_path / "images" / "failures.json"
    states = ImageStates(path)
    fut = states.begin(DIGEST)
    error = states.failed(DIGEST, ImageNotFound("blob sha256:... not found"))
    assert isinstance(error, NotInvocable) and error.code is ReasonCode.IMAGE_DELETED
    with pytest.raises(NotInvocable) as err:
        await fut
    assert str(err.value).startswith(
        "The operation cannot be performed at this time. "
        "The function is currently in the following state: Failed"
    )
    # A new worker on the same data dir reads it back.
    again = ImageStates(path)
    assert summary(again, image_fn()) == ("Failed", "ImageDeleted", "Failed")
    again.retry(DIGEST)  # a deploy of the image
    assert ImageStates(path).failure(DIGEST) is None
    again.begin(DIGEST)
    again.failed(DIGEST, AuthError("registry refused our credentials"))
    assert summary(ImageStates(path), image_fn()) == ("Failed", "ImageAccessDenied", "Failed")
    again.released(DIGEST)  # no function uses it any more
    assert ImageStates(path).failure(DIGEST) is None


@on_a_loop
async def test_a_failure_that_is_not_the_images_is_not_recorded(tmp_path: Path) -> None:
    states = ImageStates(tmp_path / "f.json")
    states.deployed("fn", DIGEST, update=False)
    fut = states.begin(DIGEST)
    cause = RegistryError("connection refused")
    assert states.failed(DIGEST, cause) is cause
    with pytest.raises(RegistryError):
        await fut
    s = states.state(image_fn())
    assert (s.state, s.reason_code) == (State.INACTIVE, ReasonCode.IDLE)
    assert (s.last_update, s.last_update_code) == (
        LastUpdateStatus.FAILED,
        ReasonCode.INTERNAL_ERROR,
    )
    assert states.failure(DIGEST) is None
    assert not (tmp_path / "f.json").exists()


def test_classify() -> None:
    assert classify(UnsafeLayer("x")) is ReasonCode.INVALID_IMAGE
    assert classify(ImageNotFound("x")) is ReasonCode.IMAGE_DELETED
    assert classify(AuthError("x")) is ReasonCode.IMAGE_ACCESS_DENIED
    assert classify(RegistryError("x")) is None
    assert classify(PlatformError("x")) is None
    assert classify(asyncio.CancelledError()) is None


def test_a_corrupt_failures_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("{not json")
    assert ImageStates(path).failure(DIGEST) is None
    path.write_text('{"sha256:x": {"code": "NoSuchCode", "reason": "r", "at": 1}}')
    assert ImageStates(path).failure("sha256:x") is None
