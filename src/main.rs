//! The grpc-registrar controller binary: flags, logging, signals; everything else is the library
//! ([`grpc_registrar::run`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, ValueEnum};
use grpc_registrar::controller::{Scope, Tuning};
use grpc_registrar::crd::Backend;
use grpc_registrar::desired::{CustomTargets, Policy};
use grpc_registrar::leader::{self, ElectionConfig};
use grpc_registrar::logging;
use grpc_registrar::registry::consul::{ConsulConfig, ConsulTls};
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdTls, EtcdUser};
use grpc_registrar::run::{self, Config, RegistryConfig};
use tracing::{error, info, warn};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    Etcd,
    Consul,
}

/// Registers ready Kubernetes pods in a service registry for gRPC: etcd, or Consul's catalog.
///
/// The cluster is found as kubectl finds it: $KUBECONFIG (or ~/.kube/config), else the in-cluster
/// service account. The log level comes from RUST_LOG (default `info`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The registry this controller publishes into. It acts only on the GrpcServices whose
    /// `spec.backend` names it (`Etcd` when unset), so one controller per backend may run.
    /// Case-insensitive: `Consul`, as `spec.backend` spells it, works too.
    #[arg(
        long,
        env = "BACKEND",
        value_enum,
        ignore_case = true,
        default_value = "etcd"
    )]
    backend: BackendArg,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    consul: ConsulArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    election: ElectionArgs,
    /// Watch only this namespace; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log output format: `plain` (coloured only on a terminal) or `json` (one object per line);
    /// the level comes from RUST_LOG (default `info`, e.g. RUST_LOG=grpc_registrar=debug).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// After SIGTERM or SIGINT, exit (status 1) if in-flight work has not finished in this
    /// long, e.g. `20s`; keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Most GrpcServices reconciled at once. A cold start of many services goes at the
    /// registry's write throughput when enough are in flight; each in flight holds its memory.
    #[arg(long, env = "RECONCILE_CONCURRENCY", default_value_t = grpc_registrar::controller::CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// Least time between two reconciles of one GrpcService that changes of its pods or
    /// EndpointSlices queue, counted from when each is queued, e.g. `100ms` (at most `60s`).
    /// A change after a quiet interval is published at once; the
    /// changes that follow within it are published together when it ends, in one registry write
    /// (less CPU and fewer writes under heavy readiness churn, at up to this much latency).
    /// `0s` publishes every change at once.
    #[arg(long, env = "MIN_SYNC_INTERVAL", default_value = "0s", value_parser = parse_sync_interval)]
    min_sync_interval: Duration,
}

/// How to reach etcd.
#[derive(Debug, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// CA certificate file (PEM) that signed etcd's serving certificate; use `https://` endpoints.
    #[arg(long, env = "ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate file (PEM) for etcd mTLS; under etcd auth its common name is the user.
    #[arg(long, env = "ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// Client private key file (PEM) for etcd mTLS.
    #[arg(long, env = "ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// etcd user for username/password auth.
    #[arg(long, env = "ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// etcd password (prefer --etcd-password-file); never logged.
    #[arg(
        long,
        env = "ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_username",
        conflicts_with = "etcd_password_file"
    )]
    etcd_password: Option<String>,
    /// File holding the etcd password (e.g. a mounted Secret).
    #[arg(long, env = "ETCD_PASSWORD_FILE", requires = "etcd_username")]
    etcd_password_file: Option<PathBuf>,
}

/// How to reach Consul (with `--backend consul`); the env vars are Consul's own.
#[derive(Debug, Args)]
struct ConsulArgs {
    /// Consul's HTTP API: `http://host:8500`, or `https://host:8501` with --consul-ca-file.
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    consul_addr: String,
    /// CA certificate file (PEM) that signed Consul's HTTPS certificate.
    #[arg(long, env = "CONSUL_CACERT")]
    consul_ca_file: Option<PathBuf>,
    /// Client certificate file (PEM), when Consul verifies incoming HTTPS clients.
    #[arg(long, env = "CONSUL_CLIENT_CERT", requires = "consul_key_file")]
    consul_cert_file: Option<PathBuf>,
    /// Client private key file (PEM).
    #[arg(long, env = "CONSUL_CLIENT_KEY", requires = "consul_cert_file")]
    consul_key_file: Option<PathBuf>,
    /// File holding the ACL token (e.g. a mounted Secret); the token is never logged. It needs
    /// node:write on the controller's node, service:write on the published services and
    /// key:write on the --registrar-root prefix.
    #[arg(long, env = "CONSUL_HTTP_TOKEN_FILE")]
    consul_token_file: Option<PathBuf>,
    /// The datacenter to register in; the agent's own when unset.
    #[arg(long, env = "CONSUL_DATACENTER")]
    consul_datacenter: Option<String>,
}

impl ConsulArgs {
    fn into_config(self, registry: &RegistryArgs) -> anyhow::Result<ConsulConfig> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))
        };
        let tls = match (
            &self.consul_ca_file,
            &self.consul_cert_file,
            &self.consul_key_file,
        ) {
            (None, None, None) => None,
            (ca, cert, key) => Some(ConsulTls {
                ca: ca.as_ref().map(read).transpose()?,
                identity: match (cert, key) {
                    (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                    _ => None,
                },
            }),
        };
        let token = match &self.consul_token_file {
            Some(path) => Some(
                String::from_utf8(read(path)?)
                    .context("the consul token file is not UTF-8")?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(ConsulConfig {
            token,
            datacenter: self.consul_datacenter,
            tls,
            cluster: registry.cluster_name.clone(),
            kv_root: registry.registrar_root.clone(),
            default_ttl: Duration::from_secs(registry.lease_ttl),
            ..ConsulConfig::new(self.consul_addr)
        })
    }
}

/// What is published where.
#[derive(Debug, Args)]
struct RegistryArgs {
    /// TTL of the shared etcd lease, in seconds, for services that set none; with Consul, the
    /// TTL the controller's node check announces (renewed every third of it).
    #[arg(long, env = "LEASE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=86400))]
    lease_ttl: u64,
    /// Prefix of default targets: `<key-prefix>/<namespace>/<name>`.
    #[arg(long, env = "KEY_PREFIX", default_value = "services")]
    key_prefix: String,
    /// Prefix of the controller's own records in etcd (target ownership, the leader record).
    #[arg(long, env = "REGISTRAR_ROOT", default_value = "grpc-registrar")]
    registrar_root: String,
    /// Namespaces trusted to publish outside their own space: a comma-separated list, or `*`.
    /// etcd: targets outside `<key-prefix>/<namespace>/`. Consul: flat service names; every
    /// other namespace publishes `<name>--<namespace>`. `*` restores the pre-rule Consul
    /// behaviour (any namespace, any flat name).
    #[arg(long, env = "CUSTOM_TARGET_NAMESPACES", default_value = "")]
    custom_target_namespaces: String,
    /// This cluster's name, when several clusters publish into one registry: each cluster's
    /// controller then owns, fences and deletes only its own keys under a shared target, and
    /// endpoint metadata carries `cluster`. A DNS label; unset for one cluster.
    #[arg(long, env = "CLUSTER_NAME", value_parser = parse_cluster_name)]
    cluster_name: Option<String>,
}

/// A cluster name: a DNS label (it is a segment of the controller's record keys).
fn parse_cluster_name(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err("must be a DNS label: 1-63 lowercase letters, digits and '-'".into())
    }
}

/// Leader election, for more than one replica.
#[derive(Debug, Args)]
struct ElectionArgs {
    /// Elect a leader on a coordination.k8s.io Lease; only the leader writes (run 2+ replicas).
    #[arg(long, env = "LEADER_ELECT", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEADER_ELECTION_NAME", default_value = "grpc-registrar")]
    leader_election_name: String,
    /// This replica's identity in the Lease (a random suffix is added); the host name if unset.
    #[arg(long, env = "POD_NAME", default_value = "")]
    leader_election_identity: String,
    /// How long an unrenewed leader Lease stays held, e.g. `15s`; shorter than the etcd TTL.
    #[arg(long, env = "LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    leader_lease_duration: Duration,
    /// A leader that could not renew for this long stops writing, e.g. `10s`.
    #[arg(long, env = "LEADER_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    leader_renew_deadline: Duration,
    /// How often candidates retry and the leader renews, e.g. `2s`.
    #[arg(long, env = "LEADER_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    leader_retry_period: Duration,
}

impl EtcdArgs {
    /// The etcd config, reading the TLS and password files.
    fn into_config(self, registry: &RegistryArgs) -> anyhow::Result<EtcdConfig> {
        let Self {
            etcd_endpoints,
            etcd_ca_file,
            etcd_cert_file,
            etcd_key_file,
            etcd_username,
            etcd_password,
            etcd_password_file,
        } = self;
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))
        };
        let tls = if etcd_ca_file.is_some() || etcd_cert_file.is_some() {
            Some(EtcdTls {
                ca: etcd_ca_file.as_ref().map(read).transpose()?,
                identity: match (&etcd_cert_file, &etcd_key_file) {
                    (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                    _ => None,
                },
            })
        } else {
            None
        };
        let password = match (etcd_password, &etcd_password_file) {
            (Some(password), _) => Some(password),
            (None, Some(path)) => Some(
                String::from_utf8(read(path)?)
                    .context("the etcd password file is not UTF-8")?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let user = match (etcd_username, password) {
            (Some(name), Some(password)) => Some(EtcdUser { name, password }),
            (Some(_), None) => {
                anyhow::bail!("--etcd-username needs --etcd-password or --etcd-password-file")
            }
            (None, _) => None,
        };
        Ok(EtcdConfig {
            registrar_root: registry.registrar_root.clone(),
            cluster: registry.cluster_name.clone(),
            default_ttl: Duration::from_secs(registry.lease_ttl),
            tls,
            user,
            ..EtcdConfig::new(etcd_endpoints)
        })
    }
}

impl ElectionArgs {
    fn into_config(self) -> Option<ElectionConfig> {
        let Self {
            leader_elect,
            leader_election_namespace,
            leader_election_name,
            leader_election_identity,
            leader_lease_duration,
            leader_renew_deadline,
            leader_retry_period,
        } = self;
        leader_elect.then(|| {
            let base = if leader_election_identity.is_empty() {
                hostname()
            } else {
                leader_election_identity
            };
            ElectionConfig {
                namespace: leader_election_namespace,
                name: leader_election_name,
                identity: leader::unique_identity(&base),
                lease_duration: leader_lease_duration,
                renew_deadline: leader_renew_deadline,
                retry_period: leader_retry_period,
            }
        })
    }
}

/// Exits with status 1 and one line on stderr when the controller cannot start or fails: a
/// configuration error is a sentence to act on, never a backtrace (`RUST_BACKTRACE=1` is common
/// in containers, and anyhow's `Debug` output, which `main` returning `Err` prints, would add one).
///
/// The controller runs as a task on the runtime's workers, not on the main thread that blocks
/// on it: a watch event then wakes the controller on the worker that read it, where driving it
/// from the main thread cost a cross-thread wake-up (a futex) per event.
#[tokio::main]
async fn main() -> ExitCode {
    match tokio::spawn(run_cli(Cli::parse())).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // A panic (its message already printed by the panic hook).
        Err(e) => {
            eprintln!("grpc-registrar: {e}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("grpc-registrar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    // Listening before anything else, so that a SIGTERM during start-up is a graceful shutdown,
    // not the default exit by signal.
    let mut signals = Signals::listen()?;
    let Cli {
        backend,
        etcd,
        consul,
        registry,
        election,
        namespace,
        metrics_addr,
        log_format,
        shutdown_timeout,
        reconcile_concurrency,
        min_sync_interval,
    } = cli;
    logging::init(match log_format {
        LogFormat::Plain => logging::Format::Plain,
        LogFormat::Json => logging::Format::Json,
    });
    let (backend, registry_config) = match backend {
        BackendArg::Etcd => (
            Backend::Etcd,
            RegistryConfig::Etcd(etcd.into_config(&registry)?),
        ),
        BackendArg::Consul => (
            Backend::Consul,
            RegistryConfig::Consul(consul.into_config(&registry)?),
        ),
    };
    let config = Config {
        registry: registry_config,
        policy: Policy {
            key_prefix: registry.key_prefix,
            registrar_root: registry.registrar_root,
            custom_targets: CustomTargets::parse(&registry.custom_target_namespaces),
            cluster: registry.cluster_name,
            backend,
        },
        scope: Scope {
            namespace: (!namespace.is_empty()).then_some(namespace),
        },
        metrics_addr,
        election: election.into_config(),
        tuning: Tuning {
            concurrency: reconcile_concurrency,
            min_sync_interval,
        },
    };
    run::run(config, async move {
        signals.next().await;
        info!(
            timeout_ms = u64::try_from(shutdown_timeout.as_millis()).unwrap_or(u64::MAX),
            "shutdown signal received; finishing in-flight work (registrations are kept)"
        );
        // Shutdown always ends: whatever still waits (an unreachable API server or etcd) is
        // abandoned after the timeout, or at once on a second signal.
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(shutdown_timeout) => {
                    error!("in-flight work did not finish within the shutdown timeout; exiting");
                }
                () = signals.next() => warn!("second signal; exiting now"),
            }
            std::process::exit(1);
        });
    })
    .await
    .map_err(|e| anyhow::anyhow!(grpc_registrar::error::chain(&e)))?;
    Ok(())
}

/// Parses `500ms`, `2s`, `1m` or bare seconds.
/// The longest `--min-sync-interval`: a pacing longer than this is an outage, not a trade.
const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(60);

fn parse_sync_interval(s: &str) -> Result<Duration, String> {
    let interval = parse_duration(s)?;
    if interval > MAX_SYNC_INTERVAL {
        return Err(format!(
            "{s:?} is longer than {}s: a change would wait that long to be published",
            MAX_SYNC_INTERVAL.as_secs()
        ));
    }
    Ok(interval)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map_or_else(|| "grpc-registrar".to_owned(), |h| h.trim().to_owned())
}

/// SIGTERM and SIGINT, listened for from the start.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
