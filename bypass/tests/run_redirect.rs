//! `bypass run`: real clients in the new cgroup reach the redirect target, and only the
//! connections a rule names are changed.

mod support;

use support::{
    JobCgroup, Netns, TcpServer, TestCgroup, UdpEcho, attached_programs, bypass, count_lines,
    require_root, run_args, tcp_client, text, udp_client,
};

const HIT_LINE: &str = "redirect connect4 tcp 10.0.0.22:80 -> 10.0.0.22:3000 rule 0";

#[test]
fn curl_reaches_redirect_target() {
    if !require_root("curl_reaches_redirect_target") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let curl = netns.command_line(&["curl", "-sS", "--max-time", "5", "telnet://10.0.0.22:80"]);
    let output = bypass(&run_args(&[], &curl));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "served-by 3000", "stderr: {stderr}");
    assert_eq!(target.accepted(), 1, "stderr: {stderr}");
    assert!(stderr.contains(HIT_LINE), "no hit log line in: {stderr}");
}

#[test]
fn socket_client_reaches_target() {
    if !require_root("socket_client_reaches_target") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let client = tcp_client(&netns, "10.0.0.22", 80, 1);
    let output = bypass(&run_args(&["-r", "10.0.0.22:80=:3000"], &client));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "served-by 3000", "stderr: {stderr}");
    assert_eq!(target.accepted(), 1, "stderr: {stderr}");
    assert!(stderr.contains(HIT_LINE), "no hit log line in: {stderr}");
    assert!(
        stderr.contains("comm python3"),
        "hit line lacks the command name: {stderr}"
    );
}

#[test]
fn counter_equals_connect_count() {
    if !require_root("counter_equals_connect_count") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let client = tcp_client(&netns, "10.0.0.22", 80, 25);
    let output = bypass(&run_args(&["-r", "10.0.0.22:80=:3000"], &client));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(
        count_lines(&stdout, "served-by 3000"),
        25,
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(target.accepted(), 25, "stderr: {stderr}");
    assert!(
        stderr.contains("INFO  bypass::hitlog] 25 hits: tcp/10.0.0.22:80=10.0.0.22:3000\n"),
        "no exact summary line in: {stderr}"
    );
    assert_eq!(
        count_lines(&stderr, HIT_LINE),
        25,
        "one hit line per connect: {stderr}"
    );
}

#[test]
fn unruled_destination_is_unchanged() {
    if !require_root("unruled_destination_is_unchanged") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let other = TcpServer::start(&netns, "10.0.0.22:4000");

    let client = tcp_client(&netns, "10.0.0.22", 4000, 1);
    let output = bypass(&run_args(&["-r", "10.0.0.22:80=:3000"], &client));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "served-by 4000", "stderr: {stderr}");
    assert_eq!(other.accepted(), 1, "stderr: {stderr}");
    assert_eq!(target.accepted(), 0, "stderr: {stderr}");
    assert!(
        stderr.contains("0 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("redirect connect4 tcp 10.0.0.22"),
        "a hit was logged: {stderr}"
    );
}

#[test]
fn udp_rule_leaves_tcp_alone() {
    if !require_root("udp_rule_leaves_tcp_alone") {
        return;
    }
    let netns = Netns::new();
    let tcp_target = TcpServer::start(&netns, "10.0.0.22:3000");
    let tcp_original = TcpServer::start(&netns, "10.0.0.22:80");
    let udp_target = UdpEcho::start(&netns, "10.0.0.22:3000");

    let tcp = tcp_client(&netns, "10.0.0.22", 80, 1);
    let output = bypass(&run_args(&["-r", "udp/10.0.0.22:80=:3000"], &tcp));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(
        stdout.trim(),
        "served-by 80",
        "tcp was redirected; stderr: {stderr}"
    );
    assert_eq!(
        (tcp_original.accepted(), tcp_target.accepted()),
        (1, 0),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("0 hits: udp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );

    // The same rule does redirect udp, so the tcp result above is not a broken rule.
    let udp = udp_client(&netns, "10.0.0.22", 80);
    let output = bypass(&run_args(&["-r", "udp/10.0.0.22:80=:3000"], &udp));
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "echo 3000 ping", "stderr: {stderr}");
    assert_eq!(udp_target.received(), 1, "stderr: {stderr}");
    assert!(
        stderr.contains("1 hit: udp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );
}

#[test]
fn ipv6_client_reaches_target() {
    if !require_root("ipv6_client_reaches_target") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "[fd00::22]:3000");

    let client = tcp_client(&netns, "fd00::22", 80, 3);
    let output = bypass(&run_args(&["-r", "[fd00::22]:80=[fd00::22]:3000"], &client));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(
        count_lines(&stdout, "served-by 3000"),
        3,
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(target.accepted(), 3, "stderr: {stderr}");
    assert!(
        stderr.contains("3 hits: tcp/[fd00::22]:80=[fd00::22]:3000"),
        "stderr: {stderr}"
    );
}

#[test]
fn default_rule_is_announced() {
    if !require_root("default_rule_is_announced") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let client = tcp_client(&netns, "10.0.0.22", 80, 1);
    let output = bypass(&run_args(&[], &client));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "served-by 3000", "stderr: {stderr}");
    assert_eq!(target.accepted(), 1, "stderr: {stderr}");
    assert!(
        stderr.contains("no --rule or --config given; using the default rule"),
        "no default rule message in: {stderr}"
    );
    assert!(
        stderr.contains("rule 0: tcp/10.0.0.22:80=10.0.0.22:3000 (default)"),
        "default rule not listed in: {stderr}"
    );
}

#[test]
fn log_rate_zero_still_counts() {
    if !require_root("log_rate_zero_still_counts") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let client = tcp_client(&netns, "10.0.0.22", 80, 5);
    let output = bypass(&run_args(
        &["--log-rate", "0", "-r", "10.0.0.22:80=:3000"],
        &client,
    ));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(
        count_lines(&stdout, "served-by 3000"),
        5,
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(target.accepted(), 5, "stderr: {stderr}");
    assert!(
        stderr.contains("5 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("redirect connect4 tcp 10.0.0.22"),
        "a hit line was logged: {stderr}"
    );
    assert!(
        stderr.contains("hit log off (--log-rate 0"),
        "stderr: {stderr}"
    );
}

#[test]
fn parent_cgroup_holds_job() {
    if !require_root("parent_cgroup_holds_job") {
        return;
    }
    let parent = TestCgroup::new();
    let parent_dir = parent.path().display().to_string();
    let command = ["cat".to_owned(), "/proc/self/cgroup".to_owned()];
    let output = bypass(&run_args(&["--parent-cgroup", &parent_dir], &command));

    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "bypass run failed: {stderr}");
    let job = JobCgroup::from_log(&stderr);
    let created = job.path();
    assert_eq!(created.parent(), Some(parent.path()), "stderr: {stderr}");
    let relative = created
        .strip_prefix(support::cgroup2_mount())
        .expect("under the mount");
    assert_eq!(
        stdout.lines().find_map(|line| line.strip_prefix("0::")),
        Some(format!("/{}", relative.display()).as_str()),
        "the command ran outside the job cgroup; stderr: {stderr}"
    );
    let programs = attached_programs(parent.path());
    assert!(
        programs.is_empty(),
        "attached to the parent: {programs:?}; {stderr}"
    );
    assert!(
        !created.exists(),
        "job cgroup left behind; stderr: {stderr}"
    );
}
