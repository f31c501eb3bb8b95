//! The check after attaching that the redirect really applies to the cgroup.
//!
//! A temporary rule sends `127.0.0.1:SOURCE` to `127.0.0.1:TARGET`, two loopback listeners of
//! this process. A helper process started in the cgroup connects to SOURCE. The connection must
//! arrive at TARGET; arriving at SOURCE means the programs did not run for the helper. Nothing
//! leaves loopback, and the rule is removed again before this returns.

use std::{
    io::{self, ErrorKind},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    loader::Redirector,
    rule::{Protocol, Rule},
    rulemap::RuleMaps,
    spawn::{self, CgroupEntry, Forked},
};

/// How long the check waits for the helper's connection.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "the redirect does not apply to processes in {cgroup}: a test connection from there \
         reached its original address. Likely causes: bypass runs in another cgroup namespace \
         than the cgroup's processes, or another program on the cgroup or a parent rewrites \
         connect() after bypass. Detached; pass --no-verify to skip this check"
    )]
    NotRedirected { cgroup: String },
    #[error(
        "cannot place a test process in {cgroup} ({error}); a cgroup with child cgroups and \
         enabled controllers accepts no processes. Attach to a leaf cgroup, or pass --no-verify"
    )]
    CannotJoin { cgroup: String, error: io::Error },
    #[error(
        "the test connection from {cgroup} to 127.0.0.1 failed ({error}); loopback may be down \
         in this network namespace, or a firewall on loopback or a program on the cgroup that \
         rejects connect() blocks it. Detached; pass --no-verify to skip this check"
    )]
    ConnectFailed { cgroup: String, error: io::Error },
    #[error(
        "the test process in {cgroup} did not connect within {TIMEOUT:?}; is the cgroup frozen \
         (cgroup.freeze)? Detached; pass --no-verify to skip this check"
    )]
    TimedOut { cgroup: String },
    #[error("cannot set up the check")]
    Setup(#[source] anyhow::Error),
}

/// Checks that a process in `cgroup` is redirected by `redirector`'s programs.
pub fn verify(redirector: &Redirector, cgroup: &Path) -> Result<(), VerifyError> {
    let setup = |err: io::Error| VerifyError::Setup(err.into());
    let target = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(setup)?;
    let source = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(setup)?;
    let rule = Rule {
        protocol: Protocol::Tcp,
        from: source.local_addr().map_err(setup)?,
        to: target.local_addr().map_err(setup)?,
    };
    let mut maps =
        RuleMaps::from_ebpf(redirector.ebpf()).map_err(|err| VerifyError::Setup(err.into()))?;
    let rule_id = maps.check_rule_id();
    maps.insert(&rule, rule_id)
        .map_err(|err| VerifyError::Setup(err.into()))?;
    log::debug!("checking the redirect with the temporary rule {rule}");
    let result = probe(cgroup, rule.from, &target, &source);
    if let Err(err) = maps.remove(&rule) {
        log::warn!("cannot remove the temporary rule {rule}: {err}");
    }
    result?;
    log::info!("checked: a process in {} is redirected", cgroup.display());
    Ok(())
}

fn probe(
    cgroup: &Path,
    from: SocketAddr,
    target: &TcpListener,
    source: &TcpListener,
) -> Result<(), VerifyError> {
    let shown = cgroup.display().to_string();
    let entry = CgroupEntry::open(cgroup).map_err(|error| VerifyError::CannotJoin {
        cgroup: shown.clone(),
        error,
    })?;
    match run_helper(&entry, from) {
        Ok(()) => {}
        Err(HelperError::Join(error)) => {
            return Err(VerifyError::CannotJoin {
                cgroup: shown,
                error,
            });
        }
        Err(HelperError::Connect(error)) => {
            return Err(VerifyError::ConnectFailed {
                cgroup: shown,
                error,
            });
        }
        Err(HelperError::TimedOut) => return Err(VerifyError::TimedOut { cgroup: shown }),
    }
    wait_for_arrival(target, source, &shown)
}

/// Returns which listener got the helper's connection, within [`TIMEOUT`].
fn wait_for_arrival(
    target: &TcpListener,
    source: &TcpListener,
    cgroup: &str,
) -> Result<(), VerifyError> {
    let setup = |err: io::Error| VerifyError::Setup(err.into());
    target.set_nonblocking(true).map_err(setup)?;
    source.set_nonblocking(true).map_err(setup)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match target.accept() {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Err(err) => return Err(setup(err)),
        }
        if source.accept().is_ok() {
            return Err(VerifyError::NotRedirected {
                cgroup: cgroup.to_owned(),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VerifyError::TimedOut {
                cgroup: cgroup.to_owned(),
            });
        }
        poll_readable(&[target.as_raw_fd(), source.as_raw_fd()], left).map_err(setup)?;
    }
}

/// Waits until one of `fds` is readable or `timeout` has passed.
fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<()> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `polled` is a valid array of `polled.len()` entries.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, millis) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

enum HelperError {
    Join(io::Error),
    Connect(io::Error),
    TimedOut,
}

/// Exit status offset of the helper: `JOIN_FAILED + errno` when joining failed,
/// `CONNECT_FAILED + errno` when connecting failed. errno values stay below 100 in practice.
const JOIN_FAILED: i32 = 1;
const CONNECT_FAILED: i32 = 101;

/// Forks a helper that starts in the cgroup and connects to `to`, then exits.
fn run_helper(entry: &CgroupEntry, to: SocketAddr) -> Result<(), HelperError> {
    let SocketAddr::V4(to) = to else {
        unreachable!("the check uses IPv4 loopback")
    };
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the child calls only async-signal-safe functions (socket, connect, _exit) on
    // memory prepared before the fork, so forking a threaded process is sound.
    let forked = unsafe { entry.fork() }.map_err(HelperError::Join)?;
    let pid = match forked {
        // SAFETY: see above; the child never returns from this call.
        Forked::Child { join_errno } => unsafe { helper_child(join_errno, &address) },
        Forked::Parent(pid) => pid,
    };
    let code = wait_helper(pid)?;
    match code {
        0 => Ok(()),
        c if c >= CONNECT_FAILED => Err(HelperError::Connect(io::Error::from_raw_os_error(
            c - CONNECT_FAILED,
        ))),
        c => Err(HelperError::Join(io::Error::from_raw_os_error(
            c - JOIN_FAILED,
        ))),
    }
}

/// Waits up to [`TIMEOUT`] for the helper and returns its exit status. A helper that hangs
/// (in a frozen cgroup, say) is killed and reaped.
fn wait_helper(pid: libc::pid_t) -> Result<i32, HelperError> {
    // A pidfd becomes readable when the process exits (Linux 5.3). Without one, poll by pid.
    // SAFETY: a plain syscall; `pid` is our unreaped child, so the pidfd is for it.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    // SAFETY: a descriptor just returned by pidfd_open, owned by nothing else.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    let deadline = Instant::now() + TIMEOUT;
    let mut status = 0;
    loop {
        // SAFETY: polls the child forked by `run_helper`, which only this function reaps.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == pid {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                255
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if reaped < 0 || left.is_zero() {
            // SAFETY: `pid` is our unreaped child, so it cannot be another process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = spawn::reap(pid);
            return Err(HelperError::TimedOut);
        }
        match &pidfd {
            Some(pidfd) => {
                // An error here only means one more round of the loop.
                let _ = poll_readable(&[pidfd.as_raw_fd()], left);
            }
            None => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Runs the helper's whole life: connect, then exit with a status that encodes the outcome.
unsafe fn helper_child(join_errno: i32, address: &libc::sockaddr_in) -> ! {
    // SAFETY: plain syscalls on valid memory; `_exit` skips atexit handlers.
    unsafe {
        if join_errno != 0 {
            libc::_exit(JOIN_FAILED + join_errno.min(99));
        }
        let errno = || *libc::__errno_location();
        let socket = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let connected = socket >= 0
            && libc::connect(
                socket,
                (address as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0;
        if !connected {
            libc::_exit(CONNECT_FAILED + errno().min(99));
        }
        libc::close(socket);
        libc::_exit(0)
    }
}
