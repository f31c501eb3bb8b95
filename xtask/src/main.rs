//! Development tasks for bypass: `cargo xtask <task>`. Nothing here is needed at run time.

mod bench;
mod demo;
mod dist;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Development tasks for bypass.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian and Ubuntu), or name it elsewhere.
    Setup,
    /// Set up, build, and show a real curl redirected inside a private network namespace.
    Demo,
    /// Build the release tarball and .deb into target/dist/.
    Dist,
    /// Set up, then run every test, the privileged ones included (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then benchmark bypass against a direct connection, iptables DNAT and socat
    /// (needs root); writes docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// One client run of the bench, started by `bench` inside its namespace and cgroup.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Dist => setup::run().and_then(|()| dist::run_dist()),
        Task::Test { args } => setup::run().and_then(|()| test(&args)),
        Task::Bench(args) => setup::run().and_then(|()| bench::run(&args)),
        Task::BenchClient(args) => bench::client(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let mut cargo = cargo();
    cargo.args(["test", "--workspace"]).args(args);
    // The privileged tests build their own namespaces and cgroups; keep them from racing
    // for CPU with each other on small machines.
    cargo.env(
        "RUST_TEST_THREADS",
        std::env::var("RUST_TEST_THREADS").unwrap_or("2".into()),
    );
    run(&mut cargo)
}

/// Returns a command for the cargo that runs this xtask, with the PATH the eBPF build needs.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.env("PATH", setup::build_path());
    command
}

/// Runs `command` and fails with its status when it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
