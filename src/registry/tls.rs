//! TLS material for a registry client, one type for every backend.

/// TLS material, PEM: the CA that signed the registry's serving certificate, and an optional
/// client certificate and key (mTLS).
#[derive(Clone, Default)]
pub struct TlsPem {
    /// CA certificate(s), PEM.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and private key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_key_never_reaches_a_log() {
        let tls = TlsPem {
            ca: Some(b"ca".to_vec()),
            identity: Some((b"cert".to_vec(), b"secret-key".to_vec())),
        };
        let shown = format!("{tls:?}");
        assert!(
            !shown.contains("secret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
