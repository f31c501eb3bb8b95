//! bypass: redirect the outgoing connections of one cgroup at connect() time, with eBPF.
//!
//! The library contains everything but argument parsing glue: rule and config parsing, cgroup
//! discovery, the loader, the hit log reader, and the `run` and `attach` lifecycles.

pub mod attach;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod config;
pub mod exit;
pub mod generate;
pub mod hitlog;
mod kernel_btf;
pub mod live;
pub mod loader;
pub mod names;
pub mod pin;
pub mod record;
pub mod rule;
pub mod rulemap;
pub mod run;
mod setup;
pub mod spawn;
pub mod status;
pub mod target;
pub mod user;
pub mod verify;
