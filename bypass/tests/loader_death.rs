//! What the end of a foreground loader leaves. After SIGKILL nothing stays attached or loaded,
//! and the next connect goes to the original destination. SIGTERM and SIGINT detach cleanly.
//! Sockets connected before the end keep the destination they were given.

mod support;

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use support::{
    Attached, BYPASS, FlagFile, Netns, TcpServer, TestCgroup, UdpEcho, attached_program_ids,
    client_argv, client_tally, map_exists, program_exists, program_map_ids, require_root,
    wait_timeout, wait_until,
};

/// Connects once to 10.0.0.22:80 from `cgroup` and returns where it went: `served-by PORT`.
fn connect_once(netns: &Netns, cgroup: &TestCgroup) -> String {
    let output = cgroup.run(&client_argv(netns, "10.0.0.22:80", 1, 1, "tally"));
    let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
    let mut keys = tally.into_keys().filter(|key| key != "connects");
    keys.next().unwrap_or_default()
}

/// Returns the ids of our programs attached to `cgroup` and of the maps they use.
fn our_objects(cgroup: &Path) -> (Vec<u32>, Vec<u32>) {
    let programs = attached_program_ids(cgroup);
    assert!(
        !programs.is_empty(),
        "nothing attached to {}",
        cgroup.display()
    );
    let mut maps: Vec<u32> = programs
        .iter()
        .flat_map(|&id| program_map_ids(id))
        .collect();
    maps.sort_unstable();
    maps.dedup();
    assert!(!maps.is_empty(), "programs {programs:?} use no maps");
    (programs, maps)
}

/// Asserts that the kernel freed every program and map in `objects`.
fn assert_unloaded((programs, maps): &(Vec<u32>, Vec<u32>)) {
    let gone = wait_until(Duration::from_secs(5), || {
        !programs.iter().any(|&id| program_exists(id)) && !maps.iter().any(|&id| map_exists(id))
    });
    assert!(
        gone,
        "programs {programs:?} or maps {maps:?} are still loaded"
    );
}

#[test]
fn sigkill_ends_redirect_at_once() {
    if !require_root("sigkill_ends_redirect_at_once") {
        return;
    }
    let netns = Netns::new();
    let _original = TcpServer::start(&netns, "10.0.0.22:80");
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &[]);
    assert_eq!(connect_once(&netns, &cgroup), "served-by 3000");
    let objects = our_objects(cgroup.path());

    let (status, stderr) = bypass.stop_with(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{stderr}");
    // The exit closed the link fds, and with them the attachment: no waiting needed.
    assert_eq!(attached_program_ids(cgroup.path()), Vec::<u32>::new());
    assert_eq!(connect_once(&netns, &cgroup), "served-by 80");
    assert_unloaded(&objects);
}

fn assert_clean_detach(signal: i32) {
    let netns = Netns::new();
    let _original = TcpServer::start(&netns, "10.0.0.22:80");
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &[]);
    assert_eq!(connect_once(&netns, &cgroup), "served-by 3000");
    let objects = our_objects(cgroup.path());

    let (status, stderr) = bypass.stop_with(signal);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("1 hit: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "{stderr}"
    );
    assert!(stderr.contains("detached from"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    assert_eq!(attached_program_ids(cgroup.path()), Vec::<u32>::new());
    assert_eq!(connect_once(&netns, &cgroup), "served-by 80");
    assert_unloaded(&objects);
}

#[test]
fn sigterm_detaches_cleanly() {
    if require_root("sigterm_detaches_cleanly") {
        assert_clean_detach(libc::SIGTERM);
    }
}

#[test]
fn sigint_detaches_cleanly() {
    if require_root("sigint_detaches_cleanly") {
        assert_clean_detach(libc::SIGINT);
    }
}

/// Connects a UDP socket to 10.0.0.22:53 and prints the reply. Once the file GO exists, it
/// sends again on the same socket, then on a new one, and prints both replies.
const CONNECTED_UDP: &str = r#"
import os, socket, sys, time
def ask(s, text):
    s.send(text.encode())
    return s.recv(100).decode()
old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
old.settimeout(5)
old.connect(("10.0.0.22", 53))
print(ask(old, "first"), flush=True)
deadline = time.time() + 10
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.005)
print(ask(old, "same-socket"))
new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
new.settimeout(5)
new.connect(("10.0.0.22", 53))
print(ask(new, "new-socket"))
"#;

#[test]
fn connected_udp_keeps_target_after_detach() {
    if !require_root("connected_udp_keeps_target_after_detach") {
        return;
    }
    let netns = Netns::new();
    let _original = UdpEcho::start(&netns, "10.0.0.22:53");
    let _target = UdpEcho::start(&netns, "10.0.0.22:5353");
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &["--rule", "udp/10.0.0.22:53=:5353"]);
    let go = FlagFile::new("bypass-go");

    let argv = netns.command_line(&["python3", "-c", CONNECTED_UDP, go.arg()]);
    let mut client = cgroup.spawn(&argv);
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("echo 5353 first"));

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    go.raise();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(wait_timeout(&mut client, Duration::from_secs(10)).success());
    // The socket connected under the rule keeps its destination; a new one does not get it.
    assert_eq!(rest, ["echo 5353 same-socket", "echo 53 new-socket"]);
}

/// Connects to 10.0.0.22:80 and prints where it went; once the file GO exists, does it again.
const CONNECT_TWICE: &str = r#"
import os, socket, sys, time
def where():
    s = socket.create_connection(("10.0.0.22", 80), timeout=5)
    return s.makefile().readline().strip()
print(where(), flush=True)
deadline = time.time() + 10
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.005)
print(where(), flush=True)
"#;

/// Removes an empty directory on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn killed_run_leaves_command_unredirected() {
    if !require_root("killed_run_leaves_command_unredirected") {
        return;
    }
    let netns = Netns::new();
    let _original = TcpServer::start(&netns, "10.0.0.22:80");
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let parent = TestCgroup::new();
    let go = FlagFile::new("bypass-go");

    let client = netns.command_line(&["python3", "-c", CONNECT_TWICE, go.arg()]);
    let mut bypass = Command::new(BYPASS)
        .args(["run", "--parent-cgroup"])
        .arg(parent.path())
        .arg("--")
        .args(&client)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bypass run");
    let mut lines = BufReader::new(bypass.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("served-by 3000")
    );
    let made: Vec<PathBuf> = fs::read_dir(parent.path())
        .expect("read parent cgroup")
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.is_dir())
        .collect();
    assert_eq!(
        made.len(),
        1,
        "expected the cgroup of `run` in {}",
        parent.path().display()
    );
    let _left_behind = RemoveOnDrop(made[0].clone());

    bypass.kill().expect("SIGKILL bypass run");
    assert_eq!(bypass.wait().expect("wait").signal(), Some(libc::SIGKILL));
    go.raise();
    // The command lives on, in its cgroup, without the redirect.
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("served-by 80")
    );
    assert_eq!(attached_program_ids(&made[0]), Vec::<u32>::new());
    assert!(wait_until(Duration::from_secs(5), || {
        fs::read_to_string(made[0].join("cgroup.procs")).is_ok_and(|procs| procs.is_empty())
    }));
    // NOTE: the empty cgroup stays until someone removes it; the guard above does here.
    assert!(made[0].exists());
}

/// The cgroups that `run` made under `parent`.
fn made_cgroups(parent: &Path) -> Vec<PathBuf> {
    fs::read_dir(parent)
        .expect("read parent cgroup")
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.is_dir())
        .collect()
}

/// Freezes a cgroup and thaws it on drop, so that nothing stays frozen when a test fails.
struct Frozen(PathBuf);

impl Frozen {
    fn new(cgroup: &Path) -> Self {
        fs::write(cgroup.join("cgroup.freeze"), "1").expect("freeze the cgroup");
        Self(cgroup.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.freeze"), "0");
    }
}

/// SIGINT or SIGTERM while `run` attaches and checks, before the command starts, must not
/// leave its cgroup behind, and the command must not start. A frozen parent cgroup holds
/// `run` in its check for two seconds, which is the window the signal lands in.
#[test]
fn signal_during_run_startup_removes_its_cgroup() {
    if !require_root("signal_during_run_startup_removes_its_cgroup") {
        return;
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let parent = TestCgroup::new();
        let _thaw = Frozen::new(parent.path());
        let started = FlagFile::new("bypass-started");
        let mut bypass = Command::new(BYPASS)
            .args(["run", "--parent-cgroup"])
            .arg(parent.path())
            .args(["--", "touch", started.arg()])
            .stderr(Stdio::null())
            .spawn()
            .expect("start bypass run");
        let mut made = Vec::new();
        assert!(wait_until(Duration::from_secs(5), || {
            made = made_cgroups(parent.path());
            !made.is_empty()
        }));
        let _guard = RemoveOnDrop(made[0].clone());
        // SAFETY: a plain syscall on our own child, which has not been reaped yet.
        unsafe { libc::kill(bypass.id() as libc::pid_t, signal) };
        let status = wait_timeout(&mut bypass, Duration::from_secs(10));
        assert_eq!(
            status.signal(),
            None,
            "signal {signal} killed bypass: {status:?}"
        );
        assert!(
            !made[0].exists(),
            "signal {signal} left {}",
            made[0].display()
        );
        assert!(
            !Path::new(started.arg()).exists(),
            "the command ran after signal {signal}"
        );
    }
}
