//! Faults around the loader: its cgroup removed or replaced while attached, more rules than
//! the maps can contain, a private cgroup namespace, and no BPF file system.

mod support;

use std::{
    fs,
    os::unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use support::{
    Attached, BYPASS, Netns, TcpServer, TempFile, TestCgroup, attached_program_ids, cgroup_id,
    cgroup2_mount, client_argv, client_tally, link_cgroup_ids, program_exists, require_root,
    wait_until,
};

/// Checks that `attach` ended by itself after its cgroup went, detached, and gave the reason.
fn assert_ended_by_removal(bypass: Attached, cgroup: &str, programs: &[u32]) {
    let (status, stderr) = bypass.wait();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let reason =
        format!("bypass: cgroup {cgroup} was removed while attached; the redirect ended with it");
    assert_eq!(stderr.lines().last(), Some(reason.as_str()), "{stderr}");
    assert!(
        stderr.contains(&format!("detached from {cgroup}")),
        "{stderr}"
    );
    assert!(!stderr.contains("ERROR"), "{stderr}");
    let unloaded = wait_until(Duration::from_secs(5), || {
        !programs.iter().any(|&id| program_exists(id))
    });
    assert!(unloaded, "programs {programs:?} still loaded");
}

#[test]
fn removed_cgroup_ends_attach_cleanly() {
    if !require_root("removed_cgroup_ends_attach_cleanly") {
        return;
    }
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &[]);
    let programs = attached_program_ids(cgroup.path());
    fs::remove_dir(cgroup.path()).expect("rmdir an empty cgroup with programs attached");
    assert_ended_by_removal(bypass, &cgroup.path().display().to_string(), &programs);
}

#[test]
fn recreated_cgroup_is_not_mistaken() {
    if !require_root("recreated_cgroup_is_not_mistaken") {
        return;
    }
    let cgroup = TestCgroup::new();
    let bypass = Attached::start(cgroup.path(), &[]);
    let programs = attached_program_ids(cgroup.path());
    let old_id = cgroup_id(cgroup.path());
    fs::remove_dir(cgroup.path()).expect("rmdir");
    fs::create_dir(cgroup.path()).expect("mkdir again");
    assert_ne!(cgroup_id(cgroup.path()), old_id);

    assert_ended_by_removal(bypass, &cgroup.path().display().to_string(), &programs);
    assert_eq!(attached_program_ids(cgroup.path()), Vec::<u32>::new());
}

/// Writes a config file with `count` distinct rules.
fn config_with_rules(count: u16) -> TempFile {
    let text: String = (0..count)
        .map(|i| format!("[[rule]]\nfrom = \"10.0.1.{}:80\"\nto = \":3000\"\n", i + 1))
        .collect();
    TempFile::with_bytes("bypass-config", text.as_bytes())
}

/// Lists the directories in `dir`.
fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|err| panic!("ls {}: {err}", dir.display()));
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect()
}

#[test]
fn more_rules_than_max_is_rejected() {
    if !require_root("more_rules_than_max_is_rejected") {
        return;
    }
    let cgroup = TestCgroup::new();
    let config = config_with_rules(5);
    let expected = "bypass: too many rules: 5 given, but the maps hold 4; raise the limit with \
                    --max-rules\n";

    let mut attach = Command::new(BYPASS);
    attach
        .args(["attach", "--max-rules", "4", "--cgroup"])
        .arg(cgroup.path());
    let output = attach
        .arg("--config")
        .arg(config.path())
        .output()
        .expect("run bypass");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected);
    assert_eq!(attached_program_ids(cgroup.path()), Vec::<u32>::new());

    let mut run = Command::new(BYPASS);
    run.args(["run", "--max-rules", "4", "--parent-cgroup"])
        .arg(cgroup.path());
    let output = run
        .arg("--config")
        .arg(config.path())
        .args(["--", "true"])
        .output();
    let output = output.expect("run bypass");
    assert_eq!(output.status.code(), Some(125));
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected);
    assert_eq!(subdirectories(cgroup.path()), Vec::<PathBuf>::new());

    // Exactly at the limit is fine.
    let config = config_with_rules(4);
    let mut run = Command::new(BYPASS);
    run.args(["-q", "run", "--max-rules", "4", "--parent-cgroup"])
        .arg(cgroup.path());
    let output = run
        .arg("--config")
        .arg(config.path())
        .args(["--", "true"])
        .output();
    assert!(output.expect("run bypass").status.success());
}

/// Runs `argv` under `unshare -C`, in a new cgroup namespace rooted at `cgroup`.
fn in_private_cgroupns(cgroup: &TestCgroup, argv: &[&str]) -> Command {
    let mut line = vec!["unshare".to_owned(), "--cgroup".to_owned()];
    line.extend(argv.iter().map(|arg| (*arg).to_owned()));
    cgroup.command(&line)
}

#[test]
fn private_cgroupns_run_is_rejected() {
    if !require_root("private_cgroupns_run_is_rejected") {
        return;
    }
    let home = TestCgroup::new();
    let before = subdirectories(&cgroup2_mount());
    let child = in_private_cgroupns(&home, &[BYPASS, "-q", "run", "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare");
    // unshare execs bypass in the same process, and bypass names its cgroups bypass-PID-...
    let own_prefix = format!("bypass-{}-", child.id());
    let output: Output = child.wait_with_output().expect("wait for unshare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.starts_with(
            "bypass: cgroup paths from /proc cannot be used: this process's cgroup \
                            namespace is rooted below the top of the cgroup v2 mount"
        ),
        "{stderr:?}"
    );
    assert!(stderr.contains("pass --parent-cgroup DIR"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // Nothing was made at the top of the hierarchy, where /proc/self/cgroup's "/" would lead.
    let made: Vec<PathBuf> = subdirectories(&cgroup2_mount())
        .into_iter()
        .filter(|path| !before.contains(path))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.as_bytes().starts_with(own_prefix.as_bytes()))
        })
        .collect();
    assert!(made.is_empty(), "run made {made:?}");
}

#[test]
fn private_cgroupns_attach_hits_given_cgroup() {
    if !require_root("private_cgroupns_attach_hits_given_cgroup") {
        return;
    }
    let netns = Netns::new();
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let home = TestCgroup::new();
    let target = TestCgroup::new();
    let target_arg = target.path().to_str().expect("utf-8 path");
    let bypass = Attached::spawn(in_private_cgroupns(
        &home,
        &[BYPASS, "attach", "--cgroup", target_arg],
    ));

    let programs = attached_program_ids(target.path());
    assert!(!programs.is_empty());
    let links = link_cgroup_ids(&programs);
    assert_eq!(
        links,
        vec![cgroup_id(target.path()); programs.len()],
        "cgroup ids of our links"
    );
    assert_eq!(attached_program_ids(home.path()), Vec::<u32>::new());
    let output = target.run(&client_argv(&netns, "10.0.0.22:80", 1, 1, "tally"));
    let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(tally.get("served-by 3000"), Some(&1), "{tally:?}");
    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
}

#[test]
fn works_without_bpf_filesystem() {
    if !require_root("works_without_bpf_filesystem") {
        return;
    }
    let netns = Netns::new();
    let _target = TcpServer::start(&netns, "10.0.0.22:3000");
    let parent = TestCgroup::new();
    let client = client_argv(&netns, "10.0.0.22:80", 1, 1, "tally");
    // In a private mount namespace, with any bpffs mount taken away.
    let script = "umount -q /sys/fs/bpf 2>/dev/null; ! grep -q ' bpf ' /proc/self/mounts || \
                  exit 99; exec \"$@\"";
    let mut command = Command::new("unshare");
    command.args([
        "--mount",
        "sh",
        "-c",
        script,
        "sh",
        BYPASS,
        "run",
        "--parent-cgroup",
    ]);
    let output = command
        .arg(parent.path())
        .arg("--")
        .args(&client)
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "status {:?}: {stderr}",
        output.status.signal()
    );
    let tally = client_tally(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(tally.get("served-by 3000"), Some(&1), "{stderr}");
}
