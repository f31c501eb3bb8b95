//! Starting a process inside a cgroup, from its first instruction.
//!
//! Writing a pid to `cgroup.procs` moves a process, and the move takes a lock that makes the
//! kernel wait for an RCU grace period: 5 to 15 ms on a 2-CPU machine, on every start. A
//! process created by `clone3` with `CLONE_INTO_CGROUP` (Linux 5.7) is born in the cgroup and
//! takes 0.3 ms. Where `clone3` is refused (an old kernel, or a seccomp filter that hides it,
//! as some container runtimes do), the child moves itself with `cgroup.procs` as before.

use std::{
    ffi::{CString, OsStr, OsString},
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::OpenOptionsExt, process::ExitStatusExt},
    },
    path::Path,
    process::ExitStatus,
};

/// `CLONE_INTO_CGROUP` from `<linux/sched.h>`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `<linux/sched.h>`, up to the `cgroup` field (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// A cgroup that new processes start in: its directory and its `cgroup.procs`, opened before
/// any fork so that the child needs no allocation.
pub struct CgroupEntry {
    dir: File,
    procs: File,
}

/// The side of a fork that the caller is on.
pub enum Forked {
    Parent(libc::pid_t),
    /// The new process, inside the cgroup unless `join_errno` is not 0.
    Child {
        join_errno: i32,
    },
}

impl CgroupEntry {
    pub fn open(cgroup: &Path) -> io::Result<Self> {
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(cgroup)?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(cgroup.join("cgroup.procs"))?;
        Ok(Self { dir, procs })
    }

    /// Forks a process that starts inside the cgroup.
    ///
    /// # Safety
    ///
    /// As for `fork` in a process with threads: until it calls `execve` or `_exit`, the child
    /// may only make async-signal-safe calls and must not allocate or take locks.
    pub unsafe fn fork(&self) -> io::Result<Forked> {
        let mut args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: self.dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: `args` is a valid `clone_args` of the size passed. With no stack given, the
        // child continues on a copy of this stack, as after `fork`.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match pid {
            0 => return Ok(Forked::Child { join_errno: 0 }),
            pid if pid > 0 => return Ok(Forked::Parent(pid as libc::pid_t)),
            _ => {}
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // ENOSYS or EPERM: clone3 is missing or filtered out. EINVAL or E2BIG: the kernel
            // lacks CLONE_INTO_CGROUP.
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG) => {
                log::debug!("clone3 into the cgroup failed ({err}); moving the child instead");
                // SAFETY: see the function's contract.
                unsafe { self.fork_and_move() }
            }
            _ => Err(err),
        }
    }

    /// Forks a process that moves itself into the cgroup through `cgroup.procs`: the way
    /// [`Self::fork`] falls back to.
    ///
    /// # Safety
    ///
    /// As for [`Self::fork`].
    pub unsafe fn fork_and_move(&self) -> io::Result<Forked> {
        // SAFETY: see the function's contract.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: `write` is async-signal-safe; "0" moves the writing process itself.
                let written =
                    unsafe { libc::write(self.procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
                let join_errno = if written == 1 {
                    0
                } else {
                    // SAFETY: reads this thread's errno.
                    unsafe { *libc::__errno_location() }
                };
                Ok(Forked::Child { join_errno })
            }
            pid => Ok(Forked::Parent(pid)),
        }
    }
}

/// A command prepared for [`spawn`], with every buffer the child needs allocated up front.
pub struct Prepared {
    program: CString,
    argv: Vec<CString>,
    /// `sh PROGRAM ARGS...`, for a file without a `#!` line (`ENOEXEC`), as `execvp` does.
    shell_argv: Vec<CString>,
    envp: Vec<CString>,
    /// Set `groups`, then gid, then uid, before `exec`.
    user: Option<(Vec<libc::gid_t>, libc::gid_t, libc::uid_t)>,
    /// Signals the command starts with ignored.
    ignored: Vec<libc::c_int>,
}

impl Prepared {
    /// Prepares `program` with `argv` (the first is the command's `argv[0]`) and this
    /// process's environment changed by `env`.
    pub fn new(program: &Path, argv: &[&OsStr], env: &[(&str, &str)]) -> io::Result<Self> {
        let c_string = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command")
            })
        };
        let mut environment: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(key, _)| !env.iter().any(|(name, _)| key == OsStr::new(name)))
            .collect();
        environment.extend(env.iter().map(|(key, value)| (key.into(), value.into())));
        let argv: Vec<CString> = argv
            .iter()
            .map(|arg| c_string(arg.as_bytes()))
            .collect::<io::Result<_>>()?;
        let program = c_string(program.as_os_str().as_bytes())?;
        let shell_argv = [c"sh".to_owned(), program.clone()]
            .into_iter()
            .chain(argv.iter().skip(1).cloned())
            .collect();
        Ok(Self {
            program,
            argv,
            shell_argv,
            envp: environment
                .iter()
                .map(|(key, value)| {
                    let mut pair = key.as_bytes().to_vec();
                    pair.push(b'=');
                    pair.extend_from_slice(value.as_bytes());
                    c_string(&pair)
                })
                .collect::<io::Result<_>>()?,
            user: None,
            ignored: Vec::new(),
        })
    }

    /// Makes the command start with `signals` ignored, as they were when bypass started
    /// (`nohup` ignores SIGHUP, say). bypass catches them to pass them on, and a caught
    /// signal is reset to its default action by `execve`, an ignored one is not.
    pub fn keep_ignored(&mut self, signals: Vec<libc::c_int>) {
        self.ignored = signals;
    }

    /// Makes the child drop to `uid`, `gid` and `groups` before `exec`.
    pub fn run_as(&mut self, uid: libc::uid_t, gid: libc::gid_t, groups: Vec<libc::gid_t>) {
        self.user = Some((groups, gid, uid));
    }
}

/// A failure in the child before its command ran.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start a process in the cgroup")]
    Fork(#[source] io::Error),
    #[error("cannot join the cgroup")]
    Join(#[source] io::Error),
    #[error("cannot change to the user")]
    User(#[source] io::Error),
    #[error("cannot execute the command")]
    Exec(#[source] io::Error),
}

/// Steps of the child that can fail, as reported through the status pipe.
const STEP_JOIN: u8 = 1;
const STEP_USER: u8 = 2;
const STEP_EXEC: u8 = 3;

/// Starts `command` inside `cgroup` and returns its pid once `execve` has succeeded.
pub fn spawn(cgroup: &CgroupEntry, command: &Prepared) -> Result<libc::pid_t, SpawnError> {
    let mut argv: Vec<*const libc::c_char> = command.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = command.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut shell_argv: Vec<*const libc::c_char> =
        command.shell_argv.iter().map(|a| a.as_ptr()).collect();
    shell_argv.push(std::ptr::null());

    // The child reports a failure as one step byte and its errno; a successful `execve`
    // closes the pipe, so the parent reads nothing.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Fork(io::Error::last_os_error()));
    }
    // SAFETY: `pipe2` just returned these two descriptors, and nothing else owns them.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the child below calls only async-signal-safe functions on memory prepared
    // before the fork, and leaves by `execve` or `_exit`.
    match unsafe { cgroup.fork() }.map_err(SpawnError::Fork)? {
        Forked::Child { join_errno } => unsafe {
            child(
                join_errno,
                command,
                [&argv, &shell_argv],
                &envp,
                write_end.as_raw_fd(),
            )
        },
        Forked::Parent(pid) => {
            drop(write_end);
            let mut report = [0u8; 5];
            let read = read_full(&read_end, &mut report);
            if read == 0 {
                return Ok(pid);
            }
            // The child failed and exits right after its report; reap it so no zombie stays.
            let _ = reap(pid);
            let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
            let err = io::Error::from_raw_os_error(errno);
            Err(match report[0] {
                STEP_JOIN => SpawnError::Join(err),
                STEP_USER => SpawnError::User(err),
                _ => SpawnError::Exec(err),
            })
        }
    }
}

/// Reads until `buf` is full or the writer is gone; returns the bytes read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reads into the unfilled rest of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => break,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    done
}

/// Runs the child's steps between fork and exec: reset signals, set the user, `execve`.
///
/// # Safety
///
/// Called only in the child of [`CgroupEntry::fork`], with pointers into live buffers.
unsafe fn child(
    join_errno: i32,
    command: &Prepared,
    [argv, shell_argv]: [&[*const libc::c_char]; 2],
    envp: &[*const libc::c_char],
    report: i32,
) -> ! {
    // SAFETY: async-signal-safe calls only, on memory allocated before the fork.
    unsafe {
        let fail = |step: u8, errno: i32| -> ! {
            let e = errno.to_ne_bytes();
            let message = [step, e[0], e[1], e[2], e[3]];
            libc::write(report, message.as_ptr().cast(), message.len());
            libc::_exit(127)
        };
        let errno = || *libc::__errno_location();
        if join_errno != 0 {
            fail(STEP_JOIN, join_errno);
        }
        // The command starts with no signal blocked and SIGPIPE at its default, which the
        // Rust runtime of this process ignores.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for &signal in &command.ignored {
            libc::signal(signal, libc::SIG_IGN);
        }
        // Raw system calls: after `clone3`, glibc still believes the other threads of this
        // process exist, and its setuid family would try to change them too.
        if let Some((groups, gid, uid)) = &command.user {
            let (gid, uid) = (*gid as libc::c_long, *uid as libc::c_long);
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                fail(STEP_USER, errno());
            }
        }
        libc::execve(command.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let exec_errno = errno();
        if exec_errno == libc::ENOEXEC {
            libc::execve(c"/bin/sh".as_ptr(), shell_argv.as_ptr(), envp.as_ptr());
        }
        fail(STEP_EXEC, exec_errno)
    }
}

/// Returns those of `signals` that this process ignores (`SIG_IGN`).
pub fn ignored_signals(signals: &[libc::c_int]) -> Vec<libc::c_int> {
    signals
        .iter()
        .copied()
        .filter(|&signal| {
            // SAFETY: reads the disposition only; `current` is a valid out-pointer.
            let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
            let read = unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
            read == 0 && current.sa_sigaction == libc::SIG_IGN
        })
        .collect()
}

/// Waits for child `pid` to exit without reaping it, so that signals sent to `pid` until
/// [`reap`] cannot reach another process that reuses the number.
pub fn wait_exited(pid: libc::pid_t) -> io::Result<()> {
    loop {
        // SAFETY: `info` is a valid out-pointer; WNOWAIT leaves the child to `reap`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Reaps child `pid` and returns its status.
pub fn reap(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
