//! The reverse map keeps one entry per open redirected socket: `sock_release` deletes it when
//! the socket is closed, so the map never fills with closed sockets.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use support::{
    Attached, Netns, TcpServer, TestCgroup, assert_success, attached_program_ids, client_argv,
    client_tally, program_map_ids, require_root, stdout_of, wait_until,
};

/// Python that connects to 10.0.0.22:80, prints `open`, and closes when stdin closes.
const HOLD_OPEN: &str = r#"
import socket, sys
s = socket.create_connection(("10.0.0.22", 80), timeout=5)
print("open", flush=True)
sys.stdin.read()
s.close()
"#;

/// Returns the id of the reverse map of the programs attached to `cgroup`.
fn origins_map(cgroup: &std::path::Path) -> u32 {
    let programs = attached_program_ids(cgroup);
    programs
        .iter()
        .flat_map(|&program| program_map_ids(program))
        .find(|&map| {
            let output = Command::new("bpftool")
                .args(["map", "show", "id", &map.to_string()])
                .output()
                .expect("run bpftool");
            String::from_utf8_lossy(&output.stdout).contains("name ORIGINS")
        })
        .expect("an ORIGINS map used by the attached programs")
}

/// Returns the number of entries in map `id`.
fn entries(id: u32) -> usize {
    let output = Command::new("bpftool")
        .args(["map", "dump", "id", &id.to_string(), "--json"])
        .output()
        .expect("run bpftool");
    String::from_utf8_lossy(&output.stdout)
        .matches("\"key\":")
        .count()
}

#[test]
fn closed_sockets_leave_no_entry() {
    if !require_root("closed_sockets_leave_no_entry") {
        return;
    }
    let netns = Netns::new();
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &["--rule", "10.0.0.22:80=:3000"]);
    let origins = origins_map(cgroup.path());
    assert_eq!(entries(origins), 0, "entries before any connect");

    let mut holder = cgroup
        .command(&netns.command_line(&["python3", "-c", HOLD_OPEN]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the python client");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read from the python client");
    assert_eq!(line.trim(), "open", "bypass:\n{}", bypass.stderr());
    assert_eq!(
        entries(origins),
        1,
        "entries with one redirected socket open"
    );

    drop(holder.stdin.take());
    assert!(holder.wait().expect("wait for the python client").success());
    assert!(
        wait_until(Duration::from_secs(5), || entries(origins) == 0),
        "the entry of the closed socket is still there"
    );

    let burst = cgroup.run(&client_argv(&netns, "10.0.0.22:80", 500, 2, "burst"));
    assert_success("the connect burst", &burst);
    assert_eq!(
        client_tally(&stdout_of(&burst)).get("connected"),
        Some(&500),
        "{}",
        stdout_of(&burst)
    );
    assert!(
        wait_until(Duration::from_secs(5), || entries(origins) == 0),
        "{} entries left after 500 closed sockets",
        entries(origins)
    );

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("501 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "{stderr}"
    );
}
