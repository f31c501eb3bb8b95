//! Several loaders at once. Jobs with rules for the same source each reach their own target,
//! and a cgroup handed from one loader to another makes no connect without a rule.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::{
    Attached, BYPASS, FlagFile, Netns, TcpServer, TestCgroup, client_argv_with, client_tally,
    read_all, require_root, wait_timeout, wait_until,
};

const JOBS: u16 = 8;
const CONNECTS_PER_JOB: u64 = 25;
const FIRST_PORT: u16 = 3001;

#[test]
fn parallel_runs_reach_own_targets() {
    if !require_root("parallel_runs_reach_own_targets") {
        return;
    }
    let netns = Netns::new();
    let original = TcpServer::start(&netns, "10.0.0.22:80");
    let ports: Vec<u16> = (FIRST_PORT..FIRST_PORT + JOBS).collect();
    let servers: Vec<TcpServer> = ports
        .iter()
        .map(|port| TcpServer::start(&netns, &format!("10.0.0.22:{port}")))
        .collect();
    let parent = TestCgroup::new();
    let go = FlagFile::new("bypass-go");

    // Every job makes one connect, then waits for GO: all eight are attached at once when
    // the rest of their connects run.
    let client = client_argv_with(
        &netns,
        "10.0.0.22:80",
        CONNECTS_PER_JOB,
        1,
        "tally",
        "-",
        go.arg(),
    );
    let mut jobs: Vec<Child> = ports
        .iter()
        .map(|port| {
            Command::new(BYPASS)
                .args([
                    "run",
                    "--rule",
                    &format!("10.0.0.22:80=:{port}"),
                    "--parent-cgroup",
                ])
                .arg(parent.path())
                .arg("--")
                .args(&client)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start bypass run")
        })
        .collect();
    let all_started = wait_until(Duration::from_secs(20), || {
        servers.iter().all(|server| server.accepted() >= 1)
    });
    go.raise();
    assert!(all_started, "not every job connected once");

    for (job, port) in jobs.iter_mut().zip(&ports) {
        let status = wait_timeout(job, Duration::from_secs(20));
        let stdout = read_all(job.stdout.take().expect("stdout"));
        let stderr = read_all(job.stderr.take().expect("stderr"));
        assert!(status.success(), "job for :{port} failed: {stderr}");
        let tally = client_tally(&stdout);
        let expected = [
            ("connects".to_owned(), CONNECTS_PER_JOB),
            (format!("served-by {port}"), CONNECTS_PER_JOB),
        ];
        assert_eq!(
            tally.into_iter().collect::<Vec<_>>(),
            expected,
            "job for :{port}"
        );
        let summary = format!("{CONNECTS_PER_JOB} hits: tcp/10.0.0.22:80=10.0.0.22:{port}");
        assert!(stderr.contains(&summary), "job for :{port}: {stderr}");
    }
    for (server, port) in servers.iter().zip(&ports) {
        assert_eq!(
            server.accepted() as u64,
            CONNECTS_PER_JOB,
            "server on :{port}"
        );
    }
    assert_eq!(original.accepted(), 0);
}

/// Upper bound of the hand-over test's connects; it stops earlier once every phase was seen.
const HANDOVER_MAX_CONNECTS: u64 = 20_000;
/// Connects each phase must see before the test moves on.
const PHASE_CONNECTS: usize = 300;

#[test]
fn loaders_hand_over_without_gap() {
    if !require_root("loaders_hand_over_without_gap") {
        return;
    }
    let netns = Netns::new();
    let original = TcpServer::start(&netns, "10.0.0.22:80");
    let first_target = TcpServer::start(&netns, "10.0.0.22:3000");
    let second_target = TcpServer::start(&netns, "10.0.0.22:3001");
    let cgroup = TestCgroup::new();
    let stop = FlagFile::new("bypass-stop");
    let phase = |server: &TcpServer, at_least: usize| {
        let reached = wait_until(Duration::from_secs(20), || server.accepted() >= at_least);
        assert!(
            reached,
            "the client stalled at {} connects",
            server.accepted()
        );
    };

    let first = Attached::start(cgroup.path(), &["--rule", "10.0.0.22:80=:3000"]);
    let argv = client_argv_with(
        &netns,
        "10.0.0.22:80",
        HANDOVER_MAX_CONNECTS,
        1,
        "tally",
        stop.arg(),
        "-",
    );
    let mut client = cgroup.spawn(&argv);
    phase(&first_target, PHASE_CONNECTS);
    // Both attached: the first program rewrites to :3000, the second then has no match.
    let second = Attached::start(cgroup.path(), &["--rule", "10.0.0.22:80=:3001"]);
    phase(&first_target, first_target.accepted() + PHASE_CONNECTS);
    let (status, stderr) = first.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    phase(&second_target, PHASE_CONNECTS);
    stop.raise();

    assert!(wait_timeout(&mut client, Duration::from_secs(20)).success());
    let tally = client_tally(&read_all(client.stdout.take().expect("stdout")));
    let (second_status, _) = second.stop_with(libc::SIGTERM);
    assert!(second_status.success());
    eprintln!(
        "hand-over connects: {tally:?}; original destination: {}",
        original.accepted()
    );
    let to_first = tally.get("served-by 3000").copied().unwrap_or(0);
    let to_second = tally.get("served-by 3001").copied().unwrap_or(0);
    assert_eq!(
        to_first + to_second,
        tally["connects"],
        "connects that missed both: {tally:?}"
    );
    assert_eq!(original.accepted(), 0);
}
