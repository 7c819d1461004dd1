//! Reads the agent's /metrics the way Prometheus does: a plain HTTP/1.1 GET and the text
//! exposition format, with just enough parsing for the scenarios' assertions.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the text exposition format, skipping comments and lines it cannot read.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = text.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        text = &after[end + 1..];
    }
}

fn has_labels(sample: &Sample, wanted: &[(&str, &str)]) -> bool {
    wanted
        .iter()
        .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
}

/// The value of the sample named `name` whose label set is exactly `labels` (in any order).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .find(|s| s.name == name && s.labels.len() == labels.len() && has_labels(s, labels))
        .map(|s| s.value)
}

/// The sum over every sample named `name` that carries at least `labels` (other labels may be
/// present); `None` when there is no such sample.
pub fn metric_sum_with_labels(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .filter(|s| s.name == name && has_labels(s, labels))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// `GET path` over a fresh connection; the status code and body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("the answer has no status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP observer_module_loads_total Module loads.
# TYPE observer_module_loads_total counter
observer_module_loads_total{outcome="loaded",method="signature"} 2
observer_module_loads_total{outcome="loaded",method="none"} 1
observer_module_loads_total{method="none",outcome="rejected_lockdown"} 1 1700000000000
observer_module_integrity_check_duration_seconds_bucket{method="signature",result="ok",le="+Inf"} 2
observer_module_integrity_check_duration_seconds_count{method="signature",result="ok"} 2
odd{text="a \"quoted\", {braced} value\\"} 7
observer_up 1
observer_ratio{x="y"} +Inf
"#;

    #[test]
    fn exact_label_sets() {
        let loads = "observer_module_loads_total";
        let signed = [("outcome", "loaded"), ("method", "signature")];
        assert_eq!(metric_value(TEXT, loads, &signed), Some(2.0));
        let locked = [("outcome", "rejected_lockdown"), ("method", "none")];
        assert_eq!(metric_value(TEXT, loads, &locked), Some(1.0));
        assert_eq!(metric_value(TEXT, loads, &[("outcome", "loaded")]), None);
        assert_eq!(metric_value(TEXT, "observer_up", &[]), Some(1.0));
        assert_eq!(
            metric_value(TEXT, "odd", &[("text", r#"a "quoted", {braced} value\"#)]),
            Some(7.0)
        );
        assert_eq!(
            metric_value(TEXT, "observer_ratio", &[("x", "y")]),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn sums_over_label_subsets() {
        let loads = "observer_module_loads_total";
        assert_eq!(
            metric_sum_with_labels(TEXT, loads, &[("method", "none")]),
            Some(2.0)
        );
        assert_eq!(metric_sum_with_labels(TEXT, loads, &[]), Some(4.0));
        assert_eq!(
            metric_sum_with_labels(TEXT, loads, &[("method", "hash")]),
            None
        );
    }

    #[test]
    fn chunked_bodies() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).unwrap(), b"hello, world");
    }
}
