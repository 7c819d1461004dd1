//! What `guest-tool bpf-stats` prints, read back (by the judges here and the host's benchmarks).
/// One program's counters as `guest-tool bpf-stats` prints them: the fields of a `bpf-stats ID
/// NAME run_cnt=C run_time_ns=T` line (NAME as the kernel keeps it: 15 bytes, so an entry and an
/// exit program can share it).
#[derive(Debug, PartialEq, Eq)]
pub struct ProgramStats<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub runs: u64,
    pub run_ns: u64,
}

impl<'a> ProgramStats<'a> {
    pub fn parse(fields: &[&'a str]) -> Option<Self> {
        let ["bpf-stats", id, name, runs, run_ns] = fields else {
            return None;
        };
        Some(Self {
            id,
            name,
            runs: runs.strip_prefix("run_cnt=")?.parse().ok()?,
            run_ns: run_ns.strip_prefix("run_time_ns=")?.parse().ok()?,
        })
    }
}
