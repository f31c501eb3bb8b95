//! The check after attaching: it passes on a normal cgroup and fails, leaving nothing
//! attached or pinned, where no test process can connect.

mod support;

use std::{fs, path::Path};

use support::{Attached, TestCgroup, attached_programs, bypass, require_root, unique_name};

#[test]
fn verify_passes_on_a_leaf_cgroup() {
    if !require_root("verify_passes_on_a_leaf_cgroup") {
        return;
    }
    let cgroup = TestCgroup::new();
    let attached = Attached::start(cgroup.path(), &["-r", "10.0.0.22:80=:3000"]);
    let expected = format!(
        "checked: a process in {} is redirected",
        cgroup.path().display()
    );
    assert!(
        attached.stderr().contains(&expected),
        "{}",
        attached.stderr()
    );
    let (status, stderr) = attached.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("0 hits: tcp/10.0.0.22:80=10.0.0.22:3000"),
        "the temporary rule leaked into the summary: {stderr}"
    );
}

/// A frozen cgroup: unfrozen on drop, before the cgroup itself is removed.
struct Frozen<'a>(&'a Path);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.freeze"), "0");
    }
}

#[test]
fn verify_failure_leaves_nothing_behind() {
    if !require_root("verify_failure_leaves_nothing_behind") {
        return;
    }
    let cgroup = TestCgroup::new();
    fs::write(cgroup.path().join("cgroup.freeze"), "1").expect("freeze the cgroup");
    let _frozen = Frozen(cgroup.path());
    let name = unique_name("t");
    let pin_dir = Path::new("/sys/fs/bpf/bypass").join(&name);

    let output = bypass(&[
        "attach",
        "--pin",
        &name,
        "--cgroup",
        cgroup.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let leaked_pin = pin_dir.exists();
    if leaked_pin {
        let _ = bypass(&["detach", &name]);
    }
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not connect within"), "{stderr}");
    assert!(stderr.contains("pass --no-verify"), "{stderr}");
    assert!(!leaked_pin, "a failed check left a pin");
    assert!(
        attached_programs(cgroup.path()).is_empty(),
        "a failed check left programs attached"
    );

    let skipped = bypass(&[
        "attach",
        "--pin",
        &name,
        "--no-verify",
        "--cgroup",
        cgroup.path().to_str().unwrap(),
    ]);
    assert!(
        skipped.status.success(),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    let detached = bypass(&["detach", &name]);
    assert!(
        detached.status.success(),
        "{}",
        String::from_utf8_lossy(&detached.stderr)
    );
}
