"""The CLI without a server: every option documented with its default, serve's defaults
taken from Settings, --qos-config inline or from a file, top's plain view, the demo
deploy's failure logged."""

from __future__ import annotations

import argparse
import dataclasses
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from warmstart.cli import main as cli
from warmstart.cli import top
from warmstart.qos.policy import QoSConfig
from warmstart.worker.settings import Settings


def _parsers(p: argparse.ArgumentParser, path: str = "warmstart") -> list[tuple[str, Any]]:
    found = [(path, p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def _options() -> list[tuple[str, argparse.Action]]:
    return [
        (f"{path} {'/'.join(a.option_strings) or a.dest}", a)
        for path, parser in _parsers(cli._parser())
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def test_the_walk_sees_every_command() -> None:
    names = {path for path, _ in _parsers(cli._parser())}
    assert {
        "warmstart serve",
        "warmstart top",
        "warmstart image pull",
        "warmstart job results",
    } <= names
    assert len(_options()) > 60


@pytest.mark.parametrize("name,action", _options(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_a_description_and_its_default(name: str, action: argparse.Action) -> None:
    assert action.help, f"{name} has no description"
    if action.option_strings and not action.required:
        # A flag says what happens without it; a valued option names its default.
        assert "default" in action.help or isinstance(
            action, (argparse._StoreTrueAction, argparse._StoreFalseAction)
        ), f"{name}: {action.help!r} does not name its default"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            assert "default" in action.help or "(off)" in action.help, name


def test_serve_defaults_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARMSTART_DATA_DIR", raising=False)
    args = cli._parser("serve").parse_args(["serve"])
    seen: dict[str, Any] = {}

    class Capture(Exception):
        pass

    def fake_settings(**kwargs: Any) -> Settings:
        seen.update(kwargs)
        raise Capture

    monkeypatch.setattr("warmstart.worker.Settings", fake_settings)
    with pytest.raises(Capture):
        cli._serve(args)
    default = Settings()
    for key, value in seen.items():
        want = getattr(default, key)
        if key == "data_dir":
            want = Path(want).resolve()
        assert value == want, key
    # Every setting a flag can change is passed on, so none keeps a second default.
    tunable = {f.name for f in dataclasses.fields(Settings)} - set(seen)
    assert tunable <= {
        "region",
        "account",
        "sandbox_uid",
        "sandbox_gid",
        "pids_max",
        "tmp_mb",
        "cgroup_pool",
        "idle_ttl_s",
        "init_timeout_s",
        "event_retries",
        "qos_config",
    }
    assert seen["cluster"] is None  # a single node unless --cluster is given


def test_data_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSTART_DATA_DIR", "/srv/ws")
    assert cli._parser("serve").parse_args(["serve"]).data_dir == Path("/srv/ws")
    pull = cli._parser("image").parse_args(["image", "pull", "127.0.0.1:5000/a:1"])
    assert pull.data_dir == Path("/srv/ws")


def test_qos_config_inline_or_in_a_file(tmp_path: Path) -> None:
    assert cli._qos_config('{"be_sched_idle": true}') == QoSConfig(be_sched_idle=True)
    f = tmp_path / "qos.json"
    f.write_text('{"cpu_reclaim_threshold": 0.5}')
    assert cli._qos_config(str(f)) == QoSConfig(cpu_reclaim_threshold=0.5)
    for bad in ('{"no_such_threshold": 1}', "[1]", str(tmp_path / "missing.json")):
        with pytest.raises(cli.CLIError, match="--qos-config"):
            cli._qos_config(bad)


def test_client_commands_do_not_load_the_worker() -> None:
    """ls, invoke, job... build a parser without serve's options (no worker import)."""
    sub = next(a for a in cli._parser("ls")._actions if isinstance(a, argparse._SubParsersAction))
    assert not [a for a in sub.choices["serve"]._actions if a.option_strings != ["-h", "--help"]]


NODE = {
    "capacity": {"cpus": 2.0, "memory_bytes": 4 << 30},
    "usage": {"ls_cpu": 0.5, "ls_memory": 1 << 30, "be_cpu": 1.0, "be_memory": 0},
    "reclaimed": {"cpu_cores": 1.0, "memory_bytes": 1 << 30},
    "qos": True,
    "be_cpu_policy": "none",
    "best_effort_running": 2,
    "best_effort_slots": 4,
    "queue_depth": 3,
    "evictions": 1,
    "instances": {"idle": 1, "frozen": 2},
    "functions": 4,
}


def test_top_prints_plain_snapshots_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    calls = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return NODE

    assert top.run(fetch, "http://x", 0.001, iterations=3, out=out) == 0
    text = out.getvalue()
    assert len(calls) == 3 and text.count("warmstart top · http://x") == 3
    assert "\x1b[" not in text  # no terminal codes
    assert "queue depth:        3" in text
    assert "instances:          idle 1, frozen 2" in text
    assert "best-effort               1.00    0.00 GiB" in text


class FakeServer:
    def __init__(self, started: bool, should_exit: bool = False) -> None:
        self.started, self.should_exit = started, should_exit


class FailingWorker:
    functions: dict[str, Any] = {}  # noqa: RUF012

    async def create_function(self, *args: Any) -> None:
        raise RuntimeError("no room for hello")


def test_a_failed_demo_deploy_is_logged_with_its_cause(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    args = argparse.Namespace(host="127.0.0.1", port=1)
    with caplog.at_level("ERROR", logger="warmstart.cli"):
        asyncio.run(cli._demo_when_up(FakeServer(started=True), FailingWorker(), args))
    (record,) = caplog.records
    assert "--demo" in record.getMessage() and "hello" in record.getMessage()
    assert record.exc_info is not None and "no room for hello" in str(record.exc_info[1])
    assert "demo: curl" not in capsys.readouterr().out


def test_the_demo_waits_for_nothing_once_the_server_is_stopping() -> None:
    import asyncio

    args = argparse.Namespace(host="127.0.0.1", port=1)
    server = FakeServer(started=False, should_exit=True)
    asyncio.run(asyncio.wait_for(cli._demo_when_up(server, FailingWorker(), args), 5))


def test_serve_raises_the_open_files_limit_to_the_hard_one() -> None:
    """A shell's soft limit (1024) would cap a node at a few hundred instances."""
    code = (
        "import resource\n"
        "from warmstart.cli.main import _raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "_raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
