//! The agent's log lines, in the formats fleet log pipelines take (`--log.format`): the
//! default text (`[time LEVEL] message`), logfmt (`time=... level=... msg="..."`, as
//! Prometheus' own exporters write), or one JSON object per line.

use std::io::Write as _;

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Logfmt,
    Json,
}

pub fn init(level: log::LevelFilter, format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .parse_default_env()
        .format_target(false);
    match format {
        LogFormat::Text => {}
        LogFormat::Logfmt => {
            builder.format(|out, record| {
                writeln!(
                    out,
                    "time={} level={} msg={:?}",
                    out.timestamp_millis(),
                    record.level().as_str().to_ascii_lowercase(),
                    record.args().to_string()
                )
            });
        }
        LogFormat::Json => {
            builder.format(|out, record| {
                let line = serde_json::json!({
                    "time": out.timestamp_millis().to_string(),
                    "level": record.level().as_str().to_ascii_lowercase(),
                    "msg": record.args().to_string(),
                });
                writeln!(out, "{line}")
            });
        }
    }
    builder.init();
}
