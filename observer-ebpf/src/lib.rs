//! Empty library target: lets the agent name this crate as a build dependency.
#![no_std]
