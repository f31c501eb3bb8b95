//! Test fixtures for the privileged tests: network namespaces, cgroups, servers and bypass
//! processes, each removed or stopped on drop, also when a test fails.
//!
//! Every test makes its own namespace, with 10.0.0.22 and fd00::22 on that namespace's `lo`,
//! so no packet of a test ever leaves the machine: a redirect that fails ends in a refused
//! connection inside the namespace.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the fixtures"
)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The address the tests redirect from; it exists only on the `lo` of test namespaces.
pub const SERVICE_IP: &str = "10.0.0.22";
/// The IPv6 address the tests use, likewise only inside test namespaces.
pub const SERVICE_IP6: &str = "fd00::22";

/// Programs bypass attaches on this kernel, which has every hook: connect, sendmsg, recvmsg
/// and getpeername, each for IPv4 and IPv6, and sock_release.
pub const PROGRAM_COUNT: usize = 9;

/// Programs bypass attaches when only TCP rules are given and they cannot change (no pin,
/// no --config): all but sendmsg and recvmsg.
pub const TCP_PROGRAM_COUNT: usize = 5;

/// The bypass binary under test.
pub const BYPASS: &str = env!("CARGO_BIN_EXE_bypass");

/// Returns whether privileged tests can run here. Without root they are skipped with a
/// printed reason, except under CI (`CI=true`), where they must fail instead.
pub fn require_root(test: &str) -> bool {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
    assert!(
        !in_ci,
        "{test}: needs root to load eBPF programs, and CI=true forbids skipping"
    );
    eprintln!("skipping {test}: needs root to load eBPF programs and make namespaces");
    false
}

/// Returns a name no other test or run uses: prefix, pid, a counter and the clock.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{count}-{}",
        std::process::id(),
        nanos % 100_000
    )
}

fn run_checked(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace made by `ip netns add`, with the service addresses on its `lo`.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Self {
        let netns = Self {
            name: unique_name("bypass-test"),
        };
        run_checked("ip", &["netns", "add", &netns.name]);
        run_checked("ip", &["-n", &netns.name, "link", "set", "lo", "up"]);
        run_checked(
            "ip",
            &[
                "-n",
                &netns.name,
                "addr",
                "add",
                "10.0.0.22/32",
                "dev",
                "lo",
            ],
        );
        run_checked(
            "ip",
            &[
                "-n",
                &netns.name,
                "addr",
                "add",
                "fd00::22/128",
                "dev",
                "lo",
                "nodad",
            ],
        );
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Returns `nsenter --net=PATH` followed by `argv`: a command line that runs `argv` in
    /// this namespace without the fresh /sys that `ip netns exec` would mount.
    pub fn command_line(&self, argv: &[&str]) -> Vec<String> {
        let mut line = vec![
            "nsenter".to_owned(),
            format!("--net={}", self.path().display()),
        ];
        line.extend(argv.iter().map(|arg| (*arg).to_owned()));
        line
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Sockets created there stay in the namespace wherever they are used later.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = fs::File::open(self.path()).expect("open netns file");
        thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                result,
                0,
                "setns failed: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Returns the cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .expect("a cgroup v2 mount")
}

/// Returns the cgroup v2 directory of this test process.
pub fn own_cgroup() -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("cgroup v2 line");
    cgroup2_mount().join(relative.trim_start_matches('/'))
}

/// A cgroup made by a test under its own cgroup, removed on drop.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        Self::under(&own_cgroup())
    }

    pub fn under(parent: &Path) -> Self {
        Self::named(parent, unique_name("bypass-test").as_ref())
    }

    /// Makes the child `name` of `parent`, for tests that need a particular name.
    pub fn named(parent: &Path, name: &std::ffi::OsStr) -> Self {
        let path = parent.join(name);
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `argv` to completion as a member of this cgroup from its first instruction.
    pub fn run(&self, argv: &[String]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|err| panic!("run {argv:?}: {err}"))
    }

    /// Starts `argv` in this cgroup with stdin closed and stdout piped; the caller waits.
    pub fn spawn<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(&self, argv: &[S]) -> Child {
        let mut command = self.command(argv);
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        command
            .spawn()
            .unwrap_or_else(|err| panic!("start {argv:?}: {err}"))
    }

    /// Builds a command for `argv` that joins this cgroup before `exec`.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Command {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        // SAFETY: only `write`, which is async-signal-safe, runs between fork and exec. The
        // closure owns `procs`, so its fd stays open as long as the command exists.
        unsafe {
            command.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes this test started may take a moment to leave after exiting.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.path.exists() && fs::remove_dir(&self.path).is_err() && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Returns the names of the programs attached to `cgroup`, as `bpftool cgroup show` lists
/// them; empty when the cgroup no longer exists.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    if !cgroup.exists() {
        return Vec::new();
    }
    let output = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines: ID AttachType AttachFlags Name; the header starts with "ID".
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .filter_map(|line| line.split_whitespace().last().map(str::to_owned))
        .collect()
}

/// A TCP server inside a namespace. Each connection receives `served-by PORT\n` and is
/// closed; the server counts them. Stops on drop.
pub struct TcpServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("server address");
        let listener = netns.enter(move || TcpListener::bind(addr).expect("bind server"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        // A deeper accept queue than std's 128, so bursts of connects are not dropped.
        // SAFETY: listen on a listening socket only resizes its queue.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.set_nonblocking(false);
                            // One write, so a client's single recv() gets the whole line.
                            let line = format!("served-by {}\n", addr.port());
                            let _ = stream.write_all(line.as_bytes());
                        }
                        Err(_) => wait_readable(&listener, Duration::from_millis(20)),
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP echo server inside a namespace: it sends every datagram back, prefixed with
/// `echo PORT `. Stops on drop.
pub struct UdpEcho {
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("server address");
        let socket = netns.enter(move || UdpSocket::bind(addr).expect("bind udp server"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::Relaxed);
                        let mut reply = format!("echo {} ", addr.port()).into_bytes();
                        reply.extend_from_slice(&buf[..len]);
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `bypass ARGS` to completion.
pub fn bypass(args: &[&str]) -> Output {
    Command::new(BYPASS)
        .args(args)
        .output()
        .expect("run bypass")
}

/// A `bypass attach` process in the background, stopped by pid with SIGTERM on drop, so that
/// it detaches cleanly.
pub struct Attached {
    process: Background,
}

impl Attached {
    /// Starts `bypass attach --cgroup CGROUP ARGS` and waits until it reports that it is
    /// redirecting. Panics with its output if it exits or takes longer than 10 seconds.
    pub fn start(cgroup: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(BYPASS);
        command.arg("attach").arg("--cgroup").arg(cgroup).args(args);
        Self::spawn(command)
    }

    /// Starts `command`, a `bypass attach` command line, and waits as [`Attached::start`]
    /// does.
    pub fn spawn(command: Command) -> Self {
        let mut attached = Self {
            process: Background::spawn(command),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !attached.stderr().contains("redirecting; stop with") {
            if let Ok(Some(status)) = attached.process.child.try_wait() {
                panic!("bypass attach exited with {status}:\n{}", attached.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "bypass attach did not start:\n{}",
                attached.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
        attached
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Returns everything bypass wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Waits until stderr contains `text`, for at most 5 seconds; returns whether it did.
    pub fn wait_for_log(&self, text: &str) -> bool {
        wait_until_for(Duration::from_secs(5), || self.stderr().contains(text))
    }

    /// Sends `signal` and waits for the exit; returns the status and the whole stderr.
    pub fn stop_with(mut self, signal: i32) -> (ExitStatus, String) {
        self.process.signal(signal);
        self.process.finish()
    }

    /// Waits for bypass to exit by itself (killing it after 10 seconds); returns the status
    /// and the whole stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        self.process.finish()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(None) = self.process.child.try_wait() {
            self.process.signal(libc::SIGTERM);
            let _ = self.process.finish();
        }
    }
}

/// Waits for `child`, killing it (by pid) if it takes longer than `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().expect("wait after kill");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads everything from a reader into a string, for small test outputs.
pub fn read_all(mut reader: impl Read) -> String {
    let mut text = String::new();
    let _ = reader.read_to_string(&mut text);
    text
}

/// Waits until `socket` is readable (for a listener: a connection is waiting), or `timeout`.
fn wait_readable(socket: &impl AsRawFd, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// Polls `condition` every 10 ms until it is true or `timeout` passes; returns whether it
/// became true.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Returns the id of a cgroup: the inode number of its directory, as the kernel and bpftool
/// give it.
pub fn cgroup_id(cgroup: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(cgroup)
        .unwrap_or_else(|err| panic!("stat {}: {err}", cgroup.display()))
        .ino()
}

/// Returns the ids of the programs attached to `cgroup` (`bpftool cgroup show`).
pub fn attached_program_ids(cgroup: &Path) -> Vec<u32> {
    let output = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output();
    let output = output.expect("run bpftool");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Returns whether the kernel still has a BPF program with this id.
pub fn program_exists(id: u32) -> bool {
    let status = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run bpftool");
    status.success()
}

/// Returns whether the kernel still has a BPF map with this id.
pub fn map_exists(id: u32) -> bool {
    let status = Command::new("bpftool")
        .args(["map", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run bpftool");
    status.success()
}

/// Returns the ids of the maps that program `id` uses (`map_ids` of `bpftool prog show`).
pub fn program_map_ids(id: u32) -> Vec<u32> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()
        .expect("run bpftool");
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(start) = text.find("\"map_ids\":[") else {
        return Vec::new();
    };
    let list = &text[start + "\"map_ids\":[".len()..];
    let list = &list[..list.find(']').unwrap_or(0)];
    list.split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect()
}

/// A connect client in Python: `python3 -c CLIENT HOST PORT COUNT THREADS MODE STOP GO`.
///
/// It makes up to COUNT connects to HOST:PORT from THREADS threads and prints one
/// `KEY COUNT` line per outcome, then `connects N`. MODE `tally` reads the server's first line
/// (`served-by PORT`) as the key; MODE `burst` closes at once with a reset (no TIME_WAIT, so
/// ports do not run out) and keys on `connected`. It stops early once the file STOP exists,
/// and makes no second connect before the file GO exists or 20 seconds passed ("-" for
/// neither).
pub const CLIENT: &str = r#"
import collections, errno, os, socket, struct, sys, threading, time
host, port, count, threads, mode, stop, go = sys.argv[1:8]
port, count, threads = int(port), int(count), int(threads)
lock = threading.Lock()
tally = collections.Counter()
made = [0]
linger = struct.pack("ii", 1, 0)

def take():
    with lock:
        if made[0] >= count or (stop != "-" and made[0] % 50 == 0 and os.path.exists(stop)):
            return False
        made[0] += 1
        return True

def one():
    s = socket.socket()
    try:
        s.connect((host, port))
        if mode == "tally":
            s.settimeout(5)
            return s.makefile().readline().strip() or "no reply"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        return "connected"
    except OSError as err:
        return "error " + errno.errorcode.get(err.errno, str(err.errno))
    finally:
        s.close()

def worker(index):
    local = collections.Counter()
    first = True
    while take():
        if not first:
            deadline = time.time() + 20
            while go != "-" and not os.path.exists(go) and time.time() < deadline:
                time.sleep(0.005)
        local[one()] += 1
        first = False
    with lock:
        tally.update(local)

workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
for key, n in sorted(tally.items()): print(key, n)
print("connects", made[0], flush=True)
"#;

/// Parses the outcome counts a [`CLIENT`] printed, by key (`served-by 3000`, `error ECONNREFUSED`).
pub fn client_tally(stdout: &str) -> std::collections::BTreeMap<String, u64> {
    stdout
        .lines()
        .filter_map(|line| {
            let (key, count) = line.rsplit_once(' ')?;
            Some((key.to_owned(), count.parse().ok()?))
        })
        .collect()
}

/// Returns the argv that runs [`CLIENT`] inside `netns`.
pub fn client_argv(
    netns: &Netns,
    target: &str,
    count: u64,
    threads: u32,
    mode: &str,
) -> Vec<String> {
    client_argv_with(netns, target, count, threads, mode, "-", "-")
}

/// [`client_argv`] with STOP and GO files.
pub fn client_argv_with(
    netns: &Netns,
    target: &str,
    count: u64,
    threads: u32,
    mode: &str,
    stop: &str,
    go: &str,
) -> Vec<String> {
    let (host, port) = target.rsplit_once(':').expect("HOST:PORT");
    let (count, threads) = (count.to_string(), threads.to_string());
    netns.command_line(&[
        "python3", "-c", CLIENT, host, port, &count, &threads, mode, stop, go,
    ])
}

/// A file whose existence signals a client process (the STOP and GO files of [`CLIENT`]);
/// removed on drop.
pub struct FlagFile {
    path: PathBuf,
}

impl FlagFile {
    /// Picks a unique path in the temporary directory; the file does not exist yet.
    pub fn new(prefix: &str) -> Self {
        Self {
            path: std::env::temp_dir().join(unique_name(prefix)),
        }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }

    /// Creates the file.
    pub fn raise(&self) {
        fs::write(&self.path, "").unwrap_or_else(|err| panic!("create {}: {err}", self.arg()));
    }
}

impl Drop for FlagFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Returns the cgroup id that the BPF link of each program in `programs` is attached to, from
/// `bpftool link show` (lines `ID: cgroup  prog P` then `cgroup_id C  attach_type ...`).
pub fn link_cgroup_ids(programs: &[u32]) -> Vec<u64> {
    let output = Command::new("bpftool")
        .args(["link", "show"])
        .output()
        .expect("run bpftool");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut ids = Vec::new();
    let mut current_prog = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(at) = words.iter().position(|word| *word == "prog") {
            current_prog = words.get(at + 1).and_then(|id| id.parse::<u32>().ok());
        }
        if let Some(at) = words.iter().position(|word| *word == "cgroup_id") {
            let cgroup = words.get(at + 1).and_then(|id| id.parse::<u64>().ok());
            if let (Some(prog), Some(cgroup)) = (current_prog, cgroup) {
                if programs.contains(&prog) {
                    ids.push(cgroup);
                }
            }
        }
    }
    ids
}

/// A file with given contents in the temporary directory, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn with_bytes(prefix: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(unique_name(prefix));
        fs::write(&path, bytes).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A pinned attachment made by a test: `bypass detach NAME` on drop, whatever happened.
pub struct PinGuard {
    name: String,
}

impl PinGuard {
    /// Runs `bypass attach --pin NAME ARGS` and panics with its output unless it exits 0.
    pub fn attach(args: &[&str]) -> Self {
        let guard = Self {
            name: unique_name("t"),
        };
        let mut full = vec!["attach", "--pin", &guard.name];
        full.extend_from_slice(args);
        let output = bypass(&full);
        assert!(
            output.status.success(),
            "bypass attach --pin failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        guard
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/bypass").join(&self.name)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.dir().exists() {
            let _ = bypass(&["detach", &self.name]);
        }
    }
}

/// Connects to `addr` from inside `cgroup` and `netns` with curl and returns what the server
/// sent, trimmed; empty when the connection failed.
pub fn fetch_in(cgroup: &TestCgroup, netns: &Netns, addr: &str) -> String {
    let url = format!("telnet://{addr}");
    let output = cgroup.run(&netns.command_line(&["curl", "-sS", "--max-time", "5", &url]));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `bypass status --json [NAME]` and returns the parsed output.
pub fn status_json(name: Option<&str>) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend(name);
    let output = bypass(&args);
    assert!(
        output.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "status --json is not JSON ({err}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Returns the command line that runs `python3 -c SCRIPT ARGS...` in `netns`.
pub fn python_line(netns: &Netns, script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["python3", "-c", script];
    argv.extend_from_slice(args);
    netns.command_line(&argv)
}

/// Python client: it connects over TCP to each `HOST:PORT` argument (`[V6]:PORT` for IPv6),
/// all sockets open at once, then prints for each `TARGET | REPLY | PEER-HOST PEER-PORT`, the
/// peer from getpeername().
pub const TCP_CLIENT: &str = r#"
import socket, sys
sockets = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((host, int(port)))
    sockets.append((target, s))
for target, s in sockets:
    peer = s.getpeername()
    reply = s.recv(100).decode().strip()
    print(f"{target} | {reply} | {peer[0]} {peer[1]}", flush=True)
    s.close()
"#;

/// Python client: for each `MODE,HOST:PORT` argument (MODE `connected` or `sendto`) it sends
/// one UDP datagram and prints `MODE,TARGET | REPLY | SOURCE-HOST SOURCE-PORT`, the source
/// from recvfrom().
pub const UDP_CLIENT: &str = r#"
import socket, sys
for arg in sys.argv[1:]:
    mode, target = arg.split(",", 1)
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(5)
    if mode == "connected":
        s.connect((host, int(port)))
        s.send(b"ping")
    else:
        s.sendto(b"ping", (host, int(port)))
    reply, source = s.recvfrom(100)
    print(f"{arg} | {reply.decode()} | {source[0]} {source[1]}", flush=True)
    s.close()
"#;

/// The stdout of a finished command, as text.
pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        stdout_of(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `argv` to completion in the cgroup of this test process, outside any test cgroup.
pub fn run_outside(argv: &[String]) -> Output {
    Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|err| panic!("run {argv:?}: {err}"))
}

/// A bypass process in the background with its stderr collected, for `run` tests that
/// signal bypass or look at its log while the command still runs. Killed by pid on drop.
pub struct Background {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Background {
    /// Starts `bypass ARGS` with stdout discarded and stderr collected.
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(BYPASS);
        command.args(args);
        Self::spawn(command)
    }

    /// Starts `command` with stdout discarded and stderr collected.
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bypass");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let reader = {
            let stderr = stderr.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut text = stderr.lock().expect("stderr lock");
                    text.push_str(&line);
                    text.push('\n');
                }
            })
        };
        Self {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything bypass wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Sends `signal` to bypass.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the exit (at most 10 seconds); returns the status and the whole stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        self.finish()
    }

    fn finish(&mut self) -> (ExitStatus, String) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(10));
        // A command that outlived bypass keeps the pipe open, so wait for the rest of the
        // log only briefly.
        if let Some(reader) = self.reader.take() {
            if wait_until_for(Duration::from_secs(2), || reader.is_finished()) {
                let _ = reader.join();
            }
        }
        (status, self.stderr())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            // Killed bypass cleans nothing up: remove the job cgroup and what runs in it.
            wait_until_for(Duration::from_secs(1), || {
                self.stderr().contains("created cgroup ")
            });
            if created_cgroup(&self.stderr()).is_some() {
                drop(JobCgroup::from_log(&self.stderr()));
            }
        }
    }
}

/// Polls `condition` every 10 ms for at most `timeout`; returns whether it became true.
pub fn wait_until_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// Returns the path of the "created cgroup PATH" line of a `bypass run` log.
pub fn created_cgroup(stderr: &str) -> Option<PathBuf> {
    stderr.lines().find_map(|line| {
        line.split_once("created cgroup ")
            .map(|(_, path)| PathBuf::from(path.trim()))
    })
}

/// Returns how many lines of `stderr` contain `text`.
pub fn count_lines(stderr: &str, text: &str) -> usize {
    stderr.lines().filter(|line| line.contains(text)).count()
}

/// A python3 script that makes `count` TCP connections to HOST:PORT (argv 1 and 2), reads
/// the server's line from each, and prints one line per connection: the reply, or
/// `refused` when the connection was refused.
pub const PY_TCP_CLIENT: &str = r#"
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            print(s.makefile().readline().strip())
    except ConnectionRefusedError:
        print("refused")
"#;

/// A python3 script that sends one UDP datagram to HOST:PORT and prints the reply.
pub const PY_UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ping")
print(s.recv(1500).decode())
"#;

/// The command line of the python3 TCP client inside `netns`: `count` connections to
/// HOST:PORT.
pub fn tcp_client(netns: &Netns, host: &str, port: u16, count: u32) -> Vec<String> {
    let (port, count) = (port.to_string(), count.to_string());
    netns.command_line(&["python3", "-c", PY_TCP_CLIENT, host, &port, &count])
}

/// The command line of the python3 UDP client inside `netns`.
pub fn udp_client(netns: &Netns, host: &str, port: u16) -> Vec<String> {
    netns.command_line(&["python3", "-c", PY_UDP_CLIENT, host, &port.to_string()])
}

/// `bypass run ARGS -- COMMAND` as one argument list.
pub fn run_args<'a>(args: &[&'a str], command: &'a [String]) -> Vec<&'a str> {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--");
    all.extend(command.iter().map(String::as_str));
    all
}

/// The lines of stderr, for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A directory under the system temp directory, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique_name("bypass-test"));
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in this directory and returns its path as a string.
    pub fn file(&self, name: &str, contents: &str) -> String {
        let path = self.path.join(name);
        fs::write(&path, contents).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Returns the names of the directories right under `dir`: the child cgroups of a cgroup.
pub fn subdirectories(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.path().is_dir())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A job cgroup that `bypass run` created: if bypass failed to remove it, the guard kills
/// what is left inside and removes it on drop, so a failing test leaves nothing behind.
pub struct JobCgroup {
    path: PathBuf,
}

impl JobCgroup {
    /// Takes the path from the "created cgroup PATH" line of `stderr`.
    pub fn from_log(stderr: &str) -> Self {
        let path = created_cgroup(stderr)
            .unwrap_or_else(|| panic!("no \"created cgroup\" line in: {stderr}"));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        wait_until_for(Duration::from_secs(2), || {
            fs::remove_dir(&self.path).is_ok()
        });
    }
}
