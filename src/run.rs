//! The whole controller process from its configuration: the HTTP endpoints, the registry, leader
//! election and the reconciler, stopped by one injected `shutdown` future. `main` parses flags,
//! sets up logging and signals, and calls [`run`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use backon::Retryable;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::controller::{self, Scope, Tuning};
use crate::desired::Policy;
use crate::http::{self, Health};
use crate::leader::{ElectionConfig, Elector, Role};
use crate::metrics::Metrics;
use crate::registry::Backend;
use crate::registry::consul::{ConsulConfig, ConsulRegistry};
use crate::registry::etcd::{EtcdConfig, EtcdRegistry};

/// The registry backend and how to reach it.
#[derive(Clone, Debug)]
pub enum RegistryConfig {
    /// etcd, with its lease TTL.
    Etcd(EtcdConfig),
    /// Consul's catalog, with its node check TTL.
    Consul(ConsulConfig),
}

impl RegistryConfig {
    fn name(&self) -> &'static str {
        match self {
            Self::Etcd(_) => "etcd",
            Self::Consul(_) => "consul",
        }
    }

    fn default_ttl(&self) -> Duration {
        match self {
            Self::Etcd(etcd) => etcd.default_ttl,
            Self::Consul(consul) => consul.default_ttl,
        }
    }

    /// Where the registry is, for logs.
    fn address(&self) -> String {
        match self {
            Self::Etcd(etcd) => etcd.endpoints.join(","),
            Self::Consul(consul) => consul.address.clone(),
        }
    }

    /// The settings to check when the registry does not answer at start-up.
    fn settings(&self) -> &'static str {
        match self {
            Self::Etcd(_) => "--etcd-endpoints, TLS and credentials",
            Self::Consul(_) => "--consul-addr, TLS and the ACL token",
        }
    }
}

/// Everything the process is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The registry backend and how to reach it.
    pub registry: RegistryConfig,
    /// Which targets a namespace may publish under.
    pub policy: Policy,
    /// Which namespaces are watched.
    pub scope: Scope,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// Leader election, for more than one replica; `None` runs as the only writer.
    pub election: Option<ElectionConfig>,
    /// Reconciles at once, and how often one service's source changes may reconcile it.
    pub tuning: Tuning,
}

/// Why the process could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The leader election timing does not nest inside the registry lease TTL.
    #[error("invalid leader election timing: {0}")]
    Election(String),
    /// The HTTP endpoints could not listen.
    #[error("failed to bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be reached or refused the credentials.
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    /// No Kubernetes client configuration (KUBECONFIG, or the in-cluster service account).
    #[error(
        "failed to create kubernetes client: set KUBECONFIG (or ~/.kube/config), or run in a pod with a service account"
    )]
    Kube(#[source] kube::Error),
    /// The HTTP server stopped with an error.
    #[error("metrics server failed")]
    Serve(#[source] std::io::Error),
}

/// Runs the controller until `shutdown` resolves.
///
/// # Errors
/// Start-up failures ([`Error`]); once running, failures are retried, not returned.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let Config {
        registry,
        policy,
        scope,
        metrics_addr,
        election,
        tuning,
    } = config;
    if let Some(election) = &election {
        election
            .validate(registry.default_ttl())
            .map_err(Error::Election)?;
    }
    let stopped = stopper(shutdown);

    let metrics = Arc::new(Metrics::for_backend(registry.name()));
    let ready = Arc::new(AtomicBool::new(false));
    let (role_tx, role) = watch::channel(if election.is_some() {
        Role::Follower
    } else {
        Role::Leader { term: 0 }
    });
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
        role: role.clone(),
        backend: registry.name(),
    };
    let (metrics_addr, server) = serve(metrics_addr, health, stopped()).await?;

    let client = tokio::select! {
        client = kube::Client::try_default() => client.map_err(Error::Kube)?,
        () = stopped() => return Ok(()),
    };
    let default_ttl = registry.default_ttl();
    let Some(backend) = connect(registry, &metrics, &stopped).await? else {
        return Ok(());
    };
    info!(
        %metrics_addr,
        watch_namespace = scope.namespace.as_deref().unwrap_or("(all)"),
        backend = backend.name(),
        lease_ttl = default_ttl.as_secs(),
        leader_elect = election.is_some(),
        "starting grpc-registrar"
    );
    // The elector publishes the role that `/readyz` shows and the controller obeys.
    let elector = election.map(|config| {
        let elector = Elector::new(
            client.clone(),
            config,
            backend.clone(),
            metrics.clone(),
            role_tx,
        );
        tokio::spawn(elector.run(stopped()))
    });
    controller::run(
        client,
        backend,
        scope,
        policy,
        metrics,
        ready,
        role,
        tuning,
        stopped(),
    )
    .await;
    if let Some(elector) = elector
        && let Err(e) = elector.await
    {
        warn!(error = %e, "leader elector panicked");
    }
    match server.await {
        Ok(result) => result.map_err(Error::Serve),
        Err(e) => {
            warn!(error = %e, "metrics server panicked");
            Ok(())
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `stopped`; the address bound (a
/// configured port 0 picks one) and the server's task.
async fn serve(
    addr: std::net::SocketAddr,
    health: Health,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<
    (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    Error,
> {
    let listener = http::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    Ok((bound, tokio::spawn(http::serve(listener, health, stopped))))
}

/// A factory of futures that resolve once `shutdown` has (each caller gets its own).
fn stopper(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>> + Clone {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    move || {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })
    }
}

/// Connects the configured backend, checks it once (logged) and keeps probing it for
/// `/readyz`; `None` when stopped first.
async fn connect<S, F>(
    registry: RegistryConfig,
    metrics: &Arc<Metrics>,
    stopped: &S,
) -> Result<Option<Arc<dyn Backend>>, Error>
where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let (address, settings) = (registry.address(), registry.settings());
    let backend: Arc<dyn Backend> = match registry {
        RegistryConfig::Etcd(etcd) => {
            let Some(registry) = connect_etcd(etcd, metrics, stopped()).await? else {
                return Ok(None);
            };
            Arc::new(registry)
        }
        RegistryConfig::Consul(consul) => {
            Arc::new(ConsulRegistry::connect(consul, metrics.clone())?)
        }
    };
    let up = first_check(backend.as_ref(), &address, settings).await;
    tokio::spawn(probe(backend.clone(), address, up, stopped()));
    Ok(Some(backend))
}

/// Connects to etcd (retrying: with auth, connecting needs etcd up); `None` when stopped first.
async fn connect_etcd(
    etcd: EtcdConfig,
    metrics: &Arc<Metrics>,
    stopped: impl Future<Output = ()>,
) -> Result<Option<EtcdRegistry>, Error> {
    info!(
        registry_address = %etcd.endpoints.join(","),
        tls = etcd.tls.is_some(),
        user = etcd.user.as_ref().map_or("(none)", |u| u.name.as_str()),
        "connecting to etcd"
    );
    let connect = (|| EtcdRegistry::connect(etcd.clone(), metrics.clone()))
        .retry(Backoff::builder(
            Duration::from_millis(200),
            Duration::from_secs(10),
        ))
        .notify(|e, delay| warn!(error = %e, retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "failed to connect to etcd; retrying"));
    Ok(tokio::select! {
        registry = connect => Some(registry?),
        () = stopped => None,
    })
}

/// The start-up check: a wrong address, a firewall or bad credentials are said once, clearly;
/// the probe keeps checking (and `/readyz` says not ready) until the backend answers.
async fn first_check(registry: &dyn Backend, address: &str, what: &str) -> bool {
    let backend = registry.name();
    match registry.check().await {
        Ok(revision) => {
            info!(
                backend,
                registry_address = address,
                revision,
                "registry reachable"
            );
            true
        }
        Err(e) => {
            error!(
                backend,
                registry_address = address,
                error = %e,
                "registry is not reachable: check {what}; retrying, and /readyz reports not ready until it answers"
            );
            false
        }
    }
}

/// Checks that the backend answers: every 2 s while it does not (logging when it comes back),
/// every 10 s while it does, so that `/readyz` and `backend_connected` are current even with no
/// service (and so no lease or node check) to renew.
async fn probe(
    registry: Arc<dyn Backend>,
    address: String,
    mut up: bool,
    stopped: impl Future<Output = ()>,
) {
    let backend = registry.name();
    let run = async {
        loop {
            tokio::time::sleep(if up {
                Duration::from_secs(10)
            } else {
                Duration::from_secs(2)
            })
            .await;
            match registry.check().await {
                Ok(revision) if !up => {
                    info!(backend, registry_address = %address, revision, "registry reachable");
                    up = true;
                }
                Ok(_) => {}
                Err(e) if up => {
                    warn!(backend, registry_address = %address, error = %e, "registry is not reachable; retrying");
                    up = false;
                }
                Err(e) => {
                    debug!(backend, registry_address = %address, error = %e, "registry still not reachable")
                }
            }
        }
    };
    tokio::select! {
        () = run => {}
        () = stopped => {}
    }
}
