//! `--web.config.file`: TLS and basic auth for the endpoint, in the Prometheus exporter-toolkit
//! format (the same file node_exporter takes):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/observer/cert.pem
//!   key_file: /etc/observer/key.pem
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt
//! ```
//!
//! Settings this agent does not implement (client certificates, cipher choices) are refused
//! rather than ignored: a security setting silently dropped is worse than an error.

use std::{collections::BTreeMap, fs, path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: String,
    key_file: String,
    /// TLS12 (default) or TLS13.
    min_version: Option<String>,
}

/// The endpoint's security settings.
#[derive(Default)]
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash; empty means no authentication.
    users: BTreeMap<String, String>,
}

impl WebConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading --web.config.file {}", path.display()))?;
        let file: File = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a supported web config", path.display()))?;
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                bail!(
                    "{}: the password of {user:?} must be a bcrypt hash ($2y$...)",
                    path.display()
                );
            }
        }
        let tls = file
            .tls_server_config
            .map(|tls| server_config(&tls))
            .transpose()?;
        Ok(Self {
            tls,
            users: file.basic_auth_users,
        })
    }

    /// True when the request's `Authorization` header is acceptable.
    pub fn authorized(&self, header: Option<&[u8]>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(credentials) = header
            .and_then(|h| h.strip_prefix(b"Basic "))
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
        else {
            return false;
        };
        let Some((user, password)) = credentials.split_once(':') else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }
}

fn server_config(tls: &TlsFile) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .with_context(|| format!("reading cert_file {}", tls.cert_file))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing cert_file {}", tls.cert_file))?;
    if certs.is_empty() {
        bail!("cert_file {} holds no certificate", tls.cert_file);
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .with_context(|| format!("reading key_file {}", tls.key_file))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => bail!("min_version {other:?}: use TLS12 or TLS13"),
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &[(&str, &str)]) -> WebConfig {
        let users = users
            .iter()
            .map(|(u, p)| ((*u).to_owned(), bcrypt::hash(p, 4).unwrap()))
            .collect();
        WebConfig { tls: None, users }
    }

    fn basic(user_password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
        .into_bytes()
    }

    #[test]
    fn basic_auth_checks_bcrypt_hashes() {
        let c = config(&[("prometheus", "s3cret")]);
        assert!(c.authorized(Some(&basic("prometheus:s3cret"))));
        assert!(!c.authorized(Some(&basic("prometheus:wrong"))));
        assert!(!c.authorized(Some(&basic("nobody:s3cret"))));
        assert!(!c.authorized(Some(b"Basic !!!not-base64")));
        assert!(!c.authorized(Some(b"Bearer x")));
        assert!(!c.authorized(None));
        assert!(WebConfig::default().authorized(None), "no users: open");
    }

    #[test]
    fn unknown_and_unsafe_settings_are_refused() {
        let dir = std::env::temp_dir().join(format!("observer-webconfig-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            path
        };
        let err = WebConfig::load(&write(
            "a.yml",
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
        ));
        assert!(format!("{:#}", err.err().unwrap()).contains("client_auth_type"));
        let err = WebConfig::load(&write("b.yml", "basic_auth_users:\n  u: plaintext\n"));
        assert!(format!("{:#}", err.err().unwrap()).contains("bcrypt"));
        let err = WebConfig::load(&write(
            "c.yml",
            "tls_server_config:\n  cert_file: /nonexistent\n  key_file: /nonexistent\n",
        ));
        assert!(format!("{:#}", err.err().unwrap()).contains("cert_file"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
