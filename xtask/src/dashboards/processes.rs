//! The processes the check runs (the agent and a Prometheus, on free loopback ports, stopped
//! when dropped) and the client for Prometheus's query API.
use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::Scratch;

/// A process this run started, stopped (SIGTERM, then SIGKILL) when dropped, on success or
/// failure alike.
pub struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        eprintln!("+ {command:?} > {}", log.display());
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Fails with the end of its log when it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log:\n{}",
                self.name,
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "dashboards: {} ignored SIGTERM for 10 s: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<SocketAddr> {
    testkit::free_loopback_addr().context("finding a free loopback port")
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = ready();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let why = last.err().map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

pub fn start_agent(root: &Path, scratch: &Scratch) -> anyhow::Result<(SocketAddr, Process)> {
    // CARGO_TARGET_DIR moves the build; honour it to run the binary just built.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let addr = free_port()?;
    let mut agent = Process::start(
        "the agent",
        // Timing creates is opt-in; the latency panels need it.
        Command::new(target_dir.join("release/observer")).args([
            "--web.listen-address",
            &addr.to_string(),
            "--timers.latency",
        ]),
        scratch.0.join("observer.log"),
    )?;
    wait_until("the agent's /healthz", Duration::from_secs(60), || {
        agent.check_running()?;
        Ok(http_get(addr, "/healthz")
            .is_ok_and(|(status, body)| status == 200 && body.trim() == "ok"))
    })?;
    Ok((addr, agent))
}

pub fn start_prometheus(
    dir: &Path,
    scratch: &Scratch,
    targets: &[String],
) -> anyhow::Result<(Prometheus, Process)> {
    let rules = dir.join("alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: {}\n",
        serde_json::to_string(&rules.to_string_lossy())?,
        serde_json::to_string(targets)?,
    );
    let config_file = scratch.0.join("prometheus.yml");
    fs::write(&config_file, config)?;
    let addr = free_port()?;
    let mut process = Process::start(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}")),
        scratch.0.join("prometheus.log"),
    )?;
    let prometheus = Prometheus { addr };
    wait_until("Prometheus to be ready", Duration::from_secs(60), || {
        process.check_running()?;
        Ok(http_get(addr, "/-/ready").is_ok_and(|(status, _)| status == 200))
    })?;
    eprintln!(
        "dashboards: Prometheus on {addr} scraping {}",
        targets.join(", ")
    );
    wait_until(
        "Prometheus to scrape every target",
        Duration::from_secs(60),
        || {
            process.check_running()?;
            Ok(
                prometheus.value(r#"count(up{job="observer"} == 1)"#)?
                    == Some(targets.len() as f64),
            )
        },
    )?;
    Ok((prometheus, process))
}

pub struct Prometheus {
    addr: SocketAddr,
}

impl Prometheus {
    /// The `data` of a successful API answer.
    pub fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (_, body) = http_get(self.addr, path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {path} with {body:?}"))?;
        if answer["status"] != "success" {
            bail!("{}", answer["error"].as_str().unwrap_or(&body));
        }
        Ok(answer["data"].clone())
    }

    /// The number of series a query returns, or Prometheus's error for it (a parse error, or an
    /// error evaluating it).
    pub fn query(&self, expr: &str) -> anyhow::Result<Result<usize, String>> {
        let (_, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered a query with {body:?}"))?;
        if answer["status"] != "success" {
            return Ok(Err(answer["error"].as_str().unwrap_or(&body).to_owned()));
        }
        let data = &answer["data"];
        Ok(Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().map_or(0, Vec::len),
            Some("scalar" | "string") => 1,
            _ => 0,
        }))
    }

    pub fn count(&self, expr: &str) -> anyhow::Result<usize> {
        self.query(expr)?
            .map_err(|e| anyhow::anyhow!("{expr}: {e}"))
    }

    /// The value of a query returning at most one series.
    pub fn value(&self, expr: &str) -> anyhow::Result<Option<f64>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)))?;
        let result = data["result"].as_array().cloned().unwrap_or_default();
        Ok(result
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok()))
    }
}

/// A GET for Prometheus's API and the agent's /healthz.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(testkit::http::get(addr, path, Duration::from_secs(30))?)
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}
