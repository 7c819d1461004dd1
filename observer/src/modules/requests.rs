//! Who asked for an autoload: the process whose `request_module` had the kernel start modprobe,
//! and what it asked for, joined in the kernel to every load that modprobe made (see
//! observer-ebpf's `modules/requests.rs`). What is asked for is mostly an alias (`net-pf-29`,
//! `fs-xfs`, `crypto-sha256`) that modprobe resolves to module names: the load's own `module`
//! says which one it became.

use observer_common::modules::{ModuleLoad, SEEN_REQUESTED};
use serde::Serialize;

use crate::record::comm_str;

/// The asking task, as its thread saw itself when it asked (uid, command and cgroup while the
/// event stream is on; the stream adds the cgroup's path and container id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestedBy {
    pub request: String,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

pub fn requested_by(load: &ModuleLoad) -> Option<RequestedBy> {
    if load.seen & SEEN_REQUESTED == 0 {
        return None;
    }
    let request = &load.request;
    Some(RequestedBy {
        request: comm_str(&request.alias),
        pid: request.requester.pid,
        tid: request.requester.tid,
        uid: request.requester.uid,
        comm: comm_str(&request.requester.comm),
        cgroup_id: request.requester.cgroup_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_requested_load_names_its_requester() {
        // SAFETY: all-zero is a valid ModuleLoad.
        let mut load: ModuleLoad = unsafe { std::mem::zeroed() };
        assert_eq!(requested_by(&load), None);
        load.seen = SEEN_REQUESTED;
        load.request.alias[..9].copy_from_slice(b"net-pf-29");
        load.request.requester.pid = 42;
        load.request.requester.tid = 43;
        load.request.requester.uid = 65534;
        load.request.requester.comm[..4].copy_from_slice(b"sock");
        load.request.requester.cgroup_id = 7;
        assert_eq!(
            requested_by(&load),
            Some(RequestedBy {
                request: "net-pf-29".into(),
                pid: 42,
                tid: 43,
                uid: 65534,
                comm: "sock".into(),
                cgroup_id: 7,
            })
        );
    }
}
