//! Kubernetes discovery: each agent publishes its node's `EncNode` (cluster-scoped, named
//! after the node) and watches everyone else's.
//!
//! The watcher keeps the listed objects as plain data, turns them into a peer set with the
//! rules of [`super::validate_candidates`], and sends the set when it changes. List and watch
//! failures are retried by kube's watcher with backoff (a `410 Gone` relists); the last good
//! peer set stays in force meanwhile. The API server is trusted only for "who should exist
//! and where": keys come from the mutual-TLS control channel, whose certificate checks use
//! the name and address an entry gives, so a forged entry cannot pass them.

use super::{Candidate, PeerSet, validate_candidates};
use crate::Error;
use crate::app::Shared;
use crate::config::{KubernetesDiscovery, NodeConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Field manager of the agent's server-side apply.
pub const FIELD_MANAGER: &str = "enc-agent";

/// What one node's agent publishes about itself: where it is and what it runs. Discovery
/// data only; nothing here is trusted for keys or identity.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "enc.dev",
    version = "v1alpha1",
    kind = "EncNode",
    plural = "encnodes",
    shortname = "encn",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.underlayAddresses[0]"}"#,
    printcolumn = r#"{"name":"Pod CIDR","type":"string","jsonPath":".spec.podCIDRs[0]"}"#,
    printcolumn = r#"{"name":"Backends","type":"string","jsonPath":".spec.backends[0]"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".spec.epoch"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EncNodeSpec {
    /// Underlay addresses of the node (its certificate carries them as IP SANs).
    pub underlay_addresses: Vec<String>,
    /// Pod CIDRs of the node.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// `address:port` of the node's control listener.
    pub control_endpoint: String,
    /// SHA-256 (hex) of the DER of the node's certificate; informative only.
    #[serde(default)]
    pub certificate_fingerprint: String,
    /// Encryption backends the node runs, as `type/implementation` (e.g. `wireguard/boringtun`).
    #[serde(default)]
    pub backends: Vec<String>,
    /// Highest outbound key epoch the node uses with any peer.
    #[serde(default)]
    pub epoch: u32,
}

/// The CustomResourceDefinition of [`EncNode`] as YAML (the chart's `crds/` holds a copy that
/// a test keeps equal to this).
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&EncNode::crd()).unwrap_or_default()
}

/// The discovery candidate an object describes.
pub fn candidate(obj: &EncNode) -> Candidate {
    Candidate {
        name: obj.name_any(),
        underlay_addresses: obj.spec.underlay_addresses.clone(),
        pod_cidrs: obj.spec.pod_cidrs.clone(),
        control_endpoint: Some(obj.spec.control_endpoint.clone()),
        fingerprint: Some(obj.spec.certificate_fingerprint.clone()),
    }
}

/// Watches `EncNode` objects through `api` and sends the peer set they describe on `tx`
/// whenever it changes (after the initial list is complete, then on every add, update and
/// delete). Rejected entries are logged once per distinct reason. Runs until `tx` has no
/// receiver.
pub async fn watch_peers(
    api: Api<EncNode>,
    local: NodeConfig,
    tx: tokio::sync::watch::Sender<PeerSet>,
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut nodes: BTreeMap<String, EncNode> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, EncNode>> = None;
    let mut reported: BTreeSet<super::Rejected> = BTreeSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => {
                debug!("listing EncNode objects");
                listing = Some(BTreeMap::new());
                continue;
            }
            Ok(Event::InitApply(obj)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(obj.name_any(), obj);
                }
                continue;
            }
            Ok(Event::InitDone) => nodes = listing.take().unwrap_or_default(),
            Ok(Event::Apply(obj)) => {
                nodes.insert(obj.name_any(), obj);
            }
            Ok(Event::Delete(obj)) => {
                nodes.remove(&obj.name_any());
            }
            Err(e) => {
                warn!(error = %crate::app::format_chain(&e), "watching EncNode objects failed; retrying, the last peer set stays");
                continue;
            }
        }
        let candidates: Vec<Candidate> = nodes.values().map(candidate).collect();
        let incumbents: BTreeSet<String> = tx.borrow().iter().map(|p| p.name.clone()).collect();
        let (peers, rejected) = validate_candidates(&local, &candidates, &incumbents);
        let rejected: BTreeSet<_> = rejected.into_iter().collect();
        for r in rejected.difference(&reported) {
            warn!(entry = %r.name, field = %r.field, value = %r.value, reason = %r.reason, "EncNode entry refused");
        }
        reported = rejected;
        tx.send_if_modified(|cur| {
            if *cur == peers {
                return false;
            }
            *cur = peers;
            true
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// The `EncNode` this node publishes, from its configuration, identity and key state.
pub fn own_spec(shared: &Shared) -> EncNodeSpec {
    let c = &shared.config;
    let epoch = shared
        .table()
        .iter()
        .filter_map(|e| e.outbound)
        .map(|e| e.0)
        .max()
        .unwrap_or(0);
    EncNodeSpec {
        underlay_addresses: vec![c.node.underlay_address.to_string()],
        pod_cidrs: vec![c.node.pod_cidr.to_string()],
        control_endpoint: c.control.listen.to_string(),
        certificate_fingerprint: shared.identity().info().sha256_fingerprint.clone(),
        backends: vec![format!(
            "{}/{}",
            shared.crypto.type_name(),
            shared.crypto.implementation()
        )],
        epoch,
    }
}

/// Publishes `spec` as the `EncNode` called `name` (server-side apply, forced: this agent
/// owns its node's entry).
pub async fn publish(api: &Api<EncNode>, name: &str, spec: EncNodeSpec) -> Result<(), Error> {
    let obj = EncNode::new(name, spec);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error::Kube {
        context: format!("publishing EncNode {name}"),
        source,
    })
}

/// Publishes this node's `EncNode` at start and again whenever it changed (a renewed
/// certificate, a new epoch), checking every `every`; a failed publish is retried at the next
/// check.
async fn publish_loop(api: Api<EncNode>, shared: Arc<Shared>, every: Duration) {
    let name = shared.config.node.name.clone();
    let mut last: Option<EncNodeSpec> = None;
    loop {
        let spec = own_spec(&shared);
        if last.as_ref() != Some(&spec) {
            match publish(&api, &name, spec.clone()).await {
                Ok(()) => {
                    debug!(node = %name, epoch = spec.epoch, "EncNode published");
                    last = Some(spec);
                }
                Err(e) => {
                    warn!(error = %crate::app::format_chain(&e), "publishing this node's EncNode failed; retrying")
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn client() -> Result<Client, Error> {
    enc_certs::install_crypto_provider();
    Client::try_default().await.map_err(|source| Error::Kube {
        context: "connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)"
            .into(),
        source,
    })
}

/// The `spec.podCIDRs` (else `spec.podCIDR`) of the Node called `name`.
pub async fn node_pod_cidrs(name: &str) -> Result<Vec<String>, Error> {
    let client = client().await?;
    pod_cidrs_of(&Api::<Node>::all(client), name).await
}

/// The pod CIDRs of Node `name` through `api`.
pub async fn pod_cidrs_of(api: &Api<Node>, name: &str) -> Result<Vec<String>, Error> {
    let node = api.get(name).await.map_err(|source| Error::Kube {
        context: format!("reading Node {name} for its spec.podCIDRs"),
        source,
    })?;
    let spec = node.spec.unwrap_or_default();
    Ok(match spec.pod_cidrs {
        Some(c) if !c.is_empty() => c,
        _ => spec.pod_cidr.into_iter().collect(),
    })
}

/// Starts Kubernetes discovery: the `EncNode` watcher and the publisher of this node's entry.
pub async fn start(
    shared: &Arc<Shared>,
    k: &KubernetesDiscovery,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<tokio::sync::watch::Receiver<PeerSet>, Error> {
    let api: Api<EncNode> = Api::all(client().await?);
    let (tx, rx) = tokio::sync::watch::channel(PeerSet::new());
    info!(node = %shared.config.node.name, publish_interval = %humantime::format_duration(k.publish_interval), "Kubernetes discovery: watching EncNode objects");
    tasks.spawn(watch_peers(api.clone(), shared.config.node.clone(), tx));
    tasks.spawn(publish_loop(api, shared.clone(), k.publish_interval));
    Ok(rx)
}
