//! The grpc-registrar controller binary: flags, logging, signals; everything else is the library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use grpc_registrar::controller::{self, Scope};
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::http::{self, Health};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::{Registry, RegistryConfig};
use tokio::sync::watch;
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// Registers ready Kubernetes pods in an etcd service registry for gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// TTL of the shared etcd lease, in seconds, for services that set none.
    #[arg(long, env = "LEASE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=86400))]
    lease_ttl: u64,
    /// Prefix of default targets: `<key-prefix>/<namespace>/<name>`.
    #[arg(long, env = "KEY_PREFIX", default_value = "services")]
    key_prefix: String,
    /// Prefix of the controller's own records in etcd (target ownership).
    #[arg(long, env = "REGISTRAR_ROOT", default_value = "grpc-registrar")]
    registrar_root: String,
    /// Namespaces allowed targets outside their own prefix: a comma-separated list, or `*`.
    #[arg(long, env = "CUSTOM_TARGET_NAMESPACES", default_value = "")]
    custom_target_namespaces: String,
    /// Watch only this namespace; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log output format; the level comes from RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        etcd_endpoints,
        lease_ttl,
        key_prefix,
        registrar_root,
        custom_target_namespaces,
        namespace,
        metrics_addr,
        log_format,
    } = Args::parse();

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match log_format {
        LogFormat::Plain => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received; finishing in-flight work (the etcd lease is kept)");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = http::bind(metrics_addr)
        .await
        .with_context(|| format!("failed to bind {metrics_addr}"))?;
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(http::serve(listener, health, stopped()));

    let config = RegistryConfig {
        registrar_root: registrar_root.clone(),
        default_ttl: Duration::from_secs(lease_ttl),
        ..RegistryConfig::new(etcd_endpoints)
    };
    let registry = Registry::connect(config, metrics.clone())
        .await
        .context("failed to connect to etcd")?;
    let client = kube::Client::try_default()
        .await
        .context("failed to create kubernetes client")?;
    let policy = Policy {
        key_prefix,
        registrar_root,
        custom_targets: CustomTargets::parse(&custom_target_namespaces),
    };
    let scope = Scope {
        namespace: (!namespace.is_empty()).then_some(namespace),
    };
    info!(%metrics_addr, ?scope, lease_ttl, "starting grpc-registrar");
    controller::run(client, registry, scope, policy, metrics, ready, stopped()).await;
    server
        .await
        .context("metrics server panicked")?
        .context("metrics server failed")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("failed to install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
