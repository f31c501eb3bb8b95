//! A burst of connects: the per-rule counter stays exact, the hit log accounts for every hit
//! it did not write, and the loader's memory stays flat.

mod support;

use std::{
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use support::{
    Attached, Netns, TcpServer, TestCgroup, client_argv, client_tally, require_root, wait_until,
};

const CONNECTS: u64 = 100_000;
const THREADS: u32 = 4;
/// Growth of the loader's resident memory allowed over the burst.
const RSS_GROWTH_LIMIT_KB: u64 = 2048;

/// Reads the VmRSS of `pid`, in kB.
fn rss_kb(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Samples the VmRSS of `pid` every 20 ms until `stop` is set.
fn sample_rss(pid: i32, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<u64>> {
    thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            samples.extend(rss_kb(pid));
            thread::sleep(Duration::from_millis(20));
        }
        samples
    })
}

/// Returns the number in the first stderr line that ends with `suffix`, e.g. `N hits: RULE`.
fn number_before(stderr: &str, suffix: &str) -> Option<u64> {
    let line = stderr.lines().find(|line| line.ends_with(suffix))?;
    let before = line.strip_suffix(suffix)?;
    before.split_whitespace().last()?.parse().ok()
}

/// Returns `(written, not logged)` from `hit log: X lines written, Y hits not logged (rate limit)`.
fn hit_log_totals(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr
        .lines()
        .find_map(|line| line.split_once("hit log: ").map(|(_, rest)| rest))?;
    let mut numbers = line.split_whitespace().filter_map(|word| word.parse().ok());
    Some((numbers.next()?, numbers.next()?))
}

#[test]
fn burst_keeps_counts_exact_and_memory_flat() {
    if !require_root("burst_keeps_counts_exact_and_memory_flat") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    // Without the check after attaching, whose test connection would add one logged hit.
    let bypass = Attached::start(cgroup.path(), &["--no-verify"]);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(bypass.pid(), stop_sampling.clone());

    let client = client_argv(&netns, "10.0.0.22:80", CONNECTS, THREADS, "burst");
    let output = cgroup.run(&client);
    let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(tally.get("connects"), Some(&CONNECTS));
    assert_eq!(tally.get("connected"), Some(&CONNECTS), "{tally:?}");
    let all_accepted = wait_until(Duration::from_secs(10), || {
        target.accepted() as u64 == CONNECTS
    });
    assert!(
        all_accepted,
        "server accepted {} of {CONNECTS}",
        target.accepted()
    );

    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");

    let hits = number_before(&stderr, " hits: tcp/10.0.0.22:80=10.0.0.22:3000");
    assert_eq!(hits, Some(CONNECTS), "{stderr}");
    let (written, not_logged) = hit_log_totals(&stderr).expect("a hit log summary line");
    assert_eq!(written + not_logged, CONNECTS, "{stderr}");
    assert!(not_logged > 0, "the rate limit never applied");
    let lines = stderr.matches("redirect connect4 tcp 10.0.0.22:80").count() as u64;
    assert_eq!(lines, written, "hit log lines printed");
    assert!(
        stderr.contains("hits not logged because the hit log limit"),
        "{stderr}"
    );

    let (first, peak) = (samples[0], samples.iter().copied().max().unwrap_or(0));
    eprintln!(
        "{CONNECTS} connects: {written} lines written, {not_logged} not logged; \
         loader VmRSS {first} kB at start, {peak} kB peak over {} samples",
        samples.len()
    );
    assert!(
        peak - first <= RSS_GROWTH_LIMIT_KB,
        "VmRSS grew from {first} kB to {peak} kB"
    );
}
