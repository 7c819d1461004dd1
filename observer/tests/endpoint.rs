//! The endpoint as node_exporter's: a landing page at `/`, and metrics gzip-compressed for
//! scrapers that ask for it (Prometheus sends `Accept-Encoding: gzip`), plain for the rest.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use flate2::read::GzDecoder;
use support::Agent;

struct Response {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One GET with the given extra header lines, over a real socket; the body as raw bytes.
fn get(addr: SocketAddr, path: &str, extra_headers: &str) -> Response {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra_headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response with a header block");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // The agent sends whole bodies with a length, never chunked.
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("a Content-Length");
    assert_eq!(body.len(), length, "the whole body arrived");
    Response {
        status,
        headers,
        body,
    }
}

/// The metric families a scrape declares, in order.
fn families(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

#[test]
fn landing_page_links_to_metrics_and_health() {
    let agent = Agent::start(&["--web.telemetry-path", "/custom-metrics"]);
    let page = get(agent.addr, "/", "");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<h1>observer</h1>"), "{html}");
    assert!(
        html.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))),
        "{html}"
    );
    assert!(html.contains("<a href=\"/custom-metrics\">"), "{html}");
    assert!(html.contains("<a href=\"/healthz\">"), "{html}");
    // The link leads somewhere real, and the default path is no longer served.
    assert_eq!(get(agent.addr, "/custom-metrics", "").status, 200);
    assert_eq!(get(agent.addr, "/metrics", "").status, 404);
    assert_eq!(get(agent.addr, "/index.html", "").status, 404);
    assert_eq!(agent.stop(), 0);
}

#[test]
fn metrics_gzip_when_asked_plain_otherwise() {
    let agent = Agent::start(&[]);
    let plain = get(agent.addr, "/metrics", "");
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    let plain_text = String::from_utf8(plain.body).unwrap();
    assert!(
        plain_text.starts_with("# HELP observer_"),
        "{plain_text:.200}"
    );

    // What Prometheus sends.
    let zipped = get(
        agent.addr,
        "/metrics",
        "Accept-Encoding: gzip\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1\r\n",
    );
    assert_eq!(zipped.status, 200);
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert_eq!(
        zipped.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(&zipped.body[..2], b"\x1f\x8b", "a gzip member");
    let mut unzipped = String::new();
    GzDecoder::new(zipped.body.as_slice())
        .read_to_string(&mut unzipped)
        .expect("a valid gzip body");
    // Values move between scrapes; the families and their order do not.
    assert_eq!(families(&unzipped), families(&plain_text));
    assert!(!families(&plain_text).is_empty());
    assert!(
        zipped.body.len() * 3 < unzipped.len(),
        "compressed {} of {} bytes",
        zipped.body.len(),
        unzipped.len()
    );

    // Refused gzip (quality 0) and other codings get plain text.
    for header in [
        "Accept-Encoding: gzip;q=0\r\n",
        "Accept-Encoding: br, zstd\r\n",
    ] {
        let response = get(agent.addr, "/metrics", header);
        assert_eq!(response.header("content-encoding"), None, "{header}");
        assert!(response.body.starts_with(b"# HELP observer_"), "{header}");
    }
    // Several codings, gzip among them, as browsers send them.
    let browser = get(
        agent.addr,
        "/metrics",
        "Accept-Encoding: deflate, GZIP;q=0.8, br\r\n",
    );
    assert_eq!(browser.header("content-encoding"), Some("gzip"));
    assert_eq!(agent.stop(), 0);
}

/// The agent's open sockets (its listener among them).
fn sockets(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Past 64 connections the agent accepts no more until one ends: the rest wait in the listen
/// backlog, and a scrape among them is answered late rather than refused.
#[test]
fn connections_over_the_cap_wait_their_turn() {
    let agent = Agent::start(&[]);
    let idle = sockets(&agent);
    // Clients that never finish their headers hold their connections until the header read
    // timeout (10 s).
    let slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(agent.addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let held = sockets(&agent) - idle;
    assert!(held <= 64, "{held} connections accepted at once");
    assert!(held >= 60, "only {held} of 100 connections accepted");
    let start = std::time::Instant::now();
    let (status, body) = testkit::http::get(agent.addr, "/metrics", Duration::from_secs(40))
        .expect("a scrape behind the cap is answered, not refused");
    assert_eq!(status, 200, "{body:.200}");
    // Served once the slow clients' header read timeout frees their slots.
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    drop(slow);
    assert_eq!(agent.stop(), 0);
}

/// Early in boot a listen address may not be up yet: the agent starts counting anyway, says
/// so, and serves once the address is up. Here the agent runs in a network namespace of its
/// own, whose loopback is down until the test brings it up.
#[test]
fn an_address_not_up_yet_is_served_once_it_is() {
    use std::{
        io::BufRead as _,
        os::fd::AsRawFd as _,
        process::{Command, Stdio},
        sync::mpsc,
    };
    support::require_root();
    // In a new network namespace the loopback device is down, and ::1 appears only once it is
    // up (IPv6 gives an address to a device that is up).
    let addr: SocketAddr = format!("[::1]:{}", support::free_port()).parse().unwrap();
    let mut child = Command::new("unshare")
        .arg("--net")
        .arg(support::OBSERVER)
        .arg("--web.listen-address")
        .arg(addr.to_string())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let (lines, seen) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let waiting = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut log = Vec::new();
        while std::time::Instant::now() < deadline {
            if let Ok(line) = seen.recv_timeout(Duration::from_millis(200)) {
                let found = line.contains(want);
                log.push(line);
                if found {
                    return log;
                }
            }
        }
        panic!(
            "no {want:?} from the agent within 60 s:\n{}",
            log.join("\n")
        );
    };
    let log = waiting("listening is retried every second");
    assert!(
        log.iter().any(|l| l.contains("cannot listen on [::1]")),
        "{log:?}"
    );
    // Its programs are attached and counting before it serves.
    waiting("attached");
    let pid = child.id();
    let up = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])
        .status()
        .expect("nsenter, ip");
    assert!(up.success());
    // Scraped from inside its namespace (setns changes the calling thread's only).
    let scraped = std::thread::spawn(move || {
        let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        // SAFETY: a plain syscall on an open namespace file, for this thread.
        assert_eq!(
            unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match support::http_get(addr, "/metrics") {
                Ok((200, body)) => return body,
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => panic!("the agent did not serve once its address was up: {other:?}"),
            }
        }
    })
    .join()
    .unwrap();
    assert!(scraped.contains("observer_build_info"), "{scraped}");
    waiting("serving metrics on http://[::1]");
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
