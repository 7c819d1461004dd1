//! POSIX timers in the guest: the life cycles of `guest-tool timer-life` and the restore-mode
//! creates of `guest-tool timer-restore`, counted exactly (nothing else in the guest makes timer
//! syscalls).
use super::{Check, EVERY_KERNEL, Labels, NO_RESTORE_MODE, RESTORE_MODE, Scenario, Want};

const SYSCALLS: &str = "observer_posix_timer_syscalls_total";
const EVENTS: &str = "observer_events_total";
const LIVE: &str = "observer_posix_timer_live";
const ID_MAX: &str = "observer_posix_timer_id_max";
const SHORT_LIVED: &str = "observer_posix_timer_short_lived_total";
const BY_PROCESS: &str = "observer_posix_timer_creates_by_process_total";
const RESTORE_CREATES: &str = "observer_posix_timer_restore_creates_total";
const CREATE_COUNT: &str = "observer_posix_timer_create_duration_seconds_count";
const LOST: &str = "observer_events_lost_total";
const ATTACHED: &str = "observer_probe_attached";

const CREATE_OK: Labels = &[("syscall", "timer_create"), ("result", "ok")];
const CREATE_EINVAL: Labels = &[("syscall", "timer_create"), ("result", "einval")];
const CREATE_EBUSY: Labels = &[("syscall", "timer_create"), ("result", "ebusy")];
const CREATED: Labels = &[("kind", "timer_created")];
const OWNER_GONE: Labels = &[("kind", "timer_owner_gone")];

/// What `timer-life` did (see xtask/src/bin/guest-tool/timer_life.rs), and its deletes and
/// settimes counted by result, whatever else the scenario does with timers and in every mode:
/// 20 churned creates and deletes in `tm-churn`, 3 creates, 2 armed, 1 deleted in `tm-armed`,
/// 2 in `tm-exec`, 4 kept live in `tm-keep`; one failed create, delete and settime.
pub const LIFE_CALLS: &[Check] = &[
    Check::Console("timer-life churn created=20 deleted=20 max_id=19"),
    Check::Console("timer-life armed created=3 armed=2 delete rc=0"),
    Check::Console("timer-life exec created=2"),
    Check::Console("timer-life keep created=4"),
    Check::Console(
        "timer-life errors create errno=EINVAL delete errno=EINVAL settime errno=EINVAL",
    ),
    Check::Metric(
        SYSCALLS,
        &[("syscall", "timer_delete"), ("result", "ok")],
        Want::Eq(21.0),
    ),
    Check::Metric(
        SYSCALLS,
        &[("syscall", "timer_delete"), ("result", "einval")],
        Want::Eq(1.0),
    ),
    Check::Metric(
        SYSCALLS,
        &[("syscall", "timer_settime"), ("result", "ok")],
        Want::Eq(2.0),
    ),
    Check::Metric(
        SYSCALLS,
        &[("syscall", "timer_settime"), ("result", "einval")],
        Want::Eq(1.0),
    ),
];

/// What the records tell of `timer-life` (see [`LIFE_CALLS`]).
pub const LIFE: &[Check] = &[
    Check::Metric(EVENTS, &[("kind", "timer_armed")], Want::Eq(2.0)),
    // tm-keep's four; tm-armed's two died with it, tm-exec's two at exec.
    Check::Metric(LIVE, &[], Want::Eq(4.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-churn")], Want::Eq(20.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-armed")], Want::Eq(3.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-exec")], Want::Eq(2.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-keep")], Want::Eq(4.0)),
    Check::MetricSum(LOST, &[], Want::ZeroOrAbsent),
];

/// Totals when `timer-life` made all of the guest's timer calls: 29 creates, one EINVAL; IDs
/// count from 0 in each process, so tm-churn's 19 is the highest; three owners gone (tm-churn
/// and tm-armed at exit, tm-exec at exec).
pub const LIFE_TOTALS: &[Check] = &[
    Check::Metric(SYSCALLS, CREATE_OK, Want::Eq(29.0)),
    Check::Metric(SYSCALLS, CREATE_EINVAL, Want::Eq(1.0)),
    Check::MetricSum(SYSCALLS, CREATE_EBUSY, Want::ZeroOrAbsent),
    Check::Metric(EVENTS, CREATED, Want::Eq(29.0)),
    Check::Metric(ID_MAX, &[], Want::Eq(19.0)),
    Check::Metric(EVENTS, OWNER_GONE, Want::Eq(3.0)),
];

/// With `--timers.latency`: every create of `LIFE_TOTALS` is timed, failed or not.
const TIMED: &[Check] = &[Check::Metric(CREATE_COUNT, &[], Want::Eq(30.0))];

/// By default creates are not timed: no latency series.
pub const UNTIMED: &[Check] = &[Check::MetricSum(CREATE_COUNT, &[], Want::ZeroOrAbsent)];

/// `timer-life` under lockdown=confidentiality, where the agent reads no user memory (see the
/// timer programs): every call counted, every create counted for its process and
/// every owner's end seen as under integrity; but no ID, so no live timer, ID high-water mark,
/// churn or arming.
pub const LIFE_WITHOUT_USER_READS: &[Check] = &[
    Check::Metric(SYSCALLS, CREATE_OK, Want::Eq(29.0)),
    Check::Metric(SYSCALLS, CREATE_EINVAL, Want::Eq(1.0)),
    Check::MetricSum(CREATE_COUNT, &[], Want::ZeroOrAbsent),
    Check::Metric(EVENTS, CREATED, Want::Eq(29.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-churn")], Want::Eq(20.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-keep")], Want::Eq(4.0)),
    Check::Metric(EVENTS, OWNER_GONE, Want::Eq(3.0)),
    Check::Metric(LIVE, &[], Want::Eq(0.0)),
    Check::MetricSum(ID_MAX, &[], Want::ZeroOrAbsent),
    Check::MetricSum(EVENTS, &[("kind", "timer_armed")], Want::ZeroOrAbsent),
    // Without --timers.latency, exits only.
    Check::Metric(
        ATTACHED,
        &[("probe", "timer_syscalls"), ("mechanism", "fexit")],
        Want::Eq(1.0),
    ),
    Check::MetricSum(LOST, &[], Want::ZeroOrAbsent),
];

/// `timer-restore` in `tm-restore` on a kernel with restore mode: ID 424242 granted, asked
/// again (EBUSY), -5 (EINVAL), then an ordinary create after the counter the kernel moved
/// past the restored ID; the child exits with two timers.
const RESTORE_COUNTS: &[Check] = &[
    Check::Console(
        "timer-restore on rc=0 get rc=1 first rc=0 id=424242 again errno=EBUSY \
         negative errno=EINVAL off rc=0 next rc=0 id=424243",
    ),
    Check::Metric(RESTORE_CREATES, &[("result", "ok")], Want::Eq(1.0)),
    Check::Metric(RESTORE_CREATES, &[("result", "ebusy")], Want::Eq(1.0)),
    Check::Metric(RESTORE_CREATES, &[("result", "einval")], Want::Eq(1.0)),
    Check::Metric(SYSCALLS, CREATE_OK, Want::Eq(31.0)),
    Check::Metric(SYSCALLS, CREATE_EINVAL, Want::Eq(2.0)),
    Check::Metric(SYSCALLS, CREATE_EBUSY, Want::Eq(1.0)),
    Check::Metric(ID_MAX, &[], Want::Eq(424_243.0)),
];

/// What the records add to [`RESTORE_COUNTS`], and the latency of all 34 creates.
const RESTORED: &[Check] = &[
    Check::Metric(EVENTS, CREATED, Want::Eq(31.0)),
    Check::Metric(CREATE_COUNT, &[], Want::Eq(34.0)),
    Check::Metric(BY_PROCESS, &[("comm", "tm-restore")], Want::Eq(2.0)),
    Check::Metric(EVENTS, OWNER_GONE, Want::Eq(4.0)),
];

/// Only tm-churn's 20: the armed ones and the ones never deleted are not churn. Checked where the
/// agent runs with a 10 s threshold: under TCG on a busy host a vCPU can stall for more than the
/// default 10 ms between a create and its delete.
const CHURN: &[Check] = &[Check::Metric(SHORT_LIVED, &[], Want::Eq(20.0))];

/// The primary mechanisms, so the counts above (restore mode included) come through trampolines.
const THROUGH_TRAMPOLINES: &[Check] = &[Check::Metric(
    ATTACHED,
    &[("probe", "timer_syscalls"), ("mechanism", "fentry+fexit")],
    Want::Eq(1.0),
)];

/// Owners' ends on `exit_itimers(struct task_struct *)` (6.0+, and 5.10.262, which took the fix
/// that made it take the task).
const OWNERS_THROUGH_TRAMPOLINES: &[Check] = &[Check::Metric(
    ATTACHED,
    &[("probe", "timer_owner_exit"), ("mechanism", "fentry")],
    Want::Eq(1.0),
)];

/// Before 6.15 the prctl is unknown: the child says so and makes no timer call.
const NOT_RESTORED: &[Check] = &[
    Check::Console("timer-restore on errno=EINVAL: no restore mode on this kernel (6.15+)"),
    Check::MetricSum(RESTORE_CREATES, &[], Want::ZeroOrAbsent),
];

pub const TIMERS: Scenario = Scenario {
    judge: None,
    alone: false,
    // Timing creates, with a churn threshold that an emulated guest cannot miss by stalling.
    agent_args: "--timers.short-lived 10s --timers.latency",
    before_agent: "",
    name: "timers",
    about: "timer creates by result, deletes, arming, live timers, ID high-water mark, churn, \
            per-process creates, owners gone at exit and exec; restore-mode IDs on 6.15+",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "/vm/guest-tool timer-life\n/vm/guest-tool timer-restore\n",
    checks: &[
        LIFE_CALLS,
        LIFE,
        CHURN,
        THROUGH_TRAMPOLINES,
        OWNERS_THROUGH_TRAMPOLINES,
    ],
    kernel_checks: &[
        (RESTORE_MODE, RESTORE_COUNTS),
        (RESTORE_MODE, RESTORED),
        (NO_RESTORE_MODE, NOT_RESTORED),
        (NO_RESTORE_MODE, LIFE_TOTALS),
        (NO_RESTORE_MODE, TIMED),
    ],
};

/// `--timers.counts-only`: the same calls counted exactly by syscall and result, the ID
/// high-water mark and restore-mode creates, from per-CPU arrays alone; no record, and none of
/// what records tell (live timers, churn, per-process creates, owners gone).
const COUNTS_ONLY: &[Check] = &[
    Check::MetricSum(EVENTS, CREATED, Want::ZeroOrAbsent),
    Check::MetricSum(EVENTS, &[("kind", "timer_deleted")], Want::ZeroOrAbsent),
    Check::MetricSum(EVENTS, &[("kind", "timer_armed")], Want::ZeroOrAbsent),
    Check::MetricSum(EVENTS, OWNER_GONE, Want::ZeroOrAbsent),
    Check::MetricSum(LIVE, &[], Want::ZeroOrAbsent),
    Check::MetricSum(SHORT_LIVED, &[], Want::ZeroOrAbsent),
    Check::MetricSum(BY_PROCESS, &[], Want::ZeroOrAbsent),
    Check::MetricSum(CREATE_COUNT, &[], Want::ZeroOrAbsent),
    Check::Metric(
        ATTACHED,
        &[("probe", "timer_syscalls"), ("mechanism", "fexit")],
        Want::Eq(1.0),
    ),
    // Owners' ends only matter to live timers: not hooked.
    Check::MetricSum(
        ATTACHED,
        &[("probe", "timer_owner_exit")],
        Want::ZeroOrAbsent,
    ),
    Check::MetricSum(LOST, &[], Want::ZeroOrAbsent),
];

/// Before 6.15: `timer-life`'s 29 creates and one failure, tm-churn's 19 the highest ID.
const COUNTS_ONLY_LIFE: &[Check] = &[
    Check::Metric(SYSCALLS, CREATE_OK, Want::Eq(29.0)),
    Check::Metric(SYSCALLS, CREATE_EINVAL, Want::Eq(1.0)),
    Check::Metric(ID_MAX, &[], Want::Eq(19.0)),
];

pub const TIMERS_COUNTS_ONLY: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "--timers.counts-only",
    before_agent: "",
    name: "timers-counts-only",
    about: "--timers.counts-only: timer calls by result, the ID high-water mark and restore-mode \
            creates exactly, without records",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "/vm/guest-tool timer-life\n/vm/guest-tool timer-restore\n",
    checks: &[LIFE_CALLS, COUNTS_ONLY],
    kernel_checks: &[
        (RESTORE_MODE, RESTORE_COUNTS),
        (NO_RESTORE_MODE, NOT_RESTORED),
        (NO_RESTORE_MODE, COUNTS_ONLY_LIFE),
    ],
};
