//! TLS for the channels that leave the host (issue 28): the peer channel (mutual TLS, a
//! certificate per node), etcd, the alert webhooks and `/metrics`. One place reads the PEM
//! files, checks that secrets are private, and builds rustls configurations with one crypto
//! provider (ring, the one etcd-client's tonic uses too), so every error names the file and the
//! reason the same way.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use serde::Deserialize;

use crate::Error;

/// A certificate, its key and the CA that signs the other side (`cluster.tls`,
/// `cluster.limits.tls`): PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA the other side's certificate must chain to.
    pub ca: PathBuf,
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM; readable by its owner only.
    pub key: PathBuf,
}

#[expect(deprecated, reason = "ring, as etcd-client's tonic uses: aws-lc-rs (post-quantum key exchange) needs CMake and a long C build")]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Refuses a secret (a private key, a password or token file) that others than its owner may
/// read, as ssh does: the message names the file, its mode and the fix.
pub fn check_private(path: &Path, key: &str) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::other(format!("{key} {}", path.display()), e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::other(
            format!("{key} {}", path.display()),
            anyhow::anyhow!("this secret is readable by others than its owner (mode {mode:04o}); refusing to use it: `chmod 600 {}`", path.display()),
        ));
    }
    Ok(())
}

/// Reads a secret file (checked private); a trailing newline is not part of it.
pub fn read_secret(path: &Path, key: &str) -> Result<String, Error> {
    check_private(path, key)?;
    let s = std::fs::read_to_string(path).map_err(|e| Error::other(format!("reading {key} {}", path.display()), e))?;
    let s = s.strip_suffix('\n').unwrap_or(&s).to_owned();
    if s.is_empty() {
        return Err(Error::other(format!("{key} {}", path.display()), anyhow::anyhow!("the file is empty")));
    }
    Ok(s)
}

/// The certificates of a PEM file, at least one.
pub fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let ctx = || format!("{key} {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::other(ctx(), anyhow::anyhow!("{e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::other(ctx(), anyhow::anyhow!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::other(ctx(), anyhow::anyhow!("no certificate (-----BEGIN CERTIFICATE-----) in the file")));
    }
    Ok(certs)
}

/// A private key from a PEM file (PKCS#8, PKCS#1 or SEC1), checked private.
pub fn read_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, Error> {
    check_private(path, key)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::other(format!("{key} {}", path.display()), anyhow::anyhow!("no private key read: {e}")))
}

/// The trust anchors of a CA file.
pub fn read_roots(path: &Path, key: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path, key)? {
        roots.add(c).map_err(|e| Error::other(format!("{key} {}", path.display()), anyhow::anyhow!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The system's trust anchors (`/etc/ssl/certs`).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("reading the system's CA certificates: {e}");
    }
    roots.add_parsable_certificates(found.certs);
    roots
}

/// A server configuration: this side's certificate and key and, with `client_ca`, every client
/// must present a certificate that chains to it (mutual TLS).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>, what: &str) -> Result<Arc<ServerConfig>, Error> {
    server_config_with(cert, key, client_ca, what, false)
}

/// [`server_config`], offering TLS 1.3 only with `tls13_only`.
pub fn server_config_with(cert: &Path, key: &Path, client_ca: Option<&Path>, what: &str, tls13_only: bool) -> Result<Arc<ServerConfig>, Error> {
    let chain = read_certs(cert, &format!("{what} certificate"))?;
    let private = read_key(key, &format!("{what} key"))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only { &[&rustls::version::TLS13] } else { rustls::DEFAULT_VERSIONS };
    let builder = ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions).map_err(|e| Error::other("TLS", e))?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = read_roots(ca, &format!("{what} CA"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| Error::other(format!("{what} CA {}", ca.display()), e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| Error::other(format!("{what} certificate {} and key {}", cert.display(), key.display()), anyhow::anyhow!("{}", describe(&e))))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration: the server must chain to `ca` (or the system's roots without one);
/// with `identity` (certificate, key), this side presents it.
pub fn client_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>, what: &str) -> Result<Arc<ClientConfig>, Error> {
    let roots = match ca {
        Some(ca) => read_roots(ca, &format!("{what} CA"))?,
        None => system_roots(),
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| Error::other(format!("{what} CA"), e))?;
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| Error::other("TLS", e))?.with_webpki_verifier(verifier);
    let config = match identity {
        Some((cert, key)) => {
            let chain = read_certs(cert, &format!("{what} certificate"))?;
            let private = read_key(key, &format!("{what} key"))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| Error::other(format!("{what} certificate {} and key {}", cert.display(), key.display()), anyhow::anyhow!("{}", describe(&e))))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Both sides of a mutual-TLS channel (the peer channel): every node serves and connects with
/// its own certificate, and trusts the cluster's CA only.
#[derive(Clone)]
pub struct Mutual {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl Mutual {
    /// Reads `files`; `key` names the config table in errors (`cluster.tls`).
    pub fn load(files: &TlsFiles, key: &str) -> Result<Self, Error> {
        // Said at start, not only as refused handshakes later; the datapath forwards either way.
        if let Some(why) = diagnose_own(&files.cert, &files.ca) {
            tracing::error!("{key}.cert: {why}: the peers will refuse this node's certificate");
        }
        Ok(Self { server: server_config(&files.cert, &files.key, Some(&files.ca), key)?, client: client_config(Some(&files.ca), Some((&files.cert, &files.key)), key)? })
    }
}

/// Whether `cert` (already verified against the CA) is valid for `name` (its DNS or IP
/// subject alternative names): the peer channel ties a node's messages to its certificate.
pub fn cert_is_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else { return false };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// A rustls error as an operator reads it: which check failed, and what to look at.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => "the certificate is signed by an unknown CA (not the configured ca)".into(),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "the certificate has expired".into(),
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "the certificate is not valid yet (check the clocks)".into(),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the certificate is not valid for this name or address (its subject alternative names)".into()
        }
        E::InvalidCertificate(C::BadSignature) => "the certificate's signature does not verify".into(),
        E::InvalidCertificate(C::Revoked) => "the certificate is revoked".into(),
        E::NoCertificatesPresented => "the other side presented no certificate".into(),
        E::AlertReceived(a) => format!("the other side refused the handshake (TLS alert {a:?}): usually this side's certificate (from a CA it does not trust, expired, or none)"),
        E::InconsistentKeys(_) => "the key does not belong to the certificate".into(),
        other => other.to_string(),
    }
}

/// Why the other side may refuse this side's certificate `cert`, checked against `ca` now: it
/// expired, is not valid yet, or does not chain to `ca`. `None` if it verifies.
pub fn diagnose_own(cert: &Path, ca: &Path) -> Option<String> {
    let chain = read_certs(cert, "certificate").ok()?;
    let roots = read_roots(ca, "CA").ok()?;
    let leaf = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
    let algs = provider().signature_verification_algorithms.all;
    let verdict = leaf.verify_for_usage(algs, &roots.roots, &chain[1..], rustls::pki_types::UnixTime::now(), webpki::KeyUsage::client_auth(), None, None);
    let when = |t: &rustls::pki_types::UnixTime| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()));
    match verdict {
        Ok(_) => None,
        Err(webpki::Error::CertExpired { not_after, .. }) => Some(format!("{} expired at {}", cert.display(), when(&not_after))),
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => Some(format!("{} is not valid before {} (check the clocks)", cert.display(), when(&not_before))),
        Err(webpki::Error::UnknownIssuer) => Some(format!("{} is not signed by the CA {}", cert.display(), ca.display())),
        Err(e) => Some(format!("{}: {e}", cert.display())),
    }
}

/// Names the TLS reason inside any error chain (a tonic or hyper error wrapping a rustls one).
pub fn reason_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(t));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(describe(t));
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_others_may_read_is_refused_naming_file_and_mode() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("pw");
        std::fs::write(&f, "secret\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_secret(&f, "cluster.limits.password_file").expect_err("0644 refused").to_string();
        assert!(e.contains("0644") && e.contains("cluster.limits.password_file") && e.contains(&f.display().to_string()) && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(read_secret(&f, "k").is_err(), "group-readable is refused too");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_secret(&f, "k").expect("0600 read"), "secret");
        std::fs::write(&f, "").expect("write");
        assert!(read_secret(&f, "k").expect_err("empty").to_string().contains("empty"));
        let e = read_certs(&f, "cluster.tls.cert").expect_err("no certificate").to_string();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
