//! Backend connections with health: an endpoint whose connection fails is not picked again until
//! it answers a reachability probe.
//!
//! Each connection's socket is watched: end-of-stream or a read error (the backend died) marks
//! the endpoint down at once, before any RPC has to fail on it. A transport error on an RPC does
//! the same. A per-endpoint task then probes with backoff and puts it back when it answers.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::Options;

/// One endpoint's up/down flag.
#[derive(Default)]
pub(crate) struct Health {
    down: AtomicBool,
    wake: Notify,
}

impl Health {
    /// Marks the endpoint down and wakes its task; idempotent.
    pub(crate) fn mark_down(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }
}

/// An endpoint that may be picked.
#[derive(Clone)]
pub(crate) struct Ready {
    pub(crate) addr: Arc<str>,
    pub(crate) channel: Channel,
    pub(crate) health: Arc<Health>,
}

struct Member {
    task: JoinHandle<()>,
    /// Set once the first reachability probe has finished, either way.
    probed: Arc<AtomicBool>,
}

/// Every backend the registry lists, and the subset that may be picked.
pub(crate) struct Pool {
    options: Options,
    members: Mutex<HashMap<String, Member>>,
    ready: RwLock<Arc<Vec<Ready>>>,
    /// Signalled whenever the ready set changes or a first probe finishes.
    pub(crate) changed: Notify,
    next: AtomicUsize,
    /// Members whose first probe has not finished: an RPC waits for them rather than failing.
    unprobed: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(options: Options) -> Arc<Self> {
        Arc::new(Self {
            options,
            members: Mutex::default(),
            ready: RwLock::default(),
            changed: Notify::new(),
            next: AtomicUsize::new(0),
            unprobed: AtomicUsize::new(0),
        })
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// Makes the member set equal `addrs`: new addresses start connecting, gone ones are dropped
    /// from the ready set at once.
    pub(crate) fn set(self: &Arc<Self>, addrs: &BTreeSet<String>) {
        let mut members = self.members.lock().expect("lock");
        let gone: Vec<String> = members
            .keys()
            .filter(|a| !addrs.contains(*a))
            .cloned()
            .collect();
        for addr in &gone {
            if let Some(member) = members.remove(addr) {
                member.task.abort();
                self.probed(&member.probed);
            }
            info!(addr, "endpoint removed");
        }
        if !gone.is_empty() {
            self.update_ready(|ready| ready.retain(|r| !gone.iter().any(|g| **g == *r.addr)));
        }
        for addr in addrs {
            if !members.contains_key(addr) {
                info!(addr, "endpoint added");
                let probed = Arc::new(AtomicBool::new(false));
                self.unprobed.fetch_add(1, Ordering::AcqRel);
                let task = tokio::spawn(member(Arc::downgrade(self), addr.clone(), probed.clone()));
                members.insert(addr.clone(), Member { task, probed });
            }
        }
    }

    /// The next ready endpoint, round-robin.
    pub(crate) fn pick(&self) -> Option<Ready> {
        let ready = self.ready.read().expect("lock").clone();
        if ready.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
        Some(ready[i].clone())
    }

    /// Whether some endpoint is still on its first connection attempt.
    pub(crate) fn connecting(&self) -> bool {
        self.unprobed.load(Ordering::Acquire) > 0
    }

    /// Records a member's first probe as finished (once).
    fn probed(&self, flag: &AtomicBool) {
        if !flag.swap(true, Ordering::AcqRel) {
            self.unprobed.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_waiters();
        }
    }

    /// Addresses currently picked from, for tests and observability.
    pub(crate) fn ready_addrs(&self) -> Vec<String> {
        self.ready
            .read()
            .expect("lock")
            .iter()
            .map(|r| r.addr.to_string())
            .collect()
    }

    fn update_ready(&self, f: impl FnOnce(&mut Vec<Ready>)) {
        {
            let mut guard = self.ready.write().expect("lock");
            let mut next = guard.as_ref().clone();
            f(&mut next);
            next.sort_by(|a, b| a.addr.cmp(&b.addr));
            *guard = Arc::new(next);
        }
        self.changed.notify_waiters();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(members) = self.members.lock() {
            for member in members.values() {
                member.task.abort();
            }
        }
    }
}

/// Keeps one endpoint's connection: probe until reachable, serve until it fails, repeat.
async fn member(pool: Weak<Pool>, addr: String, probed: Arc<AtomicBool>) {
    let Some(strong) = pool.upgrade() else { return };
    let options = strong.options.clone();
    drop(strong);
    let endpoint = match options.endpoint(&addr) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            warn!(addr, error = %e, "skipping endpoint");
            return;
        }
    };
    let health = Arc::new(Health::default());
    let connector = WatchedConnector {
        health: Arc::downgrade(&health),
        nodelay: options.tcp_nodelay,
    };
    let channel = endpoint.connect_with_connector_lazy(connector);
    let name: Arc<str> = addr.as_str().into();
    loop {
        let mut delays = options.backoff();
        loop {
            let probe =
                tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr.as_str()))
                    .await;
            if matches!(probe, Ok(Ok(_))) {
                break;
            }
            if let Some(pool) = pool.upgrade() {
                pool.probed(&probed);
            }
            let delay = delays.next().unwrap_or(options.retry_max);
            debug!(addr, ?delay, "endpoint unreachable; probing again");
            tokio::time::sleep(delay).await;
        }
        health.down.store(false, Ordering::Release);
        let Some(strong) = pool.upgrade() else { return };
        let ready = Ready {
            addr: name.clone(),
            channel: channel.clone(),
            health: health.clone(),
        };
        strong.update_ready(|set| {
            set.retain(|r| r.addr != name);
            set.push(ready);
        });
        strong.probed(&probed);
        drop(strong);
        debug!(addr, "endpoint up");
        while !health.down.load(Ordering::Acquire) {
            health.wake.notified().await;
        }
        let Some(strong) = pool.upgrade() else { return };
        strong.update_ready(|set| set.retain(|r| r.addr != name));
        drop(strong);
        warn!(
            addr,
            "endpoint connection failed; not picked until it answers again"
        );
    }
}

/// Connects backends over TCP and marks the endpoint down when the socket ends.
#[derive(Clone)]
struct WatchedConnector {
    health: Weak<Health>,
    nodelay: bool,
}

impl tower::Service<http::Uri> for WatchedConnector {
    type Response = TokioIo<WatchedStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "uri has no authority")
            })?;
            let stream = match TcpStream::connect(authority.as_str()).await {
                Ok(stream) => stream,
                Err(e) => {
                    if let Some(health) = this.health.upgrade() {
                        health.mark_down();
                    }
                    return Err(e);
                }
            };
            stream.set_nodelay(this.nodelay)?;
            Ok(TokioIo::new(WatchedStream {
                inner: stream,
                health: this.health,
            }))
        })
    }
}

/// A TCP stream that reports its end (EOF or error) to the endpoint's health.
struct WatchedStream {
    inner: TcpStream,
    health: Weak<Health>,
}

impl WatchedStream {
    fn ended(&self) {
        if let Some(health) = self.health.upgrade() {
            health.mark_down();
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => self.ended(),
            Poll::Ready(Err(_)) => self.ended(),
            _ => {}
        }
        result
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(_)) = &result {
            self.ended();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
