//! getpeername() on a redirected socket reports the address the program asked for.

mod support;

use support::{
    Attached, Netns, TCP_CLIENT, TcpServer, TestCgroup, assert_success, python_line, require_root,
    run_outside, stdout_of,
};

#[test]
fn each_socket_reports_its_own_original_peer() {
    if !require_root("each_socket_reports_its_own_original_peer") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    // Two rules share one target: only the socket cookie distinguishes them.
    let rules = [
        "--rule",
        "10.0.0.22:80=:3000",
        "--rule",
        "10.0.0.99:8080=10.0.0.22:3000",
    ];
    let bypass = Attached::start(cgroup.path(), &rules);

    let targets = [
        "10.0.0.22:80",
        "10.0.0.99:8080",
        "[::ffff:10.0.0.22]:80",
        "[::ffff:10.0.0.99]:8080",
        "10.0.0.22:3000",
    ];
    let inside = cgroup.run(&python_line(&netns, TCP_CLIENT, &targets));
    assert_success("python in the cgroup", &inside);
    let expected = "\
10.0.0.22:80 | served-by 3000 | 10.0.0.22 80
10.0.0.99:8080 | served-by 3000 | 10.0.0.99 8080
[::ffff:10.0.0.22]:80 | served-by 3000 | ::ffff:10.0.0.22 80
[::ffff:10.0.0.99]:8080 | served-by 3000 | ::ffff:10.0.0.99 8080
10.0.0.22:3000 | served-by 3000 | 10.0.0.22 3000
";
    assert_eq!(stdout_of(&inside), expected, "bypass:\n{}", bypass.stderr());

    let outside = run_outside(&python_line(&netns, TCP_CLIENT, &["10.0.0.22:3000"]));
    assert_success("python outside", &outside);
    assert_eq!(
        stdout_of(&outside),
        "10.0.0.22:3000 | served-by 3000 | 10.0.0.22 3000\n"
    );

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("2 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 hits: tcp/10.0.0.99:8080=10.0.0.22:3000"),
        "{stderr}"
    );
    assert_eq!(target.accepted(), targets.len() + 1);
}
