//! `/healthz` (the process answers), `/readyz` (the agent can do its job) and `/metrics`
//! (Prometheus text) on the metrics address. Readiness and the metrics text are questions the
//! caller answers, so this module knows nothing of the store or the swarm.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::{Body, full};

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Serves the health and metrics endpoints until `shutdown` turns true. `ready` says why
/// the agent is not ready, if it is not; `metrics` renders the metrics.
pub async fn serve_health<F, Fut, M, MFut>(
    listener: TcpListener,
    ready: F,
    metrics: M,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
    M: Fn() -> MFut + Clone + Send + Sync + 'static,
    MFut: Future<Output = String> + Send + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let (ready, metrics) = (ready.clone(), metrics.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (ready, metrics) = (ready.clone(), metrics.clone());
                async move {
                    let response = match (req.method(), req.uri().path()) {
                        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
                        (&Method::GET | &Method::HEAD, "/readyz") => match ready().await {
                            Ok(()) => text(StatusCode::OK, "ready\n".into()),
                            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                        },
                        (&Method::GET, "/metrics") => {
                            let mut r = text(StatusCode::OK, metrics().await);
                            r.headers_mut().insert(
                                header::CONTENT_TYPE,
                                http::HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                            );
                            r
                        }
                        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
    connections.close();
}
