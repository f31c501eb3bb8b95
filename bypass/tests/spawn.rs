//! A process that `run` or the check starts is inside the cgroup from its first instruction,
//! whether it was created there by `clone3` or moved there by the fallback.

mod support;

use std::{fs, time::Duration};

use bypass::spawn::{CgroupEntry, Forked};
use support::{TestCgroup, require_root, wait_until};

/// Starts a child with `fork`, reads the cgroup it runs in (at once, or after it has moved
/// when `wait_for` is given), then ends and reaps it.
fn child_cgroup(fork: impl FnOnce() -> std::io::Result<Forked>, wait_for: Option<&str>) -> String {
    let pid = match fork().expect("fork") {
        // SAFETY: the child only waits for a signal, async-signal-safe.
        Forked::Child { join_errno } => unsafe {
            if join_errno != 0 {
                libc::_exit(1);
            }
            loop {
                libc::pause();
            }
        },
        Forked::Parent(pid) => pid,
    };
    let path = format!("/proc/{pid}/cgroup");
    let mut membership = String::new();
    wait_until(Duration::from_secs(5), || {
        membership = fs::read_to_string(&path).unwrap_or_default();
        wait_for.is_none_or(|name| membership.trim_end().ends_with(name))
    });
    // SAFETY: our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn both_ways_start_the_child_inside_the_cgroup() {
    if !require_root("both_ways_start_the_child_inside_the_cgroup") {
        return;
    }
    let cgroup = TestCgroup::new();
    let entry = CgroupEntry::open(cgroup.path()).expect("open the test cgroup");
    let name = cgroup
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let name = format!("/{name}");

    // Born in the cgroup: inside at the first look.
    // SAFETY: the children only pause or exit (see `child_cgroup`).
    let cloned = child_cgroup(|| unsafe { entry.fork() }, None);
    assert!(cloned.ends_with(&name), "clone3 child in {cloned:?}");
    // SAFETY: as above.
    let moved = child_cgroup(|| unsafe { entry.fork_and_move() }, Some(&name));
    assert!(moved.ends_with(&name), "moved child in {moved:?}");
}
