//! Bad input: one clear line on stderr, exit status 2 for `attach` and 125 for `run`, and
//! nothing created or attached. Most cases fail before bypass needs root.

mod support;

use std::{fs, process::Output};

use support::{
    TempDir, TestCgroup, attached_programs, bypass, cgroup2_mount, require_root, subdirectories,
    text,
};

const USAGE: i32 = 2;
const RUN_FAILED: i32 = 125;

/// Asserts that `output` is exactly one stderr line, `line`, with status `code`.
fn assert_one_line(output: &Output, code: i32, line: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr, format!("{line}\n"), "not the one expected line");
}

/// Runs the same rule options with `run` and with `attach` and checks both reject them with
/// `line`.
fn assert_rejected(rule_args: &[&str], line: &str) {
    let mut run = vec!["run"];
    run.extend_from_slice(rule_args);
    run.extend(["--", "true"]);
    assert_one_line(&bypass(&run), RUN_FAILED, line);

    let mut attach = vec!["attach", "--cgroup", "/nonexistent-cgroup"];
    attach.extend_from_slice(rule_args);
    assert_one_line(&bypass(&attach), USAGE, line);
}

#[test]
fn rule_without_equals() {
    assert_rejected(
        &["-r", "garbage"],
        "bypass: invalid rule `garbage`: expected FROM=TO, e.g. 10.0.0.22:80=:3000 or \
         udp/10.0.0.53:53=127.0.0.1:5353",
    );
}

#[test]
fn invalid_address() {
    assert_rejected(
        &["--rule", "10.0.0.300:80=:3000"],
        "bypass: invalid rule `10.0.0.300:80=:3000`: `10.0.0.300` is not an IP address",
    );
}

#[test]
fn port_zero() {
    assert_rejected(
        &["-r", "10.0.0.22:0=:3000"],
        "bypass: invalid rule `10.0.0.22:0=:3000`: port 0 is out of range (1-65535)",
    );
}

#[test]
fn port_too_big() {
    assert_rejected(
        &["-r", "10.0.0.22:80=:99999"],
        "bypass: invalid rule `10.0.0.22:80=:99999`: port 99999 is out of range (1-65535)",
    );
}

#[test]
fn unknown_protocol() {
    assert_rejected(
        &["-r", "sctp/10.0.0.22:80=:3000"],
        "bypass: invalid rule `sctp/10.0.0.22:80=:3000`: unknown protocol `sctp` (expected \
         tcp or udp)",
    );
}

#[test]
fn rule_given_twice() {
    assert_rejected(
        &["-r", "10.0.0.22:80=:3000", "-r", "10.0.0.22:80=:4000"],
        "bypass: rule `tcp/10.0.0.22:80=10.0.0.22:4000` (--rule) has the same source as \
         `tcp/10.0.0.22:80=10.0.0.22:3000` (--rule); remove one of them",
    );
}

#[test]
fn rule_in_config_twice() {
    let dir = TempDir::new();
    let config = dir.file(
        "bypass.toml",
        "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n",
    );
    assert_rejected(
        &["-r", "10.0.0.22:80=:3000", "-c", &config],
        &format!(
            "bypass: rule `tcp/10.0.0.22:80=10.0.0.22:3000` ({config}:1) has the same source \
             as `tcp/10.0.0.22:80=10.0.0.22:3000` (--rule); remove one of them"
        ),
    );
}

#[test]
fn unreadable_config() {
    let dir = TempDir::new();
    let missing = dir.path().join("missing.toml").display().to_string();
    assert_rejected(
        &["--config", &missing],
        &format!(
            "bypass: cannot read config file {missing}: No such file or directory (os error 2)"
        ),
    );
}

#[test]
fn config_bad_rule_names_line() {
    let dir = TempDir::new();
    let config = dir.file(
        "bypass.toml",
        "# two rules\n[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n\n[[rule]]\n\
         from = \"10.0.0.22:81\"\nto = \":3001\"\nprotocol = \"sctp\"\n",
    );
    assert_rejected(
        &["-c", &config],
        &format!(
            "bypass: invalid rule in {config}, line 6: unknown protocol `sctp` (expected tcp or udp)"
        ),
    );
}

#[test]
fn config_syntax_names_line() {
    let dir = TempDir::new();
    let config = dir.file("bypass.toml", "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \n");
    assert_rejected(
        &["-c", &config],
        &format!(
            "bypass: invalid config file {config}, line 3: invalid string; expected `\"`, `'`"
        ),
    );
}

#[test]
fn config_without_rules_rejected() {
    let dir = TempDir::new();
    for (name, text) in [("empty.toml", ""), ("none.toml", "rule = []\n")] {
        let config = dir.file(name, text);
        assert_rejected(
            &["-c", &config],
            &format!(
                "bypass: config file {config} has no rules; add a [[rule]] table, or drop \
                 --config to use the default rule tcp/10.0.0.22:80=10.0.0.22:3000"
            ),
        );
    }
}

#[test]
fn attach_cgroup_missing() {
    let output = bypass(&["attach", "--cgroup", "/nonexistent-cgroup"]);
    assert_one_line(
        &output,
        USAGE,
        "bypass: cgroup directory /nonexistent-cgroup does not exist",
    );
}

#[test]
fn attach_cgroup_not_cgroup2() {
    let output = bypass(&["attach", "--cgroup", "/tmp"]);
    let mount = cgroup2_mount();
    let line = format!(
        "bypass: /tmp is not a cgroup v2 directory; give a directory under the cgroup v2 mount {}",
        mount.display()
    );
    assert_one_line(&output, USAGE, &line);
}

#[test]
fn attach_cgroup_root_refused() {
    let mount = cgroup2_mount().display().to_string();
    let output = bypass(&["attach", "--cgroup", &mount]);
    let line = format!(
        "bypass: {mount} is the root of the cgroup v2 hierarchy, so the redirect would apply to \
         every process on the host; pass --all-processes if that is what you want"
    );
    assert_one_line(&output, USAGE, &line);
}

#[test]
fn attach_needs_cgroup_option() {
    let output = bypass(&["attach", "-r", "10.0.0.22:80=:3000"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(USAGE), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: the following required arguments"),
        "stderr: {stderr}"
    );
}

#[test]
fn run_needs_command() {
    let output = bypass(&["run", "-r", "10.0.0.22:80=:3000"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(RUN_FAILED), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: the following required arguments"),
        "stderr: {stderr}"
    );
}

#[test]
fn run_unknown_option() {
    let output = bypass(&["run", "--no-such-option", "--", "true"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(RUN_FAILED), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: unexpected argument"),
        "stderr: {stderr}"
    );
}

#[test]
fn run_command_not_found() {
    let output = bypass(&["run", "--", "bypass-no-such-command"]);
    assert_one_line(
        &output,
        127,
        "bypass: command not found: bypass-no-such-command",
    );
}

#[test]
fn run_parent_not_cgroup2() {
    let output = bypass(&["run", "--parent-cgroup", "/tmp", "--", "true"]);
    let mount = cgroup2_mount();
    let line = format!(
        "bypass: /tmp is not a cgroup v2 directory; give a directory under the cgroup v2 mount {}",
        mount.display()
    );
    assert_one_line(&output, RUN_FAILED, &line);
}

#[test]
fn run_parent_missing() {
    let output = bypass(&[
        "run",
        "--parent-cgroup",
        "/nonexistent-cgroup",
        "--",
        "true",
    ]);
    assert_one_line(
        &output,
        RUN_FAILED,
        "bypass: cgroup directory /nonexistent-cgroup does not exist",
    );
}

const NOT_ROOT: &str = "bypass: permission denied: loading eBPF programs needs CAP_BPF and \
                        CAP_NET_ADMIN (or CAP_SYS_ADMIN); run as root, e.g. with sudo";

/// Runs bypass as user and group 65534 with no supplementary groups and no capabilities.
fn bypass_unprivileged(args: &[&str]) -> Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            support::BYPASS,
        ])
        .args(args)
        .output()
        .expect("run setpriv")
}

#[test]
fn run_not_root() {
    if !require_root("run_not_root") {
        return;
    }
    let parent = TestCgroup::new();
    let parent_dir = parent.path().display().to_string();
    let output = bypass_unprivileged(&["run", "--parent-cgroup", &parent_dir, "--", "true"]);
    assert_one_line(&output, RUN_FAILED, NOT_ROOT);
    assert_eq!(
        subdirectories(parent.path()),
        Vec::<String>::new(),
        "a cgroup was created"
    );
}

#[test]
fn attach_not_root() {
    if !require_root("attach_not_root") {
        return;
    }
    let cgroup = TestCgroup::new();
    let dir = cgroup.path().display().to_string();
    let output = bypass_unprivileged(&["attach", "--cgroup", &dir, "-r", "10.0.0.22:80=:3000"]);
    assert_one_line(&output, 1, NOT_ROOT);
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<String>::new(),
        "something attached"
    );
}

#[test]
fn failed_create_leaves_nothing() {
    if !require_root("failed_create_leaves_nothing") {
        return;
    }
    let parent = TestCgroup::new();
    // The kernel rejects any child cgroup here, so creation fails after bypass loaded its programs.
    fs::write(parent.path().join("cgroup.max.descendants"), "0").expect("limit descendants");
    let parent_dir = parent.path().display().to_string();
    let output = bypass(&["-q", "run", "--parent-cgroup", &parent_dir, "--", "true"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(RUN_FAILED), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.starts_with("bypass: cannot create cgroup"),
        "stderr: {stderr}"
    );
    assert_eq!(
        subdirectories(parent.path()),
        Vec::<String>::new(),
        "a cgroup was left"
    );
    assert_eq!(
        attached_programs(parent.path()),
        Vec::<String>::new(),
        "something attached"
    );
}

#[test]
fn too_many_rules() {
    if !require_root("too_many_rules") {
        return;
    }
    let cgroup = TestCgroup::new();
    let dir = cgroup.path().display().to_string();
    let rules = [
        "--max-rules",
        "1",
        "-r",
        "10.0.0.22:80=:3000",
        "-r",
        "10.0.0.22:81=:3000",
    ];
    let line = "bypass: too many rules: 2 given, but the maps hold 1; raise the limit with \
                --max-rules";

    let mut attach = vec!["attach", "--cgroup", &dir];
    attach.extend(rules);
    assert_one_line(&bypass(&attach), USAGE, line);
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<String>::new(),
        "something attached"
    );

    let mut run = vec!["run", "--parent-cgroup", &dir];
    run.extend(rules);
    run.extend(["--", "true"]);
    assert_one_line(&bypass(&run), RUN_FAILED, line);
    assert_eq!(
        subdirectories(cgroup.path()),
        Vec::<String>::new(),
        "a cgroup was created"
    );
}
