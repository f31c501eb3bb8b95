//! `bypass check` against the real kernel, and with cgroup v2 or root missing.

mod support;

use std::{fs, process::Command};

use support::{BYPASS, bypass, require_root, unique_name};

fn lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_passes_on_this_host() {
    if !require_root("check_passes_on_this_host") {
        return;
    }
    let output = bypass(&["check"]);
    let report = lines(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{report:#?}");
    for what in [
        "kernel",
        "capabilities",
        "bpf syscall",
        "cgroup v2",
        "program connect4",
        "BTF",
    ] {
        let found = report.iter().find(|line| line[5..].starts_with(what));
        let found = found.unwrap_or_else(|| panic!("no `{what}` line in {report:#?}"));
        assert!(found.starts_with("OK"), "{found}");
    }
}

#[test]
fn check_fails_without_cgroup2() {
    if !require_root("check_fails_without_cgroup2") {
        return;
    }
    let mountinfo = std::env::temp_dir().join(unique_name("bypass-mountinfo"));
    fs::write(&mountinfo, "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n").expect("write");
    let output = bypass(&["check", "--mountinfo", mountinfo.to_str().expect("utf-8")]);
    let _ = fs::remove_file(&mountinfo);

    let report = lines(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report:#?}");
    let failed: Vec<&String> = report
        .iter()
        .filter(|line| line.starts_with("FAIL"))
        .collect();
    assert_eq!(failed.len(), 1, "{report:#?}");
    assert!(
        failed[0].starts_with("FAIL cgroup v2: no cgroup v2 file system"),
        "{}",
        failed[0]
    );
    assert!(
        failed[0].contains("mount -t cgroup2"),
        "the line names no fix: {}",
        failed[0]
    );
}

#[test]
fn check_fails_without_root() {
    if !require_root("check_fails_without_root") {
        return;
    }
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BYPASS,
            "check",
        ])
        .output()
        .expect("run setpriv");
    let report = lines(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report:#?}");
    let capabilities = report
        .iter()
        .find(|line| line.contains("capabilities:"))
        .expect("line");
    assert!(capabilities.starts_with("FAIL"), "{capabilities}");
    assert!(
        capabilities.contains("run as root, e.g. with sudo"),
        "{capabilities}"
    );
    let bpf = report
        .iter()
        .find(|line| line.contains("bpf syscall:"))
        .expect("line");
    assert!(bpf.starts_with("FAIL"), "{bpf}");
    let cgroup = report
        .iter()
        .find(|line| line.contains("cgroup v2:"))
        .expect("line");
    assert!(cgroup.starts_with("OK"), "{cgroup}");
}

#[test]
fn pin_commands_need_root() {
    if !require_root("pin_commands_need_root") {
        return;
    }
    for (args, command) in [
        (&["status"][..], "status"),
        (&["detach", "x"][..], "detach"),
        (&["gc"][..], "gc"),
        (&["rules", "add", "x", "10.0.0.22:80=:3000"][..], "rules"),
    ] {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BYPASS])
            .args(args)
            .output()
            .expect("run setpriv");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        let expected = format!("`bypass {command}` needs root");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
}

/// `bypass check | head -1` and the like: a reader that went away is not a crash.
#[test]
fn closed_stdout_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    for args in [&["check"][..], &["status"][..], &["status", "--json"][..]] {
        let output = Command::new(BYPASS)
            .args(args)
            .stdout(writer.try_clone().expect("clone pipe"))
            .output()
            .expect("run bypass");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(output.status.code(), Some(101), "{args:?}: {stderr}");
    }
}
