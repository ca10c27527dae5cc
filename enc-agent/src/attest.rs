//! Kubernetes-attested enrolment: the issuer verifies a node's projected ServiceAccount
//! token with the TokenReview API and learns from it which node the token's pod runs on
//! (the model of SPIRE's `k8s_psat` node attestor).
//!
//! - [`check_review`] is the decision, sans-IO: given what the API server answered, is the
//!   token authenticated, for the expected audience, of the agents' ServiceAccount, and bound
//!   to exactly one node with a valid name? Every refusal ([`Refusal`]) names what was wrong
//!   and the value.
//! - [`TokenReviewer`] is the seam to the API server: `create tokenreviews`
//!   (`authentication.k8s.io/v1`, with `spec.audiences`) and `get nodes` (the Node's
//!   addresses, which bound the certificate's IP SANs). [`KubeTokenReviewer`] is the kube-rs
//!   implementation, [`FakeTokenReviewer`] the in-memory one.
//! - [`attest`] runs the two: review, decide, look the node's addresses up.
//!
//! The node name comes from the token's `authentication.kubernetes.io/node-name` extra,
//! which the API server adds to tokens bound to a pod when `ServiceAccountTokenPodNodeInfo`
//! is on (beta and on by default since Kubernetes 1.30). Older API servers do not add it;
//! such tokens are refused ([`Refusal::NoNodeBinding`]).

use crate::config::KubernetesAttestation;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The user extra in which the API server names the node of a token's pod.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The user extra in which the API server names a token's pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Why a ServiceAccount token does not attest a node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// This issuer has no `issuer.kubernetes` section.
    #[error(
        "this issuer does not accept ServiceAccount tokens (issuer.kubernetes is not configured)"
    )]
    NotEnabled,
    /// The request carried an empty token.
    #[error("the ServiceAccount token is empty")]
    EmptyToken,
    /// The API server could not be asked (or its answer could not be read).
    #[error("cannot verify the ServiceAccount token: TokenReview failed: {reason}")]
    ReviewFailed {
        /// The API or transport error.
        reason: String,
    },
    /// The API server did not authenticate the token.
    #[error("the ServiceAccount token is not authenticated by the API server: {error}")]
    NotAuthenticated {
        /// `status.error`, or what was missing.
        error: String,
    },
    /// The answer does not confirm the issuer's audience (`status.audiences`).
    #[error(
        "the ServiceAccount token is not for audience {want:?} (the API server confirmed audiences {got:?})"
    )]
    WrongAudience {
        /// The configured audience.
        want: String,
        /// `status.audiences`.
        got: Vec<String>,
    },
    /// The token belongs to another user than the agents' ServiceAccount.
    #[error("the ServiceAccount token belongs to {got:?}, not to {want:?}")]
    WrongServiceAccount {
        /// `system:serviceaccount:<namespace>:<name>` as configured.
        want: String,
        /// `status.user.username`.
        got: String,
    },
    /// The token names no node: not a token bound to a pod, or an API server without
    /// `ServiceAccountTokenPodNodeInfo`.
    #[error(
        "the ServiceAccount token names no node (no user extra {NODE_NAME_EXTRA}): use a projected token of the agent pod, on Kubernetes 1.30 or later"
    )]
    NoNodeBinding,
    /// The token names more than one node.
    #[error("the ServiceAccount token names {} nodes ({values:?}); it must name one", values.len())]
    AmbiguousNode {
        /// The values of the node-name extra.
        values: Vec<String>,
    },
    /// The node name cannot be a certificate's DNS SAN.
    #[error(
        "the ServiceAccount token names node {node:?}, which is not a valid node name: {reason}"
    )]
    BadNodeName {
        /// The name.
        node: String,
        /// Why it is refused.
        reason: String,
    },
    /// The node's addresses could not be read.
    #[error("cannot read the addresses of node {node}: {reason}")]
    NodeLookup {
        /// The node.
        node: String,
        /// The API or transport error.
        reason: String,
    },
    /// The Node reports no address to put in a certificate.
    #[error("node {node} reports no InternalIP or ExternalIP address in status.addresses")]
    NoNodeAddress {
        /// The node.
        node: String,
    },
}

/// What a verified token says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedNode {
    /// The node the token's pod is bound to.
    pub node: String,
    /// The token's pod, if the API server named it.
    pub pod: Option<String>,
    /// The Node's InternalIP and ExternalIP addresses (empty until [`attest`] looks them up).
    pub ips: Vec<IpAddr>,
}

/// Decides whether a TokenReview answer attests a node for `policy`. Pure.
///
/// In order: `status` is present and `status.authenticated` is true; `status.audiences`
/// contains the configured audience (a TokenReview server that ignores `spec.audiences`
/// does not echo it, and is not trusted); `status.user.username` is
/// `system:serviceaccount:<namespace>:<name>` of the agents; the user extra
/// [`NODE_NAME_EXTRA`] has exactly one value, a valid node name.
pub fn check_review(
    policy: &KubernetesAttestation,
    status: Option<&TokenReviewStatus>,
) -> Result<AttestedNode, Refusal> {
    let status = status.ok_or_else(|| Refusal::NotAuthenticated {
        error: "the TokenReview answer has no status".to_owned(),
    })?;
    if status.authenticated != Some(true) {
        return Err(Refusal::NotAuthenticated {
            error: status
                .error
                .clone()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "status.authenticated is not true".to_owned()),
        });
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.contains(&policy.audience) {
        return Err(Refusal::WrongAudience {
            want: policy.audience.clone(),
            got: audiences,
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let want = policy.username();
    let got = user.username.unwrap_or_default();
    if got != want {
        return Err(Refusal::WrongServiceAccount { want, got });
    }
    let extra = user.extra.unwrap_or_default();
    let node = match extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
        None | Some([]) => return Err(Refusal::NoNodeBinding),
        Some([node]) => node.clone(),
        Some(values) => {
            return Err(Refusal::AmbiguousNode {
                values: values.to_vec(),
            });
        }
    };
    crate::config::check_node_name(&node).map_err(|reason| Refusal::BadNodeName {
        node: node.clone(),
        reason,
    })?;
    let pod = extra.get(POD_NAME_EXTRA).and_then(|v| v.first()).cloned();
    Ok(AttestedNode {
        node,
        pod,
        ips: Vec::new(),
    })
}

/// The addresses of a Node that may appear in its certificate: `status.addresses` of type
/// InternalIP or ExternalIP that parse as IP addresses, in order, without duplicates.
pub fn node_ips(node: &Node) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            && let Ok(ip) = a.address.trim().parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

/// The API calls attestation needs. Errors are the API's or the transport's, in words.
pub trait TokenReviewer: Send + Sync {
    /// Creates a TokenReview of `token` for `audience` and returns its status.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenReviewStatus>, String>>;
    /// Reads the Node `node` and returns [`node_ips`] of it.
    fn node_addresses<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>>;
}

/// Verifies a token and returns the node it attests, with the node's addresses.
pub async fn attest(
    reviewer: &dyn TokenReviewer,
    policy: &KubernetesAttestation,
    token: &str,
) -> Result<AttestedNode, Refusal> {
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::EmptyToken);
    }
    let status = reviewer
        .review(token, &policy.audience)
        .await
        .map_err(|reason| Refusal::ReviewFailed { reason })?;
    let mut attested = check_review(policy, status.as_ref())?;
    let ips = reviewer
        .node_addresses(&attested.node)
        .await
        .map_err(|reason| Refusal::NodeLookup {
            node: attested.node.clone(),
            reason,
        })?;
    if ips.is_empty() {
        return Err(Refusal::NoNodeAddress {
            node: attested.node,
        });
    }
    attested.ips = ips;
    Ok(attested)
}

/// [`TokenReviewer`] over the Kubernetes API with kube-rs (the issuer's in-cluster
/// ServiceAccount needs `create` on `tokenreviews` and `get` on `nodes`).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl KubeTokenReviewer {
    /// Uses `client` for the calls.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenReviewStatus>, String>> {
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(vec![audience.to_owned()]),
                },
                ..Default::default()
            };
            // kube's error names the status and message; it never contains the request body.
            api.create(&kube::api::PostParams::default(), &review)
                .await
                .map(|r| r.status)
                .map_err(|e| e.to_string())
        })
    }

    fn node_addresses<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>> {
        Box::pin(async move {
            let api: kube::Api<Node> = kube::Api::all(self.client.clone());
            api.get(node)
                .await
                .map(|n| node_ips(&n))
                .map_err(|e| e.to_string())
        })
    }
}

/// In-memory [`TokenReviewer`]: answers each known token with its status and each known
/// node with its addresses; anything else is what the API server says of an unknown token
/// (not authenticated) or node (not found). Records the audiences it was asked for.
#[derive(Debug, Default)]
pub struct FakeTokenReviewer {
    tokens: BTreeMap<String, TokenReviewStatus>,
    nodes: BTreeMap<String, Vec<IpAddr>>,
    asked: Mutex<Vec<String>>,
    fail: Option<String>,
}

impl FakeTokenReviewer {
    /// A reviewer that knows nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// `token` reviews as `status`.
    pub fn with_token(mut self, token: &str, status: TokenReviewStatus) -> Self {
        self.tokens.insert(token.to_owned(), status);
        self
    }

    /// `token` is a valid projected token of `username`'s pod `pod` on `node` for `audience`.
    pub fn with_bound_token(
        self,
        token: &str,
        audience: &str,
        username: &str,
        node: &str,
        pod: &str,
    ) -> Self {
        let extra = BTreeMap::from([
            (NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()]),
            (POD_NAME_EXTRA.to_owned(), vec![pod.to_owned()]),
        ]);
        self.with_token(
            token,
            TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(vec![audience.to_owned()]),
                user: Some(k8s_openapi::api::authentication::v1::UserInfo {
                    username: Some(username.to_owned()),
                    extra: Some(extra),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    }

    /// Node `node` has `ips`.
    pub fn with_node(mut self, node: &str, ips: &[IpAddr]) -> Self {
        self.nodes.insert(node.to_owned(), ips.to_vec());
        self
    }

    /// Every call fails with `reason` (the API server is unreachable).
    pub fn failing(mut self, reason: &str) -> Self {
        self.fail = Some(reason.to_owned());
        self
    }

    /// The audiences of the reviews asked for so far.
    pub fn asked_audiences(&self) -> Vec<String> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl TokenReviewer for FakeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenReviewStatus>, String>> {
        Box::pin(async move {
            self.asked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(audience.to_owned());
            if let Some(reason) = &self.fail {
                return Err(reason.clone());
            }
            Ok(Some(self.tokens.get(token).cloned().unwrap_or_else(|| {
                TokenReviewStatus {
                    error: Some(
                        "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
                            .to_owned(),
                    ),
                    user: Some(Default::default()),
                    ..Default::default()
                }
            })))
        })
    }

    fn node_addresses<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>> {
        Box::pin(async move {
            if let Some(reason) = &self.fail {
                return Err(reason.clone());
            }
            self.nodes
                .get(node)
                .cloned()
                .ok_or_else(|| format!("nodes \"{node}\" not found"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::authentication::v1::UserInfo;
    use kube::client::Body;
    use proptest::prelude::*;
    use serde_json::json;
    use tower_test::mock;

    const SA: &str = "system:serviceaccount:kube-system:enc-agent";

    fn policy() -> KubernetesAttestation {
        KubernetesAttestation {
            audience: "enc-issuer".into(),
            namespace: "kube-system".into(),
            service_account: "enc-agent".into(),
        }
    }

    /// A TokenReview status as the API server writes it for a bound projected token.
    fn bound(node: &str) -> serde_json::Value {
        json!({
            "authenticated": true,
            "user": {
                "username": SA,
                "uid": "6f7b6b7e-3a2b-4b8e-9d7c-0a1b2c3d4e5f",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=3c1c6a0e-8f2e-4a3b-9b55-6a8d2f1e7c10"],
                    "authentication.kubernetes.io/node-name": [node],
                    "authentication.kubernetes.io/node-uid": ["a0c4b4f9-5b0e-4d8f-8a2c-6b9e2f3d4c5b"],
                    "authentication.kubernetes.io/pod-name": ["enc-agent-x7k2p"],
                    "authentication.kubernetes.io/pod-uid": ["0d3f7a9e-1c2b-4e5f-8a6b-7c8d9e0f1a2b"]
                }
            },
            "audiences": ["enc-issuer"]
        })
    }

    fn status(v: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_bound_token_of_the_agents_attests_its_node() {
        let a = check_review(&policy(), Some(&status(bound("node-1")))).unwrap();
        assert_eq!(a.node, "node-1");
        assert_eq!(a.pod.as_deref(), Some("enc-agent-x7k2p"));
    }

    #[test]
    fn refusals_name_what_was_wrong_and_the_value() {
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = bound("node-1");
            f(&mut v);
            check_review(&policy(), Some(&status(v))).unwrap_err()
        };
        let cases: Vec<(Refusal, &str)> = vec![
            (check_review(&policy(), None).unwrap_err(), "has no status"),
            (
                with(
                    &|v| *v = json!({"user": {}, "error": "[invalid bearer token, service account token has expired]"}),
                ),
                "not authenticated by the API server: [invalid bearer token, service account token has expired]",
            ),
            (
                with(&|v| v["authenticated"] = json!(false)),
                "status.authenticated is not true",
            ),
            (
                with(&|v| v["audiences"] = json!(["https://kubernetes.default.svc"])),
                "not for audience \"enc-issuer\" (the API server confirmed audiences [\"https://kubernetes.default.svc\"])",
            ),
            (
                with(&|v| {
                    v.as_object_mut().unwrap().remove("audiences");
                }),
                "confirmed audiences []",
            ),
            (
                with(&|v| v["user"]["username"] = json!("system:serviceaccount:default:default")),
                "belongs to \"system:serviceaccount:default:default\", not to \"system:serviceaccount:kube-system:enc-agent\"",
            ),
            (
                with(&|v| v["user"]["username"] = json!("system:node:node-1")),
                "belongs to \"system:node:node-1\"",
            ),
            (
                with(&|v| {
                    v["user"]["extra"]
                        .as_object_mut()
                        .unwrap()
                        .remove(NODE_NAME_EXTRA);
                }),
                "names no node (no user extra authentication.kubernetes.io/node-name)",
            ),
            (
                with(&|v| v["user"]["extra"][NODE_NAME_EXTRA] = json!([])),
                "names no node",
            ),
            (
                with(&|v| v["user"]["extra"][NODE_NAME_EXTRA] = json!(["node-1", "node-2"])),
                "names 2 nodes ([\"node-1\", \"node-2\"])",
            ),
            (
                with(&|v| v["user"]["extra"][NODE_NAME_EXTRA] = json!(["Node_1"])),
                "names node \"Node_1\", which is not a valid node name",
            ),
        ];
        for (refusal, want) in cases {
            let text = refusal.to_string();
            assert!(text.contains(want), "{text}\nwant: {want}");
        }
    }

    #[test]
    fn node_addresses_are_internal_and_external_ips() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "Hostname", "address": "node-1"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "ExternalDNS", "address": "node-1.example.com"},
                {"type": "InternalIP", "address": "10.0.0.1"}
            ]}
        }))
        .unwrap();
        let ips: Vec<IpAddr> = ["10.0.0.1", "fd00::1", "203.0.113.7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(node_ips(&node), ips);
        assert!(node_ips(&Node::default()).is_empty());
    }

    proptest! {
        /// The decision is exactly the conjunction of its rules, whatever the answer holds,
        /// and an accepted token's node is the one the API server named.
        #[test]
        fn decision_is_the_conjunction_of_the_rules(
            authenticated in proptest::option::of(any::<bool>()),
            audiences in proptest::option::of(proptest::collection::vec(
                prop_oneof![Just("enc-issuer".to_owned()), Just("api".to_owned()), "[a-z-]{0,12}"], 0..3)),
            username in prop_oneof![Just(SA.to_owned()), Just("system:serviceaccount:kube-system:other".to_owned()), ".{0,40}"],
            nodes in proptest::option::of(proptest::collection::vec(
                prop_oneof!["[a-z][a-z0-9-]{0,10}[a-z0-9]", ".{0,20}"], 0..3)),
            error in proptest::option::of(".{0,30}"),
        ) {
            let mut extra = BTreeMap::new();
            if let Some(n) = &nodes {
                extra.insert(NODE_NAME_EXTRA.to_owned(), n.clone());
            }
            let st = TokenReviewStatus {
                authenticated,
                audiences: audiences.clone(),
                error,
                user: Some(UserInfo {
                    username: Some(username.clone()),
                    extra: Some(extra),
                    ..Default::default()
                }),
            };
            let got = check_review(&policy(), Some(&st));
            let one_valid_node = match nodes.as_deref() {
                Some([n]) => crate::config::check_node_name(n).is_ok(),
                _ => false,
            };
            let ok = authenticated == Some(true)
                && audiences.as_ref().is_some_and(|a| a.iter().any(|x| x == "enc-issuer"))
                && username == SA
                && one_valid_node;
            prop_assert_eq!(got.is_ok(), ok, "{:?}", got);
            if let Ok(a) = got {
                prop_assert_eq!(Some(vec![a.node]), nodes);
            } else if let Err(e) = got {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn mock_reviewer() -> (KubeTokenReviewer, Handle) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (
            KubeTokenReviewer::new(kube::Client::new(service, "default")),
            handle,
        )
    }

    /// The API server's answer to a TokenReview: the request's spec echoed, and `status`.
    fn review_answer(sent: &serde_json::Value, status: serde_json::Value) -> serde_json::Value {
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": sent["spec"],
            "status": status
        })
    }

    fn node_answer() -> serde_json::Value {
        json!({
            "kind": "Node", "apiVersion": "v1",
            "metadata": {"name": "node-1", "uid": "a0c4b4f9-5b0e-4d8f-8a2c-6b9e2f3d4c5b", "resourceVersion": "812"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "Hostname", "address": "node-1"}
            ]}
        })
    }

    /// Runs [`attest`] against the mock API, which answers the TokenReview with `status`
    /// (HTTP 201) or with the API error `error` (an HTTP code and a `Status` body), and the
    /// Node GET, if one comes, with node-1. Returns the result and the requests.
    async fn review_on_mock(
        status: Option<serde_json::Value>,
        error: Option<(u16, serde_json::Value)>,
    ) -> (
        Result<AttestedNode, Refusal>,
        (http::request::Parts, serde_json::Value),
        Option<http::request::Parts>,
    ) {
        let (reviewer, mut handle) = mock_reviewer();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            let (parts, b) = req.into_parts();
            let b = http_body_util::BodyExt::collect(b)
                .await
                .unwrap()
                .to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&b).unwrap();
            let (code, body) = match (&status, &error) {
                (Some(st), _) => (201, review_answer(&sent, st.clone())),
                (None, Some((code, body))) => (*code, body.clone()),
                (None, None) => unreachable!(),
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
            let node = match tokio::time::timeout(
                std::time::Duration::from_millis(500),
                handle.next_request(),
            )
            .await
            {
                Ok(Some((req, send))) => {
                    let (parts, _) = req.into_parts();
                    send.send_response(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Body::from(serde_json::to_vec(&node_answer()).unwrap()))
                            .unwrap(),
                    );
                    Some(parts)
                }
                _ => None,
            };
            ((parts, sent), node)
        });
        let result = attest(
            &reviewer,
            &policy(),
            "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.e30.c2ln",
        )
        .await;
        let (review, node) = server.await.unwrap();
        (result, review, node)
    }

    #[tokio::test]
    async fn kube_reviewer_attests_a_bound_token_over_the_mock_api() {
        let (result, (parts, sent), node) = review_on_mock(Some(bound("node-1")), None).await;
        let a = result.unwrap();
        assert_eq!(a.node, "node-1");
        assert_eq!(a.pod.as_deref(), Some("enc-agent-x7k2p"));
        assert_eq!(a.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(
            parts.uri.path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        assert_eq!(sent["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(sent["kind"], "TokenReview");
        assert_eq!(
            sent["spec"],
            json!({"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.e30.c2ln", "audiences": ["enc-issuer"]})
        );
        let node = node.expect("a Node GET");
        assert_eq!(node.method, http::Method::GET);
        assert_eq!(node.uri.path(), "/api/v1/nodes/node-1");
    }

    #[tokio::test]
    async fn kube_reviewer_refusals_over_the_mock_api() {
        let mut no_extra = bound("node-1");
        no_extra["user"]["extra"]
            .as_object_mut()
            .unwrap()
            .remove(NODE_NAME_EXTRA);
        let cases = [
            // Expired or forged: the API server's answer for a token it does not accept.
            (
                Some(
                    json!({"user": {}, "error": "[invalid bearer token, service account token has expired]"}),
                ),
                None,
                "not authenticated by the API server: [invalid bearer token, service account token has expired]",
            ),
            // A token for another audience: the API server authenticates nothing and says why.
            (
                Some(
                    json!({"user": {}, "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences [\"enc-issuer\"]]"}),
                ),
                None,
                "is invalid for the target audiences",
            ),
            // An authenticator that ignores spec.audiences and echoes none: not trusted.
            (
                Some({
                    let mut v = bound("node-1");
                    v["audiences"] = json!(["https://kubernetes.default.svc.cluster.local"]);
                    v
                }),
                None,
                "not for audience \"enc-issuer\"",
            ),
            // A legacy or unbound token: no node-name extra.
            (Some(no_extra), None, "names no node"),
            // The issuer may not create TokenReviews.
            (
                None,
                Some((
                    403,
                    json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:kube-system:default\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                        "reason": "Forbidden", "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"}, "code": 403
                    }),
                )),
                "TokenReview failed: ",
            ),
        ];
        for (status, error, want) in cases {
            let (result, (parts, _), node) = review_on_mock(status, error).await;
            assert_eq!(
                parts.uri.path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let e = result.unwrap_err();
            assert!(e.to_string().contains(want), "{e}\nwant: {want}");
            assert!(node.is_none(), "no Node lookup after a refusal: {e}");
        }
        let (result, _, _) = review_on_mock(
            None,
            Some((
                403,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "forbidden", "reason": "Forbidden", "code": 403}),
            )),
        )
        .await;
        assert!(
            matches!(result, Err(Refusal::ReviewFailed { .. })),
            "{result:?}"
        );
        // The token never appears in what is said about a refusal.
        assert!(!format!("{result:?}").contains("c2ln"));
    }

    #[tokio::test]
    async fn fake_reviewer_attests_and_refuses() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let fake = FakeTokenReviewer::new()
            .with_bound_token("t1", "enc-issuer", SA, "node-1", "enc-agent-a")
            .with_bound_token("t2", "enc-issuer", SA, "node-9", "enc-agent-b")
            .with_node("node-1", &[ip]);
        let a = attest(&fake, &policy(), " t1\n").await.unwrap();
        assert_eq!((a.node.as_str(), a.ips.as_slice()), ("node-1", &[ip][..]));
        assert!(matches!(
            attest(&fake, &policy(), "nope").await,
            Err(Refusal::NotAuthenticated { .. })
        ));
        assert!(matches!(
            attest(&fake, &policy(), "t2").await,
            Err(Refusal::NodeLookup { .. })
        ));
        assert_eq!(
            attest(&fake, &policy(), "  ").await,
            Err(Refusal::EmptyToken)
        );
        assert!(fake.asked_audiences().iter().all(|a| a == "enc-issuer"));
        let down = FakeTokenReviewer::new().failing("connection refused");
        assert!(matches!(
            attest(&down, &policy(), "t1").await,
            Err(Refusal::ReviewFailed { .. })
        ));
    }
}
