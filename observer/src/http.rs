//! The metrics endpoint: GET on the telemetry path and /healthz, nothing else.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use tokio_rustls::TlsAcceptor;

use crate::{agent::Agent, webconfig::WebConfig};

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Accepts connections until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    telemetry_path: Arc<str>,
    web: Arc<WebConfig>,
) {
    let acceptor = web.tls.clone().map(TlsAcceptor::from);
    loop {
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
        let response = respond(&request, &agent, &path, &web);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that never finishes its headers cannot hold a connection open.
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service);
    if let Err(err) = connection.await {
        log::debug!("connection: {err}");
    }
}

fn respond(
    request: &Request<Incoming>,
    agent: &Agent,
    telemetry_path: &str,
    web: &WebConfig,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != telemetry_path && path != "/healthz" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // /healthz says only "ok", so liveness probes need no credentials.
    if path == "/healthz" {
        return plain(StatusCode::OK, "ok\n");
    }
    if !web.authorized(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(header::HeaderValue::as_bytes),
    ) {
        let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"observer\""),
        );
        return response;
    }
    match agent.scrape() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(TEXT_FORMAT),
            );
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
