//! The status endpoint: `/metrics` (OpenMetrics text), `/healthz` (liveness) and `/readyz`
//! (readiness, with one line of detail per check).
//!
//! Kubernetes probes and the systemd watchdog ask different questions: liveness is "the process
//! is not wedged" and must not fail because a dependency is down (restarting would not help);
//! readiness is "this instance is doing its job now" and does fail while Kafka is unreachable.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short name (`mqtt`, `kafka`, `buffer`).
    pub name: &'static str,
    /// Whether it passes.
    pub ok: bool,
    /// One line for an operator.
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self { name, ok, detail: detail.into() }
    }
}

/// What the endpoint reports; implemented by each binary's running pipeline.
pub trait Status: Send + Sync + 'static {
    /// Liveness: `false` only if the process is wedged.
    fn live(&self) -> bool;
    /// Readiness checks.
    fn ready(&self) -> Vec<Check>;
    /// Called before each scrape to refresh gauges that are sampled rather than counted.
    fn refresh(&self) {}
}

/// Binds the status listener. Kept separate from [`serve`] so a bad `listen` address fails
/// start-up with a clear error, before any data is accepted.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoint until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    status: Arc<dyn Status>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "status endpoint failed to accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let status = status.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &registry, status.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry, status: &dyn Status) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            status.refresh();
            let mut body = String::with_capacity(16 * 1024);
            if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n".into());
            }
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            resp
        }
        "/healthz" | "/livez" => {
            if status.live() {
                text(StatusCode::OK, "ok\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "wedged\n".into())
            }
        }
        "/readyz" => {
            let checks = status.ready();
            let mut body = String::new();
            for c in &checks {
                let _ = writeln!(body, "[{}] {}: {}", if c.ok { "+" } else { "-" }, c.name, c.detail);
            }
            let ok = checks.iter().all(|c| c.ok);
            let _ = writeln!(body, "{}", if ok { "ready" } else { "not ready" });
            text(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake {
        ready: AtomicBool,
    }

    impl Status for Fake {
        fn live(&self) -> bool {
            true
        }
        fn ready(&self) -> Vec<Check> {
            vec![Check::new("kafka", self.ready.load(Ordering::SeqCst), "broker reachable")]
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("edgeflow_test_events", "Events seen", counter.clone());
        counter.inc_by(3);
        let fake = Arc::new(Fake { ready: AtomicBool::new(false) });
        let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, Arc::new(registry), fake.clone(), shutdown.clone()));

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("edgeflow_test_events_total 3"), "{metrics}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("[-] kafka"), "{not_ready}");
        fake.ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        shutdown.cancel();
        task.await.expect("server task ends on shutdown");
    }
}
