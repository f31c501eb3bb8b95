//! `bypass run` exits like `env` and `timeout`: the command's status, 128+N for a signal N,
//! 126 and 127 when the command cannot run. Signals sent to bypass reach the command, and
//! on every path the job cgroup is removed.

mod support;

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use support::{
    Background, JobCgroup, TempDir, attached_programs, bypass, require_root, run_args, text,
    wait_until,
};

/// Runs `bypass -r RULE run -- sh -c SCRIPT` and returns its status code and stderr, after
/// checking that the job cgroup it created is gone.
fn run_sh(script: &str) -> (Option<i32>, String) {
    let command = ["sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let output = bypass(&run_args(&["-r", "10.0.0.22:80=:3000"], &command));
    let stderr = text(&output.stderr);
    let created = JobCgroup::from_log(&stderr);
    assert!(!created.path().exists(), "job cgroup left behind: {stderr}");
    (output.status.code(), stderr)
}

#[test]
fn success_exits_zero() {
    if !require_root("success_exits_zero") {
        return;
    }
    let (code, stderr) = run_sh("exit 0");
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

#[test]
fn command_status_passes_through() {
    if !require_root("command_status_passes_through") {
        return;
    }
    let (code, stderr) = run_sh("exit 7");
    assert_eq!(code, Some(7), "stderr: {stderr}");
}

#[test]
fn killed_command_gives_128_plus() {
    if !require_root("killed_command_gives_128_plus") {
        return;
    }
    let (code, stderr) = run_sh("kill -TERM $$");
    assert_eq!(code, Some(143), "SIGTERM; stderr: {stderr}");
    let (code, stderr) = run_sh("kill -KILL $$");
    assert_eq!(code, Some(137), "SIGKILL; stderr: {stderr}");
}

#[test]
fn missing_command_exits_127() {
    if !require_root("missing_command_exits_127") {
        return;
    }
    let output = bypass(&[
        "run",
        "-r",
        "10.0.0.22:80=:3000",
        "--",
        "bypass-no-such-command",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "stderr: {stderr}");
    assert_eq!(
        stderr,
        "bypass: command not found: bypass-no-such-command\n"
    );
}

#[test]
fn missing_path_exits_127() {
    if !require_root("missing_path_exits_127") {
        return;
    }
    let output = bypass(&["run", "-r", "10.0.0.22:80=:3000", "--", "/nonexistent/tool"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "stderr: {stderr}");
    assert_eq!(stderr, "bypass: command not found: /nonexistent/tool\n");
}

#[test]
fn unexecutable_file_exits_126() {
    if !require_root("unexecutable_file_exits_126") {
        return;
    }
    let dir = TempDir::new();
    let script = dir.file("script", "#!/bin/sh\nexit 0\n");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod");

    let output = bypass(&["run", "-r", "10.0.0.22:80=:3000", "--", &script]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(126), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("bypass: cannot execute {script}: Permission denied (os error 13)")
    );
    let created = JobCgroup::from_log(&stderr);
    assert!(!created.path().exists(), "job cgroup left behind: {stderr}");
}

#[test]
fn commands_resolve_like_execvp() {
    if !require_root("commands_resolve_like_execvp") {
        return;
    }
    let dir = TempDir::new();
    let mode = |path: &str, mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod")
    };

    // A file without a #! line runs with /bin/sh, as `execvp` and `env` run it.
    let plain = dir.file("plain", "echo plain \"$@\"\n");
    mode(&plain, 0o755);
    let output = bypass(&["run", "--no-verify", "--", &plain, "a", "b"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "plain a b\n");

    // A missing interpreter is not a missing command.
    let orphan = dir.file("orphan", "#!/nonexistent/interpreter\n");
    mode(&orphan, 0o755);
    let output = bypass(&["run", "--no-verify", "--", &orphan]);
    assert_eq!(output.status.code(), Some(127));
    assert_eq!(
        text(&output.stderr).lines().last().unwrap_or_default(),
        format!("bypass: cannot execute {orphan}: the interpreter on its #! line was not found")
    );

    // A file in PATH that is not executable is skipped when a later one is.
    let shadow = dir.file("true", "exit 3\n");
    mode(&shadow, 0o644);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new(support::BYPASS)
        .args(["run", "--no-verify", "--", "true"])
        .env("PATH", path)
        .output()
        .expect("run bypass");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// A shell script that records the signal it gets in DIR/got, then dies of it; it writes
/// DIR/ready once its trap is set.
fn trapping_script(dir: &Path, signal: &str) -> String {
    let dir = dir.display();
    format!(
        "trap 'echo {signal} > {dir}/got; trap - {signal}; kill -{signal} $$' {signal}
         touch {dir}/ready
         while :; do sleep 0.02; done"
    )
}

fn signal_is_forwarded(test: &str, signal: i32, name: &str) {
    if !require_root(test) {
        return;
    }
    let dir = TempDir::new();
    let command = [
        "sh".to_owned(),
        "-c".to_owned(),
        trapping_script(dir.path(), name),
    ];
    let bypass = Background::start(&run_args(&["-r", "10.0.0.22:80=:3000"], &command));
    assert!(
        wait_until(std::time::Duration::from_secs(10), || dir
            .path()
            .join("ready")
            .exists()),
        "command did not start: {}",
        bypass.stderr()
    );
    // The log reader may lag behind the command.
    assert!(
        wait_until(std::time::Duration::from_secs(10), || bypass
            .stderr()
            .contains("created cgroup")),
        "no created cgroup line: {}",
        bypass.stderr()
    );
    let created = JobCgroup::from_log(&bypass.stderr());
    let programs = attached_programs(created.path());
    assert!(
        programs.iter().any(|p| p == "connect4"),
        "not attached: {programs:?}"
    );

    bypass.signal(signal);
    let (status, stderr) = bypass.wait();

    let got = fs::read_to_string(dir.path().join("got")).unwrap_or_default();
    assert_eq!(
        got.trim(),
        name,
        "the command did not get {name}; stderr: {stderr}"
    );
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "bypass exited with {status}: {stderr}"
    );
    assert!(!created.path().exists(), "job cgroup left behind: {stderr}");
    assert!(
        stderr.contains("detached; removing cgroup"),
        "stderr: {stderr}"
    );
}

#[test]
fn sigterm_reaches_command() {
    signal_is_forwarded("sigterm_reaches_command", libc::SIGTERM, "TERM");
}

#[test]
fn sigint_reaches_command() {
    signal_is_forwarded("sigint_reaches_command", libc::SIGINT, "INT");
}

#[test]
fn sighup_reaches_command() {
    signal_is_forwarded("sighup_reaches_command", libc::SIGHUP, "HUP");
}

#[test]
fn sigquit_reaches_command() {
    signal_is_forwarded("sigquit_reaches_command", libc::SIGQUIT, "QUIT");
}

/// A process the test started, killed by pid on drop if it still runs.
struct Daemon(libc::pid_t);

impl Drop for Daemon {
    fn drop(&mut self) {
        if Path::new("/proc").join(self.0.to_string()).exists() {
            // SAFETY: a plain syscall on a process this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

#[test]
fn leftover_processes_are_killed() {
    if !require_root("leftover_processes_are_killed") {
        return;
    }
    let dir = TempDir::new();
    let pid_file = dir.path().join("pid");
    // The command leaves a daemon behind in the job cgroup and exits at once. The daemon
    // closes its output, so bypass's pipes end with bypass even if the daemon lives on.
    let script = format!(
        "sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {}; exit 0",
        pid_file.display()
    );
    let (code, stderr) = run_sh(&script);
    let pid = fs::read_to_string(&pid_file).expect("daemon pid");
    let daemon = Daemon(pid.trim().parse().expect("a pid"));

    assert_eq!(code, Some(0), "stderr: {stderr}");
    let killed = stderr.find("killing 1 process(es) the command left");
    assert!(killed.is_some(), "stderr: {stderr}");
    // Killed while the redirect is still attached: a leftover must never connect unredirected.
    let detached = stderr.find("detached; removing cgroup");
    assert!(killed < detached, "killed after detaching: {stderr}");
    let proc_dir = Path::new("/proc").join(daemon.0.to_string());
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !proc_dir.exists()),
        "daemon {} still runs: {stderr}",
        daemon.0
    );
}

#[test]
fn ignored_signals_stay_ignored() {
    if !require_root("ignored_signals_stay_ignored") {
        return;
    }
    // As under nohup: bypass starts with SIGHUP ignored, and so must the command, although
    // bypass itself catches SIGHUP to pass it on.
    let script = format!(
        "trap '' HUP; exec {} run --no-verify -- grep SigIgn /proc/self/status",
        support::BYPASS
    );
    let output = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("run sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");

    let mask = stdout
        .trim()
        .strip_prefix("SigIgn:")
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SigIgn line in {stdout:?}"));
    let hangup = 1u64 << (libc::SIGHUP - 1);
    assert_eq!(mask & hangup, hangup, "SIGHUP not ignored: {stdout}");

    // The other forwarded signals keep the disposition this test process has.
    let own = std::fs::read_to_string("/proc/self/status").expect("read own status");
    let own_mask = own
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("own SigIgn line");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT] {
        let bit = 1u64 << (signal - 1);
        assert_eq!(mask & bit, own_mask & bit, "signal {signal}: {stdout}");
    }
}
