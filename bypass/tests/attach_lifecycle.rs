//! `bypass attach` ends cleanly: on SIGTERM and SIGINT it exits 0 with the hit summary and
//! leaves no program attached, so the cgroup's connections are no longer redirected.

mod support;

use support::{
    Attached, Netns, TcpServer, TestCgroup, attached_programs, require_root, tcp_client, text,
};

fn stop_detaches(test: &str, signal: i32, name: &str) {
    if !require_root(test) {
        return;
    }
    let netns = Netns::new();
    let cgroup = TestCgroup::new();
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let attached = Attached::start(cgroup.path(), &["-r", "10.0.0.22:80=:3000"]);
    let client = tcp_client(&netns, "10.0.0.22", 80, 2);

    let programs = attached_programs(cgroup.path());
    let stderr = attached.stderr();
    assert!(
        programs.iter().any(|p| p == "connect4"),
        "not attached: {programs:?}; {stderr}"
    );
    assert!(
        programs.iter().any(|p| p == "connect6"),
        "not attached: {programs:?}; {stderr}"
    );
    let before = cgroup.run(&client);
    assert_eq!(text(&before.stdout).lines().count(), 2, "stderr: {stderr}");
    assert!(
        text(&before.stdout).lines().all(|l| l == "served-by 3000"),
        "stderr: {stderr}"
    );

    let (status, stderr) = attached.stop_with(signal);
    assert_eq!(
        status.code(),
        Some(0),
        "bypass attach exited with {status}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{name} received; detaching")),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("2 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("detached from"), "stderr: {stderr}");
    let programs = attached_programs(cgroup.path());
    assert!(
        programs.is_empty(),
        "still attached: {programs:?}; {stderr}"
    );
    let after = cgroup.run(&client);
    assert!(
        text(&after.stdout).lines().all(|l| l == "refused"),
        "still redirected after exit: {}; bypass: {stderr}",
        text(&after.stdout)
    );
}

#[test]
fn sigterm_detaches_attach() {
    stop_detaches("sigterm_detaches_attach", libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_detaches_attach() {
    stop_detaches("sigint_detaches_attach", libc::SIGINT, "SIGINT");
}

#[test]
fn sigkill_leaves_nothing_attached() {
    if !require_root("sigkill_leaves_nothing_attached") {
        return;
    }
    let cgroup = TestCgroup::new();
    let attached = Attached::start(cgroup.path(), &["-r", "10.0.0.22:80=:3000"]);
    assert!(
        !attached_programs(cgroup.path()).is_empty(),
        "bypass: {}",
        attached.stderr()
    );

    let (status, stderr) = attached.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None, "not killed: {status}; {stderr}");
    // The kernel frees the links with the last file descriptor; that may take a moment.
    assert!(
        support::wait_until(std::time::Duration::from_secs(10), || attached_programs(
            cgroup.path()
        )
        .is_empty()),
        "still attached after SIGKILL: {:?}",
        attached_programs(cgroup.path())
    );
}

#[test]
fn udp_programs_only_when_rules_need_them() {
    if !require_root("udp_programs_only_when_rules_need_them") {
        return;
    }
    let udp_programs = ["sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"];
    let config = support::TempFile::with_bytes(
        "bypass-tcp-only.toml",
        b"[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n",
    );
    let config_path = config.path().to_str().expect("utf-8 path").to_owned();
    let cases: [(&[&str], bool); 3] = [
        // Fixed TCP rules: UDP traffic runs no bypass program.
        (&["-r", "10.0.0.22:80=:3000"], false),
        (&["-r", "udp/10.0.0.22:53=:5353"], true),
        // A SIGHUP reload of the config may add UDP rules later.
        (&["-c", &config_path], true),
    ];
    for (args, expected) in cases {
        let cgroup = TestCgroup::new();
        let attached = Attached::start(cgroup.path(), args);
        let programs = attached_programs(cgroup.path());
        for name in udp_programs {
            assert_eq!(
                programs.iter().any(|p| p == name),
                expected,
                "{name} with {args:?}: {programs:?}; {}",
                attached.stderr()
            );
        }
        assert!(programs.iter().any(|p| p == "connect4"), "{programs:?}");
        let (status, stderr) = attached.stop_with(libc::SIGTERM);
        assert_eq!(status.code(), Some(0), "{stderr}");
    }
}
