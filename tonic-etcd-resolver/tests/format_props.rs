//! Property tests over the wire format: no input makes the parser panic, and whatever the
//! renderer writes, the parser reads back. `PROPTEST_CASES` scales the run (CI: 1,000,000 with
//! `make test`, split over the strategies below).

use proptest::prelude::*;
use tonic_etcd_resolver::format::{self, Endpoint, ValueFormat};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20_000)
}

fn metadata() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        ".*".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn addr() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<std::net::Ipv4Addr>(), any::<u16>())
            .prop_map(|(ip, p)| format::socket_addr(ip.into(), p)),
        (any::<std::net::Ipv6Addr>(), any::<u16>())
            .prop_map(|(ip, p)| format::socket_addr(ip.into(), p)),
        ("[a-z][a-z0-9.-]{0,20}", any::<u16>()).prop_map(|(h, p)| format!("{h}:{p}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn a_socket_address_is_written_as_the_standard_library_writes_it(
        ip in prop_oneof![
            any::<std::net::Ipv4Addr>().prop_map(std::net::IpAddr::from),
            any::<std::net::Ipv6Addr>().prop_map(std::net::IpAddr::from),
        ],
        port in any::<u16>(),
    ) {
        prop_assert_eq!(
            format::socket_addr(ip, port),
            std::net::SocketAddr::new(ip, port).to_string()
        );
    }

    #[test]
    fn rendering_borrowed_parts_writes_the_bytes_rendering_the_endpoint_writes(
        addr in addr(),
        id in ".{0,16}",
        service in ".{0,12}",
        md in prop::collection::btree_map(
            prop_oneof![Just("version".to_owned()), Just("weight".to_owned()), ".{0,8}"],
            ".{0,12}",
            0..5,
        ),
    ) {
        let parts = format::EndpointParts { addr: &addr, id: &id, service: &service, metadata: &md };
        for f in ValueFormat::ALL {
            prop_assert_eq!(
                f.codec().render_parts(&parts),
                f.codec().render(&parts.to_endpoint()),
                "{}", f
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_make_the_parser_panic(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let _ = format::parse(&bytes);
    }

    #[test]
    fn json_shaped_garbage_never_makes_the_parser_panic(text in r#"\{("(Op|Addr|Metadata|id|name|endpoints|metadata|x)":)?[-0-9a-z:/\[\]{}",. null]{0,40}\}?"#) {
        let _ = format::parse(text.as_bytes());
        for f in ValueFormat::ALL {
            let _ = f.codec().parse(text.as_bytes());
        }
    }

    #[test]
    fn every_kratos_value_parses_back_to_its_address_id_service_and_string_metadata(
        addr in addr(),
        id in "[a-z0-9-]{1,12}",
        service in "[a-z][a-z0-9-]{0,12}",
        md in prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..4),
    ) {
        let metadata = serde_json::Value::Object(
            md.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        );
        let endpoint = Endpoint::new(addr).with_id(id).with_service(service).with_metadata(metadata);
        let value = format::render(ValueFormat::Kratos, &endpoint);
        prop_assert_eq!(format::detect(&value), ValueFormat::Kratos);
        let parsed = format::parse(&value).unwrap();
        prop_assert_eq!(&parsed.addr, &endpoint.addr);
        prop_assert_eq!(&parsed.id, &endpoint.id);
        prop_assert_eq!(&parsed.service, &endpoint.service);
        prop_assert_eq!(parsed.metadata.unwrap_or(serde_json::json!({})), endpoint.metadata.unwrap());
    }

    #[test]
    fn every_rendered_value_parses_back_to_the_same_endpoint(addr in addr(), md in proptest::option::of(metadata())) {
        let mut endpoint = Endpoint::new(addr);
        if let Some(md) = md.filter(|m| !m.is_null()) {
            endpoint = endpoint.with_metadata(md);
        }
        let naming = format::render(ValueFormat::EtcdNaming, &endpoint);
        prop_assert_eq!(format::parse(&naming).unwrap(), endpoint.clone());
        let bare = format::render(ValueFormat::Address, &endpoint);
        prop_assert_eq!(format::parse(&bare).unwrap().addr, endpoint.addr);
    }
}
