//! Real servers for tests, in the redis-test shape: a fresh process per test on free loopback
//! ports with a temp dir, readiness polled with a bound, killed on drop, its log printed when the
//! test fails.
//!
//! # Layout
//! - [`etcd`]: an etcd server built from the pinned Go module by `scripts/controlplane.sh`.
//! - [`pki`]: a throwaway CA for TLS tests.
//! - [`wait`]: [`eventually`], a condition with a deadline.
//! - [`bench`]: bench tables, printed and written as JSON.
//! - [`proxy`]: a TCP proxy a test can cut, for partitions.
//! - [`registry`]: what is under a registry prefix, and DELETEs a watcher saw.
//! - [`controlplane`]: etcd, kube-apiserver and kube-controller-manager (only its endpointslice
//!   controller, for real EndpointSlices) from the same module, with certificates, RBAC and a
//!   kubeconfig.

pub mod bench;
pub mod consul;
pub mod controlplane;
pub mod etcd;
pub mod pki;
pub mod proxy;
pub mod registry;
pub mod wait;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

pub use controlplane::ControlPlane;
pub use etcd::{EtcdAccess, EtcdServer};
pub use pki::TestCa;
pub use proxy::TcpProxy;
pub use wait::eventually;

/// The last `max` bytes of a log file (empty when it cannot be read).
#[must_use]
pub fn tail(path: &Path, max: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let cut = text.len().saturating_sub(max);
    let start = (cut..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    text[start..].to_owned()
}

/// The workspace root (this crate lives one level below it).
#[must_use]
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives inside the workspace")
        .to_path_buf()
}

/// A free TCP port on 127.0.0.1, found by binding port 0.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("failed to find a free port")
}

/// `N` free loopback ports, all different: each stays bound until every one is found (a port
/// let go can be handed out again at once, and Consul refuses one port for two roles).
///
/// # Panics
/// When no free port can be bound.
#[must_use]
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("failed to find a free port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("failed to find a free port")
            .port()
    })
}

/// This host's IPv4 address on its default route: an address servers can listen on that an
/// EndpointSlice accepts (the API server rejects loopback and link-local endpoint addresses).
///
/// # Panics
/// When the host has no such address: e2e tests that need it fail rather than skip.
#[must_use]
pub fn host_ip() -> std::net::IpAddr {
    // Connecting a UDP socket sends nothing; it only picks the source address of the route.
    ["10.255.255.255:9", "192.0.2.255:9", "172.31.255.255:9"]
        .iter()
        .find_map(|probe| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            socket.connect(probe).ok()?;
            let ip = socket.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
        .expect("this host has no non-loopback IPv4 address for EndpointSlice endpoints")
}

/// Finds a control-plane binary: `$<ENV>` if set, else `target/controlplane/bin/<name>`.
///
/// # Panics
/// When the binary is missing: tests never skip for want of a real server. `make test` (or
/// `scripts/controlplane.sh`) builds it.
#[must_use]
pub fn controlplane_bin(name: &str, env: &str) -> PathBuf {
    built_bin(
        "target/controlplane/bin",
        name,
        env,
        "scripts/controlplane.sh",
    )
}

/// The Go interop client built from `tests/interop` by `scripts/interop.sh`.
///
/// # Panics
/// When it is missing, as [`controlplane_bin`].
#[must_use]
pub fn interop_bin() -> PathBuf {
    built_bin(
        "target/interop/bin",
        "interop",
        "INTEROP_BIN",
        "scripts/interop.sh",
    )
}

/// The pinned helm binary (built by `scripts/helm.sh`; `HELM_BIN` overrides).
///
/// # Panics
/// When it is missing: tests that need it fail, never skip.
#[must_use]
pub fn helm_bin() -> PathBuf {
    built_bin("target/helm/bin", "helm", "HELM_BIN", "scripts/helm.sh")
}

fn built_bin(dir: &str, name: &str, env: &str, script: &str) -> PathBuf {
    let path =
        std::env::var_os(env).map_or_else(|| workspace_root().join(dir).join(name), PathBuf::from);
    assert!(
        path.is_file(),
        "{name} binary not found at {}: run `make test` or `{script}` to build it (or set {env})",
        path.display()
    );
    path
}

/// A plain HTTP/1.1 GET of `path` on a loopback `port`: (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Some((code, body))
}
