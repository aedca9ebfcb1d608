//! The operational HTTP endpoints of both binaries, served by axum:
//! `/metrics` (Prometheus text format), `/healthz` (the process answers) and
//! `/readyz` (it is doing its job — caches synced, leading or standing by,
//! connected to containerd — and if not, what it waits for).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::Listener;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// Whether the binary is ready, and what it is doing or waiting for: shared
/// between its work and `/readyz`.
#[derive(Clone)]
pub struct Health {
    state: Arc<RwLock<(bool, String)>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Arc::new(RwLock::new((false, "starting".into()))),
        }
    }
}

impl Health {
    /// Ready (or not), saying why in words an administrator reads in the
    /// probe's output.
    pub fn set(&self, ready: bool, detail: impl Into<String>) {
        *self.state.write().expect("health lock") = (ready, detail.into());
    }

    pub fn is_ready(&self) -> bool {
        self.state.read().expect("health lock").0
    }

    /// What `/readyz` says.
    pub fn detail(&self) -> String {
        self.state.read().expect("health lock").1.clone()
    }
}

#[derive(Clone)]
struct Endpoints {
    registry: Arc<Registry>,
    health: Health,
}

/// The endpoints, to serve or to test without a socket.
pub fn router(registry: Arc<Registry>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(Endpoints { registry, health })
}

async fn metrics(State(e): State<Endpoints>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &e.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn readyz(State(e): State<Endpoints>) -> Response {
    let (ready, detail) = e.health.state.read().expect("health lock").clone();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{detail}\n")).into_response()
}

/// Binds `addr` and serves until the process ends. Returns the bound address
/// (useful with port 0), or `None` if it could not bind: the endpoints are an
/// aid, and their absence must not stop the work.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Health,
) -> Option<SocketAddr> {
    // Bound through a socket with SO_REUSEADDR, so a restarted process gets
    // its port back at once.
    let listener = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve /metrics, /healthz and /readyz; going on without them");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    let app = router(registry, health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the /metrics, /healthz and /readyz server stopped");
        }
    });
    Some(bound)
}

fn bind(addr: SocketAddr) -> std::io::Result<impl Listener<Addr = SocketAddr>> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    #[tokio::test]
    async fn readyz_says_what_it_waits_for_and_metrics_are_served() {
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("probe_things", "things", counter.clone());
        counter.inc();
        let health = Health::default();
        let addr = serve(
            ([127, 0, 0, 1], 0).into(),
            Arc::new(registry),
            health.clone(),
        )
        .await
        .unwrap();

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.trim()), (503, "starting"));
        health.set(true, "leading; caches synced");
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.trim()), (200, "leading; caches synced"));
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("probe_things_total 1"), "{body}");
        assert_eq!(get(addr, "/nothing").await.0, 404);
    }
}
