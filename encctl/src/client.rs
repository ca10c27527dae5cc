//! A minimal HTTP/1.1 client for the agent's Unix socket.

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use std::path::Path;

/// GETs `path` from the agent at `socket` and decodes the JSON answer.
pub fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(get_async(socket, path))
}

async fn get_async<T: DeserializeOwned>(socket: &Path, path: &str) -> anyhow::Result<T> {
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
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "enc-agent")
        .body(Empty::<Bytes>::new())
        .context("build request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path}"))?;
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
        bail!("agent answered {status} for {path}: {msg}");
    }
    serde_json::from_slice(&body).with_context(|| format!("decode the agent's answer to {path}"))
}
