//! Values typed on the command line.

use std::time::Duration;

/// The units of a duration, largest first, as Prometheus writes them (`1h30m`, `1m30s`,
/// `1500ms`), and the finer ones a timer threshold needs (`us`, `ns`).
const UNITS: [(&str, u64); 9] = [
    ("y", 365 * 24 * 3_600_000_000_000),
    ("w", 7 * 24 * 3_600_000_000_000),
    ("d", 24 * 3_600_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration in Prometheus' syntax: whole numbers, each with a unit, largest first
/// (`10ms`, `2s`, `1m30s`, `1h`), plus `us` (or `µs`) and `ns`. Fractions are refused with the
/// way to write them (`1.5s`: `1500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.replace('µ', "u");
    if rest.is_empty() {
        return Err("needs a number and a unit, e.g. 10ms or 1m30s".into());
    }
    let (mut total, mut last_unit) = (0u64, None::<usize>);
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if rest[digits..].starts_with('.') {
            return Err(format!(
                "{text:?}: fractions are not taken; write a smaller unit (1.5s is 1500ms, 1.5m is 1m30s)"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: needs a whole number before each unit"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(if unit.is_empty() {
                format!("{text:?} needs a unit: y, w, d, h, m, s, ms, us or ns")
            } else {
                format!("{text:?}: unknown unit {unit:?}: use y, w, d, h, m, s, ms, us or ns")
            });
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(format!(
                "{text:?}: units go largest first, each once (1m30s)"
            ));
        }
        last_unit = Some(index);
        total = number
            .checked_mul(UNITS[index].1)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("{text:?} is too long"))?;
        rest = after[unit_len..].to_owned();
    }
    Ok(Duration::from_nanos(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1.5s").unwrap_err().contains("1500ms"));
        assert!(
            parse_duration("30s1m")
                .unwrap_err()
                .contains("largest first")
        );
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("999999999999y")
                .unwrap_err()
                .contains("too long")
        );
    }
}
