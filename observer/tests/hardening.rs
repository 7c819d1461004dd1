//! The agent under stress and attack: capabilities dropped, TLS and basic auth, slow and
//! hostile HTTP clients, ring buffer overflow counted exactly, memory flat under a storm, label
//! cardinality capped, nothing left in the kernel after it stops, and a kernel without BTF.

mod support;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use support::{Agent, Metrics, OBSERVER, http_get, timer_storm};

/// Storms and program counts would disturb each other: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

#[test]
fn capabilities_are_dropped_once_started() {
    let _serial = serial();
    let agent = Agent::start(&[]);
    assert_eq!(agent.status_field("NoNewPrivs:"), "1");
    assert_eq!(agent.status_field("CapPrm:"), "0000000000000000");
    assert_eq!(agent.status_field("CapAmb:"), "0000000000000000");
    if kernel_at_least(6, 5) {
        // bpf(2) on maps it holds needs nothing from 6.5: everything goes.
        assert_eq!(agent.status_field("CapEff:"), "0000000000000000");
        assert_eq!(agent.status_field("CapBnd:"), "0000000000000000");
    } else {
        assert_eq!(
            agent.status_field("CapEff:"),
            format!("{:016x}", 1u64 << 39),
            "CAP_BPF alone"
        );
    }
    // And it still reads its maps and ring buffer without them.
    support::timer_pair();
    agent.metrics_until("a timer counted after the drop", |m| {
        m.value("observer_events_total", &[("kind", "timer_created")]) >= 1.0
    });
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tls_and_basic_auth_from_a_web_config_file() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("observer-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl made no certificate");
    let config = dir.join("web.yml");
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: {hash}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let agent = Agent::spawn(&["--web.config.file", config.to_str().unwrap()]);
    let https = |path: &str| format!("https://{}{path}", agent.addr);
    let cacert = cert.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&["--cacert", cacert, &https("/healthz")]) != "200" {
        assert!(
            Instant::now() < deadline,
            "no TLS /healthz: {:?}",
            agent.stderr.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        curl(&[
            "--cacert",
            cacert,
            "-u",
            "prometheus:s3cret",
            &https("/metrics")
        ]),
        "200"
    );
    assert_eq!(
        curl(&[
            "--cacert",
            cacert,
            "-u",
            "prometheus:wrong",
            &https("/metrics")
        ]),
        "401"
    );
    assert_eq!(
        curl(&[
            "--cacert",
            cacert,
            "-u",
            "intruder:s3cret",
            &https("/metrics")
        ]),
        "401"
    );
    assert_eq!(curl(&["--cacert", cacert, &https("/metrics")]), "401");
    // Plain HTTP to the TLS port gets no metrics.
    assert_ne!(curl(&[&format!("http://{}/metrics", agent.addr)]), "200");
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn slow_and_hostile_clients_do_not_block_scrapes() {
    let _serial = serial();
    let agent = Agent::start(&[]);
    // Slowloris: connections that never finish their headers.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(agent.addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    assert_eq!(http_get(agent.addr, "/metrics").unwrap().0, 200);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a scrape waited behind slow clients"
    );

    // 100 concurrent scrapes, all answered.
    let addr = agent.addr;
    let scrapes: Vec<_> = (0..100)
        .map(|_| thread::spawn(move || http_get(addr, "/metrics").map(|r| r.0)))
        .collect();
    for scrape in scrapes {
        assert_eq!(scrape.join().unwrap().unwrap(), 200);
    }

    // Headers past the limit are refused, not buffered.
    let mut big = TcpStream::connect(agent.addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        big,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a 64 KiB header was accepted"
    );

    // The slow clients are cut off after the header read timeout.
    let first = &mut slow[0];
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 256];
    let waited = Instant::now();
    let _ = first.read(&mut buf);
    assert!(
        waited.elapsed() < Duration::from_secs(15),
        "a slow client held its connection"
    );
}

fn created(m: &Metrics) -> (f64, f64, f64) {
    (
        m.value(
            "observer_posix_timer_syscalls_total",
            &[("syscall", "timer_create"), ("result", "ok")],
        ),
        m.value("observer_events_total", &[("kind", "timer_created")]),
        m.value("observer_events_lost_total", &[("kind", "timer_created")]),
    )
}

#[test]
fn ring_buffer_overflow_is_counted_exactly() {
    let _serial = serial();
    // One page of ring buffer: a storm fills it between two drains.
    let agent = Agent::start(&["--events.buffer-size", "4096"]);
    let before = created(&agent.metrics());
    let stop = Arc::new(AtomicBool::new(false));
    let storm = timer_storm(2, stop.clone());
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let pairs: u64 = storm.into_iter().map(|t| t.join().unwrap()).sum();
    // Settled: two scrapes in a row agree.
    let mut last = created(&agent.metrics());
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = created(&agent.metrics());
        if now == last {
            break;
        }
        last = now;
    }
    let (creates, received, lost) = (last.0 - before.0, last.1 - before.1, last.2 - before.2);
    assert!(
        creates >= pairs as f64,
        "{creates} creates counted for {pairs} made"
    );
    assert!(
        lost > 0.0,
        "a 4 KiB ring buffer kept up with {pairs} pairs: nothing tested"
    );
    // Every create the kernel counted was either handed over or counted as lost.
    assert_eq!(
        received + lost,
        creates,
        "received {received} + lost {lost} != created {creates}"
    );
    assert_eq!(
        http_get(agent.addr, "/healthz").unwrap().0,
        200,
        "the agent keeps serving"
    );
}

#[test]
fn memory_stays_flat_under_a_steady_storm() {
    let _serial = serial();
    let seconds: u64 = std::env::var("OBSERVER_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let agent = Agent::start(&[]);
    let rss = |agent: &Agent| -> f64 {
        agent
            .status_field("VmRSS:")
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let storm = timer_storm(1, stop.clone());
    let warm_up = Duration::from_secs(seconds / 6);
    thread::sleep(warm_up);
    let warm = rss(&agent);
    let end = Instant::now() + Duration::from_secs(seconds) - warm_up;
    while Instant::now() < end {
        // Scrapes during the storm too, as Prometheus would.
        assert_eq!(http_get(agent.addr, "/metrics").unwrap().0, 200);
        thread::sleep(Duration::from_secs(1));
    }
    let last = rss(&agent);
    stop.store(true, Ordering::Relaxed);
    let pairs: u64 = storm.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!(
        "soak: {pairs} timer pairs in {seconds} s; RSS {warm} kB after warm-up, {last} kB at the end"
    );
    assert!(
        last <= warm * 1.10,
        "RSS grew from {warm} kB to {last} kB under a steady storm"
    );
}

#[test]
fn label_cardinality_stays_capped() {
    let _serial = serial();
    let agent = Agent::start(&[]);
    // 10,000 distinct process names, each creating a timer.
    thread::spawn(|| {
        for i in 0..10_000 {
            let name = std::ffi::CString::new(format!("card-{i}")).unwrap();
            // SAFETY: renames this thread.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            support::timer_pair();
        }
    })
    .join()
    .unwrap();
    let m = agent.metrics_until("10,000 creates", |m| {
        m.0.lines()
            .filter(|l| l.starts_with("observer_posix_timer_creates_by_process_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
            >= 10_000.0
    });
    let series =
        m.0.lines()
            .filter(|l| l.starts_with("observer_posix_timer_creates_by_process_total{"))
            .count();
    assert!(
        series <= 11,
        "{series} per-process series: more than the top 10 and other"
    );
    let all = m.0.lines().filter(|l| !l.starts_with('#')).count();
    assert!(all < 400, "{all} series in all");
}

/// The IDs of every BPF program and link in the kernel now. The agent's are those that appear
/// while it runs: no list of names to keep in step with the families.
fn programs_and_links() -> (BTreeSet<u64>, BTreeSet<u64>) {
    let ids = |what: &str| -> BTreeSet<u64> {
        let out = Command::new("bpftool")
            .args(["--json", what, "show"])
            .output()
            .expect("bpftool (installed by cargo xtask setup)");
        assert!(out.status.success(), "bpftool {what} show failed");
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["id"].as_u64().unwrap())
            .collect()
    };
    (ids("prog"), ids("link"))
}

#[test]
fn stopping_leaves_no_programs_or_links_behind() {
    let _serial = serial();
    let (programs, links) = programs_and_links();
    let agent = Agent::start(&[]);
    let (running_programs, running_links) = programs_and_links();
    let ours: BTreeSet<u64> = running_programs.difference(&programs).copied().collect();
    let our_links: BTreeSet<u64> = running_links.difference(&links).copied().collect();
    assert!(!ours.is_empty(), "no programs seen while running");
    assert_eq!(agent.stop(), 0);
    let (after, links_after) = programs_and_links();
    assert!(
        after.is_disjoint(&ours) && links_after.is_disjoint(&our_links),
        "left behind after SIGTERM: programs {:?}, links {:?}",
        after.intersection(&ours).collect::<Vec<_>>(),
        links_after.intersection(&our_links).collect::<Vec<_>>()
    );
    // And again: a restart loads as many, and leaves the kernel as it found it.
    let agent = Agent::start(&[]);
    let (again, again_links) = programs_and_links();
    let ours_again: BTreeSet<u64> = again.difference(&after).copied().collect();
    let links_again: BTreeSet<u64> = again_links.difference(&links_after).copied().collect();
    assert_eq!(
        (ours_again.len(), links_again.len()),
        (ours.len(), our_links.len())
    );
    assert_eq!(agent.stop(), 0);
    let (last, last_links) = programs_and_links();
    assert!(last.is_disjoint(&ours_again) && last_links.is_disjoint(&links_again));
}

#[test]
fn without_btf_the_agent_degrades_and_says_why() {
    let _serial = serial();
    support::require_root();
    let script = format!("mount -t tmpfs -o ro none /sys/kernel/btf && exec {OBSERVER} probes");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fexit = text
        .lines()
        .find(|l| l.starts_with("lockdown_decision") && l.contains("fexit"))
        .unwrap();
    assert!(
        fexit.contains(" no ") && fexit.contains("no kernel BTF"),
        "{fexit}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("timer_syscalls") && l.contains(" yes ")),
        "{text}"
    );
}
