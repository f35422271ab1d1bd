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
