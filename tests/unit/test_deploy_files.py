"""The deployment files in deploy/: the Kubernetes manifests and the systemd unit.

No Kubernetes API server or systemd runs here, so these tests read the files and check
what a real fleet depends on: every document is a well-formed object; the command lines
the DaemonSet and the unit run are accepted by warmstart's own ``serve`` parser and make
valid cluster settings; the probes, ports, selectors and host paths agree with each
other; etcd's initial member list names exactly the StatefulSet's replicas; the unit
has the settings docs/cluster.md explains.  Where ``systemd-analyze`` exists, the unit
is also verified by systemd itself.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from warmstart.cli import main as cli
from warmstart.cluster.settings import NODE_NAME_RE, ClusterSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"


# -- Kubernetes -------------------------------------------------------------------------------
def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, f"{name} holds no document"
    return docs


def _all() -> list[dict[str, Any]]:
    return _docs("etcd.yaml") + _docs("warmstart.yaml")


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _all() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def _serve_words(container: dict[str, Any]) -> list[str]:
    """The DaemonSet's ``exec warmstart serve ...`` line, split as the shell would, its
    variables given the values the pod would have."""
    assert container["command"] == ["/bin/sh", "-c"]
    script = container["args"][0].replace("\\\n", " ")
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("exec "))
    values = {"name": "ip-10-0-0-1-ec2-internal", "POD_IP": "10.1.2.3"}
    line = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], line)
    words = shlex.split(line)
    assert words[:3] == ["exec", "warmstart", "serve"], words
    return words[1:]


def _cluster(words: list[str]) -> ClusterSettings:
    """``warmstart serve`` flags through warmstart's own parser into ClusterSettings."""
    args = cli._parser("serve").parse_args(words[1:])
    settings = cli._cluster_settings(args)
    assert isinstance(settings, ClusterSettings)
    return settings


def test_every_document_is_a_named_object_in_the_warmstart_namespace() -> None:
    kinds = []
    for doc in _all():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "warmstart", doc["metadata"]
        kinds.append((doc["apiVersion"], doc["kind"], doc["metadata"]["name"]))
    assert sorted(kinds) == sorted(
        [
            ("v1", "Namespace", "warmstart"),
            ("apps/v1", "DaemonSet", "warmstart"),
            ("v1", "Service", "warmstart"),
            ("v1", "Service", "etcd-peer"),
            ("v1", "Service", "etcd-client"),
            ("apps/v1", "StatefulSet", "etcd"),
            ("policy/v1", "PodDisruptionBudget", "etcd"),
            ("networking.k8s.io/v1", "NetworkPolicy", "etcd"),
        ]
    )
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["warmstart.yaml", "etcd.yaml"]


def test_the_daemonset_runs_a_cluster_node_its_flags_parse() -> None:
    ds = _one("DaemonSet", "warmstart")
    c = _container(ds, "warmstart")
    words = _serve_words(c)
    settings = _cluster(words)
    args = cli._parser("serve").parse_args(words[1:])
    assert args.host == "0.0.0.0"
    assert args.port == _port(c, "http") == 8080
    # Every node reaches etcd through the client Service.
    client = _one("Service", "etcd-client")
    assert settings.endpoints == (f"http://etcd-client:{client['spec']['ports'][0]['port']}",)
    assert settings.advertise == f"http://10.1.2.3:{args.port}"
    assert settings.node_name == "ip-10-0-0-1-ec2-internal"
    # The node name comes from the Kubernetes node, through the downward API.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize(
    "node",
    ["gke-pool-1-abc", "ip-10-0-0-1.ec2.internal", "Worker-7.Example.COM", "n" * 70 + ".x"],
)
def test_the_daemonset_makes_a_dns_label_of_any_node_name(node: str) -> None:
    c = _container(_one("DaemonSet", "warmstart"), "warmstart")
    first = c["args"][0].splitlines()[0]
    assert first.startswith("name=")
    out = subprocess.run(
        ["sh", "-c", first + '\nprintf %s "$name"'],
        env={"NODE_NAME": node, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert NODE_NAME_RE.fullmatch(out), out
    assert out.replace("-", ".") == node.lower().replace("-", ".")[: len(out)]


def test_the_daemonset_is_privileged_probed_on_healthz_and_mounts_the_host() -> None:
    ds = _one("DaemonSet", "warmstart")
    pod = ds["spec"]["template"]["spec"]
    c = _container(ds, "warmstart")
    assert c["securityContext"]["privileged"] is True
    # The worker is never pid 1 of its pid namespace: the pod's pause process is, or the
    # host's init (Kubernetes refuses both settings at once).
    assert [pod.get("shareProcessNamespace"), pod.get("hostPID")].count(True) == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts.keys() == host_paths.keys()
    args = cli._parser("serve").parse_args(_serve_words(c)[1:])
    data_dir = str(args.data_dir)
    for path in ("/sys/fs/cgroup", "/dev/fuse", "/run/warmstart", data_dir):
        name = next(n for n, p in host_paths.items() if p == path)
        assert mounts[name] == path, name
    # Long enough to drain requests and tear down; the systemd unit waits as long.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 60
    assert int(_unit()["Service"]["TimeoutStopSec"][0]) == grace
    update = ds["spec"]["updateStrategy"]
    assert update["type"] == "RollingUpdate"
    assert update["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert c["resources"]["requests"].keys() == {"cpu", "memory"}
    assert _matches(
        ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]
    )


def test_the_service_sends_port_80_to_the_daemonsets_pods() -> None:
    ds = _one("DaemonSet", "warmstart")
    svc = _one("Service", "warmstart")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert _matches(svc["spec"]["selector"], labels)
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80
    c = _container(ds, "warmstart")
    assert _port(c, port["targetPort"]) == 8080
    assert svc["spec"]["type"] == "ClusterIP"


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_etcds_initial_cluster_names_exactly_its_replicas() -> None:
    sts = _one("StatefulSet", "etcd")
    spec = sts["spec"]
    c = _container(sts, "etcd")
    flags = _flags(c["args"])
    members = dict(m.split("=", 1) for m in flags["initial-cluster"].split(","))
    names = [f"{sts['metadata']['name']}-{i}" for i in range(spec["replicas"])]
    assert sorted(members) == names
    peer = _one("Service", spec["serviceName"])
    assert peer["spec"]["clusterIP"] == "None"
    assert peer["spec"]["publishNotReadyAddresses"] is True
    for name, url in members.items():
        parts = urlsplit(url)
        assert parts.hostname == f"{name}.{spec['serviceName']}"
        assert parts.port == _port(c, "peer")
    # Each member advertises itself exactly as the list names it.
    assert flags["name"] == "$(POD_NAME)"
    assert flags["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{spec['serviceName']}:2380"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c[
        "env"
    ]
    assert spec["podManagementPolicy"] == "Parallel"  # a quorum needs them all started
    assert flags["initial-cluster-state"] == "new"
    # Data on the claim, probes on /health.
    (claim,) = spec["volumeClaimTemplates"]
    (mount,) = c["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert flags["data-dir"] == mount["mountPath"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"].startswith("/health"), probe
        assert c[probe]["httpGet"]["port"] == "metrics"
    assert urlsplit(flags["listen-metrics-urls"]).port == _port(c, "metrics")
    assert _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    budget = _one("PodDisruptionBudget", "etcd")
    assert budget["spec"]["minAvailable"] == spec["replicas"] // 2 + 1


def test_only_warmstart_nodes_and_members_reach_etcd() -> None:
    policy = _one("NetworkPolicy", "etcd")
    sts = _one("StatefulSet", "etcd")
    ds_labels = _one("DaemonSet", "warmstart")["spec"]["template"]["metadata"]["labels"]
    etcd_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], etcd_labels)
    client_rule = next(r for r in policy["spec"]["ingress"] if {"port": 2379} in r["ports"])
    allowed = [f["podSelector"]["matchLabels"] for f in client_rule["from"]]
    assert any(_matches(sel, ds_labels) for sel in allowed)
    peer_rule = next(r for r in policy["spec"]["ingress"] if {"port": 2380} in r["ports"])
    assert all(_matches(f["podSelector"]["matchLabels"], etcd_labels) for f in peer_rule["from"])


# -- systemd ----------------------------------------------------------------------------------
def _unit(path: Path = SYSTEMD / "warmstart.service") -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat; ``\\`` continues a line)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(" ".join(value.split()))
    return sections


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _exec_start(env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: ``${VAR}`` is one word, ``$VAR`` splits on spaces."""
    (line,) = _unit()["Service"]["ExecStart"]
    words: list[str] = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$\w+", word):
            words += env[word[1:]].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


def _unit_env() -> dict[str, str]:
    """The unit's Environment= defaults (``%l``: a short host name), then the example
    environment file over them, as systemd applies them."""
    env = {}
    for item in _unit()["Service"].get("Environment", []):
        key, _, value = item.partition("=")
        env[key] = value.replace("%l", "node-a")
    env.update(_env_file(SYSTEMD / "warmstart.env"))
    return env


def test_the_unit_runs_a_cluster_node_its_flags_parse() -> None:
    service = _unit()["Service"]
    (line,) = service["ExecStart"]
    assert line.startswith("/opt/warmstart/.venv/bin/warmstart serve ")
    assert "--cluster ${WARMSTART_CLUSTER}" in line
    assert "--node-name ${WARMSTART_NODE_NAME}" in line
    assert service["EnvironmentFile"] == ["/etc/warmstart/warmstart.env"]
    env = _unit_env()
    used = set(re.findall(r"\$\{?(\w+)\}?", line))
    assert used <= env.keys(), f"not set by the unit or warmstart.env: {used - env.keys()}"
    words = _exec_start(env)
    settings = _cluster(words)
    assert settings.node_name == "node-a"
    assert settings.endpoints == tuple(env["WARMSTART_CLUSTER"].split(","))
    assert settings.labels == {"rack": "r1"}
    args = cli._parser("serve").parse_args(words[1:])
    assert str(args.data_dir) == env["WARMSTART_DATA_DIR"] == "/var/lib/warmstart"


def test_the_unit_has_the_settings_the_docs_explain() -> None:
    unit = _unit()
    u, s = unit["Unit"], unit["Service"]
    assert "network-online.target" in u["After"][0].split()
    assert "network-online.target" in u["Wants"][0].split()
    assert s["Delegate"] == ["yes"]
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert int(s["LimitNOFILE"][0]) >= 65536
    assert int(s["TimeoutStopSec"][0]) >= 60
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_etcd_example_names_its_own_member() -> None:
    env = _env_file(SYSTEMD / "etcd.env")
    members = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
    assert len(members) == 3
    assert members[env["ETCD_NAME"]] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    client = urlsplit(env["ETCD_ADVERTISE_CLIENT_URLS"])
    node_env = _env_file(SYSTEMD / "warmstart.env")
    assert f"http://{client.hostname}:{client.port}" in node_env["WARMSTART_CLUSTER"].split(",")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the unit, its paths pointed at this checkout (it
    checks that ExecStart's program exists).  It prints a line for every key it ignores."""
    warmstart = Path(sys.executable).parent / "warmstart"
    if not warmstart.is_file():
        pytest.skip("no warmstart script beside this interpreter")
    text = (SYSTEMD / "warmstart.service").read_text()
    text = text.replace("/opt/warmstart/.venv/bin/warmstart", str(warmstart))
    text = text.replace("/etc/warmstart/warmstart.env", str(SYSTEMD / "warmstart.env"))
    unit = tmp_path / "warmstart.service"
    unit.write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), (
        res.stdout + res.stderr
    )
