//! Which sockets the redirect applies to: those created in the target cgroup or below it, and
//! nothing else. Connects that match no rule are left as they are.

mod support;

use std::path::Path;

use support::{
    Attached, Netns, TcpServer, TestCgroup, client_argv, client_tally, require_root, wait_until,
};

const CONNECTS: u64 = 3;

/// Returns where a client's connects went, from its output: `(served-by PORT, count)`.
fn destinations(output: std::process::Output) -> Vec<(String, u64)> {
    assert!(
        output.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
    tally
        .into_iter()
        .filter(|(key, _)| key != "connects")
        .collect()
}

fn served_by(port: u16) -> Vec<(String, u64)> {
    vec![(format!("served-by {port}"), CONNECTS)]
}

#[test]
fn redirects_only_target_cgroup_and_descendants() {
    if !require_root("redirects_only_target_cgroup_and_descendants") {
        return;
    }
    let netns = Netns::new();
    let _original = TcpServer::start(&netns, "10.0.0.22:80");
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let parent = TestCgroup::new();
    let sibling = TestCgroup::under(parent.path());
    let attached_to = TestCgroup::under(parent.path());
    let nested = TestCgroup::under(attached_to.path());
    let deeper = TestCgroup::under(nested.path());
    let bypass = Attached::start(attached_to.path(), &[]);

    let client = client_argv(&netns, "10.0.0.22:80", CONNECTS, 1, "tally");
    assert_eq!(
        destinations(attached_to.run(&client)),
        served_by(3000),
        "target cgroup"
    );
    assert_eq!(
        destinations(nested.run(&client)),
        served_by(3000),
        "child cgroup"
    );
    assert_eq!(
        destinations(deeper.run(&client)),
        served_by(3000),
        "grandchild cgroup"
    );
    assert_eq!(
        destinations(sibling.run(&client)),
        served_by(80),
        "sibling cgroup"
    );
    assert_eq!(
        destinations(parent.run(&client)),
        served_by(80),
        "parent cgroup"
    );
    let host = std::process::Command::new(&client[0])
        .args(&client[1..])
        .output();
    assert_eq!(
        destinations(host.expect("run client")),
        served_by(80),
        "test's own cgroup"
    );

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("9 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "{stderr}"
    );
}

/// Creates a socket, moves itself to MOVE_TO (a cgroup.procs file), creates a second one,
/// then connects both to 10.0.0.22:80 and prints where each went.
const MOVE_BETWEEN_SOCKETS: &str = r#"
import os, socket, sys
def where(s):
    s.settimeout(5)
    s.connect(("10.0.0.22", 80))
    reply = s.makefile().readline().strip()
    s.close()
    return reply
first = socket.socket()
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
second = socket.socket()
print("before-move", where(first))
print("after-move", where(second))
"#;

fn move_between_sockets(netns: &Netns, start_in: &TestCgroup, move_to: &Path) -> String {
    let procs = move_to.join("cgroup.procs");
    let argv = netns.command_line(&[
        "python3",
        "-c",
        MOVE_BETWEEN_SOCKETS,
        procs.to_str().expect("utf-8 cgroup path"),
    ]);
    let output = start_in.run(&argv);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn socket_keeps_cgroup_of_its_creation() {
    if !require_root("socket_keeps_cgroup_of_its_creation") {
        return;
    }
    let netns = Netns::new();
    let _original = TcpServer::start(&netns, "10.0.0.22:80");
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let outside = TestCgroup::new();
    let inside = TestCgroup::new();
    let _bypass = Attached::start(inside.path(), &[]);

    // Created outside, connected after the process joined: not redirected.
    let joined = move_between_sockets(&netns, &outside, inside.path());
    assert_eq!(
        joined,
        "before-move served-by 80\nafter-move served-by 3000\n"
    );

    // Created inside, connected after the process left: still redirected.
    let left = move_between_sockets(&netns, &inside, outside.path());
    assert_eq!(
        left,
        "before-move served-by 3000\nafter-move served-by 80\n"
    );
}

#[test]
fn unmatched_connects_are_untouched() {
    if !require_root("unmatched_connects_are_untouched") {
        return;
    }
    let netns = Netns::new();
    let other = TcpServer::start(&netns, "10.0.0.22:8080");
    let cgroup = TestCgroup::new();
    // A rule whose target has no server, beside the destinations without a rule.
    let _bypass = Attached::start(cgroup.path(), &["--rule", "10.0.0.22:80=:3999"]);

    let run = |target: &str| {
        let output = cgroup.run(&client_argv(&netns, target, 2, 1, "tally"));
        let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
        tally
            .into_iter()
            .filter(|(key, _)| key != "connects")
            .collect::<Vec<_>>()
    };
    assert_eq!(run("10.0.0.22:8080"), [("served-by 8080".to_owned(), 2)]);
    assert_eq!(other.accepted(), 2);
    // No rule and no server: refused by the kernel, never EPERM from bypass.
    assert_eq!(run("10.0.0.22:81"), [("error ECONNREFUSED".to_owned(), 2)]);
    // A rule whose target is down: refused like any connect to a closed port.
    assert_eq!(run("10.0.0.22:80"), [("error ECONNREFUSED".to_owned(), 2)]);
    assert!(wait_until(std::time::Duration::from_secs(1), || other
        .accepted()
        == 2));
}
