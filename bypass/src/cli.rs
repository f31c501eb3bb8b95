//! Command-line interface. The doc comments here are the `--help` text.

use std::{ffi::OsString, path::PathBuf};

use bypass_common::{DEFAULT_LOG_RATE, DEFAULT_MAX_RULES};
use clap::{ArgAction, Args, Parser, Subcommand};

const RULE_HELP: &str = "\
RULES:
  -r, --rule [tcp/|udp/]FROM=TO   FROM is IP:PORT, TO is [IP]:PORT (no IP keeps FROM's)
      --rule 10.0.0.22:80=:3000             tcp (the default protocol), same address
      --rule udp/10.0.0.53:53=127.0.0.1:5353
      --rule '[fd00::22]:80=[fd00::22]:3000'  IPv6 needs brackets
      --rule registry.internal:80=10.0.0.22:3000  a host name in FROM is resolved once at
                                            start; each of its addresses becomes a rule
  With no --rule and no --config, the rule is tcp/10.0.0.22:80=10.0.0.22:3000.

EXIT STATUS:
  run:    the command's status; 128+N if a signal N killed it; 125 if bypass failed
          before the command ran (usage errors included); 126 if the command could not
          be executed; 127 if it was not found.
  attach: 0 after SIGINT or SIGTERM; 1 on failure; 2 on usage errors.

Logging goes to stderr; RUST_LOG (e.g. RUST_LOG=debug) overrides -v and -q.";

/// Redirect the outgoing connections of one cgroup at connect() time, with eBPF.
///
/// bypass attaches cgroup sock_addr programs to a cgroup v2 directory. When a process in that
/// cgroup (or below it) connects to the FROM address of a rule, the kernel connects it to TO
/// instead. Other processes on the host are not affected. Needs root (CAP_BPF and
/// CAP_NET_ADMIN) and cgroup v2.
#[derive(Debug, Parser)]
#[command(name = "bypass", version, after_long_help = RULE_HELP, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log more: -v for debug, -vv for trace.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log less: -q for warnings and errors only, -qq for errors only.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run COMMAND in a new cgroup with the redirect attached, then remove both.
    ///
    /// The cgroup is created under this process's own cgroup v2 directory (or
    /// --parent-cgroup) and the programs are attached before COMMAND starts, so its first
    /// connect() is already redirected. SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to
    /// COMMAND, so a Ctrl-C in a terminal reaches it twice (from the terminal and from
    /// bypass).
    ///
    /// Example: bypass run --rule 10.0.0.22:80=:3000 -- docker login 10.0.0.22
    #[command(after_long_help = RULE_HELP)]
    Run(RunArgs),

    /// Attach the redirect to an existing cgroup until SIGINT or SIGTERM, or pin it.
    ///
    /// The target is --cgroup DIR or the cgroup of --pid PID. With --pin NAME the attachment
    /// is pinned under /sys/fs/bpf/bypass/NAME and bypass exits at once; it stays until
    /// `bypass detach NAME`. Without --pin the redirect ends with this process, even on
    /// SIGKILL. SIGHUP re-reads --config and applies the changes in place.
    ///
    /// Example: bypass attach --cgroup /sys/fs/cgroup/system.slice/runner.service -r 10.0.0.22:80=:3000
    #[command(after_long_help = RULE_HELP)]
    Attach(AttachArgs),

    /// Remove a pinned attachment made by `attach --pin NAME`.
    Detach(DetachArgs),

    /// Show every attachment, pinned and running: cgroup, rules, hits per rule.
    Status(StatusArgs),

    /// Remove pinned attachments whose cgroup no longer exists.
    Gc,

    /// Add or delete rules of a pinned attachment while it redirects.
    #[command(subcommand)]
    Rules(RulesCommand),

    /// Check that this host can run bypass; one line per requirement, with the fix.
    Check(CheckArgs),

    /// Write shell completions and man pages into DIR (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Redirect rule, [tcp/|udp/]FROM=TO; repeat for more rules. See RULES below.
    #[arg(short, long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,

    /// TOML file with [[rule]] tables (keys: from, to, protocol).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Capacity of the rule map; more rules than this are rejected.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_RULES,
          value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
    pub max_rules: u32,

    /// Hit log lines per second per CPU; hits over it are counted but not logged. 0 turns
    /// the hit log off.
    #[arg(long, value_name = "LINES", default_value_t = DEFAULT_LOG_RATE)]
    pub log_rate: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub rules: RuleArgs,

    /// Create the command's cgroup under this cgroup v2 directory instead of under bypass's
    /// own cgroup.
    #[arg(long, value_name = "DIR")]
    pub parent_cgroup: Option<PathBuf>,

    /// Run the command as this user (name or uid), with the user's groups, instead of as
    /// the user running bypass.
    #[arg(long, value_name = "NAME|UID")]
    pub user: Option<String>,

    /// Skip the check that the redirect took effect on the cgroup.
    #[arg(long)]
    pub no_verify: bool,

    /// The command to run, and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub rules: RuleArgs,

    /// The cgroup v2 directory to attach to, e.g. /sys/fs/cgroup/system.slice/runner.service.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "pid",
        conflicts_with = "pid"
    )]
    pub cgroup: Option<PathBuf>,

    /// Attach to the cgroup v2 of this running process (read from /proc/PID/cgroup).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,

    /// Allow the target to be the root of the cgroup v2 hierarchy, which redirects
    /// connections of every process on the host.
    #[arg(long)]
    pub all_processes: bool,

    /// Pin the attachment under /sys/fs/bpf/bypass/NAME and exit at once; it stays until
    /// `bypass detach NAME`. Pinned attachments have no hit log, only counters.
    #[arg(long, value_name = "NAME")]
    pub pin: Option<String>,

    /// Skip the check that the redirect took effect on the cgroup (use where no process may
    /// join the cgroup).
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The name given to `attach --pin`.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Show only the pinned attachment of this name.
    pub name: Option<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Add RULE to the pinned attachment NAME; the next connect() uses it.
    Add {
        /// The name given to `attach --pin`.
        name: String,
        /// [tcp/|udp/]FROM=TO, as for --rule.
        rule: String,
    },
    /// Delete RULE (or any rule with RULE's protocol and FROM) from the pinned attachment.
    Del {
        /// The name given to `attach --pin`.
        name: String,
        /// [tcp/|udp/]FROM=TO or [tcp/|udp/]FROM.
        rule: String,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read mounts from this file instead of /proc/self/mountinfo (for tests).
    #[arg(long, value_name = "FILE", hide = true)]
    pub mountinfo: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Output directory; `completions/` and `man/` are created in it.
    pub dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "bypass",
            "run",
            "-r",
            "10.0.0.22:80=:3000",
            "--",
            "curl",
            "-v",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.command, ["curl", "-v"]);
        assert_eq!(args.rules.rules, ["10.0.0.22:80=:3000"]);
        assert_eq!(args.rules.log_rate, DEFAULT_LOG_RATE);
    }

    #[test]
    fn attach_needs_cgroup() {
        let err = Cli::try_parse_from(["bypass", "attach"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
