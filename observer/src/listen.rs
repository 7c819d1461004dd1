//! Where the agent serves: one or more `--web.listen-address` values, in the forms exporters
//! take (`127.0.0.1:9745`, `[::1]:9745`, `:9745` for every address of the host). Each is bound
//! before anything is loaded into the kernel (a port in use fails at once); an address that is
//! not up yet (early in boot, before the network) is retried every second while the programs
//! already count.

use std::{io::ErrorKind, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::anyhow;

use crate::{agent::Agent, http, webconfig::WebConfig};

/// `ADDR:PORT`, or `:PORT` for every address of the host (IPv6 and IPv4 alike, as
/// node_exporter's `:9100`).
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: the port after ':' is not a number up to 65535"))?;
        return Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is not ADDR:PORT (127.0.0.1:9745, [::1]:9745) or :PORT"))
}

/// One address, and its socket if it could be bound now (else it is bound once it is up).
pub struct Listener {
    address: SocketAddr,
    bound: Option<std::net::TcpListener>,
}

/// Binds `address`, non-blocking for the runtime; `[::]` falls back to `0.0.0.0` on a host
/// without IPv6.
fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = match std::net::TcpListener::bind(address) {
        Err(err)
            if address.ip().is_unspecified()
                && address.is_ipv6()
                && err.kind() != ErrorKind::AddrInUse =>
        {
            std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], address.port())))
        }
        other => other,
    }?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Binds every address before the programs load: a port in use is an error now; an address
/// that is not up yet is waited for.
pub fn bind_all(addresses: &[SocketAddr]) -> anyhow::Result<Vec<Listener>> {
    addresses
        .iter()
        .map(|&address| match bind(address) {
            Ok(listener) => Ok(Listener {
                address,
                bound: Some(listener),
            }),
            Err(err) if err.kind() == ErrorKind::AddrNotAvailable => {
                log::warn!(
                    "cannot listen on {address} yet ({err}): the address is not up on this host; \
                     the programs count meanwhile, and listening is retried every second"
                );
                Ok(Listener {
                    address,
                    bound: None,
                })
            }
            Err(err) => {
                let hint = match err.kind() {
                    ErrorKind::AddrInUse => {
                        "; is another observer running? pick another with --web.listen-address"
                    }
                    _ => "",
                };
                Err(anyhow!("cannot listen on {address}: {err}{hint}"))
            }
        })
        .collect()
}

/// Binds `address` once it is up, trying every second (any other error is logged once and
/// retried too: the agent keeps counting either way, and says why it does not serve).
async fn bind_when_up(address: SocketAddr) -> tokio::net::TcpListener {
    let mut last_error = None;
    loop {
        match bind(address).and_then(tokio::net::TcpListener::from_std) {
            Ok(listener) => return listener,
            Err(err) => {
                if last_error != Some(err.kind()) && err.kind() != ErrorKind::AddrNotAvailable {
                    log::warn!("cannot listen on {address} yet: {err}; retrying every second");
                }
                last_error = Some(err.kind());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Serves on every address until the agent stops (inside the agent's runtime).
pub async fn serve_all(
    listeners: Vec<Listener>,
    agent: Arc<Agent>,
    telemetry_path: &str,
    web: WebConfig,
) {
    let (path, web): (Arc<str>, _) = (telemetry_path.into(), Arc::new(web));
    let mut servers = tokio::task::JoinSet::new();
    for Listener { address, bound } in listeners {
        let (agent, path, web) = (agent.clone(), path.clone(), web.clone());
        servers.spawn(async move {
            let listener = match bound.map(tokio::net::TcpListener::from_std) {
                Some(Ok(listener)) => listener,
                Some(Err(err)) => {
                    log::error!("cannot serve on {address}: {err}");
                    return;
                }
                None => bind_when_up(address).await,
            };
            log::info!("serving metrics on http://{address}{path}");
            http::serve(listener, agent, path, web).await;
        });
    }
    while servers.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_exporters_take_them() {
        assert_eq!(
            parse_listen_address("127.0.0.1:9745"),
            Ok("127.0.0.1:9745".parse().unwrap())
        );
        assert_eq!(
            parse_listen_address("[::1]:9745"),
            Ok("[::1]:9745".parse().unwrap())
        );
        assert_eq!(
            parse_listen_address(":9745"),
            Ok("[::]:9745".parse().unwrap())
        );
        assert!(parse_listen_address(":http").unwrap_err().contains("port"));
        assert!(
            parse_listen_address("localhost")
                .unwrap_err()
                .contains(":PORT")
        );
    }
}
