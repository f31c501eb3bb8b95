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

/// The cgroup v2 mount point, from /proc/self/mountinfo.
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

/// The cgroup v2 directory of this test process.
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
        let path = parent.join(unique_name("bypass-test"));
        fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `argv` to completion as a member of this cgroup from its first instruction.
    pub fn run(&self, argv: &[String]) -> Output {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        // SAFETY: only `write`, which is async-signal-safe, runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
            .output()
            .unwrap_or_else(|err| panic!("run {argv:?}: {err}"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes this test started may take a moment to leave after exiting.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
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
                            let _ = writeln!(stream, "served-by {}", addr.port());
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
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

/// A `bypass attach` process in the background, stopped by pid on drop.
pub struct Attached {
    process: Background,
}

impl Attached {
    /// Starts `bypass attach --cgroup CGROUP ARGS` and waits until it reports that it is
    /// redirecting. Panics with its output if it exits or takes longer than 10 seconds.
    pub fn start(cgroup: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(BYPASS);
        command.arg("attach").arg("--cgroup").arg(cgroup).args(args);
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

    /// Everything bypass wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Waits until stderr contains `text`, for at most 5 seconds; returns whether it did.
    pub fn wait_for_log(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.stderr().contains(text) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends `signal` and waits for the exit; returns the status and the whole stderr.
    pub fn stop_with(mut self, signal: i32) -> (ExitStatus, String) {
        self.process.signal(signal);
        self.process.finish()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(None) = self.process.child.try_wait() {
            self.process.signal(libc::SIGTERM);
            let _ = wait_timeout(&mut self.process.child, Duration::from_secs(10));
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
            wait_until_for(Duration::from_secs(1), || self.stderr().contains("created cgroup "));
            if created_cgroup(&self.stderr()).is_some() {
                drop(JobCgroup::from_log(&self.stderr()));
            }
        }
    }
}

/// Polls `condition` every 10 ms for at most 10 seconds; returns whether it became true.
pub fn wait_until(condition: impl FnMut() -> bool) -> bool {
    wait_until_for(Duration::from_secs(10), condition)
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

/// Runs `argv` to completion outside any test cgroup and returns its stdout.
pub fn run_outside(argv: &[String]) -> String {
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("run client");
    String::from_utf8_lossy(&output.stdout).into_owned()
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
