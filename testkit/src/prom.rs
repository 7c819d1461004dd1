//! The Prometheus text exposition format (version 0.0.4), read as far as checks need: samples
//! with their labels and values, and the families the `# TYPE` lines declare.
use std::collections::BTreeSet;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of the label `name`, if the sample carries it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the sample carries every one of `wanted` (it may carry others too).
    pub fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(k, v)| self.labels.iter().any(|(sk, sv)| sk == k && sv == v))
    }

    /// Whether the sample's label set is exactly `wanted` (in any order).
    pub fn has_exactly(&self, wanted: &[(&str, &str)]) -> bool {
        self.labels.len() == wanted.len() && self.has_labels(wanted)
    }
}

/// A metric family as declared by `# TYPE name kind`, with the label names its samples carry
/// (not a histogram's `le` nor a summary's `quantile`: those come with the type, not the family).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    pub name: String,
    /// counter, gauge, histogram, summary or untyped.
    pub kind: String,
    pub label_names: BTreeSet<String>,
}

impl Family {
    /// Whether a sample of this name belongs to the family: its own name, or the name plus the
    /// suffix its kind adds in the text format.
    pub fn owns(&self, sample_name: &str) -> bool {
        let Some(suffix) = sample_name.strip_prefix(self.name.as_str()) else {
            return false;
        };
        matches!(
            (self.kind.as_str(), suffix),
            (_, "")
                | ("counter", "_total" | "_created")
                | ("histogram", "_bucket" | "_sum" | "_count" | "_created")
                | ("summary", "_sum" | "_count" | "_created")
        )
    }
}

/// Every sample, in order, skipping comments and lines it cannot read.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The value of the sample named `name` whose label set is exactly `labels` (in any order).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .find(|s| s.name == name && s.has_exactly(labels))
        .map(|s| s.value)
}

/// The sum over every sample named `name` that carries at least `labels` (other labels may be
/// present); `None` when there is no such sample.
pub fn sum_with_labels(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .filter(|s| s.name == name && s.has_labels(labels))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

/// The families declared by `# TYPE` lines, in order of declaration, each with the label names
/// of the samples that belong to it.
pub fn families(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
            Some(Family {
                name: words.next()?.to_owned(),
                kind: words.next()?.to_owned(),
                label_names: BTreeSet::new(),
            })
        })
        .collect();
    for sample in parse(text) {
        // The longest declared name that owns it: `a_bucket` is not family `a_b`'s.
        if let Some(family) = families
            .iter_mut()
            .filter(|f| f.owns(&sample.name))
            .max_by_key(|f| f.name.len())
        {
            let structural = match family.kind.as_str() {
                "histogram" => "le",
                "summary" => "quantile",
                _ => "",
            };
            family.label_names.extend(
                sample
                    .labels
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| k != structural),
            );
        }
    }
    families
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
    let value = match rest.split_whitespace().next()? {
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

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP observer_module_loads_total Module loads.
# TYPE observer_module_loads_total counter
observer_module_loads_total{outcome="loaded",method="signature"} 2
observer_module_loads_total{outcome="loaded",method="none"} 1
observer_module_loads_total{method="none",outcome="rejected_lockdown"} 1 1700000000000
# TYPE observer_module_integrity_check_duration_seconds histogram
observer_module_integrity_check_duration_seconds_bucket{method="signature",result="ok",le="+Inf"} 2
observer_module_integrity_check_duration_seconds_sum{method="signature",result="ok"} 0.5
observer_module_integrity_check_duration_seconds_count{method="signature",result="ok"} 2
odd{text="a \"quoted\", {braced} value\\"} 7
# TYPE observer_up gauge
observer_up 1
observer_ratio{x="y"} +Inf
not a sample line
"#;

    #[test]
    fn exact_label_sets() {
        let loads = "observer_module_loads_total";
        let signed = [("outcome", "loaded"), ("method", "signature")];
        assert_eq!(value(TEXT, loads, &signed), Some(2.0));
        let locked = [("outcome", "rejected_lockdown"), ("method", "none")];
        assert_eq!(value(TEXT, loads, &locked), Some(1.0));
        assert_eq!(value(TEXT, loads, &[("outcome", "loaded")]), None);
        assert_eq!(value(TEXT, "observer_up", &[]), Some(1.0));
        assert_eq!(
            value(TEXT, "odd", &[("text", r#"a "quoted", {braced} value\"#)]),
            Some(7.0)
        );
        assert_eq!(
            value(TEXT, "observer_ratio", &[("x", "y")]),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn sums_over_label_subsets() {
        let loads = "observer_module_loads_total";
        assert_eq!(
            sum_with_labels(TEXT, loads, &[("method", "none")]),
            Some(2.0)
        );
        assert_eq!(sum_with_labels(TEXT, loads, &[]), Some(4.0));
        assert_eq!(sum_with_labels(TEXT, loads, &[("method", "hash")]), None);
    }

    #[test]
    fn families_with_their_label_names() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            families(TEXT),
            [
                Family {
                    name: "observer_module_loads_total".into(),
                    kind: "counter".into(),
                    label_names: names(&["method", "outcome"]),
                },
                Family {
                    name: "observer_module_integrity_check_duration_seconds".into(),
                    kind: "histogram".into(),
                    label_names: names(&["method", "result"]),
                },
                Family {
                    name: "observer_up".into(),
                    kind: "gauge".into(),
                    label_names: BTreeSet::new(),
                },
            ]
        );
    }
}
