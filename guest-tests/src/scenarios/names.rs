//! Module names under both lockdown levels: the same refused and loaded modules, named the same,
//! with the same outcomes. Under `lockdown=confidentiality` the kernel refuses
//! `bpf_probe_read_kernel` (and tracefs): the names come from plain loads through the BTF-typed
//! arguments of `security_kernel_read_file` (the file's dentry) and `do_init_module` (the module).
//! `observer profile` prints them beside the running agent.
use super::{CURRENT, Check, Scenario};

const GUEST: &str = "/observer profile --duration 30s --format json >/tmp/profile.json 2>/tmp/profile.err &\n\
                     profile=$!\n\
                     until grep -q watching /tmp/profile.err; do sleep 0.2; done\n\
                     load /vm/mods/$M1-unsigned.ko /vm/mods/$M2.ko\n\
                     kill -INT $profile; wait $profile; echo \"profile rc=$?\"\n\
                     echo PROFILE-BEGIN; cat /tmp/profile.json; echo PROFILE-END\n";

const SAME_NAMES: &[Check] = &[
    Check::Console("finit_module {M1}-unsigned.ko errno=EPERM"),
    Check::Console("finit_module {M2}.ko rc=0"),
    Check::Console("profile rc=0"),
    // The refused load, named from its file; the loaded one by the kernel's module name.
    Check::Console("\"module\": \"{M1.name}_unsigned\""),
    Check::Console("\"module\": \"{M2.name}\""),
    Check::Console("\"signature\": {"),
    Check::Console("\"digest\":"),
];

pub const NAMES_INTEGRITY: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "names-integrity",
    about: "lockdown=integrity: refused and loaded modules are named (the reference for confidentiality)",
    cmdline: "lockdown=integrity",
    kernels: CURRENT,
    guest: GUEST,
    checks: &[SAME_NAMES],
    kernel_checks: &[],
};

pub const NAMES_CONFIDENTIALITY: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "names-confidentiality",
    about: "lockdown=confidentiality: the same names, outcomes and signature phases as under integrity",
    cmdline: "lockdown=confidentiality",
    kernels: CURRENT,
    guest: GUEST,
    checks: &[SAME_NAMES],
    kernel_checks: &[],
};
