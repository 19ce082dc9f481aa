//! `daemon.metrics_web_config`: TLS and basic authentication for `/metrics`, read from the web
//! configuration file every Prometheus exporter takes (`--web.config.file` of the exporter
//! toolkit), so operators reuse the file, certificates and bcrypt hashes they already have.
//!
//! Supported: `tls_server_config` (`cert_file`, `key_file`, `client_ca_file`,
//! `client_auth_type` `NoClientCert` or `RequireAndVerifyClientCert`, `min_version`) and
//! `basic_auth_users` (bcrypt hashes). Any other key is refused by name: a setting that would
//! silently not apply is worse than none.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    extract::Request,
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse as _, Response},
    Router,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::Error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsServer>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServer {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    min_version: Option<String>,
}

/// A loaded web configuration: the TLS server configuration and the users.
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    users: BTreeMap<String, String>,
}

impl WebConfig {
    /// Reads and checks `path` (its certificates and key too): an error names the file, the key
    /// and the reason.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let ctx = |what: &str| format!("daemon.metrics_web_config {}: {what}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| Error::other(ctx("reading"), e))?;
        let file = parse(&text).map_err(|e| Error::other(ctx(&e.0), anyhow::anyhow!("{}", e.1)))?;
        // Relative paths are relative to the file, as in the exporter toolkit.
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let tls = match file.tls_server_config {
            None => None,
            Some(t) => {
                let client_ca = match (t.client_auth_type.as_deref(), &t.client_ca_file) {
                    (None | Some("NoClientCert"), _) => None,
                    (Some("RequireAndVerifyClientCert"), Some(ca)) => Some(dir.join(ca)),
                    (Some("RequireAndVerifyClientCert"), None) => {
                        return Err(Error::other(ctx("tls_server_config.client_ca_file"), anyhow::anyhow!("RequireAndVerifyClientCert needs a client_ca_file")))
                    }
                    (Some(other), _) => {
                        return Err(Error::other(
                            ctx("tls_server_config.client_auth_type"),
                            anyhow::anyhow!("{other:?} is not supported: use NoClientCert or RequireAndVerifyClientCert"),
                        ))
                    }
                };
                let tls13_only = match t.min_version.as_deref() {
                    None | Some("TLS12") => false,
                    Some("TLS13") => true,
                    Some(other) => return Err(Error::other(ctx("tls_server_config.min_version"), anyhow::anyhow!("{other:?}: use TLS12 or TLS13"))),
                };
                let config = crate::tls::server_config_with(&dir.join(&t.cert_file), &dir.join(&t.key_file), client_ca.as_deref(), "metrics TLS", tls13_only)?;
                Some(config)
            }
        };
        Ok(Self { tls, users: file.basic_auth_users })
    }

    /// `app` behind basic authentication when the file names users.
    pub fn guard(&self, app: Router) -> Router {
        if self.users.is_empty() {
            return app;
        }
        let auth = Arc::new(Auth { users: self.users.clone(), verified: Mutex::default(), hashing: Arc::new(tokio::sync::Semaphore::new(2)) });
        app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let auth = auth.clone();
            async move {
                let credentials = basic_credentials(&req);
                if auth.allows(credentials).await {
                    next.run(req).await
                } else {
                    unauthorized()
                }
            }
        }))
    }
}

/// The file's keys, its bcrypt hashes checked: (the key at fault, why) on error.
fn parse(text: &str) -> Result<File, (String, String)> {
    let file: File = serde_yaml_ng::from_str(text).map_err(|e| ("not a web configuration".to_owned(), e.to_string()))?;
    for (user, hash) in &file.basic_auth_users {
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return Err((format!("basic_auth_users.{user}"), "not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)".to_owned()));
        }
    }
    Ok(file)
}

struct Auth {
    users: BTreeMap<String, String>,
    /// Digests of (user, password, hash) that verified: bcrypt costs tens of milliseconds, and a
    /// scrape every few seconds should not pay it each time (as the exporter toolkit caches).
    verified: Mutex<HashSet<[u8; 32]>>,
    /// bcrypt runs off the async workers, two at a time: a flood of wrong passwords cannot take
    /// the blocking pool.
    hashing: Arc<tokio::sync::Semaphore>,
}

/// A hash no password matches, verified for an unknown user so that the answer takes as long as
/// for a known one.
const DUMMY: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

impl Auth {
    async fn allows(&self, credentials: Option<(String, String)>) -> bool {
        let Some((user, password)) = credentials else { return false };
        let hash = self.users.get(&user).cloned();
        let digest: [u8; 32] =
            Sha256::new().chain_update(&user).chain_update([0]).chain_update(&password).chain_update([0]).chain_update(hash.as_deref().unwrap_or("")).finalize().into();
        if hash.is_some() && self.verified.lock().expect("verified").contains(&digest) {
            return true;
        }
        // The turn goes into the blocking task: a request cancelled (timed out) mid-hash does
        // not free it while its hash still runs.
        let Ok(turn) = self.hashing.clone().acquire_owned().await else { return false };
        let known = hash.is_some();
        let check = hash.unwrap_or_else(|| DUMMY.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            bcrypt::verify(password, &check).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known;
        if ok {
            let mut v = self.verified.lock().expect("verified");
            // Bounded: a handful of users and passwords.
            if v.len() > 1024 {
                v.clear();
            }
            v.insert(digest);
        }
        ok
    }
}

fn basic_credentials(req: &Request) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"sluice\"")], "authentication required (daemon.metrics_web_config: basic_auth_users)\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_web_config_parses_and_unknown_keys_are_refused_by_name() {
        let shipped = include_str!("../../deploy/web.yml");
        let f = parse(shipped).expect("deploy/web.yml");
        assert!(f.tls_server_config.is_some() && bcrypt::verify("change-me", &f.basic_auth_users["prometheus"]).expect("bcrypt"));
        let e = parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n").expect_err("unsupported key");
        assert!(e.1.contains("cipher_suites"), "{e:?}");
        let e = parse("basic_auth_users:\n  alice: plain-text\n").expect_err("not a hash");
        assert_eq!(e.0, "basic_auth_users.alice");
    }
}
