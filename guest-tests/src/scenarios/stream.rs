//! What the guests print for the host's checks to read: the event stream between markers
//! (each event validated against the schema), module names on marker lines, and the fixtures'
//! manifest. Shared by the scenarios, and importing none of them.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::manifest::unfield;

const SCHEMA: &str = include_str!("../../../schemas/events.schema.json");

/// The events the guest printed between `EVENTS-BEGIN` and `EVENTS-END`, each validated
/// against schemas/events.schema.json.
pub(super) fn validated_events(console: &str) -> anyhow::Result<Vec<Value>> {
    let lines: Vec<&str> = console
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "EVENTS-BEGIN")
        .skip(1)
        .take_while(|l| *l != "EVENTS-END")
        .filter(|l| l.starts_with('{'))
        .collect();
    let schema: Value = serde_json::from_str(SCHEMA).context("the events schema")?;
    let validator = jsonschema::draft202012::new(&schema).context("compiling the schema")?;
    let mut events = Vec::new();
    for line in lines {
        let event: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        ensure!(errors.is_empty(), "{line}: {errors:?}");
        events.push(event);
    }
    Ok(events)
}

/// The one `module_load` event with this `reason` (an error naming them all otherwise).
pub(super) fn the_load_with_reason<'a>(
    events: &'a [Value],
    reason: &str,
) -> anyhow::Result<&'a Value> {
    let found: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load" && e["reason"] == reason)
        .collect();
    match found.as_slice() {
        [event] => Ok(event),
        _ => bail!("want one module_load with reason {reason}, got {found:?} of {events:?}"),
    }
}

/// The module named first after `prefix` on a console line (`cgroup-load crc-itu-t`,
/// `ima-digest crc8.ko set`): the file stem as the kernel names the module (`crc_itu_t`).
pub(super) fn console_module(console: &str, prefix: &str) -> anyhow::Result<String> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|file| file.split(".ko").next())
        .map(|stem| stem.replace('-', "_"))
        .with_context(|| format!("no console line starting {prefix:?}"))
}

/// `file=NAME key=value...` lines the guest printed after `MANIFEST ` (values percent-encoded,
/// see `vm::fixtures`).
pub(super) fn manifest(
    console: &str,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut files = BTreeMap::new();
    for line in console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("MANIFEST "))
    {
        let fields: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_owned(), unfield(v)))
            .collect();
        let file = fields
            .get("file")
            .context("a manifest line without file=")?;
        files.insert(file.clone(), fields);
    }
    ensure!(!files.is_empty(), "no MANIFEST lines on the console");
    Ok(files)
}
