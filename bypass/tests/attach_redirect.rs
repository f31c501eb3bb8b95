//! `bypass attach`: processes in the cgroup are redirected, other processes in the same
//! network namespace are not.

mod support;

use support::{
    Attached, Netns, TcpServer, TestCgroup, require_root, run_outside, tcp_client, text,
};

const RULE: &str = "10.0.0.22:80=:3000";

#[test]
fn member_redirected_outsider_not() {
    if !require_root("member_redirected_outsider_not") {
        return;
    }
    let netns = Netns::new();
    let cgroup = TestCgroup::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let original = TcpServer::start(&netns, "10.0.0.22:80");
    let attached = Attached::start(cgroup.path(), &["-r", RULE]);

    let client = tcp_client(&netns, "10.0.0.22", 80, 1);
    let inside = cgroup.run(&client);
    let outside = text(&run_outside(&client).stdout);

    let stderr = attached.stderr();
    assert_eq!(
        text(&inside.stdout).trim(),
        "served-by 3000",
        "member; bypass: {stderr}"
    );
    assert_eq!(
        outside.trim(),
        "served-by 80",
        "outsider was redirected; bypass: {stderr}"
    );
    assert_eq!(
        (target.accepted(), original.accepted()),
        (1, 1),
        "bypass: {stderr}"
    );
    assert!(
        attached.wait_for_log("redirect connect4 tcp 10.0.0.22:80 -> 10.0.0.22:3000 rule 0"),
        "no hit log line in: {}",
        attached.stderr()
    );
}

#[test]
fn outsider_gets_refused() {
    if !require_root("outsider_gets_refused") {
        return;
    }
    let netns = Netns::new();
    let cgroup = TestCgroup::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let attached = Attached::start(cgroup.path(), &["-r", RULE]);

    let client = tcp_client(&netns, "10.0.0.22", 80, 1);
    let outside = text(&run_outside(&client).stdout);
    let inside = cgroup.run(&client);

    let stderr = attached.stderr();
    assert_eq!(
        outside.trim(),
        "refused",
        "outsider was redirected; bypass: {stderr}"
    );
    assert_eq!(
        text(&inside.stdout).trim(),
        "served-by 3000",
        "member; bypass: {stderr}"
    );
    assert_eq!(target.accepted(), 1, "bypass: {stderr}");
    let (status, stderr) = attached.stop_with(libc::SIGTERM);
    assert!(
        status.success(),
        "bypass attach exited with {status}: {stderr}"
    );
    assert!(
        stderr.contains("1 hit: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );
}

#[test]
fn child_cgroup_is_redirected() {
    if !require_root("child_cgroup_is_redirected") {
        return;
    }
    let netns = Netns::new();
    let cgroup = TestCgroup::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let attached = Attached::start(cgroup.path(), &["-r", RULE]);
    let child = TestCgroup::under(cgroup.path());

    let inside = child.run(&tcp_client(&netns, "10.0.0.22", 80, 1));

    let stderr = attached.stderr();
    assert_eq!(
        text(&inside.stdout).trim(),
        "served-by 3000",
        "bypass: {stderr}"
    );
    assert_eq!(target.accepted(), 1, "bypass: {stderr}");
    drop(child);
}
