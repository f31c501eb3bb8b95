//! Live rule changes under a client's tight connect loop: `bypass rules add|del` on a pinned
//! attachment, a pinned loader restarted, a hand-over to a foreground loader and SIGHUP
//! reloads. Every connect must reach the target that the rules in force at its instant give.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use support::{
    Attached, FlagFile, Netns, PinGuard, TcpServer, TestCgroup, bypass, require_root, unique_name,
    wait_timeout, wait_until,
};

/// Python client: it connects to HOST:PORT up to COUNT times, one at a time, until the file
/// STOP exists. For each connect it prints `START END REPLY`, the CLOCK_MONOTONIC times around
/// connect() and the server's reply.
const TIMED_CLIENT: &str = r#"
import os, socket, sys, time
host, port, count, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for i in range(count):
    if i % 20 == 0 and os.path.exists(stop):
        break
    s = socket.socket()
    s.settimeout(5)
    start = time.monotonic()
    try:
        s.connect((host, port))
        end = time.monotonic()
        reply = s.makefile().readline().strip().replace(" ", "-") or "no-reply"
    except OSError as err:
        end = time.monotonic()
        reply = "error-%d" % err.errno
    s.close()
    print("%.6f %.6f %s" % (start, end, reply), flush=True)
"#;

/// Upper bound of connects, so the loop ends even if the test never raises STOP.
const MAX_CONNECTS: u32 = 20_000;
/// Connects the client makes in each rule state before the next change.
const CONNECTS_PER_STATE: usize = 150;
/// The port the client connects to; nothing redirects it without a rule.
const ORIGINAL: u16 = 80;

/// Seconds on CLOCK_MONOTONIC, the clock of Python's `time.monotonic()`.
fn monotonic() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// One connect of the client.
struct Connect {
    start: f64,
    end: f64,
    reply: String,
}

/// The rule for 10.0.0.22:80 over time: where a connect should go at each instant.
struct Timeline {
    /// (changed not before, changed by, port the connect goes to from then on).
    changes: Vec<(f64, f64, u16, &'static str)>,
    /// Windows the guarantees page does not cover: a pinned loader restarted.
    uncovered: Vec<(f64, f64)>,
}

impl Timeline {
    fn new(initial: u16) -> Self {
        Self {
            changes: vec![(f64::MIN, f64::MIN, initial, "start")],
            uncovered: Vec::new(),
        }
    }

    /// Runs `change`, which makes the rule point to `port`, and notes when it ran.
    fn change(&mut self, what: &'static str, port: u16, change: impl FnOnce()) {
        let begin = monotonic();
        change();
        self.changes.push((begin, monotonic(), port, what));
    }

    /// Returns the states that a connect between `start` and `end` may see: each state in
    /// force at some instant of that interval.
    fn allowed(&self, start: f64, end: f64) -> Vec<(u16, &'static str)> {
        let mut allowed = Vec::new();
        for (index, &(begin, _, port, what)) in self.changes.iter().enumerate() {
            let until = self.changes.get(index + 1).map_or(f64::MAX, |next| next.1);
            if begin <= end && start <= until {
                allowed.push((port, what));
            }
        }
        allowed
    }

    fn in_uncovered(&self, start: f64, end: f64) -> bool {
        self.uncovered
            .iter()
            .any(|&(begin, until)| begin <= end && start <= until)
    }
}

/// The client process and the connects it has reported so far.
struct Client {
    child: std::process::Child,
    connects: Arc<Mutex<Vec<Connect>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Client {
    fn start(cgroup: &TestCgroup, netns: &Netns, stop: &FlagFile) -> Self {
        let count = MAX_CONNECTS.to_string();
        let argv = netns.command_line(&[
            "python3",
            "-c",
            TIMED_CLIENT,
            "10.0.0.22",
            &ORIGINAL.to_string(),
            &count,
            stop.arg(),
        ]);
        let mut child = cgroup.spawn(&argv);
        let stdout = child.stdout.take().expect("client stdout");
        let connects = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let connects = connects.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let words: Vec<&str> = line.split(' ').collect();
                    if let [start, end, reply] = words[..] {
                        connects.lock().expect("lock").push(Connect {
                            start: start.parse().expect("start time"),
                            end: end.parse().expect("end time"),
                            reply: reply.to_owned(),
                        });
                    }
                }
            })
        };
        Self {
            child,
            connects,
            reader: Some(reader),
        }
    }

    fn count(&self) -> usize {
        self.connects.lock().expect("lock").len()
    }

    /// Waits until the client made [`CONNECTS_PER_STATE`] more connects.
    fn wait_for_more(&self) {
        let target = self.count() + CONNECTS_PER_STATE;
        let made = wait_until(Duration::from_secs(30), || self.count() >= target);
        assert!(made, "the client stopped connecting at {}", self.count());
    }

    fn finish(mut self, stop: &FlagFile) -> Vec<Connect> {
        stop.raise();
        let status = wait_timeout(&mut self.child, Duration::from_secs(30));
        assert!(status.success(), "client failed: {status}");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("reader thread");
        }
        std::mem::take(&mut *self.connects.lock().expect("lock"))
    }
}

fn rules(args: &[&str]) {
    let mut full = vec!["-q", "rules"];
    full.extend_from_slice(args);
    let output = bypass(&full);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn detach(name: &str) {
    let output = bypass(&["-q", "detach", name]);
    assert!(
        output.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes `rules` (FROM, TO pairs) as the config, sends SIGHUP, and waits for reload `count`.
fn reload(attached: &Attached, config: &std::path::Path, rules: &[(&str, &str)], count: usize) {
    let text: String = rules
        .iter()
        .map(|(from, to)| format!("[[rule]]\nfrom = \"{from}\"\nto = \"{to}\"\n"))
        .collect();
    fs::write(config, text).expect("write config");
    // SAFETY: signals our own child, which has not been reaped.
    unsafe { libc::kill(attached.pid(), libc::SIGHUP) };
    let done = wait_until(Duration::from_secs(10), || {
        attached.stderr().matches("reloaded rules").count() >= count
    });
    assert!(done, "reload {count} not applied:\n{}", attached.stderr());
}

/// Makes every change of the test while `client` connects, recording them in `timeline`.
fn change_rules(client: &Client, cgroup: &TestCgroup, first: PinGuard, timeline: &mut Timeline) {
    let cgroup_arg = cgroup.path().to_str().expect("utf-8 path").to_owned();
    let name = first.name().to_owned();
    let step = |timeline: &mut Timeline, what, port, change: &dyn Fn()| {
        client.wait_for_more();
        timeline.change(what, port, change);
    };
    step(timeline, "add other rule", 3000, &|| {
        rules(&["add", &name, "10.0.0.22:81=:3001"])
    });
    step(timeline, "del other rule", 3000, &|| {
        rules(&["del", &name, "10.0.0.22:81"])
    });
    step(timeline, "del rule", ORIGINAL, &|| {
        rules(&["del", &name, "10.0.0.22:80"])
    });
    step(timeline, "add rule", 3001, &|| {
        rules(&["add", &name, "10.0.0.22:80=:3001"])
    });

    // Restart of a pinned loader: detach, then attach again. Not covered.
    client.wait_for_more();
    let begin = monotonic();
    timeline.change("restart: detach", ORIGINAL, || detach(&name));
    drop(first);
    let mut second = None;
    timeline.change("restart: attach", 3000, || {
        second = Some(PinGuard::attach(&[
            "-q",
            "--cgroup",
            &cgroup_arg,
            "-r",
            "10.0.0.22:80=:3000",
        ]));
    });
    timeline.uncovered.push((begin, monotonic()));
    let second = second.expect("second pin");

    // Hand-over to a foreground loader with the same rule, then SIGHUP reloads.
    let config = std::env::temp_dir().join(unique_name("bypass-rules"));
    fs::write(
        &config,
        "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n",
    )
    .expect("config");
    let mut attached = None;
    client.wait_for_more();
    timeline.change("foreground start", 3000, || {
        attached = Some(Attached::start(
            cgroup.path(),
            &["-c", config.to_str().expect("utf-8")],
        ));
    });
    let attached = attached.expect("foreground loader");
    step(timeline, "pin detached", 3000, &|| detach(second.name()));
    let (to_3001, other) = (("10.0.0.22:80", ":3001"), ("10.0.0.22:81", ":3000"));
    step(timeline, "sighup change", 3001, &|| {
        reload(&attached, &config, &[to_3001], 1)
    });
    step(timeline, "sighup add", 3001, &|| {
        reload(&attached, &config, &[to_3001, other], 2)
    });
    step(timeline, "sighup del", ORIGINAL, &|| {
        reload(&attached, &config, &[other], 3)
    });
    let back = ("10.0.0.22:80", ":3000");
    step(timeline, "sighup add back", 3000, &|| {
        reload(&attached, &config, &[back], 4)
    });
    client.wait_for_more();
    timeline.change("foreground stop", ORIGINAL, || {
        let (status, stderr) = attached.stop_with(libc::SIGTERM);
        assert!(status.success(), "{stderr}");
    });
    client.wait_for_more();
    let _ = fs::remove_file(&config);
}

#[test]
fn rule_changes_leave_no_gap() {
    if !require_root("rule_changes_leave_no_gap") {
        return;
    }
    let netns = Netns::new();
    let servers: Vec<TcpServer> = [ORIGINAL, 3000, 3001]
        .iter()
        .map(|port| TcpServer::start(&netns, &format!("10.0.0.22:{port}")))
        .collect();
    let cgroup = TestCgroup::new();
    let cgroup_arg = cgroup.path().to_str().expect("utf-8 path");
    let first = PinGuard::attach(&["-q", "--cgroup", cgroup_arg, "-r", "10.0.0.22:80=:3000"]);
    let stop = FlagFile::new("bypass-rules-stop");
    let client = Client::start(&cgroup, &netns, &stop);
    let mut timeline = Timeline::new(3000);
    change_rules(&client, &cgroup, first, &mut timeline);
    let connects = client.finish(&stop);
    drop(servers);

    let mut tally: BTreeMap<&str, u64> = BTreeMap::new();
    let mut restart_original = 0;
    let mut wrong = Vec::new();
    for connect in &connects {
        *tally.entry(&connect.reply).or_default() += 1;
        let allowed = timeline.allowed(connect.start, connect.end);
        let ok = allowed
            .iter()
            .any(|(port, _)| connect.reply == format!("served-by-{port}"));
        if connect.reply == format!("served-by-{ORIGINAL}")
            && timeline.in_uncovered(connect.start, connect.end)
        {
            restart_original += 1;
        }
        if !ok {
            wrong.push(format!(
                "{:.6}..{:.6} {} allowed {allowed:?}",
                connect.start, connect.end, connect.reply
            ));
        }
    }
    let restart: f64 = timeline
        .uncovered
        .iter()
        .map(|(begin, end)| end - begin)
        .sum();
    eprintln!(
        "{} connects over {} rule changes: {tally:?}; to the original destination during the \
         pinned restart ({restart:.3} s): {restart_original}",
        connects.len(),
        timeline.changes.len() - 1
    );
    assert!(
        wrong.is_empty(),
        "{} connects went astray:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        connects.len() >= 12 * CONNECTS_PER_STATE,
        "only {} connects",
        connects.len()
    );
}
