//! Kernel features a test needs. A test whose feature the running kernel lacks is skipped
//! visibly: a line on stderr and one in the skip log (`target/tmp/skipped-tests.txt`, which
//! `cargo xtask test` prints at the end). Where the run declares the feature expected
//! (`OBSERVER_REQUIRED_FEATURES`, comma-separated; CI sets it for its hosts), a missing feature
//! fails the test instead: a host that should have it and does not is a failure, not a skip.

use std::io::Write as _;

/// The skip log, under cargo's scratch folder for integration tests.
pub const SKIP_LOG: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/skipped-tests.txt");

/// True when the test may go on. `have`: whether this kernel has `feature`; `why`: what it
/// lacks, in words.
pub fn kernel_has(feature: &str, have: bool, why: &str) -> bool {
    if have {
        return true;
    }
    let required = std::env::var("OBSERVER_REQUIRED_FEATURES").unwrap_or_default();
    assert!(
        !required.split(',').any(|f| f.trim() == feature),
        "feature {feature} is required on this host (OBSERVER_REQUIRED_FEATURES) but missing: {why}"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    let line = format!("SKIP {test}: {feature}: {why}");
    eprintln!("{line}");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SKIP_LOG)
    {
        let _ = writeln!(log, "{line}");
    }
    false
}
