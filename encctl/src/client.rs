//! A minimal HTTP/1.1 client for the agent's Unix socket.

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Talks to the agent at one socket; one connection per request.
pub struct Client {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
}

impl Client {
    /// A client of the agent at `socket` (nothing is connected yet).
    pub fn new(socket: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        Ok(Self {
            rt,
            socket: socket.to_owned(),
        })
    }

    /// GETs `path` and decodes the JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.rt
            .block_on(request(&self.socket, hyper::Method::GET, path, None))
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body).context("encode the request")?;
        self.rt
            .block_on(request(&self.socket, hyper::Method::POST, path, Some(body)))
    }
}

/// GETs `path` from the agent at `socket` and decodes the JSON answer.
pub fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> anyhow::Result<T> {
    Client::new(socket)?.get(path)
}

async fn request<T: DeserializeOwned>(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<T> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the agent at {} (is enc-agent running? set --socket or ENC_SOCKET)",
                socket.display()
            )
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake with the agent")?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(hyper::header::HOST, "enc-agent");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("build request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("read answer")?
        .to_bytes();
    drop(sender);
    conn.abort();
    if !status.is_success() {
        let msg = serde_json::from_slice::<enc_api::ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        bail!("agent answered {status} for {method} {path}: {msg}");
    }
    serde_json::from_slice(&body).with_context(|| format!("decode the agent's answer to {path}"))
}
