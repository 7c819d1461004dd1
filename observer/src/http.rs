//! The metrics endpoint: GET on the telemetry path (gzip-compressed when the scraper accepts
//! it), /healthz, and a landing page at / that links to both; nothing else.

use std::{
    convert::Infallible,
    io::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use tokio_rustls::TlsAcceptor;

use crate::{agent::Agent, webconfig::WebConfig};

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections served at once. A connection past the cap waits in the kernel's accept backlog
/// until one ends (each ends at the latest READ_TIMEOUT after its client goes quiet) rather
/// than being closed at once: a refused connection is a failed scrape, a queued one a late one,
/// and a burst of scrapers gets through. The cap bounds the agent's file descriptors, memory
/// and requests waiting for bcrypt, whatever the number of clients.
const MAX_CONNECTIONS: usize = 64;

/// How often at most the cap is reported (a flood would otherwise log on every accept).
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Accepts connections until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    telemetry_path: Arc<str>,
    web: Arc<WebConfig>,
) {
    let acceptor = web.tls.clone().map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut warned: Option<Instant> = None;
    loop {
        // A slot before accept: over the cap, new clients wait in the backlog, not in memory.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
                    log::warn!(
                        "{MAX_CONNECTIONS} connections open: new ones wait in the listen backlog"
                    );
                    warned = Some(Instant::now());
                }
                match slots.clone().acquire_owned().await {
                    Ok(slot) => slot,
                    // Never closed: nothing to serve without it.
                    Err(_) => return,
                }
            }
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: wait rather than spin.
                log::warn!("accepting a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (agent, path, web, acceptor) = (
            agent.clone(),
            telemetry_path.clone(),
            web.clone(),
            acceptor.clone(),
        );
        tokio::spawn(async move {
            // Freed when the connection ends, however it ends.
            let _slot = slot;
            match acceptor {
                None => connection(TokioIo::new(stream), agent, path, web).await,
                // A client that never finishes its handshake cannot hold a connection open.
                Some(acceptor) => {
                    match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(TokioIo::new(tls), agent, path, web).await,
                        Ok(Err(err)) => log::debug!("TLS handshake: {err}"),
                        Err(_) => log::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// How long a client may take to send its request headers (or its TLS handshake).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn connection<I>(io: I, agent: Arc<Agent>, path: Arc<str>, web: Arc<WebConfig>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let (agent, path, web) = (agent.clone(), path.clone(), web.clone());
        async move { Ok::<_, Infallible>(respond(request, &agent, &path, &web).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that never finishes its headers cannot hold a connection open (nor can an
        // idle keep-alive one: the timer runs while hyper waits for the next request).
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service);
    if let Err(err) = connection.await {
        log::debug!("connection: {err}");
    }
}

// The request by value: a reference kept across the bcrypt wait would need it to be Sync.
async fn respond(
    request: Request<Incoming>,
    agent: &Agent,
    telemetry_path: &str,
    web: &WebConfig,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let landing = path == "/" && telemetry_path != "/";
    if path != telemetry_path && path != "/healthz" && !landing {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // /healthz says only "ok", so liveness probes need no credentials (nor wait for bcrypt).
    if path == "/healthz" {
        return plain(StatusCode::OK, "ok\n");
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(header::HeaderValue::as_bytes);
    if !web.authorized(credentials).await {
        let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"observer\""),
        );
        return response;
    }
    if landing {
        return landing_page(telemetry_path);
    }
    match agent.scrape() {
        Ok(body) => {
            // Compression failing (it only allocates) falls back to the plain text.
            let compressed = if accepts_gzip(request.headers()) {
                compress(&body)
                    .inspect_err(|err| log::error!("compressing metrics: {err}"))
                    .ok()
            } else {
                None
            };
            let gzip = compressed.is_some();
            let mut response = Response::new(Full::new(Bytes::from(compressed.unwrap_or(body))));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(TEXT_FORMAT),
            );
            // Caches between scraper and agent must not hand a gzip body to a plain client.
            headers.insert(
                header::VARY,
                header::HeaderValue::from_static("Accept-Encoding"),
            );
            if gzip {
                headers.insert(
                    header::CONTENT_ENCODING,
                    header::HeaderValue::from_static("gzip"),
                );
            }
            response
        }
        Err(err) => {
            log::error!("rendering metrics: {err}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            )
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// True when the request's Accept-Encoding lists gzip (or `*`) with a non-zero quality.
fn accepts_gzip(headers: &header::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let quality = parts
                .find_map(|p| p.strip_prefix("q="))
                .map_or(Some(1.0), |q| q.parse::<f32>().ok());
            (name.eq_ignore_ascii_case("gzip")
                || name.eq_ignore_ascii_case("x-gzip")
                || name == "*")
                && quality.is_some_and(|q| q > 0.0)
        })
}

fn compress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::default());
    encoder.write_all(body)?;
    encoder.finish()
}

/// What node_exporter answers at /: the name, the version, and where to go next.
fn landing_page(telemetry_path: &str) -> Response<Full<Bytes>> {
    let path = escape_html(telemetry_path);
    let version = env!("CARGO_PKG_VERSION");
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>observer</title>\n</head>\n<body>\n<h1>observer</h1>\n\
         <p>eBPF runtime observer, version {version}</p>\n<ul>\n\
         <li><a href=\"{path}\">Metrics</a></li>\n\
         <li><a href=\"/healthz\">Health</a></li>\n</ul>\n</body>\n</html>\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// The telemetry path is an operator's flag: it may hold characters HTML gives meaning to.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_encoding(value: &str) -> header::HeaderMap {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            header::HeaderValue::from_str(value).unwrap(),
        );
        headers
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(&with_encoding("gzip")));
        assert!(accepts_gzip(&with_encoding("deflate, GZIP;q=0.5")));
        assert!(accepts_gzip(&with_encoding("*")));
        assert!(!accepts_gzip(&with_encoding("gzip;q=0")));
        assert!(!accepts_gzip(&with_encoding("identity")));
        assert!(!accepts_gzip(&with_encoding("gzip;q=nonsense")));
        assert!(!accepts_gzip(&header::HeaderMap::new()));
    }

    #[test]
    fn landing_page_escapes_the_path() {
        assert_eq!(escape_html("/m<\"&'>"), "/m&lt;&quot;&amp;&#39;&gt;");
    }
}
