//! The VM scenarios and what judges them: each scenario's guest steps, its checks and its own
//! judge live together in `scenarios`, and all of it runs inside the guest (`guest-tool judge`),
//! the way an integration-test crate runs in aya's VMs. xtask builds this crate's guest tool
//! static, boots Debian's kernels with it, and collects and reports what the judge printed.
pub mod judge;
pub mod manifest;
pub mod program_stats;
pub mod report;
pub mod scenarios;
mod series;

pub use self::{program_stats::ProgramStats, series::Series};
