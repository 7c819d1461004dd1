//! Debian packages from a suite the machine's own apt does not list (trixie-backports or
//! bullseye-security on a Debian 12 host), fetched through a temporary apt configuration under the cache: its own
//! sources list, package lists and apt cache. The machine's apt configuration is only read, for
//! the mirror to use, so no archive host is written into this repository and a machine behind a
//! local mirror keeps using it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where the machine's apt keeps its sources.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_PARTS: &str = "/etc/apt/sources.list.d";
/// Used when the machine's own Debian entry names no key ring.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A temporary apt configuration for one suite of the Debian archive, under `dir`.
pub struct Archive {
    dir: PathBuf,
    suite: &'static str,
    updated: bool,
}

/// One source entry of the machine's apt configuration, as far as it matters here.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    uri: String,
    suites: Vec<String>,
    signed_by: Option<String>,
}

impl Archive {
    pub fn new(dir: PathBuf, suite: &'static str) -> Self {
        Archive {
            dir,
            suite,
            updated: false,
        }
    }

    /// apt's options that point every path it writes at `dir` and read the one source there.
    fn options(&self) -> Vec<String> {
        let at = |p: &str| self.dir.join(p).display().to_string();
        vec![
            format!("-oDir::Etc::SourceList={}", at("sources.list")),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={}", at("lists")),
            format!("-oDir::Cache={}", at("cache")),
            // The files land in the cache folder, which apt's sandbox user may not write.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    /// Writes the sources list from the machine's Debian mirror and fetches the suite's index.
    pub fn update(&mut self) -> anyhow::Result<()> {
        let source = machine_debian_source()?;
        let keyring = source.signed_by.as_deref().unwrap_or(DEBIAN_KEYRING);
        let uri = suite_uri(&source.uri, self.suite);
        fs::create_dir_all(self.dir.join("lists/partial"))?;
        fs::create_dir_all(self.dir.join("cache/archives/partial"))?;
        fs::write(
            self.dir.join("sources.list"),
            format!("deb [signed-by={keyring}] {uri} {} main\n", self.suite),
        )?;
        eprintln!("vm: reading {uri} {} through apt", self.suite);
        crate::run(
            Command::new("apt-get")
                .args(self.options())
                .args(["update", "-q"]),
        )
        .with_context(|| format!("updating the package index of {}", self.suite))?;
        self.updated = true;
        Ok(())
    }

    fn has_index(&self) -> bool {
        fs::read_dir(self.dir.join("lists")).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .contains(&format!("{}_main_binary", self.suite))
            })
        })
    }

    /// Package names apt knows that start with `prefix`; updates the index first if there is none.
    pub fn names(&mut self, prefix: &str) -> anyhow::Result<Vec<String>> {
        if !self.has_index() && !self.updated {
            self.update()?;
        }
        let out = Command::new("apt-cache")
            .args(self.options())
            .args(["pkgnames", prefix])
            .output()
            .context("running apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The versions of `package` in the index, as `apt-cache madison` lists them.
    pub fn versions(&mut self, package: &str) -> anyhow::Result<Vec<String>> {
        if !self.has_index() && !self.updated {
            self.update()?;
        }
        let out = Command::new("apt-cache")
            .args(self.options())
            .args(["madison", package])
            .output()
            .context("running apt-cache madison")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
            .collect())
    }

    /// Downloads `package=version` into `into`.
    pub fn download(&self, package: &str, version: &str, into: &Path) -> anyhow::Result<()> {
        crate::run(
            Command::new("apt-get")
                .args(self.options())
                .args(["download", "-q", &format!("{package}={version}")])
                .current_dir(into),
        )
    }
}

/// Where `suite` lives beside the mirror's `/debian`: security updates are a sibling archive
/// (`/debian-security`) on Debian's mirrors and on the local mirrors that copy them.
fn suite_uri(debian: &str, suite: &str) -> String {
    let debian = debian.trim_end_matches('/');
    if suite.ends_with("-security") {
        format!("{debian}-security")
    } else {
        debian.to_owned()
    }
}

/// The machine's Debian mirror: the first binary source of a non-security suite whose URI ends
/// in `/debian` (one-line `.list` files and deb822 `.sources` files alike).
fn machine_debian_source() -> anyhow::Result<Source> {
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string(SOURCES_LIST) {
        texts.push((SOURCES_LIST.to_owned(), text));
    }
    if let Ok(entries) = fs::read_dir(SOURCES_PARTS) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path.display().to_string();
            if name.ends_with(".list") || name.ends_with(".sources") {
                texts.push((name, fs::read_to_string(&path).unwrap_or_default()));
            }
        }
    }
    for (name, text) in &texts {
        let sources = if name.ends_with(".sources") {
            parse_deb822(text)
        } else {
            parse_one_line(text)
        };
        if let Some(source) = sources.into_iter().find(is_debian_main) {
            return Ok(source);
        }
    }
    bail!(
        "no Debian archive in this machine's apt sources ({SOURCES_LIST}, {SOURCES_PARTS}/): \
         the newest and the oldest kernels come from Debian's trixie-backports and \
         bullseye-security through the same mirror"
    )
}

fn is_debian_main(source: &Source) -> bool {
    source.uri.trim_end_matches('/').ends_with("/debian")
        && source.suites.iter().any(|s| !s.contains("security"))
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn parse_one_line(text: &str) -> Vec<Source> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let (options, rest) = match rest.trim_start().strip_prefix('[') {
            Some(inner) => match inner.split_once(']') {
                Some((options, rest)) => (options, rest),
                None => continue,
            },
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let signed_by = options
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_owned);
        sources.push(Source {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
            signed_by,
        });
    }
    sources
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Signed-By:`), separated by blank lines.
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut sources = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let binary = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if !enabled || !binary {
            continue;
        }
        // An inline key block is not a path; apt's default key ring serves then.
        let signed_by = field("Signed-By").filter(|s| s.starts_with('/'));
        for uri in uris.split_whitespace() {
            sources.push(Source {
                uri: uri.to_owned(),
                suites: suites.split_whitespace().map(str::to_owned).collect(),
                signed_by: signed_by.clone(),
            });
        }
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let text = "# a comment\n\
                    deb-src http://mirror.example/debian bookworm main\n\
                    deb http://mirror.example/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        assert!(!is_debian_main(&sources[0]));
        assert_eq!(
            sources[1],
            Source {
                uri: "http://mirror.example/debian".into(),
                suites: vec!["bookworm".into()],
                signed_by: Some("/k.gpg".into()),
            }
        );
        assert!(is_debian_main(&sources[1]));
    }

    #[test]
    fn security_suites_are_a_sibling_archive() {
        assert_eq!(
            suite_uri("http://mirror.example/debian/", "bullseye-security"),
            "http://mirror.example/debian-security"
        );
        assert_eq!(
            suite_uri("http://mirror.example/debian", "trixie-backports"),
            "http://mirror.example/debian"
        );
    }

    #[test]
    fn deb822_sources() {
        let text = "Types: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n\n\
                    Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\n\n\
                    Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        let sources = parse_deb822(text);
        assert_eq!(sources.len(), 2);
        let main: Vec<_> = sources.iter().filter(|s| is_debian_main(s)).collect();
        assert_eq!(main.len(), 1);
        assert_eq!(main[0].uri, "http://mirror.example/debian/");
        assert_eq!(
            main[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
    }
}
