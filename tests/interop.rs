//! Interop with real Go code: etcd's own gRPC naming resolver and endpoints manager.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use greeter::GreeterServer;
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry};
use grpc_registrar::registry::{Claim, Owner};
use test_support::{EtcdServer, interop_bin};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};
use tonic_etcd_resolver::{Options, Resolver};

const TARGET: &str = "services/default/greeter";

async fn servers(n: usize) -> Vec<GreeterServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            GreeterServer::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    out
}

fn go(args: &[&str]) -> String {
    let out = Command::new(interop_bin())
        .args(args)
        .output()
        .expect("failed to run the Go interop client");
    assert!(
        out.status.success(),
        "interop {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn go_etcd_resolver_round_robins_across_servers_the_controller_registered() {
    let etcd = EtcdServer::start().await;
    let servers = servers(3).await;
    let registry = EtcdRegistry::connect(
        EtcdConfig::new(vec![etcd.endpoint()]),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let owner = Owner {
        uid: "uid-greeter".into(),
        namespace: "default".into(),
        name: "greeter".into(),
    };
    let entries: BTreeMap<String, Vec<u8>> = servers
        .iter()
        .map(|s| {
            let addr = s.addr().to_string();
            let md = serde_json::json!({"namespace": "default", "pod": "greeter-0"});
            let value = format::render(
                ValueFormat::EtcdNaming,
                &Endpoint::new(addr.clone()).with_metadata(md),
            );
            (format::endpoint_key(TARGET, &addr), value)
        })
        .collect();
    assert_eq!(registry.claim(TARGET, &owner).await.unwrap(), Claim::Owned);
    registry
        .sync_entries(TARGET, &owner, Duration::from_secs(30), Arc::new(entries))
        .await
        .unwrap();

    let endpoint = etcd.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        go(&["call", "-etcd", &endpoint, "-target", TARGET, "-n", "60"])
    })
    .await
    .unwrap();
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["failed"], 0, "{result}");
    // grpc-go's round_robin starts while subchannels are still connecting, so the spread is
    // even but not exact.
    for s in &servers {
        let served = result["servers"][s.addr().to_string()]
            .as_u64()
            .unwrap_or(0);
        assert!(
            (10..=30).contains(&served),
            "round robin over all three: {result}"
        );
    }
}

#[tokio::test]
async fn resolver_reads_keys_written_by_go_endpoints_manager() {
    let etcd = EtcdServer::start().await;
    let servers = servers(2).await;
    for s in &servers {
        let (endpoint, addr) = (etcd.endpoint(), s.addr().to_string());
        tokio::task::spawn_blocking(move || {
            go(&[
                "register", "-etcd", &endpoint, "-target", TARGET, "-addr", &addr,
            ])
        })
        .await
        .unwrap();
    }
    let resolver = Resolver::connect([etcd.endpoint()], TARGET, Options::default())
        .await
        .unwrap();
    let snapshot = resolver.endpoints().borrow().clone();
    assert_eq!(snapshot.len(), 2);
    assert!(
        snapshot
            .values()
            .all(|e| e.metadata == Some(serde_json::json!({"writer": "go"})))
    );

    let mut client = GreeterClient::new(resolver.channel());
    let mut answered = BTreeMap::new();
    for _ in 0..20 {
        let reply = client
            .say_hello(HelloRequest {
                name: "rust".into(),
            })
            .await
            .unwrap();
        *answered.entry(reply.into_inner().server).or_insert(0) += 1;
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
}

#[tokio::test]
async fn kratos_codec_writes_the_bytes_kratos_registers_and_the_resolver_calls_through_them() {
    use std::io::{BufRead, BufReader};
    use tonic_etcd_resolver::Codec;
    use tonic_etcd_resolver::format::Kratos;

    let etcd = EtcdServer::start().await;
    let server = servers(1).await.remove(0);
    let addr = server.addr().to_string();
    // kratos' own etcd Registry.Register, as kratos.App does on start.
    let mut child = Command::new(interop_bin())
        .args(["kratos-register", "-etcd", &etcd.endpoint()])
        .args(["-name", "greeter", "-id", "inst-1", "-addr", &addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("failed to run the Go interop client");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    let written = etcd
        .client()
        .await
        .get("/microservices/greeter/inst-1", None)
        .await
        .unwrap();
    let kratos_bytes = written.kvs()[0].value().to_vec();
    let ours = Kratos.render(
        &Endpoint::new(&addr)
            .with_id("inst-1")
            .with_service("greeter"),
    );
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&kratos_bytes),
        "our Kratos codec and kratos' Register write the same bytes"
    );
    assert_eq!(format::detect(&kratos_bytes), ValueFormat::Kratos);

    // The resolver reads kratos' own registration and calls through it.
    let resolver = Resolver::connect(
        [etcd.endpoint()],
        "/microservices/greeter",
        Options::default()
            .format(ValueFormat::Kratos)
            .wait_for_endpoints(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let snapshot = resolver.endpoints().borrow().clone();
    let found: Vec<&str> = snapshot.values().map(|e| e.addr.as_str()).collect();
    assert_eq!(found, [addr.as_str()]);
    let reply = GreeterClient::new(resolver.channel())
        .say_hello(HelloRequest {
            name: "kratos".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().server, addr);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

/// A grpc-go server (`interop serve`), its stdout lines collected: "ready ADDR", then
/// "accepted N" per connection. Stopped when dropped.
struct GoServer {
    child: std::process::Child,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GoServer {
    /// Enforcing one keep-alive ping per `min_time` and none with no RPC open (grpc-go's default
    /// policy, with its 5 minutes scaled down).
    async fn start(min_time: &str) -> (Self, String) {
        use std::io::BufRead;
        let mut child = Command::new(interop_bin())
            .args(["serve", "-min-time", min_time])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("failed to start the Go server");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        let server = Self { child, lines };
        let addr = loop {
            if let Some(addr) = server
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix("ready ").map(str::to_owned))
            {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (server, addr)
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("accepted "))
            .count()
    }
}

impl Drop for GoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resolver's default keep-alive (one ping per 300 s, only while an RPC is open) keeps to
/// what a grpc-go server accepts by default (one per 5 minutes, none while idle): here both
/// scaled down 100x (3 s against 2 s), an idle client keeps its one connection, where pinging
/// while idle gets it cut off with `GOAWAY too_many_pings` and reconnected.
#[tokio::test]
async fn an_idle_connection_to_a_grpc_go_server_is_kept_under_its_default_keep_alive_policy() {
    let etcd = EtcdServer::start().await;
    let (go_default, default_addr) = GoServer::start("2s").await;
    let (go_idle, idle_addr) = GoServer::start("2s").await;
    let mut kv = etcd.client().await;
    for (target, addr) in [("ka/default", &default_addr), ("ka/idle", &idle_addr)] {
        let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(addr.as_str()));
        kv.put(format::endpoint_key(target, addr), value, None)
            .await
            .unwrap();
    }
    let ping = Some((Duration::from_secs(3), Duration::from_secs(1)));
    let default = Resolver::connect(
        [etcd.endpoint()],
        "ka/default",
        Options::default().keep_alive(ping),
    )
    .await
    .unwrap();
    let idle = Resolver::connect(
        [etcd.endpoint()],
        "ka/idle",
        Options::default()
            .keep_alive(ping)
            .keep_alive_while_idle(true),
    )
    .await
    .unwrap();
    for resolver in [&default, &idle] {
        let reply = GreeterClient::new(resolver.channel())
            .say_hello(HelloRequest::default())
            .await
            .unwrap();
        assert!(!reply.into_inner().server.is_empty());
    }
    // Idle for four strikes' worth of pings (grpc-go cuts off at the third).
    test_support::eventually(
        "the idle-pinging client cut off and reconnected",
        Duration::from_secs(30),
        || async { go_idle.accepted() >= 2 },
    )
    .await;
    assert_eq!(
        go_default.accepted(),
        1,
        "the default keep-alive got its idle connection cut off"
    );
    assert_eq!(default.ready_endpoints(), [default_addr]);
}
