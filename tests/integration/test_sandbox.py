"""SandboxManager against the real kernel: namespaces, cgroups, root, freezer, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, deploy, needs_root
from warmstart.runtime.protocol import HEADER, encode
from warmstart.sandbox import Isolation, SandboxManager, SandboxSpec

pytestmark = [pytest.mark.integration]

PROBE = """
import os
def handler(event, context):
    return {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
            "root": sorted(os.listdir("/")), "task": sorted(os.listdir(os.environ["LAMBDA_TASK_ROOT"]))}
"""


async def _frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    a, b, c = HEADER.unpack(await reader.readexactly(HEADER.size))
    body = await reader.readexactly(a + b + c)
    return json.loads(body[:a]), body[a : a + b]


def _host_pids(manager: SandboxManager, sandbox: Any) -> list[int]:
    return [int(p) for p in Path(sandbox.cgroup.procs_files[0]).read_text().split()]


@needs_root
def test_linux_sandbox_isolation_and_cleanup(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "probe.py").write_text(PROBE)
    os.chmod(code, 0o755)

    async def scenario() -> None:
        m = SandboxManager(tmp_path / "data", isolation=Isolation.LINUX, pool_size=2, cpu_quota=0.5)
        await m.start()
        try:
            sb = await m.create(SandboxSpec(code, {"_HANDLER": "probe.handler"}, memory_mb=160))
            reader, writer = await asyncio.open_unix_connection(sock=sb.sock)
            assert (await _frame(reader))[0] == {"type": "ready"}
            writer.write(
                encode(
                    json.dumps({"id": "1", "deadline_ms": int(time.time() * 1000) + 5000}).encode(),
                    b"{}",
                )
            )
            meta, payload = await _frame(reader)
            body = json.loads(payload)
            assert meta == {"type": "result"}
            # Inside: pid 2 of its own namespace (pid 1 is the sandbox init), unprivileged.
            assert body["pid"] == 2 and body["uid"] == 65534 and body["gid"] == 65534
            assert body["cwd"] == "/var/task"
            assert body["task"] in (["__pycache__", "probe.py"], ["probe.py"])
            assert "work" not in body["root"] and "home" not in body["root"]

            # Outside: every process of the sandbox is in its cgroup, with the limits.
            assert sb.cgroup is not None
            pids = _host_pids(m, sb)
            assert len(pids) == 2  # pid 1 (the sandbox's init) and the runtime
            rel = sb.cgroup.rel
            mem = Path("/sys/fs/cgroup/memory") / rel
            assert int((mem / "memory.limit_in_bytes").read_text()) == 160 << 20
            assert int((Path("/sys/fs/cgroup/pids") / rel / "pids.max").read_text()) == 256
            assert (
                int((Path("/sys/fs/cgroup/cpu") / rel / "cpu.cfs_quota_us").read_text()) == 50_000
            )
            for pid in pids:
                assert (
                    str(pid) in (Path("/sys/fs/cgroup/freezer") / rel / "cgroup.procs").read_text()
                )
            runtime_pid = max(pids)
            for ns in ("pid", "uts", "ipc", "mnt", "net"):
                assert os.readlink(f"/proc/{runtime_pid}/ns/{ns}") != os.readlink(
                    f"/proc/self/ns/{ns}"
                ), ns
            assert os.readlink(f"/proc/{runtime_pid}/root") != "/"
            # No sandbox mount is visible on the host.
            assert str(tmp_path) not in Path("/proc/mounts").read_text()

            sb.freeze()
            state = Path("/sys/fs/cgroup/freezer") / rel / "freezer.state"
            for _ in range(200):
                if state.read_text().strip() == "FROZEN":
                    break
                await asyncio.sleep(0.005)
            assert state.read_text().strip() == "FROZEN"
            sb.thaw()
            assert sb.memory_usage() > 0

            writer.close()
            await m.destroy(sb)
            for pid in pids:
                assert (
                    not Path(f"/proc/{pid}").exists()
                    or Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
                )
            assert (Path("/sys/fs/cgroup/freezer") / rel / "cgroup.procs").read_text().split() != [
                str(p) for p in pids
            ]
        finally:
            await m.close()
        assert not list(
            Path("/sys/fs/cgroup/memory/warmstart").glob(f"{m.cgroup_parent().split('/')[1]}*")
        )

    asyncio.run(scenario())


@needs_root
def test_sandbox_setup_failure_is_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        m = SandboxManager(tmp_path / "data", isolation=Isolation.LINUX, pool_size=1)
        await m.start()
        try:
            from warmstart.errors import SandboxError

            with pytest.raises(SandboxError, match="sandbox setup"):
                await m.create(SandboxSpec(tmp_path / "does-not-exist", {}, memory_mb=128))
            # The spawner survived and the pool is intact.
            code = tmp_path / "code"
            code.mkdir()
            (code / "probe.py").write_text(PROBE)
            sb = await m.create(SandboxSpec(code, {"_HANDLER": "probe.handler"}, memory_mb=128))
            reader, writer = await asyncio.open_unix_connection(sock=sb.sock)
            assert (await _frame(reader))[0] == {"type": "ready"}
            writer.close()
            await m.destroy(sb)
        finally:
            await m.close()

    asyncio.run(scenario())


def test_process_backend_runs_without_isolation(server_factory: Any) -> None:
    server: Server = server_factory("--isolation", "process")
    lam = server.lambda_client()
    deploy(lam, "plain", {"probe.py": PROBE}, handler="probe.handler")
    resp = lam.invoke(FunctionName="plain", Payload=b"{}")
    body = json.loads(resp["Payload"].read())
    assert "FunctionError" not in resp
    assert body["pid"] != 2 and body["cwd"] != "/var/task"
    assert "ISOLATION IS OFF" in server.log()
    with server.http() as http:
        assert http.get("/healthz").json()["isolation"] == "process"


@needs_root
def test_one_worker_per_data_dir_and_a_restart_waits_for_the_dying_one(tmp_path: Path) -> None:
    from warmstart.errors import SandboxError

    async def main() -> None:
        first = SandboxManager(tmp_path / "data", isolation=Isolation.LINUX, pool_size=1)
        await first.start()
        try:
            second = SandboxManager(
                tmp_path / "data", isolation=Isolation.LINUX, pool_size=1, lock_wait_s=0.3
            )
            with pytest.raises(SandboxError, match="another warmstart worker is running"):
                await second.start()
            await second.close()
            # A worker that starts while the previous one is still going away gets the
            # data dir as soon as the lock is released.
            third = SandboxManager(
                tmp_path / "data", isolation=Isolation.LINUX, pool_size=1, lock_wait_s=30
            )
            starting = asyncio.get_running_loop().create_task(third.start())
            await asyncio.sleep(0.2)
            assert not starting.done()
            await first.close()
            await asyncio.wait_for(starting, 30)
            await third.close()
        finally:
            await first.close()

    asyncio.run(main())
