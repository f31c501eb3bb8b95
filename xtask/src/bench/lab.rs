//! The bench's private network and the client runs in it. Every variant has a namespace
//! with a server and a cgroup, plus its `bypass attach` process, iptables rule or socat.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{
    client::{Mode, Report},
    fixture::{Attached, Cgroup, Netns, Server, Socat, own_cgroup},
};

/// The port the servers listen on.
const SERVER_PORT: u16 = 3000;
/// The port every redirect, the DNAT rule included, sends to [`SERVER_PORT`].
const REDIRECTED_PORT: u16 = 80;
/// The port socat listens on; it relays to [`SERVER_PORT`].
const SOCAT_PORT: u16 = 8080;

/// The path of a variant's connections to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    /// `bypass attach` with `rules` rules and the hit log on or off; `matching` selects
    /// whether the client connects to a destination with a rule.
    Bypass {
        rules: usize,
        log: bool,
        matching: bool,
    },
    Iptables,
    Socat,
}

/// A way to connect, and the name it has in the table.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub name: &'static str,
    pub kind: Kind,
}

/// One variant's own namespace, server, cgroup and redirector, torn down in field order on
/// drop: processes first, then the server, the cgroup, and the namespace last.
///
/// Each variant has a namespace of its own, so the TIME_WAIT sockets of one variant's
/// end-to-end loops and the connection tracking that iptables' DNAT rule loads slow no
/// other variant down.
struct Setup {
    attached: Option<Attached>,
    socat: Option<Socat>,
    server: Server,
    cgroup: Cgroup,
    netns: Netns,
}

/// Everything the variants need; the parent cgroup goes after the variants' own.
pub struct Lab {
    setups: Vec<Setup>,
    _parent: Cgroup,
    client: PathBuf,
}

/// Parameters of one client run.
pub struct ClientRun {
    pub mode: Mode,
    pub count: usize,
    pub threads: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl Lab {
    pub fn create(variants: &[Variant], bypass: &Path, client: PathBuf) -> anyhow::Result<Self> {
        let tag = std::process::id();
        let parent = Cgroup::create(&own_cgroup()?, &format!("bypass-bench-{tag}"))?;
        let mut setups = Vec::new();
        for (index, variant) in variants.iter().enumerate() {
            let netns = Netns::create(format!("bypass-bench-{tag}-{index}"))?;
            let cgroup = Cgroup::create(parent.path(), &format!("variant-{index}"))?;
            let server = Server::start(&netns, service(SERVER_PORT))?;
            let mut setup = Setup {
                attached: None,
                socat: None,
                server,
                cgroup,
                netns,
            };
            prepare(&mut setup, variant, bypass)?;
            setups.push(setup);
        }
        Ok(Self {
            setups,
            _parent: parent,
            client,
        })
    }

    pub fn cgroup(&self, variant: usize) -> &Path {
        self.setups[variant].cgroup.path()
    }

    /// Runs the client for `variant` in its namespace and cgroup, and checks that the
    /// connections it reports reached the server.
    pub fn run_client(
        &self,
        variant: &Variant,
        index: usize,
        run: &ClientRun,
    ) -> anyhow::Result<Report> {
        let setup = &self.setups[index];
        let port = match variant.kind {
            Kind::Direct
            | Kind::Bypass {
                matching: false, ..
            } => SERVER_PORT,
            Kind::Bypass { matching: true, .. } | Kind::Iptables => REDIRECTED_PORT,
            Kind::Socat => SOCAT_PORT,
        };
        let before = setup.server.accepted();
        let report = self.spawn_client(&setup.netns, setup.cgroup.path(), service(port), run)?;
        if let Some(socat) = &setup.socat {
            // socat's children relay the last connections after the client is done.
            socat.settle();
        }
        // A reset that overtakes the handshake's last ACK leaves nothing to accept, so
        // connect-and-reset runs may lose a few; the others must all arrive.
        let lost = if run.mode == Mode::Connect {
            report.count / 100
        } else {
            0
        };
        let expected = before + report.count - lost;
        if !setup.server.wait_accepted(expected, Duration::from_secs(5)) {
            bail!(
                "`{}`: the client made {} connections but the server accepted {}",
                variant.name,
                report.count,
                setup.server.accepted() - before
            );
        }
        Ok(report)
    }

    fn spawn_client(
        &self,
        netns: &Netns,
        cgroup: &Path,
        addr: SocketAddr,
        run: &ClientRun,
    ) -> anyhow::Result<Report> {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))?;
        let netns_file = fs::File::open(netns.path())?;
        let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns_file.as_raw_fd());
        let mut command = Command::new(&self.client);
        command.args(["bench-client", "--mode"]);
        command.arg(match run.mode {
            Mode::Connect => "connect",
            Mode::EndToEnd => "end-to-end",
            Mode::Stream => "stream",
        });
        command.arg(format!("--addr={addr}"));
        command.arg(format!("--count={}", run.count));
        command.arg(format!("--threads={}", run.threads));
        command.arg(format!("--bytes={}", run.bytes));
        command.arg(format!("--seconds={}", run.seconds));
        // SAFETY: only `write` and `setns`, both async-signal-safe, run between fork and
        // exec; both fds stay open in the parent until `output` returns.
        unsafe {
            command.pre_exec(move || {
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                    || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = command
            .output()
            .with_context(|| format!("cannot start {}", self.client.display()))?;
        if !output.status.success() {
            bail!(
                "bench client for {addr} failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Report::parse(String::from_utf8_lossy(&output.stdout).trim())
    }

    /// Everything the `bypass attach` processes logged, for a failure message.
    pub fn attach_logs(&self) -> String {
        let mut out = String::new();
        for attached in self
            .setups
            .iter()
            .filter_map(|setup| setup.attached.as_ref())
        {
            let _ = writeln!(out, "{}", attached.stderr());
        }
        out
    }
}

/// Adds what the variant needs beyond the namespace and server: bypass, the DNAT rule, or
/// socat.
fn prepare(setup: &mut Setup, variant: &Variant, bypass: &Path) -> anyhow::Result<()> {
    match variant.kind {
        Kind::Direct => {}
        Kind::Bypass { rules, log, .. } => {
            eprintln!("xtask: attaching bypass for `{}`", variant.name);
            let args = attach_args(rules, log);
            setup.attached = Some(Attached::start(bypass, setup.cgroup.path(), &args)?);
        }
        Kind::Iptables => {
            let (dport, to) = (
                REDIRECTED_PORT.to_string(),
                service(SERVER_PORT).to_string(),
            );
            let rule = [
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "10.0.0.22",
                "--dport",
                &dport,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ];
            setup.netns.exec(&rule).context(
                "cannot add the iptables DNAT rule; install the Debian package iptables",
            )?;
        }
        Kind::Socat => {
            let socat = Socat::start(&setup.netns, service(SOCAT_PORT), service(SERVER_PORT))?;
            setup.socat = Some(socat);
        }
    }
    Ok(())
}

fn service(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 22], port))
}

/// Returns the `bypass attach` arguments for a rule set of `rules` rules: the redirect of
/// 10.0.0.22:80, and `rules - 1` others for addresses in 10.64.0.0/10 that no client uses.
pub fn attach_args(rules: usize, log: bool) -> Vec<String> {
    let mut args = vec![format!("--rule=10.0.0.22:{REDIRECTED_PORT}=:{SERVER_PORT}")];
    for i in 1..rules {
        let [_, b, c, d] = (0x0a40_0000_u32 + i as u32).to_be_bytes();
        args.push(format!(
            "--rule=10.{b}.{c}.{d}:{REDIRECTED_PORT}=:{SERVER_PORT}"
        ));
    }
    args.push(format!("--max-rules={}", rules.max(DEFAULT_MAX_RULES)));
    if !log {
        args.push("--log-rate=0".into());
    }
    args
}

/// bypass's default `--max-rules`; larger rule sets raise it.
const DEFAULT_MAX_RULES: usize = 16_384;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_args_make_distinct_rules() {
        let args = attach_args(3, false);
        assert_eq!(
            args,
            [
                "--rule=10.0.0.22:80=:3000",
                "--rule=10.64.0.1:80=:3000",
                "--rule=10.64.0.2:80=:3000",
                "--max-rules=16384",
                "--log-rate=0",
            ]
        );
        let many = attach_args(100_000, true);
        assert_eq!(many[99_999], "--rule=10.65.134.159:80=:3000");
        assert_eq!(many.last().unwrap(), "--max-rules=100000");
    }
}
