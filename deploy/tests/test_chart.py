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
    "casecret-certs": {"certs": {"mode": "caSecret"}},
    "issuer-tuned": {"encryption": {"enabled": True}, "certs": {"issuer": {
        "certLifetime": "12h", "renewAt": "60%", "port": 8946, "audience": "enc.example/issuer",
        "tokenExpirationSeconds": 3600, "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]}}},
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
    cm = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-agent")
    text = cm["data"]["agent.yaml"]
    fixture = FIXTURES / f"agent-{case}.yaml"
    if os.environ.get("ENC_UPDATE_FIXTURES") == "1":
        fixture.write_text(text)
    assert fixture.exists(), f"missing {fixture}; run with ENC_UPDATE_FIXTURES=1"
    assert text == fixture.read_text(), f"{fixture} is stale; run with ENC_UPDATE_FIXTURES=1"


def test_encryption_flag_switches_the_agent_config():
    off, _ = render({})
    on, _ = render({"encryption": {"enabled": True}})
    cfg = lambda docs: yaml.safe_load(next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-agent")["data"]["agent.yaml"])
    assert cfg(off)["encryption"] == {"type": "none"}
    assert cfg(on)["encryption"]["type"] == "wireguard"
    assert cfg(on)["encryption"]["strictMode"] is True
    assert cfg(on)["discovery"]["kind"] == "kubernetes"


def test_esp_in_udp_renders_with_every_implementation():
    docs, _ = render(CASES["ipsec-udp"])
    cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
    assert cfg["encryption"]["ipsec"] == {"implementation": "userspace", "encapsulation": "udp"}
    # The kernel XFRM backend does ESP in UDP too (XFRMA_ENCAP and a UDP_ENCAP socket).
    for implementation in ["auto", "kernel"]:
        values = {"encryption": {"enabled": True, "type": "ipsec",
                                 "ipsec": {"implementation": implementation, "encapsulation": "udp"}}}
        docs, _ = render(values)
        cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
        assert cfg["encryption"]["ipsec"] == {"implementation": implementation,
                                              "encapsulation": "udp"}
    # Raw ESP writes no encapsulation line (the agent's default).
    docs, _ = render(CASES["ipsec"])
    cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
    assert "encapsulation" not in cfg["encryption"]["ipsec"]


def test_daemonset_is_host_network_with_only_the_capabilities_it_needs():
    docs, _ = render({"encryption": {"enabled": True}, "certs": {"mode": "caSecret"}})
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


def rules_of(role):
    return {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}


def test_rbac_grants_only_what_the_agent_and_the_issuer_use():
    docs, _ = render({})
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert sorted(roles) == ["enc-agent", "enc-issuer"]
    assert rules_of(roles["enc-agent"]) == {
        (("",), ("nodes",)): ["get"],
        (("enc.dev",), ("encnodes",)): ["create", "get", "list", "patch", "watch"],
    }
    assert rules_of(roles["enc-issuer"]) == {
        (("authentication.k8s.io",), ("tokenreviews",)): ["create"],
        (("",), ("nodes",)): ["get"],
    }
    # Each role is bound to its own ServiceAccount only.
    bindings = {b["metadata"]["name"]: b for b in by_kind(docs, "ClusterRoleBinding")}
    assert sorted(bindings) == ["enc-agent", "enc-issuer"]
    for name, b in bindings.items():
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}]
    # No Role grants Secrets, and nothing else is namespaced RBAC.
    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []
    # Other modes have no issuer and no TokenReview permission.
    for mode in ("caSecret", "hostPath"):
        docs, _ = render({"certs": {"mode": mode}})
        assert [r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")] == ["enc-agent"]
        assert by_kind(docs, "Deployment") == []


def references_secret(obj, name):
    """Whether any part of a manifest names Secret `name` (volumes, env, envFrom, projections)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("secretName",) and v == name:
                return True
            if k in ("secret", "secretRef", "secretKeyRef") and isinstance(v, dict) and v.get("name", v.get("secretName")) == name:
                return True
            if references_secret(v, name):
                return True
    elif isinstance(obj, list):
        return any(references_secret(v, name) for v in obj)
    return False


def test_default_mode_keeps_the_ca_secret_out_of_the_daemonset():
    docs, _ = render({"encryption": {"enabled": True}})
    (ds,) = by_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    # No container, init container or volume of the DaemonSet refers to the CA Secret.
    assert not references_secret(ds, "enc-ca")
    assert "initContainers" not in spec
    assert all("secret" not in v for v in spec["volumes"])
    (agent,) = spec["containers"]
    assert "envFrom" not in agent and all("valueFrom" not in e or "secretKeyRef" not in e["valueFrom"] for e in agent["env"])
    vols = {v["name"]: v for v in spec["volumes"]}
    # The CA certificate comes from a ConfigMap, the key pair is written to memory.
    assert vols["ca-cert"]["configMap"] == {"name": "enc-ca-cert", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert vols["tls"]["emptyDir"]["medium"] == "Memory"
    # A projected token for the issuer's audience, short-lived.
    (src,) = vols["issuer-token"]["projected"]["sources"]
    assert src == {"serviceAccountToken": {"audience": "enc-issuer", "expirationSeconds": 600, "path": "token"}}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["issuer-token"] == {"name": "issuer-token", "mountPath": "/var/run/secrets/enc", "readOnly": True}
    assert mounts["ca-cert"]["readOnly"] is True
    assert "readOnly" not in mounts["tls"]
    # The agent's configuration enrols with that token and renews with the issuer Service.
    cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["agent.yaml"])
    issuer = "enc-issuer.kube-system.svc:7946"
    assert cfg["tls"]["enrolment"] == {"issuer": issuer, "serviceAccountTokenFile": "/var/run/secrets/enc/token"}
    assert cfg["tls"]["renewal"] == {"issuer": issuer, "at": "50%"}
    assert cfg["tls"]["ca"] == "/etc/enc/ca/ca.crt"
    # The DaemonSet's ServiceAccount is not the issuer's.
    assert spec["serviceAccountName"] == "enc-agent"


def test_the_issuer_deployment_alone_mounts_the_ca_secret():
    docs, _ = render({})
    (dep,) = by_kind(docs, "Deployment")
    assert dep["metadata"]["name"] == "enc-issuer" and dep["spec"]["replicas"] == 1
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "enc-issuer"
    assert references_secret(dep, "enc-ca")
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["ca-secret"]["secret"]["secretName"] == "enc-ca"
    # Only the Deployment refers to it, among everything rendered.
    assert [d["kind"] for d in docs if references_secret(d, "enc-ca")] == ["Deployment"]
    # Non-root, no capabilities, read-only root, no privilege escalation, default seccomp.
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in spec
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}, c["name"]
    (issuer,) = spec["containers"]
    assert issuer["args"] == ["--issuer-only", "--config", "/etc/enc/issuer.yaml"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    # Agents wait for the issuer before serving metrics: a startup probe covers that wait.
    (ds,) = by_kind(docs, "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    assert agent["startupProbe"]["periodSeconds"] * agent["startupProbe"]["failureThreshold"] >= 600
    # Its Service points at it.
    svc = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "enc-issuer")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 7946
    # Its configuration accepts the agents' ServiceAccount for the DaemonSet's audience.
    cm = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-issuer")
    text = cm["data"]["issuer.yaml"]
    fixture = FIXTURES / "issuer-defaults.yaml"
    if os.environ.get("ENC_UPDATE_FIXTURES") == "1":
        fixture.write_text(text)
    assert text == fixture.read_text(), f"{fixture} is stale; run with ENC_UPDATE_FIXTURES=1"
    cfg = yaml.safe_load(text)
    assert cfg["issuer"]["kubernetes"] == {"audience": "enc-issuer", "serviceAccount": "kube-system/enc-agent"}
    assert cfg["serverName"] == "enc-issuer.kube-system.svc"
    # The name and port the agents dial are the issuer's certificate name, Service and port.
    agent = yaml.safe_load(next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-agent")["data"]["agent.yaml"])
    host, port = agent["tls"]["enrolment"]["issuer"].rsplit(":", 1)
    assert host == cfg["serverName"] == f'{svc["metadata"]["name"]}.{svc["metadata"]["namespace"]}.svc'
    assert int(port) == svc["spec"]["ports"][0]["port"] == issuer["ports"][0]["containerPort"]
    assert cfg["issuer"]["listen"].endswith(f":{port}")
    # The token's audience is the one the issuer asks the TokenReview for.
    (ds,) = by_kind(docs, "DaemonSet")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["issuer-token"]["projected"]["sources"][0]["serviceAccountToken"]["audience"] == cfg["issuer"]["kubernetes"]["audience"]
    # And the ServiceAccount it accepts is the DaemonSet's.
    assert cfg["issuer"]["kubernetes"]["serviceAccount"] == f'kube-system/{ds["spec"]["template"]["spec"]["serviceAccountName"]}'


def test_issuer_values_reach_the_manifests():
    docs, _ = render(CASES["issuer-tuned"])
    (ds,) = by_kind(docs, "DaemonSet")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    (src,) = vols["issuer-token"]["projected"]["sources"]
    assert src["serviceAccountToken"]["audience"] == "enc.example/issuer"
    assert src["serviceAccountToken"]["expirationSeconds"] == 3600
    agent = yaml.safe_load(next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-agent")["data"]["agent.yaml"])
    assert agent["tls"]["renewal"] == {"issuer": "enc-issuer.kube-system.svc:8946", "at": "60%"}
    issuer = yaml.safe_load(next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "enc-issuer")["data"]["issuer.yaml"])
    assert issuer["issuer"]["kubernetes"]["audience"] == "enc.example/issuer"
    assert issuer["issuer"]["certLifetime"] == "12h"
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    # Helm merges maps: the default OS selector stays.
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "node-role.kubernetes.io/control-plane": ""}
    assert spec["tolerations"][0]["key"] == "node-role.kubernetes.io/control-plane"


def test_notes_say_how_to_check_status():
    _, out = render({"encryption": {"enabled": True}})
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "encctl status" in notes and "kubectl get encnodes" in notes
    assert "deployment/enc-issuer" in notes and "create configmap enc-ca-cert" in notes
    _, out = render({"certs": {"mode": "caSecret"}})
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "LESS SAFE" in notes


@pytest.mark.parametrize("values, where", [
    ({"encryption": {"enabeld": True}}, "enabeld"),
    ({"encryption": {"enabled": "yes"}}, "enabled"),
    ({"encryption": {"type": "openvpn"}}, "type"),
    ({"tunnel": {"protocol": "gre"}}, "protocol"),
    ({"tunel": {"protocol": "vxlan"}}, "tunel"),
    ({"metrics": {"port": 0}}, "port"),
    ({"certs": {"mode": "certManager"}}, "mode"),
    ({"certs": {"issuer": {"audiance": "x"}}}, "audiance"),
    ({"certs": {"issuer": {"tokenExpirationSeconds": 60}}}, "tokenExpirationSeconds"),
    ({"certs": {"issuer": {"renewAt": "95%"}}}, "renewAt"),
    ({"certs": {"issuer": {"audience": "a b"}}}, "audience"),
    ({"certs": {"mode": "issuer", "issuer": {"caSecret": ""}}}, "caSecret"),
    ({"certs": {"issuer": {"port": "7946"}}}, "port"),
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
