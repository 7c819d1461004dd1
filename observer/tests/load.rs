//! The endpoint under load with basic auth on: a timer storm feeding the event pipeline and a
//! flood of wrong passwords, each costing a bcrypt check, while an authorised scraper and a
//! liveness probe go on being answered in time. The latencies seen are printed, to be quoted.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use base64::Engine as _;
use support::{Agent, timer_storm};

const USER: &str = "prometheus";
const PASSWORD: &str = "s3cret";
/// Clients sending wrong credentials, each in a loop.
const WRONG_CLIENTS: usize = 50;
/// How long the authorised scraper scrapes under load.
const UNDER_LOAD: Duration = Duration::from_secs(10);
/// How long a wrong password's client waits for its answer.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(180);
/// What any answer may take on a noisy two-core machine: a scrape that queued behind bcrypt
/// checks would take many seconds, not this.
const BOUND: Duration = Duration::from_secs(5);

/// GET with `user:password` as basic auth (none when `None`): the status, the body and the time.
fn get(
    addr: SocketAddr,
    path: &str,
    credentials: Option<&str>,
) -> std::io::Result<(u16, String, Duration)> {
    get_within(addr, path, credentials, Duration::from_secs(30))
}

/// [`get`] with `timeout` for the connect and each read and write.
fn get_within(
    addr: SocketAddr,
    path: &str,
    credentials: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String, Duration)> {
    let header = credentials.map(|c| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(c)
        )
    });
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("Authorization", h.as_str()))
        .collect();
    let start = Instant::now();
    let (status, body) = testkit::http::request_with(addr, "GET", path, &headers, timeout)?;
    Ok((status, body, start.elapsed()))
}

/// The `q`-quantile of sorted durations (nearest rank).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn milliseconds(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn scrapes_stay_prompt_under_a_timer_storm_and_a_wrong_password_flood() {
    let dir = std::env::temp_dir().join(format!("observer-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("web.yml");
    // The cost htpasswd and the bcrypt crate use by default, as a real setup would have.
    let hash = bcrypt::hash(PASSWORD, bcrypt::DEFAULT_COST).unwrap();
    std::fs::write(&config, format!("basic_auth_users:\n  {USER}: '{hash}'\n")).unwrap();
    let agent = Agent::start(&["--web.config.file", config.to_str().unwrap()]);
    let addr = agent.addr;
    let right = format!("{USER}:{PASSWORD}");

    // Refused: no credentials, an unknown user, a known user's wrong password.
    for credentials in [None, Some("intruder:s3cret"), Some("prometheus:wrong")] {
        let (status, _, _) = get(addr, "/metrics", credentials).unwrap();
        assert_eq!(status, 401, "{credentials:?}");
    }
    // The scraper's first check pays bcrypt once, before the flood (Prometheus scrapes all
    // along; what matters is its scrapes after the first).
    let (status, body, _) = get(addr, "/metrics", Some(&right)).unwrap();
    assert_eq!(status, 200, "{body:.200}");

    let stop = Arc::new(AtomicBool::new(false));
    let storm = timer_storm(2, stop.clone());
    let flood_start = Instant::now();
    let flood: Vec<_> = (0..WRONG_CLIENTS)
        .map(|i| {
            let stop = stop.clone();
            thread::spawn(move || {
                // Half of them a known user's wrong password, half unknown users.
                let known = i % 2 == 0;
                let credentials = if known {
                    format!("{USER}:wrong-{i}")
                } else {
                    format!("intruder-{i}:{PASSWORD}")
                };
                let mut answers = Vec::new();
                // At least one request each, however soon the scraper is done. Fifty of them
                // queue for two bcrypt slots: at a few checks a second on a busy machine, an
                // answer takes tens of seconds, and one given up on would still be checked.
                loop {
                    let answer = get_within(addr, "/metrics", Some(&credentials), FLOOD_TIMEOUT);
                    answers.push(answer.map(|r| (r.0, r.2)));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                (known, answers)
            })
        })
        .collect();
    // Let the flood fill the bcrypt queue first.
    thread::sleep(Duration::from_secs(1));

    let (mut scrapes, mut probes) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while start.elapsed() < UNDER_LOAD {
        let (status, body, took) = get(addr, "/metrics", Some(&right)).unwrap();
        assert_eq!(status, 200, "{body:.200}");
        assert!(
            body.contains("observer_posix_timer_syscalls_total"),
            "{body:.200}"
        );
        assert!(took < BOUND, "a scrape took {took:?}");
        scrapes.push(took);
        let (status, _, took) = get(addr, "/healthz", None).unwrap();
        assert_eq!(status, 200);
        assert!(took < BOUND, "/healthz took {took:?}");
        probes.push(took);
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let pairs: u64 = storm.into_iter().map(|t| t.join().unwrap()).sum();
    // Refused, every one: an unknown name as a known name's wrong password.
    let (mut known_waits, mut unknown_waits) = (Vec::new(), Vec::new());
    for client in flood {
        let (known, answers) = client.join().unwrap();
        for answer in answers {
            let (status, took) = answer.expect("a wrong password answered");
            assert_eq!(status, 401, "known user: {known}");
            if known {
                &mut known_waits
            } else {
                &mut unknown_waits
            }
            .push(took);
        }
    }
    let flood_time = flood_start.elapsed();
    let refused = known_waits.len() + unknown_waits.len();

    for list in [
        &mut scrapes,
        &mut probes,
        &mut known_waits,
        &mut unknown_waits,
    ] {
        list.sort_unstable();
    }
    let ms = |list: &[Duration], q: f64| milliseconds(quantile(list, q));
    eprintln!(
        "under load: {} authorised scrapes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; /healthz \
         p50 {:.1} ms, p99 {:.1} ms; {refused} wrong passwords refused in {:.1} s ({:.1}/s), \
         answered after p50 {:.0} ms (known user) and {:.0} ms (unknown user); {pairs} timer \
         pairs",
        scrapes.len(),
        ms(&scrapes, 0.5),
        ms(&scrapes, 0.99),
        ms(&scrapes, 1.0),
        ms(&probes, 0.5),
        ms(&probes, 0.99),
        flood_time.as_secs_f64(),
        refused as f64 / flood_time.as_secs_f64(),
        ms(&known_waits, 0.5),
        ms(&unknown_waits, 0.5),
    );
    assert_eq!(agent.stop(), 0, "SIGTERM exits 0");
    std::fs::remove_dir_all(&dir).unwrap();
}
