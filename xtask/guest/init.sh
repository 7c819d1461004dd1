#!/bin/busybox sh
# /init of the test guest: prepares what the observer needs, loads the network driver, then runs
# the scenario named on the kernel command line (observer_scenario=NAME) from /vm/scenarios/.
#
# Protocol with the host (xtask/src/vm/), one marker per line on the serial console:
#   AGENT-READY | AGENT-FAILED   the observer answers /metrics inside the guest, or never did
#   CHECK-FAILED <what>          one per check that failed (judged in the guest: guest-tool judge)
#   JUDGED <scenario>: ...       the judge has run
#   ACTIONS-DONE                 judged; the host scrapes once and runs its own step, if any
#   RESULT <scenario> rc=N       last line before power-off; 0 when the observer started, the
#                                scenario's script succeeded and every check held
# Between ACTIONS-DONE and RESULT the guest waits for the host to say "finish" on port 9746, so
# the agent still runs while the host scrapes it.

/bin/busybox --install -s /bin
export PATH=/bin
# The console is a log file on the host: no colour codes in the observer's log lines.
export RUST_LOG_STYLE=never

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# From here on everything printed also goes to /tmp/console.log, which the judge reads; the
# serial console itself stays on fd 3.
exec 3>&1
mkfifo /tmp/console.pipe
tee /tmp/console.log </tmp/console.pipe &
exec >/tmp/console.pipe 2>&1
# The observer must cope with any of these missing, so the guest only says so. (Under
# lockdown=confidentiality tracefs still mounts, but the kernel has disabled its events.)
mount -t tracefs tracefs /sys/kernel/tracing || echo "vm: tracefs not mounted"
mount -t securityfs securityfs /sys/kernel/security || echo "vm: securityfs not mounted"
mount -t debugfs debugfs /sys/kernel/debug || echo "vm: debugfs not mounted"
mount -t bpf bpf /sys/fs/bpf || echo "vm: bpffs not mounted"

scenario=$(sed -n 's/.*observer_scenario=\([^ ]*\).*/\1/p' /proc/cmdline)
# `cargo xtask vm --agent-log LEVEL` passes the observer's log level this way.
# The host names the kernel series (`6.12`): the checks differ by series.
series=$(sed -n 's/.*observer_series=\([^ ]*\).*/\1/p' /proc/cmdline)
agent_log=$(sed -n 's/.*observer_log=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$agent_log" ] && export RUST_LOG="$agent_log"
echo "vm: kernel $(uname -r), scenario ${scenario:-none}, lockdown: $(cat /sys/kernel/security/lockdown 2>/dev/null)"

# The network driver's modules (listed in load order by the host) load before the observer
# starts, so they are not part of any scenario's counts.
while read -r module; do
    answer=$(/vm/guest-tool load "/vm/net/$module" 2>&1)
    case "$answer" in
    *rc=0) ;;
    *) echo "vm: network module: $answer" ;;
    esac
done </vm/net/order
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "vm: eth0 not configured"

# Helpers for the scenario scripts.
load() { /vm/guest-tool load "$@"; }

# Starts the observer (with any extra arguments given) and waits until it answers /metrics;
# 0 when it does.
start_agent() {
    if [ ! -x /observer ]; then
        echo "AGENT-FAILED no /observer in the initramfs"
        return 1
    fi
    /observer --web.listen-address 0.0.0.0:9745 "$@" &
    agent_pid=$!
    i=0
    while [ $i -lt 600 ]; do
        if wget -q -O /dev/null http://127.0.0.1:9745/metrics 2>/dev/null; then
            echo "AGENT-READY after $((i / 10)) s"
            return 0
        fi
        if ! kill -0 "$agent_pid" 2>/dev/null; then
            wait "$agent_pid"
            echo "AGENT-FAILED exited with status $?"
            return 1
        fi
        usleep 100000
        i=$((i + 1))
    done
    echo "AGENT-FAILED no answer on :9745 within 60 s"
    return 1
}

# Stops the running observer. /init started the first one, so a scenario's subshell cannot
# `wait` for it: it watches for it to end (a zombie until its parent reaps it).
stop_agent() {
    kill -INT "$agent_pid"
    while [ -e "/proc/$agent_pid/status" ] && ! grep -q '^State:.*Z' "/proc/$agent_pid/status"; do
        usleep 100000
    done
}

# Prints `observer probes` between markers for the host to read.
probes() {
    echo "PROBES-BEGIN"
    /observer probes
    echo "PROBES-END rc=$?"
}

# `observer profile` in the background with the arguments given, its report in
# /tmp/profile.out; returns once it is watching. stop_profile ends it (Ctrl-C, as a user would),
# says how it exited and prints the report between markers.
start_profile() {
    /observer profile "$@" >/tmp/profile.out 2>/tmp/profile.err &
    profile_pid=$!
    until grep -q watching /tmp/profile.err; do sleep 0.2; done
}
stop_profile() {
    kill -INT "$profile_pid"
    wait "$profile_pid"
    echo "profile rc=$?"
    echo PROFILE-BEGIN
    cat /tmp/profile.out
    echo PROFILE-END
}

# The kernel's own words about modules, taint and lockdown (the console is quiet).
kernel_log() {
    dmesg | grep -iE 'module|taint|lockdown|signature' | sed 's/^/kmsg: /'
}

# The scenario's actions run even when the observer did not start: what the kernel returns is
# checked on its own.
# The scenario's arguments for the observer, if any (split into words on purpose).
# What the scenario does before the observer starts (a host's boot before its agent).
if [ -f "/vm/scenarios/$scenario.pre" ]; then
    (. "/vm/scenarios/$scenario.pre") || echo "vm: before-agent steps failed"
fi
# shellcheck disable=SC2046
start_agent $(cat "/vm/scenarios/$scenario.agent" 2>/dev/null)
rc=$?
if [ -f "/vm/scenarios/$scenario.sh" ]; then
    (. "/vm/scenarios/$scenario.sh") || rc=$?
else
    echo "vm: no scenario named '$scenario'"
    rc=1
fi
kernel_log
echo "JUDGE-BEGIN"
/vm/guest-tool judge "$scenario" "$series" /tmp/console.log || rc=1
echo "ACTIONS-DONE"
/vm/guest-tool await-host 9746 120 || echo "vm: powering off without the host's word"
# Straight to the serial console, once the copy has written out what came before.
usleep 300000
echo "RESULT $scenario rc=$rc" >&3
poweroff -f
