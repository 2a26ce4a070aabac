"""Functions packaged as container images (PackageType=Image), end to end through boto3.

The images come from the real registry (Debian's docker-registry on loopback), built with
umoci and pushed with skopeo; their root is a Debian bookworm with its own python3.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests import imagetools
from tests.conftest import Server, needs, needs_root, wait_until

pytestmark = [pytest.mark.integration, needs_root]


def create_image_function(lam: Any, name: str, uri: str, **kwargs: Any) -> dict[str, Any]:
    out: dict[str, Any] = lam.create_function(
        FunctionName=name,
        PackageType="Image",
        Code={"ImageUri": uri},
        Role="arn:aws:iam::000000000000:role/test",
        Timeout=60,
        **kwargs,
    )
    return out


def invoke(lam: Any, name: str, event: Any = None) -> tuple[dict[str, Any], Any]:
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event or {}).encode())
    body = json.loads(resp["Payload"].read())
    return resp, body


def mounts_under(path: Path) -> list[str]:
    target = str(path.resolve())
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(target)
    ]


@pytest.mark.parametrize("pull", ["full", "auto"])
def test_image_function_runs_with_the_images_own_python(
    server_factory: Any, python_image: str, pull: str
) -> None:
    server: Server = server_factory("--image-pull", pull)
    lam = server.lambda_client()
    conf = create_image_function(lam, "img", python_image)
    assert conf["PackageType"] == "Image"
    assert "Runtime" not in conf and "Handler" not in conf
    resp, body = invoke(lam, "img", {"k": 1})
    assert "FunctionError" not in resp, body
    # The image's interpreter, not the host's.
    assert body == {"python": "/usr/bin/python3", "event": {"k": 1}}
    got = lam.get_function(FunctionName="img")
    assert got["Code"]["RepositoryType"] == "ECR"
    assert got["Code"]["ImageUri"] == python_image
    assert got["Code"]["ResolvedImageUri"].split("@")[1].startswith("sha256:")
    # A warm call reuses the instance.
    resp, body = invoke(lam, "img", {"k": 2})
    assert body["event"] == {"k": 2}
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert "warmstart_image_pulls_total 1.0" in metrics
    lam.delete_function(FunctionName="img")
    roots = server.data_dir / "images" / "roots"
    wait_until(lambda: mounts_under(roots) == [], "the image root to be unmounted", timeout=10)


def test_image_config_command_overrides_the_cmd(
    server: Server, lam: Any, registry: Any, tmp_path: Path
) -> None:
    ref = imagetools.build_image(
        tmp_path,
        [
            {
                "srv/fn/other.py": "import os\n"
                "def run(event, context):\n"
                "    return {'cwd': os.getcwd(), 'ctx': context.function_name}\n",
            },
        ],
        base=imagetools.debian_layout(),
        ref=f"{registry.host}/override:1",
        cmd=["missing.handler"],
        workingdir="/srv/fn",
    )
    create_image_function(
        lam, "ovr", ref, ImageConfig={"Command": ["other.run"], "WorkingDirectory": "/srv/fn"}
    )
    resp, body = invoke(lam, "ovr")
    assert "FunctionError" not in resp, body
    assert body == {"cwd": "/srv/fn", "ctx": "ovr"}
    conf = lam.get_function_configuration(FunctionName="ovr")
    assert conf["ImageConfigResponse"]["ImageConfig"]["Command"] == ["other.run"]


def test_bad_image_references_are_clear_400s(server: Server, lam: Any, registry: Any) -> None:
    cases = [
        "not a reference!",
        f"{registry.host}/does-not-exist:1",
        "127.0.0.1:9/dead-registry:1",  # nothing listens on port 9
    ]
    for uri in cases:
        with pytest.raises(ClientError) as err:
            create_image_function(lam, "bad", uri)
        assert err.value.response["Error"]["Code"] == "InvalidParameterValueException", uri
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert lam.list_functions()["Functions"] == []


def test_image_without_a_handler_cmd_or_python(
    server: Server, lam: Any, registry: Any, tmp_path: Path
) -> None:
    # No CMD naming a handler: refused at deploy.
    ref = imagetools.build_image(
        tmp_path / "a", [{"var/task/app.py": "x = 1\n"}], ref=f"{registry.host}/nocmd:1"
    )
    with pytest.raises(ClientError) as err:
        create_image_function(lam, "nocmd", ref)
    assert "CMD" in err.value.response["Error"]["Message"]
    # A handler but no Python in the image: the function is Failed (InvalidImage), and an
    # invocation is a 409 that says why.
    ref = imagetools.build_image(
        tmp_path / "b",
        [{"var/task/app.py": "def handler(e, c):\n    return 1\n"}],
        ref=f"{registry.host}/nopython:1",
        cmd=["app.handler"],
    )
    create_image_function(lam, "nopy", ref)
    with pytest.raises(ClientError) as err:
        invoke(lam, "nopy")
    assert err.value.response["Error"]["Code"] == "ResourceConflictException"
    assert "python3" in err.value.response["Error"]["Message"]
    conf = lam.get_function_configuration(FunctionName="nopy")
    assert (conf["State"], conf["StateReasonCode"]) == ("Failed", "InvalidImage")
    assert "python3" in conf["StateReason"]
    # The node is fine.
    assert server.http().get("/healthz").json()["status"] == "ok"


def test_update_function_code_to_a_new_image(
    server: Server, lam: Any, registry: Any, python_image: str, tmp_path: Path
) -> None:
    create_image_function(lam, "upd", python_image)
    _, body = invoke(lam, "upd")
    assert body["python"] == "/usr/bin/python3"
    ref = imagetools.build_image(
        tmp_path,
        [{"var/task/app.py": "def handler(e, c):\n    return 'v2'\n"}],
        base=imagetools.debian_layout(),
        ref=f"{registry.host}/python:v2",
        cmd=["app.handler"],
    )
    lam.update_function_code(FunctionName="upd", ImageUri=ref)
    _, body = invoke(lam, "upd")
    assert body == "v2"


@needs(Path("/dev/fuse").exists(), "needs FUSE (/dev/fuse)")
def test_lazy_image_function_and_recovery_after_a_crash(
    server_factory: Any, registry: Any, python_image: str, tmp_path: Path
) -> None:
    """An eStargz image starts from a lazy mount; a SIGKILLed worker's mounts are
    recovered by the next one, which serves the function again."""
    lazy_ref = f"{registry.host}/python:lazy"
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "convert", python_image, lazy_ref],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    # Not a terminal: a progress line per layer and stage, on stderr.
    layers = res.stderr.count(": fetch")
    assert layers >= 1 and res.stderr.count(": done") == layers, res.stderr
    data_dir = tmp_path / "data"
    first: Server = server_factory(data_dir=data_dir)
    lam = first.lambda_client()
    create_image_function(lam, "lazy", lazy_ref)
    resp, body = invoke(lam, "lazy", {"n": 1})
    assert "FunctionError" not in resp, body
    assert body["python"] == "/usr/bin/python3"
    with first.http() as http:
        metrics = http.get("/metrics").text
    assert "warmstart_image_lazy_mounts_total 1.0" in metrics
    assert mounts_under(data_dir), "the lazy root should be mounted"

    first.stop(signal.SIGKILL)
    second: Server = server_factory(data_dir=data_dir)
    lam = second.lambda_client()
    resp, body = invoke(lam, "lazy", {"n": 2})
    assert "FunctionError" not in resp, body
    assert body["event"] == {"n": 2}
    second.stop()
    wait_until(lambda: mounts_under(data_dir) == [], "the lazy root to be unmounted", timeout=10)


def test_image_zygote_preloads_what_the_handler_imported(
    server_factory: Any, registry: Any, tmp_path: Path
) -> None:
    """After a fresh start of an image function, a zygote starts inside the image's root
    with the packages the handler imported from the image's site-packages; the next
    function of that image forks from it."""
    site = "usr/local/lib/python3.11/dist-packages"
    ref = imagetools.build_image(
        tmp_path,
        [
            {
                f"{site}/imgpkg/__init__.py": "import os\n"
                "IN_ZYGOTE = 'AWS_LAMBDA_FUNCTION_NAME' not in os.environ\n",
                "var/task/app.py": "import os, imgpkg\n"
                "def handler(event, context):\n"
                "    return {'in_zygote': imgpkg.IN_ZYGOTE, 'cwd': os.getcwd()}\n",
            },
        ],
        base=imagetools.debian_layout(),
        ref=f"{registry.host}/zygote-image:1",
        cmd=["app.handler"],
        workingdir="/var/task",
    )
    server: Server = server_factory("--zygote-after", "1")
    lam = server.lambda_client()
    create_image_function(lam, "z1", ref)
    create_image_function(lam, "z2", ref)
    with server.http() as http:
        r = http.post("/run/z1", content=b"{}")
        assert r.status_code == 200, r.text
        assert r.headers["X-Warmstart-Start"] == "cold"
        assert r.json() == {"in_zygote": False, "cwd": "/var/task"}

        def image_zygotes() -> list[dict[str, Any]]:
            zs = [z for z in http.get("/zygotes").json()["zygotes"] if z.get("image")]
            return zs if zs and zs[0]["alive"] else []

        zs = wait_until(image_zygotes, "a live zygote in the image", timeout=60)
        assert zs[0]["imported"] == ["imgpkg"]
        r = http.post("/run/z2", content=b"{}")
        assert r.status_code == 200, r.text
        assert r.headers["X-Warmstart-Start"] == "fork"
        # imgpkg was imported by the zygote (no function environment), before the fork.
        assert r.json() == {"in_zygote": True, "cwd": "/var/task"}


def test_cli_deploy_image_and_pull_with_progress(
    server: Server, registry: Any, python_image: str, tmp_path: Path
) -> None:
    cli = [".venv/bin/warmstart"]
    res = subprocess.run(
        [*cli, "deploy", "--image", python_image, "--name", "clifn", "--endpoint", server.url],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "created clifn from image" in res.stdout
    res = subprocess.run(
        [*cli, "invoke", "clifn", '{"a": 1}', "--endpoint", server.url],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["event"] == {"a": 1}
    res = subprocess.run([*cli, "ls", "--endpoint", server.url], capture_output=True, text=True)
    assert res.returncode == 0 and "clifn" in res.stdout and "image" in res.stdout
    # A source and --image together is a usage error.
    res = subprocess.run(
        [
            *cli,
            "deploy",
            "somewhere",
            "--image",
            python_image,
            "--name",
            "x",
            "--endpoint",
            server.url,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "not both" in res.stderr
    # Preheat a node's store; a missing image is one clear line.
    res = subprocess.run(
        [*cli, "image", "pull", python_image, "--data-dir", str(tmp_path / "node")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "pulled" in res.stdout and "2 layer(s)" in res.stdout
    res = subprocess.run(
        [*cli, "image", "pull", f"{registry.host}/missing:1", "--data-dir", str(tmp_path / "n")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("warmstart: ImageNotFound") and "Traceback" not in res.stderr
