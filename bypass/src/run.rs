//! `bypass run`: a command in a new cgroup with the redirect attached.

use std::{
    ffi::{OsStr, OsString},
    io,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::ExitStatus,
};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    cgroup::{self, ChildCgroup},
    cli::RunArgs,
    exit,
    hitlog::{self, HitLog},
    record, setup,
    spawn::{self, CgroupEntry, Prepared, SpawnError},
    user::RunAs,
    verify,
};

/// Reason the command did not start.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command not found: {0}")]
    NotFound(String),
    #[error("cannot execute {0}: the interpreter on its #! line was not found")]
    InterpreterNotFound(String),
    #[error("cannot execute {command}")]
    NotExecutable { command: String, source: io::Error },
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotFound(_) | Self::InterpreterNotFound(_) => exit::NOT_FOUND,
            Self::NotExecutable { .. } => exit::NOT_EXECUTABLE,
        }
    }
}

/// Runs the command and returns the exit status bypass should exit with. An `Err` means the
/// command never ran: a [`CommandError`] carries its own exit status, any other error means
/// [`exit::RUN_FAILED`].
pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let rules = setup::rules_from_args(&args.rules)?;
    let (name, arguments) = args.command.split_first().context("no command given")?;
    // Look the command up before anything is attached, so a typo costs nothing.
    let program = resolve_command(name)?;
    let user = args.user.as_deref().map(RunAs::lookup).transpose()?;

    let mount = cgroup::find_mount()?;
    let parent = match &args.parent_cgroup {
        Some(dir) => {
            cgroup::check_dir(dir, &mount, true).map_err(|err| exit::UsageError(err.into()))?
        }
        None => cgroup::own_cgroup(&mount)?,
    };

    // Read before the handlers below replace the dispositions bypass was started with.
    let ignored = spawn::ignored_signals(&FORWARDED);
    // Catch the signals before the cgroup exists, so one that arrives while bypass sets up
    // removes the cgroup instead of killing bypass with it in place.
    let mut signals = Signals::install()?;
    // The rules of `run` are fixed: it passes SIGHUP on to the command and reloads nothing.
    let mut redirector = setup::load(&args.rules, &rules, false)?;
    let cgroup = ChildCgroup::create(&parent)?;
    log::info!("created cgroup {}", cgroup.path().display());
    redirector.attach(cgroup.path())?;
    if !args.no_verify {
        verify::verify(&redirector, cgroup.path())?;
    }
    if let Some(signal) = signals.pending().await {
        let name = Signals::name(signal);
        log::warn!("{name} received before the command started; not starting it");
        log::info!("detached; removing cgroup {}", cgroup.path().display());
        return Ok(exit::SIGNAL_BASE.wrapping_add(signal as u8));
    }
    let hit_log = HitLog::start(&mut redirector);

    let _record = record::Running::write(cgroup.path(), &redirector);
    let result = spawn_in_cgroup(&program, name, arguments, &cgroup, user.as_ref(), ignored);
    let status = match result {
        Ok(pid) => Ok(signals.forward_until_exit(pid).await?),
        Err(err) => Err(err),
    };

    let totals = match hit_log {
        Some(hit_log) => Some(hit_log.stop().await),
        None => None,
    };
    hitlog::log_summary(&rules, &redirector, totals);
    // Leftover processes die before the programs detach: detached first, they could connect
    // without the redirect for a moment.
    cgroup.kill_leftovers();
    drop(redirector);
    log::info!("detached; removing cgroup {}", cgroup.path().display());
    drop(cgroup);

    Ok(exit_code(status?))
}

/// Finds `name` the way `execvp` would: as given when it contains a slash, else in `PATH`,
/// skipping files that are not executable unless no executable one follows.
fn resolve_command(name: &OsStr) -> Result<PathBuf, CommandError> {
    let shown = name.to_string_lossy().into_owned();
    if name.as_bytes().contains(&b'/') {
        let path = PathBuf::from(name);
        return if path.exists() {
            Ok(path)
        } else {
            Err(CommandError::NotFound(shown))
        };
    }
    let search_path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    let mut not_executable = None;
    for candidate in std::env::split_paths(&search_path).map(|dir| dir.join(name)) {
        if !candidate.is_file() {
            continue;
        }
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        // Like execvp: remember it, so that `exec` reports EACCES if nothing better follows.
        not_executable.get_or_insert(candidate);
    }
    not_executable.ok_or(CommandError::NotFound(shown))
}

/// Returns whether this process may execute `path`.
fn is_executable(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated string.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// Starts the command inside the cgroup: its first instruction already runs there, and so
/// does every socket it creates. Returns its pid.
fn spawn_in_cgroup(
    program: &Path,
    name: &OsStr,
    arguments: &[OsString],
    cgroup: &ChildCgroup,
    user: Option<&RunAs>,
    ignored: Vec<libc::c_int>,
) -> anyhow::Result<libc::pid_t> {
    let entry = CgroupEntry::open(cgroup.path())
        .with_context(|| format!("cannot open cgroup {}", cgroup.path().display()))?;
    let argv: Vec<&OsStr> = std::iter::once(name)
        .chain(arguments.iter().map(OsString::as_os_str))
        .collect();
    let env = user.map(RunAs::env).unwrap_or_default();
    let mut command = Prepared::new(program, &argv, &env)
        .with_context(|| format!("cannot prepare {}", program.display()))?;
    if let Some(user) = user {
        command.run_as(user.uid, user.gid, user.groups.clone());
    }
    command.keep_ignored(ignored);

    let shown = name.to_string_lossy().into_owned();
    let pid = spawn::spawn(&entry, &command).map_err(|err| -> anyhow::Error {
        match err {
            // The file was found above, so ENOENT means its `#!` interpreter is missing.
            SpawnError::Exec(source) if source.kind() == io::ErrorKind::NotFound => {
                CommandError::InterpreterNotFound(shown).into()
            }
            SpawnError::Exec(source) => CommandError::NotExecutable {
                command: shown,
                source,
            }
            .into(),
            SpawnError::User(source) => {
                anyhow::Error::new(source).context(format!("cannot run {shown} as the user"))
            }
            other => anyhow::Error::new(other),
        }
    })?;
    log::debug!("started {} as pid {pid}", program.display());
    Ok(pid)
}

/// The signals that `run` passes on to the command.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The signals that `run` passes on to the command: SIGINT, SIGTERM, SIGHUP and SIGQUIT.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    quit: Signal,
}

impl Signals {
    /// Catches the signals from now on; until the command runs, they only queue up here.
    fn install() -> anyhow::Result<Self> {
        let handler = |kind| signal(kind).context("cannot install a signal handler");
        Ok(Self {
            interrupt: handler(SignalKind::interrupt())?,
            terminate: handler(SignalKind::terminate())?,
            hangup: handler(SignalKind::hangup())?,
            quit: handler(SignalKind::quit())?,
        })
    }

    /// Returns the name of one of the signals caught here.
    fn name(signal: i32) -> &'static str {
        match signal {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            libc::SIGHUP => "SIGHUP",
            _ => "SIGQUIT",
        }
    }

    /// Waits for and returns the next signal received.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
            _ = self.quit.recv() => libc::SIGQUIT,
        }
    }

    /// A signal received so far, without waiting. The yield lets the runtime's signal
    /// driver hand over what arrived while bypass was busy setting up.
    async fn pending(&mut self) -> Option<i32> {
        tokio::task::yield_now().await;
        tokio::select! {
            biased;
            signal = self.next() => Some(signal),
            () = std::future::ready(()) => None,
        }
    }

    /// Waits for the command, passing the signals on to it.
    ///
    /// NOTE: a Ctrl-C in a terminal reaches the command twice, once from the terminal and
    /// once from bypass. A command that treats a second SIGINT as "force quit" may notice.
    async fn forward_until_exit(&mut self, pid: libc::pid_t) -> anyhow::Result<ExitStatus> {
        // The waiter leaves the child unreaped, so `pid` stays ours for `kill` below.
        let mut exited = tokio::task::spawn_blocking(move || spawn::wait_exited(pid));
        loop {
            let signal = tokio::select! {
                waited = &mut exited => {
                    waited.context("the waiting thread failed")?
                        .context("cannot wait for the command")?;
                    return spawn::reap(pid).context("cannot wait for the command");
                }
                signal = self.next() => signal,
            };
            log::debug!("passing signal {signal} on to pid {pid}");
            // SAFETY: a plain syscall on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Maps the command's status to bypass's: its code, or 128+N for a signal N.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => exit::SIGNAL_BASE.wrapping_add(signal as u8),
        (None, None) => exit::RUN_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_env_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }

    #[test]
    fn resolve_finds_in_path_and_rejects_missing() {
        assert!(resolve_command(OsStr::new("sh")).is_ok());
        let missing = resolve_command(OsStr::new("bypass-no-such-command")).unwrap_err();
        assert_eq!(missing.exit_code(), exit::NOT_FOUND);
        assert_eq!(
            missing.to_string(),
            "command not found: bypass-no-such-command"
        );
        assert!(resolve_command(OsStr::new("/nonexistent/tool")).is_err());
    }
}
