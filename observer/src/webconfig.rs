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

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    hash::{BuildHasher as _, Hasher as _, RandomState},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde::Deserialize;
use tokio::sync::Semaphore;

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
    /// None means no authentication.
    auth: Option<BasicAuth>,
}

impl WebConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading --web.config.file {}", path.display()))?;
        let file: File = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a supported web config", path.display()))?;
        let auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            Some(
                BasicAuth::new(file.basic_auth_users)
                    .with_context(|| path.display().to_string())?,
            )
        };
        let tls = file
            .tls_server_config
            .map(|tls| server_config(&tls))
            .transpose()?;
        Ok(Self { tls, auth })
    }

    /// True when the request's `Authorization` header is acceptable. The bcrypt check runs on
    /// the blocking pool, so waiting for it never holds up the runtime thread.
    pub async fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(auth) = &self.auth else {
            return true;
        };
        let Some((user, password)) = credentials(header) else {
            return false;
        };
        auth.check(&user, password).await
    }
}

/// `user:password` from a `Basic` Authorization header.
fn credentials(header: Option<&[u8]>) -> Option<(String, String)> {
    let raw = header
        .and_then(|h| h.strip_prefix(b"Basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// bcrypt checks running at once. Each takes a blocking-pool thread for some 50 ms of CPU at
/// cost 10 (more on a busy machine); a flood of wrong passwords queues here instead of taking every pool thread and
/// both CPUs, and a scraper whose check is cached never waits here at all.
const BCRYPT_SLOTS: usize = 2;
/// Successful checks remembered. Only right passwords enter, so the set grows with the
/// scrapers a site runs, not with what an attacker sends; the bound is for safety alone.
const CACHE_ENTRIES: usize = 1024;

/// A cache entry: a keyed hash of user, password and stored hash.
type CacheKey = [u64; 2];

/// Basic auth as the exporter-toolkit does it: bcrypt off the request path, successful checks
/// cached, and the same bcrypt work for unknown users as for known ones.
struct BasicAuth {
    /// User name to bcrypt hash.
    users: BTreeMap<String, Arc<str>>,
    /// Checked for a user name not in `users`, so its answer takes as long as a known user's
    /// wrong password and response times do not tell which names exist.
    decoy: Arc<str>,
    slots: Arc<Semaphore>,
    /// Keys the cache entries: std's SipHash with a key random per process. The cache holds
    /// no password, and without the key no one can pick a password whose entry would match.
    key: RandomState,
    cache: Mutex<HashSet<CacheKey>>,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> anyhow::Result<Self> {
        let mut hashes = BTreeMap::new();
        let mut costs = Vec::new();
        for (user, hash) in users {
            // Refused here rather than failing every request: a hash bcrypt cannot use would
            // lock the user out with no word why.
            let parts: bcrypt::HashParts = hash.parse().map_err(|err| {
                anyhow!("the password of {user:?} must be a bcrypt hash ($2y$...): {err}")
            })?;
            let cost = parts.get_cost();
            if !(4..=31).contains(&cost) {
                bail!("the bcrypt hash of {user:?} has cost {cost}, outside bcrypt's 4 to 31");
            }
            costs.push(cost);
            hashes.insert(user, Arc::from(hash));
        }
        let cost = costs.into_iter().max().unwrap_or(bcrypt::DEFAULT_COST);
        // The costliest configured hash's cost: no unknown name answers faster than a known one.
        let decoy = bcrypt::hash("decoy: never a password", cost)
            .context("making the decoy bcrypt hash")?;
        Ok(Self {
            users: hashes,
            decoy: Arc::from(decoy),
            slots: Arc::new(Semaphore::new(BCRYPT_SLOTS)),
            key: RandomState::new(),
            cache: Mutex::new(HashSet::new()),
        })
    }

    async fn check(&self, user: &str, password: String) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.clone(), true),
            None => (self.decoy.clone(), false),
        };
        // The stored hash is part of the key: an entry cannot outlive the hash it was made for.
        let key = self.cache_key(user, &password, &hash);
        if known && self.cached(&key) {
            return true;
        }
        // Queued here (fairly, first come first served) rather than on the pool.
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return false;
        };
        let verified = tokio::task::spawn_blocking(move || {
            // Held until bcrypt ends even if the client has gone: the slot counts CPU in use.
            let _slot = slot;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let verified = known && verified;
        if verified {
            self.remember(key);
        }
        verified
    }

    fn cache_key(&self, user: &str, password: &str, hash: &str) -> CacheKey {
        // Two 64-bit hashes of the triple, told apart by a first byte: 128 bits to guess.
        [0u8, 1].map(|half| {
            let mut hasher = self.key.build_hasher();
            hasher.write_u8(half);
            // Each part with its length, so no two (user, password, hash) triples read the same.
            for part in [user, password, hash] {
                hasher.write_usize(part.len());
                hasher.write(part.as_bytes());
            }
            hasher.finish()
        })
    }

    fn cached(&self, key: &CacheKey) -> bool {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    fn remember(&self, key: CacheKey) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES && !cache.contains(&key) {
            // Any entry will do (exporter-toolkit evicts at random as well): the first in the
            // set's order, arbitrary under its random hash key. Its scraper pays bcrypt once more.
            if let Some(old) = cache.iter().next().copied() {
                cache.remove(&old);
            }
        }
        cache.insert(key);
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
    use std::time::Duration;

    use super::*;

    fn auth(users: &[(&str, &str, u32)]) -> BasicAuth {
        let users = users
            .iter()
            .map(|(u, p, cost)| ((*u).to_owned(), bcrypt::hash(p, *cost).unwrap()))
            .collect();
        BasicAuth::new(users).unwrap()
    }

    fn config(users: &[(&str, &str)]) -> WebConfig {
        let users: Vec<_> = users.iter().map(|(u, p)| (*u, *p, 4)).collect();
        WebConfig {
            tls: None,
            auth: Some(auth(&users)),
        }
    }

    fn basic(user_password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
        .into_bytes()
    }

    /// Every bcrypt slot, taken: until it is dropped only what needs no bcrypt can finish.
    async fn every_slot(auth: &BasicAuth) -> tokio::sync::OwnedSemaphorePermit {
        auth.slots
            .clone()
            .acquire_many_owned(BCRYPT_SLOTS as u32)
            .await
            .unwrap()
    }

    /// Whether `check` finishes within a second (false: it waits for a bcrypt slot).
    async fn finishes(check: impl Future<Output = bool>) -> Option<bool> {
        tokio::time::timeout(Duration::from_secs(1), check)
            .await
            .ok()
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_hashes() {
        let c = config(&[("prometheus", "s3cret")]);
        assert!(c.authorized(Some(&basic("prometheus:s3cret"))).await);
        assert!(!c.authorized(Some(&basic("prometheus:wrong"))).await);
        assert!(!c.authorized(Some(&basic("nobody:s3cret"))).await);
        assert!(!c.authorized(Some(b"Basic !!!not-base64")).await);
        assert!(!c.authorized(Some(&basic("no-colon"))).await);
        assert!(!c.authorized(Some(b"Bearer x")).await);
        assert!(!c.authorized(None).await);
        assert!(
            WebConfig::default().authorized(None).await,
            "no users: open"
        );
    }

    #[tokio::test]
    async fn a_successful_check_is_cached() {
        let a = auth(&[("prometheus", "s3cret", 4)]);
        assert!(a.check("prometheus", "s3cret".into()).await);
        // Every bcrypt slot taken: only what needs no bcrypt can finish.
        let held = every_slot(&a).await;
        assert_eq!(
            finishes(a.check("prometheus", "s3cret".into())).await,
            Some(true),
            "a cached check waited for bcrypt"
        );
        assert_eq!(
            finishes(a.check("prometheus", "wrong".into())).await,
            None,
            "a wrong password skipped bcrypt"
        );
        drop(held);
        assert!(!a.check("prometheus", "wrong".into()).await);
        // Wrong passwords are not remembered: the one right one is all the cache holds.
        assert_eq!(a.cache.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unknown_users_pay_bcrypt_against_the_decoy() {
        let a = auth(&[("light", "a", 4), ("heavy", "b", 5)]);
        // As costly as the costliest configured hash.
        let decoy: bcrypt::HashParts = a.decoy.parse().unwrap();
        assert_eq!(decoy.get_cost(), 5);
        assert!(!a.check("nobody", "a".into()).await);
        assert!(!a.check("nobody", "decoy: never a password".into()).await);
        // A known user's password under another name is no good either.
        assert!(!a.check("heavy", "a".into()).await);
        assert!(a.cache.lock().unwrap().is_empty());
        // An unknown name waits for a bcrypt slot like a known name's wrong password.
        let held = every_slot(&a).await;
        assert_eq!(finishes(a.check("nobody", "a".into())).await, None);
        drop(held);
    }

    #[test]
    fn the_cache_is_bounded() {
        let a = auth(&[("u", "p", 4)]);
        for i in 0..(CACHE_ENTRIES + 100) {
            a.remember(a.cache_key("u", &format!("p{i}"), &a.decoy));
        }
        assert_eq!(a.cache.lock().unwrap().len(), CACHE_ENTRIES);
        // Keys differ with each part, and the parts' boundaries count.
        assert_ne!(a.cache_key("ab", "c", "h"), a.cache_key("a", "bc", "h"));
        assert_eq!(a.cache_key("a", "b", "h"), a.cache_key("a", "b", "h"));
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
        // A bcrypt-shaped hash with a cost bcrypt refuses.
        let hash = bcrypt::hash("p", 4).unwrap().replacen("$04$", "$99$", 1);
        let err = WebConfig::load(&write(
            "d.yml",
            &format!("basic_auth_users:\n  u: '{hash}'\n"),
        ));
        assert!(format!("{:#}", err.err().unwrap()).contains("cost 99"));
        let err = WebConfig::load(&write(
            "c.yml",
            "tls_server_config:\n  cert_file: /nonexistent\n  key_file: /nonexistent\n",
        ));
        assert!(format!("{:#}", err.err().unwrap()).contains("cert_file"));
        let hash = bcrypt::hash("p", 4).unwrap();
        let loaded = WebConfig::load(&write(
            "e.yml",
            &format!("basic_auth_users:\n  u: '{hash}'\n"),
        ));
        assert!(loaded.unwrap().auth.is_some());
        fs::remove_dir_all(&dir).unwrap();
    }
}
