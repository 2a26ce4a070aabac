"""Function logs: one O_APPEND record per invocation, rotated by size."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmstart.worker.logs import FunctionLogs


def _append(logs: FunctionLogs, name: str, i: int, size: int = 100) -> bytes:
    return logs.append(name, f"req-{i}", "1", 128, 1.0, b"o" * size + b"\n", None)


def test_a_log_is_rotated_past_its_limit_and_the_file_count_is_bounded(tmp_path: Path) -> None:
    logs = FunctionLogs(tmp_path, max_bytes=1000, backups=2)
    records = [_append(logs, "fn", i) for i in range(60)]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fn.log", "fn.log.1", "fn.log.2"]
    for name in files:
        size = (tmp_path / name).stat().st_size
        assert 0 < size <= 1000
        # Every file holds whole records: rotation never splits one.
        assert (tmp_path / name).read_bytes().startswith(b"START RequestId: ")
    assert logs.rotations > 2
    # The newest records are the current file's, in order; the oldest are gone.
    assert (tmp_path / "fn.log").read_bytes().endswith(records[-1])
    kept = b"".join((tmp_path / n).read_bytes() for n in ("fn.log.2", "fn.log.1", "fn.log"))
    assert kept.endswith(b"".join(records[-3:]))
    assert records[0] not in kept
    logs.close()


def test_tail_reads_across_a_rotation(tmp_path: Path) -> None:
    logs = FunctionLogs(tmp_path, max_bytes=1000, backups=1)
    records = [_append(logs, "fn", i) for i in range(20)]
    # Rotate, then one record in the new file: a tail longer than it reaches back.
    while (tmp_path / "fn.log").stat().st_size != len(records[-1]):
        records.append(_append(logs, "fn", len(records)))
    tail = logs.tail("fn", 4 * len(records[-1]))
    assert len(tail) == 4 * len(records[-1])
    assert tail == b"".join(records[-4:])
    assert logs.tail("fn", 10) == records[-1][-10:]
    assert logs.tail("nobody", 100) == b""
    logs.close()


def test_a_full_log_left_by_an_earlier_run_is_rotated_first(tmp_path: Path) -> None:
    (tmp_path / "fn.log").write_bytes(b"x" * 990)
    logs = FunctionLogs(tmp_path, max_bytes=1000, backups=1)
    record = _append(logs, "fn", 0)
    assert (tmp_path / "fn.log").read_bytes() == record
    assert (tmp_path / "fn.log.1").read_bytes() == b"x" * 990
    logs.close()


def test_a_record_larger_than_the_limit_is_kept_whole(tmp_path: Path) -> None:
    logs = FunctionLogs(tmp_path, max_bytes=100, backups=1)
    big = _append(logs, "fn", 0, size=500)
    assert (tmp_path / "fn.log").read_bytes() == big
    small = _append(logs, "fn", 1, size=1)
    assert (tmp_path / "fn.log").read_bytes() == small
    assert (tmp_path / "fn.log.1").read_bytes() == big
    logs.close()


def test_limits_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FunctionLogs(tmp_path, max_bytes=0)
    with pytest.raises(ValueError):
        FunctionLogs(tmp_path, backups=0)
