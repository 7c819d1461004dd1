//! A plain HTTP/1.1 client over a fresh connection per request, reading the answer as a
//! Prometheus server would: status line, headers, and a body that may come in chunks.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// `GET path`; the status code and the body (chunked transfer encoding undone). `timeout`
/// bounds the connect, and each read and write.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    request(addr, "GET", path, timeout)
}

/// `METHOD path` with no request body; the status code and the body (empty for HEAD).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    request_with(addr, method, path, &[], timeout)
}

/// Like [`request`], with more header lines (`Authorization` and the like). A name or value
/// with a line break is refused: it would end the header early or add one of its own.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut extra = String::new();
    for (name, value) in headers {
        if [name, value].iter().any(|s| s.contains(['\r', '\n'])) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("header {name:?}: a line break in it"),
            ));
        }
        extra += &format!("{name}: {value}\r\n");
    }
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let (status, chunked, body) = split_response(&raw)?;
    // A HEAD answer announces a body it does not send.
    let body = if method.eq_ignore_ascii_case("HEAD") {
        Vec::new()
    } else if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The status, whether the body is chunked, and the raw body.
fn split_response(raw: &[u8]) -> io::Result<(u16, bool, &[u8])> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            bad(format!(
                "the answer has no end of headers: {:?}",
                String::from_utf8_lossy(raw)
            ))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("the answer has no status line: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok((status, chunked, &raw[split + 4..]))
}

/// Undoes chunked transfer encoding (chunk extensions ignored, trailers dropped).
fn dechunk(mut body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk size".into()))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err(bad("truncated chunk".into()));
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead as _, net::TcpListener, thread};

    use super::*;

    #[test]
    fn chunked_bodies() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).unwrap(), b"hello, world");
        assert!(dechunk(b"5\r\nhel").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
    }

    /// Serves one connection with `answer`, returning the request head's lines it read.
    fn serve_once(answer: &'static [u8]) -> (SocketAddr, thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                head.push(line.trim_end().to_owned());
                line.clear();
            }
            stream.write_all(answer).unwrap();
            head
        });
        (addr, server)
    }

    #[test]
    fn reads_chunked_answers_over_a_real_socket() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n2\r\ncd\r\n0\r\n\r\n",
        );
        let got = get(addr, "/metrics", Duration::from_secs(5)).unwrap();
        assert_eq!(got, (200, "ab\ncd".to_owned()));
        assert_eq!(server.join().unwrap()[0], "GET /metrics HTTP/1.1");
    }

    #[test]
    fn plain_bodies_methods_and_head() {
        let (addr, server) = serve_once(b"HTTP/1.1 405 Method Not Allowed\r\n\r\nno");
        let got = request(addr, "POST", "/x", Duration::from_secs(5)).unwrap();
        assert_eq!(got, (405, "no".to_owned()));
        assert_eq!(server.join().unwrap()[0], "POST /x HTTP/1.1");

        let (addr, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
        );
        let got = request(addr, "HEAD", "/", Duration::from_secs(5)).unwrap();
        assert_eq!(got, (200, String::new()));
        server.join().unwrap();
    }

    #[test]
    fn extra_headers_are_sent_and_line_breaks_refused() {
        let (addr, server) = serve_once(b"HTTP/1.1 401 Unauthorized\r\n\r\n");
        let auth = [("Authorization", "Basic dTpw")];
        let got = request_with(addr, "GET", "/m", &auth, Duration::from_secs(5)).unwrap();
        assert_eq!(got.0, 401);
        let head = server.join().unwrap();
        assert!(
            head.iter().any(|l| l == "Authorization: Basic dTpw"),
            "{head:?}"
        );
        let injected = [("X", "a\r\nAuthorization: Basic x")];
        let err = request_with(addr, "GET", "/", &injected, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (addr, server) = serve_once(b"not http at all");
        let err = get(addr, "/", Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
    }
}
