"""Function states (State, LastUpdateStatus and their reasons) through boto3, end to end.

A real registry (Debian's docker-registry on loopback) serves the images; a pull is held
under way by ``imagetools.GatedProxy`` in front of it for as long as a test needs, and
the registry is changed meanwhile (a blob deleted, the node's user revoked) to fail it the
ways a real one fails.  boto3's own waiters (``function_active_v2``,
``function_updated_v2``) poll the states.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, WaiterError

from tests import imagetools
from tests.conftest import Server, deploy, make_zip, needs_root, wait_until

pytestmark = [pytest.mark.integration, needs_root]

FAILED_409 = (
    "The operation cannot be performed at this time. "
    "The function is currently in the following state: Failed"
)
FAST = {"Delay": 1, "MaxAttempts": 120}
HANDLER = "def handler(event, context):\n    return event\n"


def create_image(lam: Any, name: str, uri: str, timeout: int = 60) -> dict[str, Any]:
    out: dict[str, Any] = lam.create_function(
        FunctionName=name,
        PackageType="Image",
        Code={"ImageUri": uri},
        Role="arn:aws:iam::000000000000:role/test",
        Timeout=timeout,
    )
    return out


def conf(lam: Any, name: str) -> dict[str, Any]:
    out: dict[str, Any] = lam.get_function(FunctionName=name)["Configuration"]
    return out


def refused_409(call: Any) -> str:
    with pytest.raises(ClientError) as err:
        call()
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert err.value.response["Error"]["Code"] == "ResourceConflictException"
    message: str = err.value.response["Error"]["Message"]
    return message


def metric(server: Server, line_start: str) -> float:
    with server.http() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[1])
    return 0.0


def invoke(lam: Any, name: str, **kwargs: Any) -> Any:
    resp = lam.invoke(FunctionName=name, Payload=b"{}", **kwargs)
    return json.loads(resp["Payload"].read()) if "Payload" in resp else None


@pytest.fixture
def proxy(registry: Any) -> Iterator[imagetools.GatedProxy]:
    p = imagetools.GatedProxy(registry.url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def python_v2(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another Debian + python3 image (same base layer), whose handler returns 'v2'."""
    return imagetools.build_image(
        tmp_path_factory.mktemp("states-v2"),
        [{"var/task/app.py": "def handler(e, c):\n    return 'v2'\n"}],
        base=imagetools.debian_layout(),
        ref=f"{registry.host}/python:states-v2",
        cmd=["app.handler"],
        env=["PATH=/usr/local/bin:/usr/bin:/bin"],
    )


def small_image(registry: Any, tmp_path: Path, repo: str) -> str:
    """A one-layer image of its own (a unique file: no blob shared with another test)."""
    return imagetools.build_image(
        tmp_path / repo.replace("/", "-"),
        [{"var/task/app.py": f"# {uuid.uuid4()}\ndef handler(e, c):\n    return 1\n"}],
        ref=f"{registry.host}/{repo}:1",
        cmd=["app.handler"],
    )


def via(proxy: imagetools.GatedProxy, ref: str) -> str:
    return f"{proxy.host}/{ref.split('/', 1)[1]}"


def test_a_zip_function_is_active_once_deployed(server: Server, lam: Any) -> None:
    out = deploy(lam, "zipfn", {"handler.py": HANDLER})
    assert out["State"] == "Active" and out["LastUpdateStatus"] == "Successful"
    assert "StateReasonCode" not in out and "LastUpdateStatusReasonCode" not in out
    lam.get_waiter("function_active_v2").wait(FunctionName="zipfn", WaiterConfig=FAST)
    lam.get_waiter("function_active").wait(FunctionName="zipfn", WaiterConfig=FAST)
    out = lam.update_function_code(FunctionName="zipfn", ZipFile=make_zip({"handler.py": HANDLER}))
    assert out["LastUpdateStatus"] == "Successful"
    lam.get_waiter("function_updated_v2").wait(FunctionName="zipfn", WaiterConfig=FAST)
    listed = lam.list_functions()["Functions"]
    assert [(f["State"], f["LastUpdateStatus"]) for f in listed] == [("Active", "Successful")]
    assert lam.get_function_configuration(FunctionName="zipfn")["State"] == "Active"
    assert metric(server, 'warmstart_function_states{state="Active"}') == 1


def test_an_image_function_is_pending_while_its_image_is_pulled(
    server_factory: Any,
    registry: Any,
    proxy: imagetools.GatedProxy,
    python_image: str,
    python_v2: str,
) -> None:
    server: Server = server_factory("--image-pull", "full")
    lam = server.lambda_client()
    proxy.hold(imagetools.layer_digests(registry.url, python_image))
    out = create_image(lam, "img", via(proxy, python_image), timeout=1)
    assert (out["State"], out["StateReasonCode"]) == ("Pending", "Creating")
    assert out["LastUpdateStatus"] == "InProgress"
    wait_until(lambda: proxy.holding > 0, "the pull to reach a held layer")
    c = conf(lam, "img")
    assert (c["State"], c["StateReasonCode"], c["LastUpdateStatus"]) == (
        "Pending",
        "Creating",
        "InProgress",
    )
    assert lam.list_functions()["Functions"][0]["State"] == "Pending"
    assert metric(server, 'warmstart_function_states{state="Pending"}') == 1
    res = subprocess.run(
        [".venv/bin/warmstart", "ls", "--endpoint", server.url], capture_output=True, text=True
    )
    assert res.returncode == 0 and "Pending (Creating)" in res.stdout, res.stdout
    # A synchronous invocation waits for the image, at most the function's Timeout (1 s
    # here, while the pull is held): then it is Lambda's 409 for a Pending function.
    message = refused_409(lambda: invoke(lam, "img"))
    assert "in the following state: Pending" in message
    proxy.release()
    lam.get_waiter("function_active_v2").wait(FunctionName="img", WaiterConfig=FAST)
    c = conf(lam, "img")
    assert (c["State"], c["LastUpdateStatus"]) == ("Active", "Successful")
    assert "StateReasonCode" not in c
    assert invoke(lam, "img")["python"] == "/usr/bin/python3"

    # An update to a new image: Active all along, LastUpdateStatus InProgress until the
    # new image is mounted.
    proxy.hold(imagetools.layer_digests(registry.url, python_v2))
    out = lam.update_function_code(FunctionName="img", ImageUri=via(proxy, python_v2))
    assert (out["State"], out["LastUpdateStatus"]) == ("Active", "InProgress")
    wait_until(lambda: proxy.holding > 0, "the new image's pull to reach a held layer")
    c = conf(lam, "img")
    assert (c["State"], c["LastUpdateStatus"]) == ("Active", "InProgress")
    proxy.release()
    lam.get_waiter("function_updated_v2").wait(FunctionName="img", WaiterConfig=FAST)
    assert conf(lam, "img")["LastUpdateStatus"] == "Successful"
    assert invoke(lam, "img") == "v2"


def hostile_image(registry: Any, tmp_path: Path) -> str:
    """An image whose second layer writes through '..' (the unpacker refuses it)."""
    info = tarfile.TarInfo("var/task/../../../escaped")
    info.size = 6
    layer = imagetools.tar_layer(tmp_path / "hostile.tar", [(info, b"owned\n")])
    return imagetools.build_image(
        tmp_path / "build",
        [{"var/task/app.py": "def handler(e, c):\n    return 1\n"}, layer],
        ref=f"{registry.host}/hostile:1",
        cmd=["app.handler"],
    )


def test_a_hostile_image_fails_once_and_stays_failed_across_a_restart(
    server_factory: Any, registry: Any, python_image: str, tmp_path: Path
) -> None:
    ref = hostile_image(registry, tmp_path)
    data = tmp_path / "data"
    server: Server = server_factory("--image-pull", "full", data_dir=data)
    lam = server.lambda_client()
    create_image(lam, "bad", ref)
    # The waiter's failure acceptor: State Failed ends the wait at once.
    with pytest.raises(WaiterError) as err:
        lam.get_waiter("function_active_v2").wait(FunctionName="bad", WaiterConfig=FAST)
    assert "terminal failure state" in str(err.value)
    with pytest.raises(WaiterError):
        lam.get_waiter("function_updated_v2").wait(FunctionName="bad", WaiterConfig=FAST)
    c = conf(lam, "bad")
    assert (c["State"], c["StateReasonCode"]) == ("Failed", "InvalidImage")
    assert (c["LastUpdateStatus"], c["LastUpdateStatusReasonCode"]) == ("Failed", "InvalidImage")
    assert "UnsafeLayer" in c["StateReason"] and ".." in c["StateReason"]

    # Every way of invoking it is a 409 (never a 5xx), and none pulls the image again.
    for _ in range(3):
        message = refused_409(lambda: invoke(lam, "bad"))
        assert message.startswith(FAILED_409) and "InvalidImage" in message
    refused_409(lambda: invoke(lam, "bad", InvocationType="Event"))
    refused_409(lambda: invoke(lam, "bad", InvocationType="DryRun"))
    with server.http() as http:
        r = http.post("/run/bad", content=b"{}")
        assert r.status_code == 409 and r.headers["x-amzn-ErrorType"] == "ResourceConflictException"
        assert r.json()["message"].startswith(FAILED_409)
    assert metric(server, "warmstart_image_mount_failures_total") == 1
    assert metric(server, 'warmstart_function_states{state="Failed"}') == 1
    # The CLI's deploy waits for the image and says why it failed (a deploy tries again).
    res = subprocess.run(
        [
            ".venv/bin/warmstart",
            "deploy",
            "--image",
            ref,
            "--name",
            "bad2",
            "--endpoint",
            server.url,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "bad2 is Failed (InvalidImage)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

    # A restarted node knows: still Failed, nothing pulled.
    server.stop()
    server = server_factory("--image-pull", "full", data_dir=data)
    lam = server.lambda_client()
    c = conf(lam, "bad")
    assert (c["State"], c["StateReasonCode"]) == ("Failed", "InvalidImage")
    refused_409(lambda: invoke(lam, "bad"))
    lam.delete_function(FunctionName="bad2")
    assert metric(server, "warmstart_image_mount_failures_total") == 0
    assert metric(server, "warmstart_image_pulls_total") == 0

    # A deploy of a good image makes it work; the failure is forgotten with the image.
    lam.update_function_code(FunctionName="bad", ImageUri=python_image)
    lam.get_waiter("function_updated_v2").wait(FunctionName="bad", WaiterConfig=FAST)
    assert conf(lam, "bad")["State"] == "Active"
    assert invoke(lam, "bad")["python"] == "/usr/bin/python3"
    failures = data / "images" / "failures.json"
    wait_until(lambda: json.loads(failures.read_text()) == {}, "the failure to be forgotten")


def test_a_blob_deleted_from_the_registry_is_image_deleted(
    server_factory: Any, registry: Any, proxy: imagetools.GatedProxy, tmp_path: Path
) -> None:
    ref = small_image(registry, tmp_path, "states/deleted")
    server: Server = server_factory("--image-pull", "full")
    lam = server.lambda_client()
    layers = imagetools.layer_digests(registry.url, ref)
    proxy.hold(layers)
    create_image(lam, "gone", via(proxy, ref))
    wait_until(lambda: proxy.holding > 0, "the pull to reach the held layer")
    r = httpx.delete(f"{registry.url}/v2/states/deleted/blobs/{layers[0]}")
    assert r.status_code == 202, r.text
    proxy.release()
    with pytest.raises(WaiterError):
        lam.get_waiter("function_active_v2").wait(FunctionName="gone", WaiterConfig=FAST)
    c = conf(lam, "gone")
    assert (c["State"], c["StateReasonCode"]) == ("Failed", "ImageDeleted")
    assert c["LastUpdateStatusReasonCode"] == "ImageDeleted"
    assert "ImageDeleted" in refused_409(lambda: invoke(lam, "gone"))


def test_a_registry_that_refuses_the_node_is_image_access_denied(
    server_factory: Any,
    registry: Any,
    proxy: imagetools.GatedProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import bcrypt

    def htpasswd(password: str) -> None:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (tmp_path / "htpasswd").write_text(f"node:{hashed}\n")

    htpasswd("n0de-pw")
    private = imagetools.start_registry(
        tmp_path / "reg",
        auth_yaml=f"  htpasswd:\n    realm: states\n    path: {tmp_path / 'htpasswd'}\n",
    )
    try:
        src = small_image(registry, tmp_path, "states/private")
        ref = f"{private.host}/app:1"
        imagetools.run(
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-creds",
            "node:n0de-pw",
            f"docker://{src}",
            f"docker://{ref}",
        )
        gate = imagetools.GatedProxy(private.url)
        auth = base64.b64encode(b"node:n0de-pw").decode()
        (tmp_path / "docker").mkdir()
        (tmp_path / "docker" / "config.json").write_text(
            json.dumps({"auths": {gate.host: {"auth": auth}}})
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        server: Server = server_factory("--image-pull", "full")
        lam = server.lambda_client()
        gate.hold(imagetools.layer_digests(registry.url, src))
        create_image(lam, "denied", via(gate, ref))
        wait_until(lambda: gate.holding > 0, "the pull to reach the held layer")
        htpasswd("changed")  # the node's password no longer works
        private.restart()
        gate.release()
        with pytest.raises(WaiterError):
            lam.get_waiter("function_active_v2").wait(FunctionName="denied", WaiterConfig=FAST)
        c = conf(lam, "denied")
        assert (c["State"], c["StateReasonCode"]) == ("Failed", "ImageAccessDenied"), c
        assert "ImageAccessDenied" in refused_409(lambda: invoke(lam, "denied"))
        gate.close()
    finally:
        private.stop()


def test_inactive_after_a_restart_and_active_again_on_invoke(
    server_factory: Any, python_image: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server: Server = server_factory("--image-pull", "full", data_dir=data)
    lam = server.lambda_client()
    create_image(lam, "idle", python_image)
    lam.get_waiter("function_active_v2").wait(FunctionName="idle", WaiterConfig=FAST)
    server.stop(signal.SIGTERM)  # unmounts its images on the way out
    server = server_factory("--image-pull", "full", data_dir=data)
    lam = server.lambda_client()
    c = conf(lam, "idle")
    assert (c["State"], c["StateReasonCode"], c["LastUpdateStatus"]) == (
        "Inactive",
        "Idle",
        "Successful",
    )
    assert metric(server, 'warmstart_function_states{state="Inactive"}') == 1
    # The invocation mounts it again (Pending, Restoring meanwhile) and runs.
    assert invoke(lam, "idle")["python"] == "/usr/bin/python3"
    assert conf(lam, "idle")["State"] == "Active"


def test_an_image_no_instance_uses_is_released_and_its_function_inactive(
    server_factory: Any, python_image: str
) -> None:
    server: Server = server_factory("--image-pull", "full", "--image-idle-release-s", "1")
    lam = server.lambda_client()
    create_image(lam, "rel", python_image)
    # Mounted ahead of the first invocation, unused for a second, released: Inactive.
    wait_until(lambda: conf(lam, "rel")["State"] == "Inactive", "the function to go Inactive")
    c = conf(lam, "rel")
    assert (c["StateReasonCode"], c["LastUpdateStatus"]) == ("Idle", "Successful")
    roots = server.data_dir / "images" / "roots"
    wait_until(lambda: not mounted_under(roots), "the image root to be unmounted")
    # An invocation mounts it again; its instance (idle, frozen) keeps the image in use.
    assert invoke(lam, "rel")["python"] == "/usr/bin/python3"
    assert conf(lam, "rel")["State"] == "Active"
    assert mounted_under(roots)


def mounted_under(path: Path) -> list[str]:
    target = str(path.resolve())
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(target)
    ]
