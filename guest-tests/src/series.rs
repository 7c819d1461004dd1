//! The Debian kernel lines the scenarios run on (the host downloads and boots them).
/// The kernel lines the scenarios run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    /// Debian 11's 5.10, the oldest kernel fleets still run: no `bpf_get_func_ret` (fexit
    /// reads the return value from its context), `module_sig_check` inlined, maps charged to
    /// RLIMIT_MEMLOCK, no `bpf_task_pt_regs`, `bpf_probe_read_kernel` asking lockdown.
    V5_10,
    /// Debian 12's backported 6.12: fentry/fexit, BPF LSM, compressed modules, MODULE_DECOMPRESS.
    V6_12,
    /// Debian 12's own 6.1: older BTF and lockdown enum, uncompressed modules.
    V6_1,
    /// Debian 13's backported 6.18: timer-ID restore mode (6.15+), the crc modules under
    /// lib/crc/ and no crc7, modules under usr/lib/modules/.
    V6_18,
    /// Debian 13's backported 7.3: split into linux-binary-* (the image, in
    /// usr/lib/modules/<release>/vmlinuz) and linux-modules-*, no config, System.map or
    /// modules.builtin.
    V7_3,
}

impl Series {
    pub const ALL: [Series; 5] = [
        Series::V6_12,
        Series::V6_1,
        Series::V6_18,
        Series::V7_3,
        Series::V5_10,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Series::V5_10 => "5.10",
            Series::V6_12 => "6.12",
            Series::V6_1 => "6.1",
            Series::V6_18 => "6.18",
            Series::V7_3 => "7.3",
        }
    }

    /// Small modules with no dependencies that load anywhere (no hardware), for the scenarios;
    /// the guest knows them as `$M1 $M2 $M3`, the checks as `{M1}`... (see `scenarios`). From
    /// 6.18 CONFIG_CRC7 is unset, so crc16 takes its place.
    pub fn scenario_modules(self) -> [&'static str; 3] {
        match self {
            Series::V5_10 | Series::V6_12 | Series::V6_1 => ["crc7", "crc-itu-t", "crc8"],
            Series::V6_18 | Series::V7_3 => ["crc16", "crc-itu-t", "crc8"],
        }
    }

    /// The series of a label (`6.12`), as the host names it on the guest's command line.
    pub fn from_label(label: &str) -> Option<Series> {
        Series::ALL.into_iter().find(|s| s.label() == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_one_series_each() {
        for series in Series::ALL {
            assert_eq!(Series::from_label(series.label()), Some(series));
        }
        assert_eq!(Series::from_label("6.2"), None);
    }
}
