"""Renders and lints the enc Helm chart with the Helm SDK (helm-python-sdk, Helm's Go SDK
through a bundled shared library: no helm binary, no cluster) for several value sets, and
validates every rendered manifest with kubernetes-validate against Kubernetes 1.33 in strict
mode. The agent configuration each value set renders is compared with the fixtures in
deploy/tests/fixtures/, which enc-agent's tests parse with the agent's own Config::parse, so
the chart and the agent cannot drift apart silently. ENC_UPDATE_FIXTURES=1 rewrites them.

Run: python3 -m pytest deploy/tests -q
"""

import os
import pathlib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "enc"
FIXTURES = ROOT / "deploy" / "tests" / "fixtures"
KUBE = "1.33.0"

CASES = {
    "defaults": {},
    "wireguard": {"encryption": {"enabled": True}},
    "ipsec": {"encryption": {"enabled": True, "type": "ipsec", "strictMode": False}},
    "ipsec-udp": {"encryption": {"enabled": True, "type": "ipsec", "strictMode": False,
                                 "ipsec": {"implementation": "userspace", "encapsulation": "udp"}}},
    "geneve": {"encryption": {"enabled": True}, "tunnel": {"protocol": "geneve"}},
    "direct": {"encryption": {"enabled": True, "rotation": {"interval": "1h"}}, "tunnel": {"protocol": "disabled"}},
    "hostpath-certs": {"certs": {"mode": "hostPath", "hostPath": {"dir": "/etc/enc/tls"}}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
}


def render(values):
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    out = chart.render(values, name="enc", namespace="kube-system", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    for crd in chart.crds:
        docs.extend(d for d in yaml.safe_load_all(crd["data"]) if d)
    return docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_is_clean(case):
    report = helm.lint(str(CHART), CASES[case], strict=True, kube_version="v" + KUBE)
    assert report["errors"] == [], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate_against_kubernetes_1_33_strict(case):
    docs, _ = render(CASES[case])
    kinds = sorted({d["kind"] for d in docs})
    assert {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
            "Service", "CustomResourceDefinition"} <= set(kinds), kinds
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            # Not a Kubernetes kind: kubernetes-validate has no schema for it.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(d, KUBE, strict=True)
            assert d["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(d, KUBE, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_agent_config_matches_the_fixture_the_agent_parses(case):
    docs, _ = render(CASES[case])
    (cm,) = by_kind(docs, "ConfigMap")
    text = cm["data"]["agent.yaml"]
    fixture = FIXTURES / f"agent-{case}.yaml"
    if os.environ.get("ENC_UPDATE_FIXTURES") == "1":
        fixture.write_text(text)
    assert fixture.exists(), f"missing {fixture}; run with ENC_UPDATE_FIXTURES=1"
    assert text == fixture.read_text(), f"{fixture} is stale; run with ENC_UPDATE_FIXTURES=1"


def test_encryption_flag_switches_the_agent_config():
    off, _ = render({})
    on, _ = render({"encryption": {"enabled": True}})
    cfg = lambda docs: yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
    assert cfg(off)["encryption"] == {"type": "none"}
    assert cfg(on)["encryption"]["type"] == "wireguard"
    assert cfg(on)["encryption"]["strictMode"] is True
    assert cfg(on)["discovery"]["kind"] == "kubernetes"


def test_esp_in_udp_needs_the_userspace_engine():
    docs, _ = render(CASES["ipsec-udp"])
    cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
    assert cfg["encryption"]["ipsec"] == {"implementation": "userspace", "encapsulation": "udp"}
    chart = helm.Chart.load(str(CHART))
    for implementation in ["auto", "kernel"]:
        values = {"encryption": {"enabled": True, "type": "ipsec",
                                 "ipsec": {"implementation": implementation, "encapsulation": "udp"}}}
        with pytest.raises(helm.HelmError) as e:
            chart.render(values, name="enc", namespace="kube-system", is_install=True)
        assert "implementation userspace" in str(e.value)


def test_daemonset_is_host_network_with_only_the_capabilities_it_needs():
    docs, _ = render({"encryption": {"enabled": True}})
    (ds,) = by_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (agent,) = spec["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "BPF"]}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"] if "valueFrom" in e}
    assert env == {"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}
    paths = sorted(v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v)
    assert paths == ["/dev/net/tun", "/run/enc", "/sys/fs/bpf", "/var/lib/enc"]
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_rbac_grants_only_what_the_agent_uses():
    docs, _ = render({})
    (role,) = by_kind(docs, "ClusterRole")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("",), ("nodes",)): ["get"],
        (("enc.dev",), ("encnodes",)): ["create", "get", "list", "patch", "watch"],
    }


def test_notes_say_how_to_check_status():
    _, out = render({"encryption": {"enabled": True}})
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "encctl status" in notes and "kubectl get encnodes" in notes


@pytest.mark.parametrize("values, where", [
    ({"encryption": {"enabeld": True}}, "enabeld"),
    ({"encryption": {"enabled": "yes"}}, "enabled"),
    ({"encryption": {"type": "openvpn"}}, "type"),
    ({"tunnel": {"protocol": "gre"}}, "protocol"),
    ({"tunel": {"protocol": "vxlan"}}, "tunel"),
    ({"metrics": {"port": 0}}, "port"),
    ({"certs": {"mode": "certManager"}}, "mode"),
    ({"encryption": {"rotation": {"interval": "daily"}}}, "interval"),
    ({"resources": {"limits": {"memroy": "1Gi"}}}, "memroy"),
])
def test_schema_refuses_unknown_misspelt_and_mistyped_values(values, where):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert where in str(e.value)
    # Rendering refuses them too (what `helm install --set` does).
    with pytest.raises(helm.HelmError):
        chart.render(values, name="enc", namespace="kube-system", is_install=True)
