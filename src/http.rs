//! The HTTP side: `/metrics`, `/healthz` and `/readyz`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints report on.
#[derive(Clone)]
pub struct Health {
    /// Metrics to encode.
    pub metrics: Arc<Metrics>,
    /// Set once the caches have synced and the controller is reconciling.
    pub ready: Arc<AtomicBool>,
    /// This replica's role, reported by `/readyz` (a warm follower is ready too).
    pub role: tokio::sync::watch::Receiver<crate::leader::Role>,
    /// The registry backend in use, by name: the one whose reachability counts.
    pub backend: &'static str,
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
/// Accept-loop I/O errors.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr`.
///
/// # Errors
/// The address is taken or not local.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// Ready when this replica can do its job: its caches are synced (so a leader computes from
/// complete state, and a follower can take over at once) and the registry it publishes into
/// answers (a replica that cannot reach the registry can neither publish nor renew). A follower
/// is ready too: it is warm. The body says which check fails.
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let (code, body) = readiness(&health);
    (code, body)
}

/// The `/readyz` answer: its status code and body.
fn readiness(health: &Health) -> (StatusCode, String) {
    let role = health.role.borrow().as_str();
    let synced = health.ready.load(Ordering::Relaxed);
    let backend = health.metrics.backend_up(health.backend);
    // Said, not failed: a rolling update without leader election has two writers for a while,
    // and a 503 there would stall it for good.
    let writers = match health.metrics.writers.other_writers.get() {
        0 => String::new(),
        n => format!(
            "writers: {n} other live controller(s) write this registry scope (see the log)\n"
        ),
    };
    let body = format!(
        "{}\nrole: {role}\ncaches: {}\nregistry: {} ({})\n{writers}",
        if synced && backend {
            "ready"
        } else {
            "not ready"
        },
        if synced { "synced" } else { "syncing" },
        if backend {
            "reachable"
        } else {
            "unreachable, see the log"
        },
        health.backend,
    );
    let code = if synced && backend {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::Role;

    fn health(backend: &'static str, synced: bool) -> Health {
        Health {
            metrics: Arc::new(Metrics::for_backend(backend)),
            ready: Arc::new(AtomicBool::new(synced)),
            role: tokio::sync::watch::channel(Role::Leader { term: 1 }).1,
            backend,
        }
    }

    #[test]
    fn a_controller_is_ready_when_its_own_registry_answers_whatever_another_does() {
        let health = health("second", true);
        health
            .metrics
            .backend_result("second", "connect", true, true);
        health.metrics.backend_result("first", "txn", false, false);
        let (code, body) = readiness(&health);
        assert_eq!(code, StatusCode::OK, "{body}");
        assert!(body.contains("registry: reachable (second)"), "{body}");
        assert!(!body.contains("first"), "{body}");
    }

    #[test]
    fn readiness_follows_the_configured_registry_and_the_caches() {
        for backend in ["first", "second"] {
            let health = health(backend, false);
            health
                .metrics
                .backend_result(backend, "connect", true, true);
            assert_eq!(readiness(&health).0, StatusCode::SERVICE_UNAVAILABLE);
            health.ready.store(true, Ordering::Relaxed);
            assert_eq!(readiness(&health).0, StatusCode::OK);
            health.metrics.backend_result(backend, "txn", false, false);
            let (code, body) = readiness(&health);
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                body.contains(&format!("registry: unreachable, see the log ({backend})")),
                "{body}"
            );
        }
    }

    #[test]
    fn another_live_writer_is_said_without_failing_readiness() {
        let health = health("memory", true);
        health
            .metrics
            .backend_result("memory", "connect", true, true);
        health.metrics.writers.other_writers.set(1);
        let (code, body) = readiness(&health);
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("writers: 1 other live controller(s)"),
            "{body}"
        );
    }
}
