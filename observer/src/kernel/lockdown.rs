//! The active lockdown level (securityfs).

use std::{fs, path::Path};

use super::mounts::SECURITYFS;

/// The active lockdown level, from securityfs's "none [integrity] confidentiality".
pub fn lockdown_level() -> Option<String> {
    let text = fs::read_to_string(Path::new(SECURITYFS).join("lockdown")).ok()?;
    parse_lockdown_level(&text)
}

pub fn parse_lockdown_level(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(text[start + 1..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockdown_levels() {
        assert_eq!(
            parse_lockdown_level("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(
            parse_lockdown_level("[none] integrity confidentiality").as_deref(),
            Some("none")
        );
        assert_eq!(parse_lockdown_level("garbage"), None);
    }
}
