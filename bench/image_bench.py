#!/usr/bin/env python3
"""Container images: time from deploy to the first successful invocation, from an empty
node, for an image of >= 100 MB compressed with Python, numpy, pandas and scipy in it.

Everything runs against one local registry (Debian's docker-registry on loopback):

* containerd ``ctr image pull`` (pull + unpack into its overlayfs snapshotter): the baseline;
* warmstart, full pull (``--image-pull full``) of the gzip image, its layers kept as
  squashfs images (the default) and unpacked (``--image-layers dirs``);
* warmstart, lazy: the image converted to eStargz by ``warmstart image convert --profile``;
* warmstart, lazy: the image converted by ``ctr-remote image convert --estargz --oci``;
* warmstart, lazy: the unconverted gzip image read through the gzip index
  ``warmstart image index`` pushed next to it (``--image-pull auto``, the default), with
  the function's ``--profile`` in the index and without one.

Bytes read from the registry are counted by the registry itself (its access log records
the bytes written for every request), between the start of a scenario and its first
successful invocation.  Convert time: ``warmstart image convert`` (fetch + rewrite + push)
against ``ctr-remote image convert --estargz --oci`` (local rewrite only, the image already
in containerd's store).

Every scenario runs on two disks (``--disk both``, the default): a freshly made ext4 (the
kind case: an empty filesystem) and the machine's own root filesystem, as a user's data
dir is, with containerd always on the same one as warmstart.

Run as root: ``bash scripts/bench image [--quick] [--repeat 3] [--disk both] [--json OUT]`` (it installs
the registry, containerd, ctr-remote and the image tools first).  Exit status: 0 every
target met, 1 a target missed, 2 an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import BenchError, Server, log, machine_info, stop_servers
from tests import imagetools

WARMSTART = [sys.executable, "-m", "warmstart.cli.main"]
PACKAGES = ("numpy", "pandas", "scipy")
# Two functions in one image: "light" uses the standard library only (most of the image
# is libraries other functions use); "data" imports numpy and pandas (scipy stays unused).
LIGHT = """\
import json, urllib.parse

def handler(event, context):
    url = urllib.parse.urlparse(event.get("url", "https://example.com/a?b=1"))
    return {"host": url.netloc, "query": urllib.parse.parse_qs(url.query), "sum": 45}
"""
DATA = """\
import numpy, pandas

def handler(event, context):
    frame = pandas.DataFrame({"x": numpy.arange(10)})
    return {"sum": int(frame.x.sum()), "mean": float(frame.x.mean())}
"""
FUNCTIONS = {"light": "app.handler", "data": "data.handler"}
# The registry's access log (combined format): "GET /v2/<name>/blobs/<digest> HTTP/1.1" 206 N
WRITTEN = re.compile(r'"GET (\S+) HTTP/[\d.]+" \d{3} (\d+)')


# -- the image -------------------------------------------------------------------------------
def site_layer() -> Path:
    """numpy, pandas and scipy for the image's Python 3.11 (cached)."""
    dest = imagetools.CACHE / "bench-site"
    if (dest / "usr/local/lib/python3.11/dist-packages/pandas").is_dir():
        return dest
    tmp = Path(str(dest) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    uv = Path(sys.executable).parent / "uv"
    subprocess.run(
        [
            str(uv) if uv.exists() else "uv",
            "pip",
            "install",
            "--quiet",
            "--python-version",
            "3.11",
            "--python-platform",
            "x86_64-manylinux_2_28",
            "--target",
            str(tmp / "usr/local/lib/python3.11/dist-packages"),
            *PACKAGES,
        ],
        check=True,
    )
    tmp.rename(dest)
    return dest


def build(reg: imagetools.Registry, work: Path) -> tuple[str, int]:
    ref = f"{reg.host}/bench/python-data:gzip"
    imagetools.build_image(
        work / "build",
        [
            imagetools.base_rootfs(),
            site_layer(),
            {"var/task/app.py": LIGHT, "var/task/data.py": DATA},
        ],
        ref=ref,
        cmd=["app.handler"],
        workingdir="/var/task",
        env=["PATH=/usr/local/bin:/usr/bin:/bin"],
    )
    manifest = httpx.get(
        f"{reg.url}/v2/bench/python-data/manifests/gzip",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    return ref, sum(layer["size"] for layer in manifest["layers"])


# -- registry-side byte counting -------------------------------------------------------------
class Meter:
    """Bytes the registry wrote for blob requests, read from its access log."""

    def __init__(self, reg: imagetools.Registry) -> None:
        self.path = reg.log_path
        self.mark()

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def read(self) -> tuple[int, int]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        total = requests = 0
        for m in WRITTEN.finditer(text):
            if "/blobs/" in m.group(1):
                total += int(m.group(2))
                requests += 1
        return total, requests


# -- containerd ------------------------------------------------------------------------------
class Containerd:
    def __init__(self, work: Path) -> None:
        self.dir = work
        self.sock = work / "containerd.sock"
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / "config.toml"
        cfg.write_text(
            "version = 2\n"
            f'root = "{work}/root"\n'
            f'state = "{work}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
        )
        self.log = open(work / "containerd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError("containerd did not start")

    def ctr(self, *args: str, check: bool = True, tool: str = "ctr") -> Any:
        res = subprocess.run(
            [tool, "--address", str(self.sock), "--namespace", "bench", *args],
            capture_output=True,
            text=True,
        )
        if check and res.returncode != 0:
            raise BenchError(f"{tool} {' '.join(args)}: {res.stderr.strip()}")
        return res

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        # Snapshots are overlay mounts only while containers run; remove the state.
        subprocess.run(["umount", "-R", "-l", str(self.dir / "root")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class RootDisk:
    """A directory on the root filesystem (where a default data dir lives), removed
    after the scenario: files made there land among everything else on that disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        subprocess.run(["umount", "-R", "-l", str(self.path)], capture_output=True)
        for mount in reversed(_mounts_under(self.path)):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = str(path) + "/"
    return [p for p in points if p.startswith(prefix)]


def make_disk(kind: str, path: Path) -> FreshDisk | RootDisk:
    return FreshDisk(path) if kind == "fresh" else RootDisk(path)


class FreshDisk:
    """An empty ext4 filesystem (a sparse file on a loop device) for one scenario: every
    scenario starts from an empty node disk, not from the state (deleted files, pending
    discards) the previous one left on the root filesystem."""

    def __init__(self, mountpoint: Path, size_gb: int = 8) -> None:
        self.mountpoint = mountpoint
        self.image = mountpoint.with_name(mountpoint.name + ".ext4")
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["truncate", "-s", f"{size_gb}G", str(self.image)], check=True)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                str(self.image),
            ],
            check=True,
        )
        subprocess.run(["mount", "-o", "loop", str(self.image), str(mountpoint)], check=True)

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        self.image.unlink(missing_ok=True)


def settle() -> None:
    """Write back what the previous scenario left dirty, so no scenario pays for another's
    disk writes (an unpacked image is ~390 MB of files)."""
    os.sync()
    time.sleep(1.0)


def containerd_pull(ref: str, work: Path, meter: Meter, disk_kind: str) -> dict[str, Any]:
    disk = make_disk(disk_kind, work)
    cd = Containerd(work)
    try:
        settle()
        meter.mark()
        t0 = time.perf_counter()
        cd.ctr("image", "pull", "--plain-http", ref)
        seconds = time.perf_counter() - t0
        written, requests = meter.read()
    finally:
        cd.stop()
        disk.remove()
    return {"seconds": seconds, "bytes": written, "requests": requests}


def ctr_remote_convert(src: str, dst: str, work: Path) -> float:
    cd = Containerd(work)
    try:
        cd.ctr("image", "pull", "--plain-http", src, tool="ctr-remote")
        t0 = time.perf_counter()
        cd.ctr("image", "convert", "--estargz", "--oci", src, dst, tool="ctr-remote")
        seconds = time.perf_counter() - t0
        cd.ctr("image", "push", "--plain-http", dst, tool="ctr-remote")
    finally:
        cd.stop()
    return seconds


def warmstart_convert(src: str, dst: str, *, profile: str | None = None) -> float:
    """``warmstart image convert``; with ``profile``, that handler's first run orders it."""
    t0 = time.perf_counter()
    args = [*WARMSTART, "image", "convert", src, dst]
    if profile:
        args += ["--profile", "--handler", profile]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"warmstart image convert failed:\n{res.stderr}")
    return time.perf_counter() - t0


def warmstart_index(ref: str, *, profile: str | None = None) -> float:
    """``warmstart image index``: fetch every layer, index it, push the index artifact;
    with ``profile``, that handler's first run names the files fetched at mount."""
    t0 = time.perf_counter()
    args = [*WARMSTART, "image", "index", ref]
    if profile:
        args += ["--profile", "--handler", profile]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"warmstart image index failed:\n{res.stderr}")
    log(res.stdout.strip())
    return time.perf_counter() - t0


# -- warmstart: deploy -> first invocation ---------------------------------------------------
def first_invocation(
    work: Path,
    name: str,
    ref: str,
    meter: Meter,
    args: list[str],
    handler: str,
    disk_kind: str,
) -> dict[str, Any]:
    server = Server(work, name, args)
    disk = make_disk(disk_kind, server.data_dir)
    server.start()
    try:
        client = httpx.Client(base_url=server.url, timeout=600)
        settle()
        meter.mark()
        t0 = time.perf_counter()
        r = client.post(
            "/2015-03-31/functions",
            json={
                "FunctionName": "fn",
                "PackageType": "Image",
                "Code": {"ImageUri": ref},
                "Role": "arn:aws:iam::000000000000:role/x",
                "MemorySize": 1024,
                "Timeout": 60,
                "ImageConfig": {"Command": [handler]},
            },
        )
        if r.status_code != 201:
            raise BenchError(f"{name}: CreateFunction: {r.status_code} {r.text}")
        deployed = time.perf_counter() - t0
        r = client.post("/2015-03-31/functions/fn/invocations", content=b"{}")
        seconds = time.perf_counter() - t0
        written, requests = meter.read()
        if r.status_code != 200 or "X-Amz-Function-Error" in r.headers:
            raise BenchError(f"{name}: first invocation failed: {r.status_code} {r.text}")
        result = json.loads(r.content)
        if result.get("sum") != 45:
            raise BenchError(f"{name}: wrong result {result}")
        client.close()
        # How long the image took to be ready: a full pull, or a lazy mount.
        ready = (server.metric("warmstart_image_pull_seconds_total") or 0.0) + (
            server.metric("warmstart_image_mount_seconds_total") or 0.0
        )
    finally:
        stop_servers([server], "image_bench")
        disk.remove()
    return {
        "seconds": seconds,
        "deploy_s": deployed,
        "image_ready_s": ready,
        "bytes": written,
        "requests": requests,
    }


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="targets: lazy first invocation >= 5x faster than containerd's pull; lazy "
        "reads <= 15% of the image; full pull >= 3x faster on either disk; convert >= 4x "
        "faster than ctr-remote. Exit status: 0 ok, 1 a target was missed, 2 error.",
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="runs of each scenario, medians (default 3)"
    )
    ap.add_argument("--quick", action="store_true", help="one run of each scenario (a smoke run)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where to work (default: a new /var/tmp dir)"
    )
    ap.add_argument(
        "--disk",
        choices=("both", "fresh", "root"),
        default="both",
        help="where scenarios run: a fresh ext4, the root filesystem, or both (default both)",
    )
    ap.add_argument(
        "--functions",
        default=",".join(FUNCTIONS),
        help="which functions' rows to run (default: %(default)s)",
    )
    ap.add_argument(
        "--scenarios",
        default="",
        help="run only the warmstart scenarios whose label contains one of these "
        "comma-separated words (e.g. 'index,squashfs'; default: all)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    opts = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("image_bench: needs root (sandboxes, mounts, containerd)", file=sys.stderr)
        return 2
    repeat = opts.repeat or (1 if opts.quick else 3)
    try:
        return run(opts, repeat)
    except BenchError as exc:
        print(f"image_bench: {exc}", file=sys.stderr)
        return 2


def run(opts: argparse.Namespace, repeat: int) -> int:
    # Not under /tmp: file creation there is several times slower on this kind of machine.
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="warmstart-image-bench-", dir="/var/tmp"))
    reg = imagetools.start_registry(work / "registry", log_level="info")
    base = f"{reg.host}/bench/python-data"
    conv: dict[str, list[float]] = {
        "warmstart image convert": [],
        "ctr-remote image convert --estargz": [],
    }
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        log("building the image (Debian + python3 + numpy, pandas, scipy)")
        ref, size = build(reg, work)
        log(f"image {ref}: {size / 1e6:.1f} MB compressed")
        meter = Meter(reg)
        for i in range(repeat):
            log(f"convert round {i + 1}")
            conv["warmstart image convert"].append(warmstart_convert(ref, f"{base}:esgz-{i}"))
            conv["ctr-remote image convert --estargz"].append(
                ctr_remote_convert(ref, f"{base}:ctr-esgz", work / f"cd-conv-{i}")
            )
        profile_s = {}
        for fn, handler in FUNCTIONS.items():
            profile_s[fn] = warmstart_convert(ref, f"{base}:esgz-{fn}", profile=handler)
        # An index is pushed next to the image, in its repository: copies of the image (the
        # same manifest) under repositories of their own keep ``ref`` itself unindexed, and
        # let each function's index carry its own profile.
        index_s = {}
        for fn, handler in FUNCTIONS.items():
            imagetools.copy_image(ref, f"{base}-index-{fn}:gzip")
            index_s[f"--profile ({fn})"] = warmstart_index(
                f"{base}-index-{fn}:gzip", profile=handler
            )
        imagetools.copy_image(ref, f"{base}-index:gzip")
        index_s["no profile"] = warmstart_index(f"{base}-index:gzip")
        wanted = [w for w in opts.scenarios.split(",") if w]
        runs = 0
        disks = ["fresh", "root"] if opts.disk == "both" else [opts.disk]
        functions = {fn: FUNCTIONS[fn] for fn in opts.functions.split(",")}
        for i in range(repeat):
            for disk in disks:
                log(f"pull round {i + 1}, {disk} disk")
                rows.setdefault(
                    f"{disk} disk | containerd: ctr image pull (pull + unpack)", []
                ).append(containerd_pull(ref, work / f"cd-pull-{disk}-{i}", meter, disk))
                for fn, handler in functions.items():
                    for label, image, args in (
                        ("warmstart full pull, squashfs layers", ref, ["--image-pull", "full"]),
                        (
                            "warmstart full pull, unpacked layers",
                            ref,
                            ["--image-pull", "full", "--image-layers", "dirs"],
                        ),
                        ("warmstart lazy, eStargz by warmstart --profile", f"{base}:esgz-{fn}", []),
                        ("warmstart lazy, eStargz by ctr-remote", f"{base}:ctr-esgz", []),
                        (
                            "warmstart lazy, unconverted + gzip index --profile",
                            f"{base}-index-{fn}:gzip",
                            [],
                        ),
                        (
                            "warmstart lazy, unconverted + gzip index, no profile",
                            f"{base}-index:gzip",
                            [],
                        ),
                    ):
                        if wanted and not any(w in label for w in wanted):
                            continue
                        runs += 1  # every run gets a fresh server and an empty data dir
                        rows.setdefault(f"{disk} disk | {fn}: {label}", []).append(
                            first_invocation(
                                work, f"{fn}-{runs}", image, meter, args, handler, disk
                            )
                        )
    finally:
        reg.stop()
    print()
    print(
        f"# Deploy → first successful invocation from an empty node ({repeat} runs, "
        f"medians); image {size / 1e6:.1f} MB compressed"
    )
    print()
    print(
        "| disk | function: scenario | deploy → first invocation (spread) | of which image "
        "ready (pull or lazy mount) | bytes from registry | % of image | containerd / this |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    cbases = {
        disk: med(rows[f"{disk} disk | containerd: ctr image pull (pull + unpack)"], "seconds")
        for disk in disks
    }
    for name, runs_ in rows.items():
        disk, _, label = name.partition(" disk | ")
        secs, nbytes = med(runs_, "seconds"), med(runs_, "bytes")
        spread = f"{min(r['seconds'] for r in runs_):.2f} to {max(r['seconds'] for r in runs_):.2f}"
        ready = f"{med(runs_, 'image_ready_s'):.2f} s" if "image_ready_s" in runs_[0] else "-"
        print(
            f"| {disk} | {label} | {secs:.2f} s ({spread}) | {ready} | {nbytes / 1e6:.1f} MB | "
            f"{100 * nbytes / size:.1f}% | {cbases[disk] / secs:.2f}x |"
        )
    print()
    print("| convert to eStargz | time (median) | ctr-remote / this |")
    print("| --- | ---: | ---: |")
    ctr = statistics.median(conv["ctr-remote image convert --estargz"])
    for name, times in conv.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.2f} s | {ctr / t:.1f}x |")
    for fn, t in profile_s.items():
        print(
            f"| warmstart image convert --profile ({fn}: pull, run, convert, push) | {t:.2f} s | {ctr / t:.1f}x |"
        )
    for kind, t in index_s.items():
        print(
            f"| warmstart image index {kind} (fetch, index, push; the image unchanged) | "
            f"{t:.2f} s | {ctr / t:.1f}x |"
        )
    wconv = statistics.median(conv["warmstart image convert"])
    print()
    checks: list[tuple[str, bool]] = []
    for disk in disks:
        cbase = cbases[disk]
        for fn in functions:
            for kind in ("eStargz by warmstart --profile", "unconverted + gzip index --profile"):
                lazy = rows.get(f"{disk} disk | {fn}: warmstart lazy, {kind}")
                if not lazy:
                    continue
                t, b = med(lazy, "seconds"), med(lazy, "bytes")
                checks += [
                    (
                        f"{disk} disk, {fn}: lazy ({kind}) first invocation >= 5x faster than "
                        f"containerd's pull: {cbase / t:.2f}x",
                        cbase / t >= 5,
                    ),
                    (
                        f"{disk} disk, {fn}: lazy ({kind}) reads <= 15% of the image before "
                        f"the first invocation: {100 * b / size:.1f}%",
                        b <= 0.15 * size,
                    ),
                ]
            full_rows = rows.get(f"{disk} disk | {fn}: warmstart full pull, squashfs layers")
            if full_rows:
                full = med(full_rows, "seconds")
                checks.append(
                    (
                        f"{disk} disk, {fn}: full pull (+ first invocation) >= 3x faster than "
                        f"containerd's pull: {cbase / full:.2f}x",
                        cbase / full >= 3,
                    )
                )
    checks.append((f"convert >= 4x faster than ctr-remote: {ctr / wconv:.1f}x", ctr / wconv >= 4))
    for label, ok in checks:
        print(f"- [{'x' if ok else ' '}] {label}")
    print()
    print(f"machine: {machine_info()}")
    if opts.json:
        opts.json.write_text(json.dumps({"size": size, "rows": rows, "convert": conv}, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
