"""The deployment files, as far as they can be checked without a cluster or a
container engine: the DaemonSet parses and asks for nothing the daemon does
not need (and everything it does), the image's entry point is the CLI, and
the Grafana dashboard only queries metrics the daemon exports."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from pybpftune import caps
from pybpftune.install import _data

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Host paths the daemon reads or writes, and why (docs/deploy.md says the same).
NEEDED_HOST_PATHS = {
    "/sys/fs/bpf": "bpffs (pinning)",
    "/sys/kernel/btf": "kernel BTF for CO-RE",
    "/proc/sys": "the sysctls it tunes",
    "/sys/fs/cgroup": "the cgroup2 root its cgroup programs attach to",
    "/run/netns": "namespaces made by ip netns and CNI plugins",
    "/lib/modules": "modprobe of congestion controls",
    "/run/pybpftune": "the journal of original values",
}


def daemonset() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "pybpftune-daemonset.yaml").read_text()))
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


def unit_bounding_set() -> set[str]:
    m = re.search(r"^CapabilityBoundingSet=(.*)$", _data("pybpftune.service"), re.M)
    assert m is not None
    return set(m.group(1).split())


def test_daemonset_asks_for_what_the_daemon_needs_and_no_more() -> None:
    ds = daemonset()
    assert ds["apiVersion"] == "apps/v1" and ds["kind"] == "DaemonSet"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert not spec.get("hostIPC")
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc.get("privileged") is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Exactly the unit's bounding set: what start-up needs, which contains what stays.
    added = {f"CAP_{c}" for c in sc["capabilities"]["add"]}
    assert added == unit_bounding_set()
    assert added >= caps.RUNTIME_CAPS
    assert set(added) <= set(caps.CAP_NUMBERS)
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == set(NEEDED_HOST_PATHS)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert {v["name"] for v in spec["volumes"]} == set(mounts)
    for v in spec["volumes"]:
        path = v["hostPath"]["path"]
        writable = path in ("/sys/fs/bpf", "/proc/sys", "/run/pybpftune")
        assert bool(mounts[v["name"]].get("readOnly")) is not writable, path
    env = {e["name"]: e for e in container["env"]}
    assert env["PYBPFTUNE_PROC_SYS"]["value"] == mounts["proc-sys"]["mountPath"]


def test_daemonset_scrape_annotations_probe_and_entry_point() -> None:
    ds = daemonset()
    notes = ds["spec"]["template"]["metadata"]["annotations"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    port = args[args.index("--metrics") + 1].rsplit(":", 1)[1]
    assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
    assert container["ports"][0]["containerPort"] == int(port)
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["bpftune", "-q"], "readiness asks the daemon's query interface"
    assert "command" not in container, "the image's entry point (the CLI) is used"


def test_image_entry_point_is_the_cli() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    entry = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert len(entry) == 1 and json.loads(entry[0]) == ["bpftune"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bpftune"] == "pybpftune.console:entry"  # the CLI, with a click-free daemon path
    assert re.search(r"^RUN pip install .*pybpftune-\*manylinux\*", text, re.M), "the image installs the wheel"
    assert re.search(r"^FROM \S*python:3\.11", text, re.M), "the wheel is built for CPython 3.11"


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "pybpftune-dashboard.json").read_text())
    source = (ROOT / "src" / "pybpftune" / "metrics.py").read_text()
    families = set(re.findall(r'"(bpftune_[a-z_]+)"', source))
    exported = (
        families | {f"{f}_total" for f in families} | {"process_cpu_seconds_total", "process_resident_memory_bytes"}
    )
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:bpftune|process)_[a-z_]+)\b", e)}
    assert used and used <= exported, used - exported
    titles = [p["title"] for p in dash["panels"]]
    assert "Changes per tuner" in titles
    per_tuner = next(p for p in dash["panels"] if p["title"] == "Changes per tuner")
    assert (
        "sum by (tuner)" in per_tuner["targets"][0]["expr"]
        and "bpftune_changes_total" in per_tuner["targets"][0]["expr"]
    )
