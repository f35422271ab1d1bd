//! etcd security against a real etcd: mTLS, username/password auth with tokens that expire, and
//! certificate common-name auth under a role limited to the controller's prefixes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Permission, PermissionType, UserAddOptions};
use grpc_registrar::metrics::Metrics;
use grpc_registrar::registry::etcd::{EtcdConfig, EtcdRegistry, EtcdTls, EtcdUser};
use grpc_registrar::registry::{Claim, Owner};
use test_support::{EtcdServer, TestCa, eventually};
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};

const TTL: Duration = Duration::from_secs(5);
const TARGET: &str = "services/default/greeter";

fn owner() -> Owner {
    Owner {
        uid: "uid-greeter".into(),
        namespace: "default".into(),
        name: "greeter".into(),
    }
}

fn entries(addrs: &[&str]) -> Arc<BTreeMap<String, Vec<u8>>> {
    Arc::new(
        addrs
            .iter()
            .map(|addr| {
                let value = format::render(ValueFormat::EtcdNaming, &Endpoint::new(*addr));
                (format::endpoint_key(TARGET, addr), value)
            })
            .collect(),
    )
}

fn config(etcd: &EtcdServer) -> EtcdConfig {
    EtcdConfig {
        default_ttl: TTL,
        op_timeout: Duration::from_secs(2),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    }
}

async fn publish(registry: &EtcdRegistry, addrs: &[&str]) -> grpc_registrar::registry::Result<()> {
    assert_eq!(registry.claim(TARGET, &owner()).await?, Claim::Owned);
    registry
        .sync_entries(TARGET, &owner(), TTL, entries(addrs))
        .await
        .map(|_| ())
}

async fn keys(etcd: &EtcdServer) -> Vec<String> {
    test_support::registry::dump(&mut etcd.client().await, &format!("{TARGET}/"))
        .await
        .into_keys()
        .collect()
}

/// The minimal role the README documents: readwrite on the key prefix and the controller's own
/// records, nothing else.
async fn add_registrar_user(etcd: &EtcdServer, password: Option<&str>) {
    let mut root = etcd.client().await;
    let options = password
        .is_none()
        .then(|| UserAddOptions::new().with_no_pwd());
    root.user_add("grpc-registrar", password.unwrap_or_default(), options)
        .await
        .unwrap();
    root.role_add("grpc-registrar").await.unwrap();
    for prefix in ["services/", "grpc-registrar/"] {
        root.role_grant_permission(
            "grpc-registrar",
            Permission::new(PermissionType::Readwrite, prefix).with_prefix(),
        )
        .await
        .unwrap();
    }
    root.user_grant_role("grpc-registrar", "grpc-registrar")
        .await
        .unwrap();
}

#[tokio::test]
async fn mtls_with_a_client_certificate_registers_and_a_client_without_one_is_refused() {
    let ca = TestCa::new("etcd test ca");
    let etcd = EtcdServer::start_tls(&ca).await;
    let client = ca.client("grpc-registrar");
    let tls = EtcdTls {
        ca: Some(ca.ca_pem().as_bytes().to_vec()),
        identity: Some((
            client.cert_pem.clone().into_bytes(),
            client.key_pem.clone().into_bytes(),
        )),
    };
    let registry = EtcdRegistry::connect(
        EtcdConfig {
            tls: Some(tls),
            ..config(&etcd)
        },
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    publish(&registry, &["10.0.0.1:50051"]).await.unwrap();
    assert_eq!(keys(&etcd).await, [format!("{TARGET}/10.0.0.1:50051")]);

    // The CA alone (no client certificate) is refused by --client-cert-auth.
    let anonymous = EtcdRegistry::connect(
        EtcdConfig {
            tls: Some(EtcdTls {
                ca: Some(ca.ca_pem().as_bytes().to_vec()),
                identity: None,
            }),
            ..config(&etcd)
        },
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let err = anonymous.list(TARGET).await.unwrap_err();
    assert!(
        err.to_string().contains("failed to list target keys"),
        "{err}"
    );
}

#[tokio::test]
async fn password_auth_re_authenticates_after_the_token_expires_and_keeps_the_lease_alive() {
    // Simple tokens expire after 1 s of disuse here (the default is 300 s).
    let mut etcd = EtcdServer::start_with(&["--auth-token-ttl=1"]).await;
    etcd.enable_auth("root-secret").await;
    add_registrar_user(&etcd, Some("s3cret-pw")).await;
    let config = EtcdConfig {
        user: Some(EtcdUser {
            name: "grpc-registrar".into(),
            password: "s3cret-pw".into(),
        }),
        ..config(&etcd)
    };
    assert!(
        !format!("{config:?}").contains("s3cret-pw"),
        "the password must never be printed"
    );
    let registry = EtcdRegistry::connect(config, Arc::new(Metrics::default()))
        .await
        .unwrap();
    publish(&registry, &["10.0.0.1:50051"]).await.unwrap();

    // Idle well past the token TTL and past the etcd lease TTL: the keep-alive stream must
    // re-authenticate too, or the keys would expire.
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    assert_eq!(keys(&etcd).await.len(), 1, "the lease was kept alive");
    publish(&registry, &["10.0.0.1:50051", "10.0.0.2:50051"])
        .await
        .expect("a write with an expired token is re-authenticated and retried");
    assert_eq!(keys(&etcd).await.len(), 2);

    // A wrong password is an error that names the operation, not a panic.
    let wrong = EtcdRegistry::connect(
        EtcdConfig {
            user: Some(EtcdUser {
                name: "grpc-registrar".into(),
                password: "wrong".into(),
            }),
            ..EtcdConfig::new(vec![etcd.endpoint()])
        },
        Arc::new(Metrics::default()),
    )
    .await;
    let err = wrong.err().expect("a wrong password is refused");
    assert!(
        err.to_string().starts_with("failed to connect to etcd"),
        "{err}"
    );
}

#[tokio::test]
async fn certificate_common_name_auth_writes_the_prefixes_of_its_role_and_nothing_else() {
    let ca = TestCa::new("etcd test ca");
    let mut etcd = EtcdServer::start_tls(&ca).await;
    etcd.enable_auth("root-secret").await;
    add_registrar_user(&etcd, None).await;
    let client = ca.client("grpc-registrar");
    let tls = EtcdTls {
        ca: Some(ca.ca_pem().as_bytes().to_vec()),
        identity: Some((client.cert_pem.into_bytes(), client.key_pem.into_bytes())),
    };
    let registry = EtcdRegistry::connect(
        EtcdConfig {
            tls: Some(tls),
            ..config(&etcd)
        },
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    // No password anywhere: etcd takes the user from the certificate.
    publish(&registry, &["10.0.0.1:50051"]).await.unwrap();
    eventually("the key is there", Duration::from_secs(5), || async {
        keys(&etcd).await.len() == 1
    })
    .await;

    // Outside the role's prefixes, etcd refuses.
    let mut kv = registry.client().kv_client();
    let err = kv.put("other/secret", "x", None).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("permission denied"),
        "{err}"
    );
}
