//! The agent's own process, as every Prometheus client library exports it (`process_*`, the
//! names the runbooks and the usual dashboards take), read from /proc/self at each scrape: CPU
//! time, memory, descriptors, start time.

use crate::metrics::Family;

/// `/proc/self/stat`'s fields after the command name (which may hold spaces): the 3rd field
/// of the line is the first of these.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

/// What the scrape shows of the process, or nothing where /proc cannot say.
pub fn gather(families: &mut Vec<Family>) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(fields) = stat_fields(&stat) else {
        return;
    };
    // SAFETY: plain queries without preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
        )
    };
    // Fields 14, 15 (utime, stime), 22 (starttime), 23 (vsize), 24 (rss), counted from 1 with
    // the pid and the command as 1 and 2.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let mut add = |name: &str, help: &str, counter: bool, value: Option<f64>| {
        if let Some(value) = value {
            families.push(Family::standard(name, help, counter).single(value));
        }
    };
    add(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        true,
        field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks),
    );
    add(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        false,
        field(24).map(|pages| pages * page),
    );
    add(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        false,
        field(23),
    );
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    add(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        false,
        boot.zip(field(22))
            .map(|(boot, start)| boot + start / ticks),
    );
    add(
        "process_open_fds",
        "Number of open file descriptors.",
        false,
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as f64),
    );
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write into.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    add(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        false,
        got.then_some(limit.rlim_cur as f64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_after_a_command_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 1 0 5000 1000 25";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(fields[0], "S");
        // utime is field 14: index 11.
        assert_eq!(fields[14 - 3], "7");
        assert_eq!(fields[24 - 3], "25");
    }

    #[test]
    fn the_process_metrics_of_this_test() {
        let mut out = Vec::new();
        gather(&mut out);
        let text = String::from_utf8(crate::metrics::render(out).unwrap()).unwrap();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name} in {text}");
        }
    }
}
