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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn mock_client() -> (Client, Handle) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), handle)
    }

    fn local() -> NodeConfig {
        NodeConfig {
            name: "node-2".into(),
            underlay_address: "10.0.0.2".parse().unwrap(),
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
        }
    }

    /// An EncNode as the API server returns it.
    fn obj(name: &str, rv: u32, addr: &str, cidr: &str) -> serde_json::Value {
        json!({
            "apiVersion": "enc.dev/v1alpha1",
            "kind": "EncNode",
            "metadata": {
                "name": name,
                "uid": format!("0d3c5f5e-0000-4000-8000-{rv:012}"),
                "resourceVersion": rv.to_string(),
                "generation": 1,
                "creationTimestamp": "2025-06-01T10:00:00Z",
                "managedFields": [{
                    "manager": "enc-agent", "operation": "Apply", "apiVersion": "enc.dev/v1alpha1",
                    "time": "2025-06-01T10:00:00Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:epoch": {}}}
                }]
            },
            "spec": {
                "underlayAddresses": [addr],
                "podCIDRs": [cidr],
                "controlEndpoint": format!("{addr}:51871"),
                "certificateFingerprint": "ab".repeat(32),
                "backends": ["wireguard/boringtun"],
                "epoch": 3
            }
        })
    }

    fn list(rv: u32, items: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "enc.dev/v1alpha1",
            "kind": "EncNodeList",
            "metadata": {"resourceVersion": rv.to_string(), "continue": ""},
            "items": items
        }))
        .unwrap()
    }

    /// A watch response body: one JSON event per line, as the API server streams them.
    fn events(evs: Vec<(&str, serde_json::Value)>) -> Vec<u8> {
        let mut body = Vec::new();
        for (ty, object) in evs {
            serde_json::to_writer(&mut body, &json!({"type": ty, "object": object})).unwrap();
            body.push(b'\n');
        }
        body
    }

    fn bookmark(rv: u32) -> serde_json::Value {
        json!({
            "kind": "EncNode",
            "apiVersion": "enc.dev/v1alpha1",
            "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}
        })
    }

    fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code
        })
    }

    /// Answers the next request with `code` and `body`; returns the request's path and query.
    async fn serve(handle: &mut Handle, code: u16, body: Vec<u8>) -> String {
        let (req, send) = tokio::time::timeout(Duration::from_secs(20), handle.next_request())
            .await
            .expect("the watcher sent no request")
            .expect("service dropped");
        let uri = req.uri().to_string();
        send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        );
        uri
    }

    fn query(uri: &str) -> BTreeMap<String, String> {
        uri.split_once('?')
            .map(|(_, q)| q)
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    async fn wait_for(rx: &mut tokio::sync::watch::Receiver<PeerSet>, want: &[(&str, &str, &str)]) {
        let view = |s: &PeerSet| -> Vec<(String, String, String)> {
            s.iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.underlay_address.to_string(),
                        p.pod_cidr.to_string(),
                    )
                })
                .collect()
        };
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
            .collect();
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if view(&rx.borrow_and_update()) == want {
                    return;
                }
                rx.changed().await.expect("watcher ended");
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "peer set {:?}, want {want:?}",
            view(&rx.borrow())
        );
    }

    #[tokio::test]
    async fn watcher_follows_list_watch_bookmarks_errors_and_relists() {
        let (client, mut handle) = mock_client();
        let (tx, mut rx) = tokio::sync::watch::channel(PeerSet::new());
        let task = tokio::spawn(watch_peers(Api::all(client), local(), tx));

        // 1. The initial list; this node's own entry is not a peer.
        let uri = serve(
            &mut handle,
            200,
            list(
                100,
                vec![
                    obj("node-1", 90, "10.0.0.1", "10.244.1.0/24"),
                    obj("node-2", 91, "10.0.0.2", "10.244.2.0/24"),
                    obj("node-3", 92, "10.0.0.3", "10.244.3.0/24"),
                ],
            ),
        )
        .await;
        assert!(uri.starts_with("/apis/enc.dev/v1alpha1/encnodes?"), "{uri}");
        assert!(!query(&uri).contains_key("watch"), "{uri}");
        wait_for(
            &mut rx,
            &[
                ("node-1", "10.0.0.1", "10.244.1.0/24"),
                ("node-3", "10.0.0.3", "10.244.3.0/24"),
            ],
        )
        .await;

        // 2. A watch from the list's version: an add, an update, a bookmark, then the
        // server closes the stream (its timeout).
        let uri = serve(
            &mut handle,
            200,
            events(vec![
                ("ADDED", obj("node-4", 101, "10.0.0.4", "10.244.4.0/24")),
                ("MODIFIED", obj("node-3", 102, "10.0.0.3", "10.244.33.0/24")),
                ("BOOKMARK", bookmark(105)),
            ]),
        )
        .await;
        let q = query(&uri);
        assert_eq!(q.get("watch").map(String::as_str), Some("true"), "{uri}");
        assert_eq!(q.get("resourceVersion").map(String::as_str), Some("100"));
        assert_eq!(
            q.get("allowWatchBookmarks").map(String::as_str),
            Some("true")
        );
        wait_for(
            &mut rx,
            &[
                ("node-1", "10.0.0.1", "10.244.1.0/24"),
                ("node-3", "10.0.0.3", "10.244.33.0/24"),
                ("node-4", "10.0.0.4", "10.244.4.0/24"),
            ],
        )
        .await;

        // 3. The watch resumes from the bookmark; the server fails it once (500), and the
        // watcher retries from the same version: the peer set stays meanwhile.
        let uri = serve(
            &mut handle,
            500,
            serde_json::to_vec(&status(
                500,
                "InternalError",
                "etcdserver: request timed out",
            ))
            .unwrap(),
        )
        .await;
        assert_eq!(
            query(&uri).get("resourceVersion").map(String::as_str),
            Some("105")
        );
        assert_eq!(rx.borrow().len(), 3);
        let uri = serve(
            &mut handle,
            200,
            events(vec![
                ("DELETED", obj("node-4", 106, "10.0.0.4", "10.244.4.0/24")),
                (
                    "ERROR",
                    status(410, "Expired", "too old resource version: 105 (150)"),
                ),
            ]),
        )
        .await;
        assert_eq!(
            query(&uri).get("resourceVersion").map(String::as_str),
            Some("105")
        );
        wait_for(
            &mut rx,
            &[
                ("node-1", "10.0.0.1", "10.244.1.0/24"),
                ("node-3", "10.0.0.3", "10.244.33.0/24"),
            ],
        )
        .await;

        // 4. 410 Gone: the watcher relists; node-3 vanished while we were away, node-5 came.
        let uri = serve(
            &mut handle,
            200,
            list(
                200,
                vec![
                    obj("node-1", 90, "10.0.0.1", "10.244.1.0/24"),
                    obj("node-5", 180, "10.0.0.5", "10.244.5.0/24"),
                ],
            ),
        )
        .await;
        assert!(
            !query(&uri).contains_key("watch"),
            "a relist, not a watch: {uri}"
        );
        wait_for(
            &mut rx,
            &[
                ("node-1", "10.0.0.1", "10.244.1.0/24"),
                ("node-5", "10.0.0.5", "10.244.5.0/24"),
            ],
        )
        .await;
        let uri = serve(&mut handle, 200, Vec::new()).await;
        assert_eq!(
            query(&uri).get("resourceVersion").map(String::as_str),
            Some("200")
        );
        task.abort();
    }

    #[tokio::test]
    async fn entries_that_break_the_rules_are_left_out() {
        let (client, mut handle) = mock_client();
        let (tx, mut rx) = tokio::sync::watch::channel(PeerSet::new());
        let task = tokio::spawn(watch_peers(Api::all(client), local(), tx));
        let mut clash = obj("node-0", 95, "10.0.0.9", "10.244.1.128/25");
        clash["spec"]["controlEndpoint"] = json!("10.0.0.9:51871");
        serve(
            &mut handle,
            200,
            list(
                100,
                vec![obj("node-1", 90, "10.0.0.1", "10.244.1.0/24"), clash],
            ),
        )
        .await;
        // node-0 sorts first, but overlaps node-1; with neither incumbent, name order wins.
        wait_for(&mut rx, &[("node-0", "10.0.0.9", "10.244.1.128/25")]).await;
        // Deleting node-0 lets node-1 in.
        serve(
            &mut handle,
            200,
            events(vec![(
                "DELETED",
                obj("node-0", 101, "10.0.0.9", "10.244.1.128/25"),
            )]),
        )
        .await;
        wait_for(&mut rx, &[("node-1", "10.0.0.1", "10.244.1.0/24")]).await;
        // A later entry that claims node-1's range does not displace it (incumbent).
        serve(
            &mut handle,
            200,
            events(vec![(
                "ADDED",
                obj("node-00", 102, "10.0.0.8", "10.244.1.0/24"),
            )]),
        )
        .await;
        serve(&mut handle, 200, Vec::new()).await;
        wait_for(&mut rx, &[("node-1", "10.0.0.1", "10.244.1.0/24")]).await;
        task.abort();
    }

    #[tokio::test]
    async fn publish_is_a_forced_server_side_apply_of_the_own_entry() {
        let (client, mut handle) = mock_client();
        let api: Api<EncNode> = Api::all(client);
        let spec = EncNodeSpec {
            underlay_addresses: vec!["10.0.0.2".into()],
            pod_cidrs: vec!["10.244.2.0/24".into()],
            control_endpoint: "10.0.0.2:51871".into(),
            certificate_fingerprint: "cd".repeat(32),
            backends: vec!["ipsec/userspace-esp".into()],
            epoch: 7,
        };
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            let (parts, body) = req.into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let mut answer = obj("node-2", 300, "10.0.0.2", "10.244.2.0/24");
            answer["spec"] = sent["spec"].clone();
            send.send_response(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            (parts, sent)
        });
        publish(&api, "node-2", spec).await.unwrap();
        let (parts, sent) = server.await.unwrap();
        assert_eq!(parts.method, http::Method::PATCH);
        assert_eq!(parts.uri.path(), "/apis/enc.dev/v1alpha1/encnodes/node-2");
        let q = query(&parts.uri.to_string());
        assert_eq!(
            q.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(q.get("force").map(String::as_str), Some("true"));
        assert_eq!(
            parts.headers.get("content-type").unwrap(),
            "application/apply-patch+yaml"
        );
        assert_eq!(sent["apiVersion"], "enc.dev/v1alpha1");
        assert_eq!(sent["kind"], "EncNode");
        assert_eq!(sent["metadata"]["name"], "node-2");
        assert_eq!(sent["spec"]["podCIDRs"], json!(["10.244.2.0/24"]));
        assert_eq!(sent["spec"]["controlEndpoint"], "10.0.0.2:51871");
        assert_eq!(sent["spec"]["epoch"], 7);
    }

    #[tokio::test]
    async fn pod_cidrs_come_from_the_node_object() {
        let (client, mut handle) = mock_client();
        let api: Api<Node> = Api::all(client);
        let server = tokio::spawn(async move {
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-2", "resourceVersion": "5"},
                "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}
            });
            let uri = serve(&mut handle, 200, serde_json::to_vec(&node).unwrap()).await;
            let missing =
                serde_json::to_vec(&status(404, "NotFound", "nodes \"node-9\" not found")).unwrap();
            (uri, serve(&mut handle, 404, missing).await)
        });
        assert_eq!(
            pod_cidrs_of(&api, "node-2").await.unwrap(),
            ["10.244.2.0/24", "fd00:10:244:2::/64"]
        );
        let err = pod_cidrs_of(&api, "node-9").await.unwrap_err();
        assert!(err.to_string().contains("Node node-9"), "{err}");
        let (first, _) = server.await.unwrap();
        assert_eq!(first, "/api/v1/nodes/node-2");
    }

    #[test]
    fn the_chart_crd_is_the_generated_one() {
        let committed = include_str!("../../../deploy/helm/enc/crds/encnodes.enc.dev.yaml");
        let generated = crd_yaml();
        assert!(
            committed.ends_with(&generated),
            "deploy/helm/enc/crds/encnodes.enc.dev.yaml is stale; regenerate it with\n  cargo test -p enc-agent the_chart_crd_regenerate -- --ignored"
        );
    }

    /// Writes the CRD into the chart (run with `--ignored` after changing [`EncNodeSpec`]).
    #[test]
    #[ignore = "regenerates deploy/helm/enc/crds/encnodes.enc.dev.yaml"]
    fn the_chart_crd_regenerate() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/helm/enc/crds/encnodes.enc.dev.yaml"
        );
        let header = "# Generated from enc-agent's EncNodeSpec (enc-agent/src/discovery/kube.rs) by\n# `cargo test -p enc-agent the_chart_crd_regenerate -- --ignored`; a test keeps it in step.\n";
        std::fs::write(path, format!("{header}{}", crd_yaml())).unwrap();
    }
}
