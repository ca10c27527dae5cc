//! Discovery: which peers should exist, and where.
//!
//! A source produces the desired peer set as plain data on a `watch` channel; the agent diffs
//! it against its peer table ([`crate::peers::PeerTable::set_peers`]) and reconciles. Two
//! sources exist: the static `peers:` list of the config file, and `EncNode` objects in the
//! Kubernetes API ([`kube`]). Discovery is never trusted for keys or identity: a peer gets
//! keys only after the mutual-TLS handshake proved, against the cluster CA, that its
//! certificate carries the name and the address discovery gave. A forged entry can make the
//! agent expect a node elsewhere (so that node's traffic stops, fail-closed), never make it
//! send traffic to, or take a key from, anyone but the certified node.

pub mod kube;

use crate::Error;
use crate::app::Shared;
use crate::config::{self, ConfigError, DiscoveryConfig, NodeConfig, PeerConfig};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

/// The peers discovery says should exist.
pub type PeerSet = Vec<PeerConfig>;

/// A peer as a discovery source describes it, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Node name.
    pub name: String,
    /// Underlay addresses; the first of this node's address family is used.
    pub underlay_addresses: Vec<String>,
    /// Pod CIDRs; the first of this node's pod CIDR family is used.
    pub pod_cidrs: Vec<String>,
    /// `address:port` of the control listener (`None`: the default port).
    pub control_endpoint: Option<String>,
    /// SHA-256 of the certificate the peer says it holds (hex).
    pub fingerprint: Option<String>,
}

/// A discovered entry that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    /// The entry's name.
    pub name: String,
    /// The offending field, e.g. `spec.podCIDRs`.
    pub field: String,
    /// Its value.
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: field `{}`: {} (value: {:?})",
            self.name, self.field, self.reason, self.value
        )
    }
}

fn family(ip: IpAddr) -> bool {
    ip.is_ipv4()
}

/// Turns candidates into a peer set with the same rules as the static list: valid names,
/// one address per peer of this node's family, distinct addresses, pod CIDRs that overlap
/// neither this node's nor another peer's, a control endpoint on the peer's underlay address.
/// Conflicts are settled in favour of `incumbents` (peers already expected), then by name, so
/// a new entry can never displace a peer that is already there. This node's own entry is
/// skipped.
pub fn validate_candidates(
    local: &NodeConfig,
    candidates: &[Candidate],
    incumbents: &BTreeSet<String>,
) -> (PeerSet, Vec<Rejected>) {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by(|a, b| {
        (!incumbents.contains(&a.name), &a.name).cmp(&(!incumbents.contains(&b.name), &b.name))
    });
    let mut peers: PeerSet = Vec::new();
    let mut rejected = Vec::new();
    let mut names = BTreeSet::new();
    for c in order {
        if c.name == local.name {
            continue;
        }
        match validate_one(local, c, &peers, &names) {
            Ok(p) => {
                names.insert(p.name.clone());
                peers.push(p);
            }
            Err((field, value, reason)) => rejected.push(Rejected {
                name: c.name.clone(),
                field: field.to_owned(),
                value,
                reason,
            }),
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    (peers, rejected)
}

type Refusal = (&'static str, String, String);

fn validate_one(
    local: &NodeConfig,
    c: &Candidate,
    accepted: &[PeerConfig],
    names: &BTreeSet<String>,
) -> Result<PeerConfig, Refusal> {
    config::check_node_name(&c.name).map_err(|r| ("metadata.name", c.name.clone(), r))?;
    if names.contains(&c.name) {
        return Err(("metadata.name", c.name.clone(), "duplicate name".into()));
    }
    let joined = |v: &[String]| v.join(",");
    let addr = c
        .underlay_addresses
        .iter()
        .filter_map(|a| config::parse_ip("spec.underlayAddresses", a).ok())
        .find(|a| family(*a) == family(local.underlay_address))
        .ok_or_else(|| {
            (
                "spec.underlayAddresses",
                joined(&c.underlay_addresses),
                format!(
                    "no unicast address of this node's family ({})",
                    local.underlay_address
                ),
            )
        })?;
    if addr == local.underlay_address {
        return Err((
            "spec.underlayAddresses",
            addr.to_string(),
            "equals this node's underlay address".into(),
        ));
    }
    if let Some(other) = accepted.iter().find(|p| p.underlay_address == addr) {
        return Err((
            "spec.underlayAddresses",
            addr.to_string(),
            format!("already the address of peer {}", other.name),
        ));
    }
    let cidr: IpNet = c
        .pod_cidrs
        .iter()
        .filter_map(|s| config::parse_cidr("spec.podCIDRs", s).ok())
        .find(|n| family(n.addr()) == family(local.pod_cidr.addr()))
        .ok_or_else(|| {
            (
                "spec.podCIDRs",
                joined(&c.pod_cidrs),
                format!(
                    "no valid pod CIDR of this node's family ({})",
                    local.pod_cidr
                ),
            )
        })?;
    let overlaps =
        |other: &IpNet| other.contains(&cidr.network()) || cidr.contains(&other.network());
    if overlaps(&local.pod_cidr) {
        return Err((
            "spec.podCIDRs",
            cidr.to_string(),
            format!("overlaps this node's pod CIDR {}", local.pod_cidr),
        ));
    }
    if let Some(other) = accepted.iter().find(|p| overlaps(&p.pod_cidr)) {
        return Err((
            "spec.podCIDRs",
            cidr.to_string(),
            format!(
                "overlaps the pod CIDR {} of peer {}",
                other.pod_cidr, other.name
            ),
        ));
    }
    let control_port = match c.control_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => config::DEFAULT_CONTROL_PORT,
        Some(e) => {
            let ep: SocketAddr = e.parse().map_err(|_| {
                (
                    "spec.controlEndpoint",
                    e.to_owned(),
                    "not an address:port".to_owned(),
                )
            })?;
            if ep.ip() != addr || ep.port() == 0 {
                return Err((
                    "spec.controlEndpoint",
                    e.to_owned(),
                    format!(
                        "must be the underlay address {addr} with a non-zero port (peers are recognised by their underlay address)"
                    ),
                ));
            }
            ep.port()
        }
    };
    let fingerprint = c
        .fingerprint
        .as_deref()
        .map(str::trim)
        .filter(|f| !f.is_empty());
    if let Some(f) = fingerprint
        && (f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err((
            "spec.certificateFingerprint",
            f.to_owned(),
            "not a SHA-256 in hex (64 digits)".into(),
        ));
    }
    Ok(PeerConfig {
        name: c.name.clone(),
        underlay_address: addr,
        pod_cidr: cidr,
        control_port,
        fingerprint: fingerprint.map(str::to_ascii_lowercase),
    })
}

/// Starts the configured discovery and returns the peer sets it produces. Static discovery
/// yields the config's `peers:` once; Kubernetes discovery watches `EncNode` objects and
/// publishes this node's own (its tasks run in `tasks`).
pub async fn start(
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<tokio::sync::watch::Receiver<PeerSet>, Error> {
    match &shared.config.discovery {
        DiscoveryConfig::Static => Ok(tokio::sync::watch::channel(shared.config.peers.clone()).1),
        DiscoveryConfig::Kubernetes(k) => kube::start(shared, k, tasks).await,
    }
}

/// What the environment and the API server say about this node, for the `node:` fields a
/// shared (ConfigMap) configuration cannot hold.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    /// This node's name (the downward API's `spec.nodeName`), if known.
    pub name: Option<String>,
    /// This node's underlay address (the downward API's `status.hostIP`), if known.
    pub underlay_address: Option<String>,
    /// The Node object's `spec.podCIDRs`.
    pub pod_cidrs: Vec<String>,
}

/// The `discovery.kind` the file asks for, and its two environment variable names (defaults
/// where unset); `None` for anything but `kubernetes`.
pub fn kubernetes_env(text: &str, path: &Path) -> Result<Option<(String, String)>, ConfigError> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let d = &v["discovery"];
    if d["kind"].as_str() != Some("kubernetes") {
        return Ok(None);
    }
    let get = |k: &str, default: &str| d[k].as_str().unwrap_or(default).to_owned();
    Ok(Some((
        get("nodeNameEnv", config::DEFAULT_NODE_NAME_ENV),
        get("underlayAddressEnv", config::DEFAULT_UNDERLAY_ADDRESS_ENV),
    )))
}

/// Fills `node.name`, `node.underlayAddress` and `node.podCidr` from `facts` where the file
/// leaves them out, and returns the text to parse. The pod CIDR is the first of the Node's
/// that has the underlay address's family (else its first).
pub fn fill_node(text: &str, path: &Path, facts: &NodeFacts) -> Result<String, ConfigError> {
    let parse_err = |source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    };
    let mut v: serde_yaml::Value = serde_yaml::from_str(text).map_err(parse_err)?;
    let Some(root) = v.as_mapping_mut() else {
        return Ok(text.to_owned());
    };
    let node = root
        .entry("node".into())
        .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    let Some(node) = node.as_mapping_mut() else {
        return Ok(text.to_owned());
    };
    let missing = |field: &str, why: &str| ConfigError::Invalid {
        field: field.to_owned(),
        value: String::new(),
        reason: why.to_owned(),
    };
    if !node.contains_key("name") {
        let name = facts.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
            missing(
                "node.name",
                "not set, and the discovery.nodeNameEnv environment variable (downward API spec.nodeName) is empty",
            )
        })?;
        node.insert("name".into(), name.into());
    }
    if !node.contains_key("underlayAddress") {
        let addr = facts
            .underlay_address
            .clone()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                missing(
                    "node.underlayAddress",
                    "not set, and the discovery.underlayAddressEnv environment variable (downward API status.hostIP) is empty",
                )
            })?;
        node.insert("underlayAddress".into(), addr.into());
    }
    if !node.contains_key("podCidr") {
        let v4 = node
            .get("underlayAddress")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .is_none_or(|a| a.is_ipv4());
        let cidr = facts
            .pod_cidrs
            .iter()
            .find(|c| c.contains('.') == v4)
            .or(facts.pod_cidrs.first())
            .ok_or_else(|| {
                missing(
                    "node.podCidr",
                    "not set, and the Node object has no spec.podCIDRs",
                )
            })?;
        node.insert("podCidr".into(), cidr.clone().into());
    }
    serde_yaml::to_string(&v).map_err(parse_err)
}

/// Loads the configuration file. With `discovery.kind: kubernetes`, the `node:` fields the
/// file leaves out come from the environment (the downward API) and from this node's Node
/// object (`spec.podCIDRs`), read from the API server.
pub fn load_config(path: &Path) -> Result<config::Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let Some((name_env, addr_env)) = kubernetes_env(&text, path)? else {
        return Ok(config::Config::parse(&text, path)?);
    };
    let mut facts = NodeFacts {
        name: std::env::var(&name_env).ok(),
        underlay_address: std::env::var(&addr_env).ok(),
        pod_cidrs: Vec::new(),
    };
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let node = &v["node"];
    let name = node["name"]
        .as_str()
        .map(str::to_owned)
        .or(facts.name.clone());
    if node["podCidr"].is_null()
        && let Some(name) = name
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io("start a runtime to read the Node object"))?;
        facts.pod_cidrs = runtime.block_on(kube::node_pod_cidrs(&name))?;
    }
    let filled = fill_node(&text, path, &facts)?;
    Ok(config::Config::parse(&filled, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> NodeConfig {
        NodeConfig {
            name: "node-2".into(),
            underlay_address: "10.0.0.2".parse().unwrap(),
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
        }
    }

    fn cand(name: &str, addr: &str, cidr: &str) -> Candidate {
        Candidate {
            name: name.into(),
            underlay_addresses: vec![addr.into()],
            pod_cidrs: vec![cidr.into()],
            control_endpoint: Some(format!("{addr}:51871")),
            fingerprint: None,
        }
    }

    #[test]
    fn candidates_follow_the_static_rules_and_incumbents_win_conflicts() {
        let mut dual = cand("node-6", "fd00::6", "fd10::/64");
        dual.underlay_addresses.push("10.0.0.6".into());
        dual.pod_cidrs.push("10.244.6.0/24".into());
        dual.control_endpoint = Some("10.0.0.6:6000".into());
        let cs = vec![
            cand("node-2", "10.0.0.2", "10.244.2.0/24"), // this node: skipped
            cand("node-1", "10.0.0.1", "10.244.1.0/24"),
            cand("node-0", "10.0.0.9", "10.244.1.0/25"), // overlaps the incumbent node-1
            cand("node-3", "10.0.0.1", "10.244.3.0/24"), // node-1's address
            cand("node-4", "10.0.0.4", "10.244.2.128/25"), // overlaps this node
            cand("Node_5", "10.0.0.5", "10.244.5.0/24"),
            dual,
        ];
        let incumbents = BTreeSet::from(["node-1".to_owned()]);
        let (peers, rejected) = validate_candidates(&local(), &cs, &incumbents);
        let names: Vec<_> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["node-1", "node-6"]);
        let n6 = &peers[1];
        assert_eq!(n6.underlay_address.to_string(), "10.0.0.6");
        assert_eq!(n6.pod_cidr.to_string(), "10.244.6.0/24");
        assert_eq!(n6.control_port, 6000);
        let fields: Vec<_> = rejected
            .iter()
            .map(|r| (r.name.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("Node_5", "metadata.name"),
                ("node-0", "spec.podCIDRs"),
                ("node-3", "spec.underlayAddresses"),
                ("node-4", "spec.podCIDRs"),
            ]
        );
        assert!(
            rejected[1].to_string().contains("node-1"),
            "{}",
            rejected[1]
        );
        // Without the incumbent, name order decides: node-0 keeps the range.
        let (peers, _) = validate_candidates(&local(), &cs, &BTreeSet::new());
        assert_eq!(peers[0].name, "node-0");
    }

    #[test]
    fn a_control_endpoint_elsewhere_than_the_underlay_address_is_refused() {
        let mut c = cand("node-1", "10.0.0.1", "10.244.1.0/24");
        c.control_endpoint = Some("10.0.0.66:51871".into());
        let (peers, rejected) = validate_candidates(&local(), &[c], &BTreeSet::new());
        assert!(peers.is_empty());
        assert_eq!(rejected[0].field, "spec.controlEndpoint");
        assert_eq!(rejected[0].value, "10.0.0.66:51871");
    }

    /// The agent configurations the Helm chart renders (deploy/tests/fixtures, kept equal to
    /// the chart's output by deploy/tests/test_chart.py) are accepted by the agent.
    #[test]
    fn the_chart_renders_configs_the_agent_accepts() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt", "token"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        // The issuer mode's paths: no certificate yet (enrolment writes it), CA from a
        // ConfigMap, the projected token.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tests/fixtures");
        let facts = NodeFacts {
            name: Some("node-1".into()),
            underlay_address: Some("10.0.0.1".into()),
            pod_cidrs: vec!["10.244.1.0/24".into()],
        };
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&fixtures).unwrap() {
            let path = entry.unwrap().path();
            let raw = std::fs::read_to_string(&path).unwrap();
            if path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .starts_with("issuer-")
            {
                // The issuer Deployment's configuration, with its CA copy in place.
                let ca = dir.path().join("issuer-ca");
                if !ca.exists() {
                    enc_certs::init_ca(&ca, &enc_certs::CaOptions::default()).unwrap();
                }
                let text = raw.replace("/var/lib/enc-issuer/ca", &ca.display().to_string());
                let env = |k: &str| (k == "POD_IP").then(|| "10.96.0.12".to_owned());
                let c = config::StandaloneIssuerConfig::parse_with_env(&text, &path, env)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let k = c.issuer.kubernetes.unwrap();
                assert_eq!(k.username(), "system:serviceaccount:kube-system:enc-agent");
                seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
                continue;
            }
            let issuer_mode = raw.contains("enrolment:");
            let tls_dir = if issuer_mode {
                &empty
            } else {
                &dir.path().to_owned()
            };
            let text = raw
                .replace("/etc/enc/tls/", &format!("{}/", tls_dir.display()))
                .replace("/etc/enc/ca/", &format!("{}/", dir.path().display()))
                .replace(
                    "/var/run/secrets/enc/",
                    &format!("{}/", dir.path().display()),
                );
            let filled = fill_node(&text, &path, &facts).unwrap();
            let c = config::Config::parse(&filled, &path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(matches!(c.discovery, DiscoveryConfig::Kubernetes(_)));
            assert_eq!(c.node.name, "node-1");
            let case = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert_eq!(c.tls.enrolment.is_some(), issuer_mode, "{case}");
            assert_eq!(c.tls.renewal.is_some(), issuer_mode, "{case}");
            let want = match case.as_str() {
                "agent-defaults"
                | "agent-hostpath-certs"
                | "agent-casecret-certs"
                | "agent-servicemonitor" => "none",
                "agent-ipsec" | "agent-ipsec-udp" => "ipsec",
                _ => "wireguard",
            };
            assert_eq!(c.encryption_name(), want, "{case}");
            seen.push(case);
        }
        seen.sort();
        assert!(seen.len() >= 10, "{seen:?}");
        assert!(seen.contains(&"issuer-defaults".to_owned()), "{seen:?}");
    }

    #[test]
    fn node_fields_come_from_the_facts_only_where_the_file_is_silent() {
        let path = Path::new("/x/agent.yaml");
        let facts = NodeFacts {
            name: Some("node-7".into()),
            underlay_address: Some("10.0.0.7".into()),
            pod_cidrs: vec!["fd10::/64".into(), "10.244.7.0/24".into()],
        };
        let text = "discovery: {kind: kubernetes}\ntls: {cert: a}\n";
        let out: serde_yaml::Value =
            serde_yaml::from_str(&fill_node(text, path, &facts).unwrap()).unwrap();
        assert_eq!(out["node"]["name"].as_str(), Some("node-7"));
        assert_eq!(out["node"]["underlayAddress"].as_str(), Some("10.0.0.7"));
        assert_eq!(out["node"]["podCidr"].as_str(), Some("10.244.7.0/24"));
        let text = "node: {name: fixed, podCidr: 10.9.0.0/24}\n";
        let out: serde_yaml::Value =
            serde_yaml::from_str(&fill_node(text, path, &facts).unwrap()).unwrap();
        assert_eq!(out["node"]["name"].as_str(), Some("fixed"));
        assert_eq!(out["node"]["podCidr"].as_str(), Some("10.9.0.0/24"));
        let err = fill_node("{}", path, &NodeFacts::default()).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, .. } if field == "node.name"),
            "{err}"
        );
        let no_cidr = NodeFacts {
            pod_cidrs: vec![],
            ..facts
        };
        let err = fill_node("{}", path, &no_cidr).unwrap_err();
        assert!(err.to_string().contains("node.podCidr"), "{err}");
        assert!(err.to_string().contains("spec.podCIDRs"), "{err}");
        assert_eq!(
            kubernetes_env("discovery: {kind: kubernetes, nodeNameEnv: MY_NODE}", path).unwrap(),
            Some(("MY_NODE".into(), "NODE_IP".into()))
        );
        assert_eq!(kubernetes_env("peers: []", path).unwrap(), None);
    }
}

#[cfg(test)]
mod trust_tests;
