//! The cgroup an `attach` applies to: `--cgroup DIR` or the cgroup of `--pid PID`.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::cgroup::{self, CgroupError};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {pid}; check the pid, e.g. with `pgrep -a NAME`")]
    NoProcess { pid: u32 },
    #[error(
        "process {pid} has exited, so its cgroup is unknown; give a running process or \
         --cgroup DIR"
    )]
    Exited { pid: u32 },
    #[error("cannot read /proc/{pid}/cgroup")]
    Read { pid: u32, source: io::Error },
    #[error(
        "process {pid} has no cgroup v2 entry in /proc/{pid}/cgroup; it lives in a cgroup v1 \
         hierarchy only, give --cgroup DIR instead"
    )]
    NoCgroup2 { pid: u32 },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Returns the canonical cgroup v2 directory of `--cgroup` or `--pid`, refusing the root of
/// the hierarchy unless `all_processes` is set.
pub fn resolve(
    cgroup: Option<&Path>,
    pid: Option<u32>,
    mount: &Path,
    all_processes: bool,
) -> Result<PathBuf, TargetError> {
    let dir = match (cgroup, pid) {
        (Some(dir), _) => dir.to_owned(),
        (None, Some(pid)) => cgroup_of_pid(pid, mount)?,
        (None, None) => unreachable!("clap requires --cgroup or --pid"),
    };
    Ok(cgroup::check_dir(&dir, mount, all_processes)?)
}

/// Returns the cgroup v2 directory of process `pid`, under `mount`.
pub fn cgroup_of_pid(pid: u32, mount: &Path) -> Result<PathBuf, TargetError> {
    let started = crate::record::process_start(pid);
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|source| match source
        .kind()
    {
        io::ErrorKind::NotFound => TargetError::NoProcess { pid },
        _ => TargetError::Read { pid, source },
    })?;
    // A process that has exited (a zombie) shows the root cgroup: check after the read
    // that it was still the same, running process.
    if started.is_none() || !is_running(pid) || crate::record::process_start(pid) != started {
        return Err(TargetError::Exited { pid });
    }
    let relative = cgroup::parse_proc_cgroup(&text).ok_or(TargetError::NoCgroup2 { pid })?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// Returns whether process `pid` exists and has not exited: its state in `/proc/PID/stat` is
/// neither zombie (`Z`) nor dead (`X`).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Returns the cgroup id of a cgroup v2 directory: its inode number, which is what the
/// kernel reports as the cgroup id. `None` when the directory is gone.
pub fn cgroup_id(dir: &Path) -> Option<u64> {
    fs::metadata(dir).ok().map(|meta| meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_resolves_to_own_cgroup() {
        let Ok(mount) = cgroup::find_mount() else {
            return;
        };
        let own = cgroup::own_cgroup(&mount).expect("own cgroup");
        let by_pid = cgroup_of_pid(std::process::id(), &mount).expect("cgroup of own pid");
        assert_eq!(by_pid, own);
    }

    #[test]
    fn missing_pid_is_a_clear_error() {
        let err = cgroup_of_pid(u32::MAX - 1, Path::new("/sys/fs/cgroup")).unwrap_err();
        assert!(matches!(err, TargetError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains("no process with pid"));
    }
}
