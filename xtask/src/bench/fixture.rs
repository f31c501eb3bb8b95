//! What the bench sets up, each undone on drop: network namespaces, the TCP server, cgroups,
//! `bypass attach` processes, socat, and the `kernel.bpf_stats_enabled` switch.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Threads that accept and drain connections in the server.
const SERVER_THREADS: usize = 2;
/// Listen backlog of the server: more than the connections of one client run, so a run never
/// waits for the server, which shares the CPUs with the clients. [`Netns::create`] raises
/// the namespace's net.core.somaxconn to match.
const SERVER_BACKLOG: i32 = 65_535;
/// Read buffer of each server thread.
const SERVER_BUFFER: usize = 256 * 1024;

/// A network namespace made with `ip netns add`, with 10.0.0.22 on its `lo`. Deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.ip(&["addr", "add", "10.0.0.22/32", "dev", "lo"])?;
        // The whole port range for the loops; the kernel wants start and end of different
        // parity.
        netns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
        ])?;
        let somaxconn = format!("net.core.somaxconn={SERVER_BACKLOG}");
        netns.exec(&["sysctl", "-q", "-w", &somaxconn])?;
        // Keep no TIME_WAIT sockets, so the end-to-end loops never run out of ports and
        // connect() never searches past tens of thousands of them; the same for every variant.
        netns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"])?;
        Ok(netns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace (with `ip netns exec`, for sysctl and iptables).
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run("ip", &full)
    }

    /// Runs `f` on a thread that entered this namespace; sockets made there stay in it.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = fs::File::open(self.path())?;
        let joined = thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join();
        Ok(joined.map_err(|_| anyhow::anyhow!("netns thread panicked"))??)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A TCP server in a namespace: it accepts, reads to EOF, and closes; it counts connections.
pub struct Server {
    listener: Arc<TcpListener>,
    accepted: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = Arc::new(netns.enter(move || TcpListener::bind(addr))?);
        // std listens with a backlog of 128, which 8 clients overflow: dropped SYNs then
        // cost a second each. Calling listen again raises the backlog.
        // SAFETY: listen on our own bound socket.
        if unsafe { libc::listen(listener.as_raw_fd(), SERVER_BACKLOG) } != 0 {
            bail!(
                "cannot raise the listen backlog: {}",
                std::io::Error::last_os_error()
            );
        }
        let accepted = Arc::new(AtomicU64::new(0));
        let threads = (0..SERVER_THREADS)
            .map(|_| {
                let (listener, accepted) = (listener.clone(), accepted.clone());
                thread::spawn(move || serve(&listener, &accepted))
            })
            .collect();
        Ok(Self {
            listener,
            accepted,
            threads,
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until the server accepted `count` connections, for at most `timeout`.
    pub fn wait_accepted(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.accepted() < count {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

fn serve(listener: &TcpListener, accepted: &AtomicU64) {
    let mut buffer = vec![0u8; SERVER_BUFFER];
    // accept fails once `Server::drop` shuts the listening socket down.
    while let Ok((mut stream, _)) = listener.accept() {
        accepted.fetch_add(1, Ordering::Relaxed);
        while matches!(stream.read(&mut buffer), Ok(1..)) {}
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutdown on our own listening socket wakes the threads blocked in accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Returns the cgroup v2 directory of this process.
pub fn own_cgroup() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
        })
        .context("no cgroup v2 file system is mounted")?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let relative = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("this process has no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(Path::new(mount).join(relative.trim_start_matches('/')))
}

/// A cgroup the bench made under its own cgroup; removed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(parent: &Path, name: &str) -> anyhow::Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Clients that just exited may take a moment to leave.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A child process, stopped by pid (SIGTERM, then SIGKILL after 10 s) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bypass attach` running in the background, with the time it took to report attached.
pub struct Attached {
    pub process: Process,
    pub startup: Duration,
    stderr: Arc<Mutex<String>>,
}

/// The line `bypass attach` logs once its programs are attached and the hit log runs.
const ATTACHED_LINE: &str = "redirecting; stop with";

impl Attached {
    /// Starts `bypass attach --cgroup CGROUP ARGS` and waits until it reports attached.
    pub fn start(bypass: &Path, cgroup: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut command = Command::new(bypass);
        command.arg("attach").arg("--cgroup").arg(cgroup).args(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A large rule set goes on the command line; a bigger stack limit raises ARG_MAX.
        // SAFETY: only `setrlimit`, which is async-signal-safe, runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                let limit = libc::rlimit {
                    rlim_cur: 256 << 20,
                    rlim_max: libc::RLIM_INFINITY,
                };
                libc::setrlimit(libc::RLIMIT_STACK, &limit);
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bypass.display()))?;
        let pipe = child.stderr.take().context("no stderr pipe")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sender, attached) = std::sync::mpsc::channel();
        let reader_text = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(ATTACHED_LINE) {
                    let _ = sender.send(start.elapsed());
                }
                let mut text = reader_text.lock().unwrap_or_else(|err| err.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut process = Process { child };
        let startup = attached.recv_timeout(Duration::from_secs(60));
        let Ok(startup) = startup else {
            let running = process.running();
            let text = stderr.lock().unwrap_or_else(|err| err.into_inner()).clone();
            bail!("bypass attach did not report attached (running: {running}):\n{text}");
        };
        Ok(Self {
            process,
            startup,
            stderr,
        })
    }

    /// Everything `bypass attach` wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|err| err.into_inner())
            .clone()
    }
}

/// Returns VmRSS and VmHWM of a process, in KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// socat relaying `listen` to `target` inside a namespace, a child process per connection.
pub struct Socat {
    process: Process,
}

impl Socat {
    pub fn start(netns: &Netns, listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg("socat")
            .arg(format!(
                "TCP-LISTEN:{},bind={},fork,reuseaddr,backlog=4096",
                listen.port(),
                listen.ip()
            ))
            .arg(format!("TCP:{target}"))
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start socat; install the Debian package socat")?;
        let mut socat = Self {
            process: Process { child },
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while netns.enter(move || TcpStream::connect(listen)).is_err() {
            if !socat.process.running() || Instant::now() >= deadline {
                bail!("socat did not start listening on {listen}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(socat)
    }

    /// Waits until every forked socat child has finished, for at most 10 s, so the next
    /// measurement does not share the CPUs with them.
    pub fn settle(&self) {
        let children = format!("/proc/{0}/task/{0}/children", self.process.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match fs::read_to_string(&children) {
                Ok(text) if !text.trim().is_empty() => thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
    }
}

/// `kernel.bpf_stats_enabled` switched on; the earlier value comes back on drop.
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let previous =
            fs::read_to_string(BPF_STATS).with_context(|| format!("cannot read {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(Self {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "xtask: cannot restore {BPF_STATS} to {}: {err}",
                self.previous
            );
        }
    }
}

/// Returns the run count and total run time in ns of the connect4 program attached to
/// `cgroup`, as `bpftool` reports them (non-zero only while [`BpfStats`] is on).
pub fn connect4_stats(cgroup: &Path) -> anyhow::Result<(u64, u64)> {
    let listing = output(
        "bpftool",
        &["--json", "cgroup", "show", &cgroup.display().to_string()],
    )?;
    let id = listing
        .split('}')
        .find(|entry| entry.contains("\"connect4\""))
        .and_then(|entry| json_number(entry, "id"))
        .with_context(|| format!("no connect4 program on {}: {listing}", cgroup.display()))?;
    let program = output(
        "bpftool",
        &["--json", "prog", "show", "id", &id.to_string()],
    )?;
    let count = json_number(&program, "run_cnt").unwrap_or(0);
    let time = json_number(&program, "run_time_ns").unwrap_or(0);
    Ok((count, time))
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Returns the number after `"key":` in a JSON text.
fn json_number(text: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let rest = text[text.find(&pattern)? + pattern.len()..].trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_number_finds_key() {
        let text = r#"{"id":42,"type":"cgroup_sock_addr","run_time_ns": 1234,"run_cnt":10}"#;
        assert_eq!(json_number(text, "id"), Some(42));
        assert_eq!(json_number(text, "run_time_ns"), Some(1234));
        assert_eq!(json_number(text, "missing"), None);
    }
}
