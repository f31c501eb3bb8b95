//! IPv4-mapped and native IPv6 destinations are redirected like IPv4 ones.

mod support;

use support::{
    Attached, Netns, TCP_CLIENT, TcpServer, TestCgroup, assert_success, python_line, require_root,
    run_outside, stdout_of,
};

/// One rule checked with a python client and curl, both connecting to `destination`.
struct Case {
    rule: &'static str,
    server: &'static str,
    /// `HOST:PORT`, IPv6 hosts in brackets, as python's argument and in curl's URL.
    destination: &'static str,
    /// The getpeername() result python prints: `HOST PORT`.
    peer: &'static str,
    log_line: &'static str,
    summary: &'static str,
}

fn check_redirect(case: &Case) {
    let netns = Netns::new();
    let target = TcpServer::start(&netns, case.server);
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &["--rule", case.rule]);

    let python = cgroup.run(&python_line(&netns, TCP_CLIENT, &[case.destination]));
    assert_success("python", &python);
    let expected = format!("{} | served-by 3000 | {}", case.destination, case.peer);
    assert_eq!(
        stdout_of(&python).trim(),
        expected,
        "bypass:\n{}",
        bypass.stderr()
    );

    let url = format!("telnet://{}", case.destination);
    let curl = cgroup.run(&netns.command_line(&["curl", "-sS", "--max-time", "5", &url]));
    assert_success("curl", &curl);
    assert_eq!(stdout_of(&curl).trim(), "served-by 3000");
    assert!(
        bypass.wait_for_log(case.log_line),
        "no `{}` in:\n{}",
        case.log_line,
        bypass.stderr()
    );

    // Outside the cgroup, in the same namespace: nothing listens on the rule's port.
    let outside = run_outside(&python_line(&netns, TCP_CLIENT, &[case.destination]));
    assert!(
        !outside.status.success(),
        "outside reached: {}",
        stdout_of(&outside)
    );
    assert!(String::from_utf8_lossy(&outside.stderr).contains("ConnectionRefusedError"));

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(case.summary), "{stderr}");
    assert_eq!(target.accepted(), 2);
}

#[test]
fn dual_stack_clients_reach_ipv4_target() {
    if !require_root("dual_stack_clients_reach_ipv4_target") {
        return;
    }
    check_redirect(&Case {
        rule: "10.0.0.22:80=:3000",
        server: "10.0.0.22:3000",
        destination: "[::ffff:10.0.0.22]:80",
        peer: "::ffff:10.0.0.22 80",
        log_line: "redirect connect6 tcp ::ffff:10.0.0.22:80 -> ::ffff:10.0.0.22:3000 rule 0",
        summary: "2 hits: tcp/10.0.0.22:80=10.0.0.22:3000",
    });
}

#[test]
fn native_ipv6_rule_reaches_target() {
    if !require_root("native_ipv6_rule_reaches_target") {
        return;
    }
    check_redirect(&Case {
        rule: "[fd00::22]:80=:3000",
        server: "[fd00::22]:3000",
        destination: "[fd00::22]:80",
        peer: "fd00::22 80",
        log_line: "redirect connect6 tcp [fd00::22]:80 -> [fd00::22]:3000 rule 0",
        summary: "2 hits: tcp/[fd00::22]:80=[fd00::22]:3000",
    });
}
