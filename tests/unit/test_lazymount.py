"""The host side of lazy mounts without mounting: the daemon's spec and mount helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmstart.images.errors import ImageError
from warmstart.images.lazymount import (
    BackgroundFetch,
    DaemonSpec,
    LayerSource,
    MountSpec,
)


def test_daemon_spec_round_trips_and_bad_specs_are_refused(tmp_path: Path) -> None:
    layers = (
        LayerSource.estargz("127.0.0.1:5000/app:1", "sha256:" + "a" * 64, "sha256:" + "b" * 64),
        LayerSource.directory(tmp_path),
    )
    spec = DaemonSpec(
        str(tmp_path / "m"),
        str(tmp_path / "c"),
        layers,
        background=BackgroundFetch(enabled=False, bandwidth=5),
    )
    assert DaemonSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    # The mount identity depends on the layers only.
    assert MountSpec(layers).key() == MountSpec(layers, background=BackgroundFetch(False)).key()
    assert MountSpec(layers).key() != MountSpec(layers[:1]).key()
    good = spec.to_json()
    for bad in (
        [],
        {**good, "layers": []},
        {**good, "layers": [{"kind": "tarball", "path": "/x"}]},
        {**good, "layers": [{"kind": "estargz", "ref": "r"}]},
        {**good, "layers": [{"kind": "dir"}]},
        {**good, "background": {"concurrency": 0}},
        {**good, "read_ahead": -1},
        {key: value for key, value in good.items() if key != "mountpoint"},
    ):
        with pytest.raises(ImageError):
            DaemonSpec.from_json(bad)
