//! Finding the cgroup v2 hierarchy, checking cgroup directories, and the child cgroup that
//! `bypass run` creates for its command.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// `f_type` that `statfs` reports for a cgroup v2 file system (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How long the child cgroup's removal waits for its last processes to leave.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 file system is mounted (looked in /proc/self/mountinfo); bypass needs \
         cgroup v2, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoMount,
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("this process has no cgroup v2 entry in /proc/self/cgroup; pass --parent-cgroup DIR")]
    NoOwnCgroup,
    #[error("cgroup directory {path} does not exist")]
    NotFound { path: String },
    #[error(
        "{path} is not a cgroup v2 directory; give a directory under the cgroup v2 mount {mount}"
    )]
    NotCgroup2 { path: String, mount: String },
    #[error(
        "{path} is the root of the cgroup v2 hierarchy, so the redirect would apply to every \
         process on the host; pass --all-processes if that is what you want"
    )]
    RootCgroup { path: String },
    #[error("cannot create cgroup {path}")]
    Create { path: String, source: io::Error },
    #[error(
        "{path} resolves to {resolved}, which is outside the cgroup v2 mount {mount}; give a \
         directory under {mount}"
    )]
    OutsideMount {
        path: String,
        resolved: String,
        mount: String,
    },
    #[error(
        "cgroup paths from /proc cannot be used: this process's cgroup namespace is rooted \
         below the top of the cgroup v2 mount {mount} (mountinfo shows the mount's root as \
         `{root}`); pass --parent-cgroup DIR, or run bypass in the host's cgroup namespace \
         (e.g. nsenter --cgroup=/proc/1/ns/cgroup)"
    )]
    ForeignNamespace { mount: String, root: String },
    #[error("cgroup {path} was removed while attached; the redirect ended with it")]
    Removed { path: String },
}

/// Returns the mount point of the first cgroup v2 file system in `/proc/self/mountinfo`.
pub fn find_mount() -> Result<PathBuf, CgroupError> {
    find_mount_in(Path::new("/proc/self/mountinfo"))
}

/// Returns the mount point of the first cgroup v2 file system in the mountinfo file `path`.
pub fn find_mount_in(path: &Path) -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_mountinfo(&text).ok_or(CgroupError::NoMount)
}

/// Returns the mount point of the first `cgroup2` entry of a mountinfo text.
fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    cgroup2_entries(text).next().map(|(_, mount)| mount)
}

/// Yields `(root, mount point)` of each `cgroup2` entry of a mountinfo text. The root is the
/// cgroup the mount shows at its top, as a path from this process's cgroup namespace root.
fn cgroup2_entries(text: &str) -> impl Iterator<Item = (String, PathBuf)> + '_ {
    text.lines().filter_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype ...
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = before.split(' ').skip(3);
        let root = unescape_mountinfo(fields.next()?);
        let mount = PathBuf::from(unescape_mountinfo(fields.next()?));
        Some((root, mount))
    })
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo path fields.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|digits| {
            bytes[i] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, digit| acc * 8 + u32::from(digit - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Returns the directory of this process's own cgroup v2, under `mount`.
///
/// Fails with [`CgroupError::ForeignNamespace`] where `/proc/self/cgroup` and the mount do not
/// share a root (see [`check_namespace`]).
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    check_namespace(mount)?;
    let path = "/proc/self/cgroup";
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let relative = parse_proc_cgroup(&text).ok_or(CgroupError::NoOwnCgroup)?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// Checks that paths from `/proc/PID/cgroup` can be joined to `mount`.
///
/// `/proc/PID/cgroup` gives paths from the root of the reader's cgroup namespace. Inside a
/// private namespace (`unshare -C`, most containers), that root is some cgroup deep in the
/// hierarchy. A mount made outside the namespace still starts at the hierarchy's root, and
/// mountinfo then shows the mount's root as `/..` or deeper. Joining the two would name the
/// wrong cgroup, so that case is rejected.
pub fn check_namespace(mount: &Path) -> Result<(), CgroupError> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let root = cgroup2_entries(&text)
        .find(|(_, point)| point == mount)
        .map(|(root, _)| root)
        .ok_or(CgroupError::NoMount)?;
    if root == "/" {
        Ok(())
    } else {
        Err(CgroupError::ForeignNamespace {
            mount: mount.display().to_string(),
            root,
        })
    }
}

/// Returns the id of the cgroup at `path`: the inode number of its directory, the number
/// the kernel reports as cgroup id (bpftool, `bpf_get_current_cgroup_id`).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(path)?.ino())
}

/// Returns whether the cgroup with id `id` at `path` is gone: removed, or replaced by a new
/// cgroup of the same name (which has a new id).
pub fn is_gone(path: &Path, id: u64) -> bool {
    cgroup_id(path).map_or(true, |now| now != id)
}

/// Returns the cgroup v2 path (the `0::` line) of a `/proc/PID/cgroup` text.
pub(crate) fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Checks that `path` is a cgroup v2 directory and returns its canonical form.
///
/// The root of the hierarchy is rejected unless `allow_root` is set, because programs attached
/// there see every process on the host.
pub fn check_dir(path: &Path, mount: &Path, allow_root: bool) -> Result<PathBuf, CgroupError> {
    let shown = path.display().to_string();
    let canonical = fs::canonicalize(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CgroupError::NotFound {
            path: shown.clone(),
        },
        _ => CgroupError::Read {
            path: shown.clone(),
            source,
        },
    })?;
    let not_cgroup2 = || CgroupError::NotCgroup2 {
        path: shown.clone(),
        mount: mount.display().to_string(),
    };

    if !canonical.is_dir() || !is_cgroup2(&canonical).map_err(|_| not_cgroup2())? {
        return Err(not_cgroup2());
    }
    // A symlink, or a second mount of the hierarchy, may lead out of the mount that `run`
    // and the namespace check use. Only the resolved path counts.
    let canonical_mount = fs::canonicalize(mount).unwrap_or_else(|_| mount.to_owned());
    if !canonical.starts_with(&canonical_mount) {
        return Err(CgroupError::OutsideMount {
            path: shown,
            resolved: canonical.display().to_string(),
            mount: mount.display().to_string(),
        });
    }
    if canonical == canonical_mount && !allow_root {
        return Err(CgroupError::RootCgroup { path: shown });
    }
    Ok(canonical)
}

fn is_cgroup2(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `statfs` is plain data, so all-zero is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid, writable `statfs`.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i64::from(stat.f_type) == CGROUP2_SUPER_MAGIC)
}

/// A cgroup created by bypass, removed again on drop.
///
/// If processes still live in it when it is dropped (daemons the command left behind), they
/// are killed through `cgroup.kill` first: they would otherwise run on without the redirect.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    /// Creates a uniquely named child of `parent`.
    pub fn create(parent: &Path) -> Result<Self, CgroupError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("bypass-{}-{nanos:09}", std::process::id());
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|source| CgroupError::Create {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the pids in the cgroup.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let text = fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(text
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect())
    }

    /// Kills the processes the command left in the cgroup and waits until they are gone, for
    /// at most [`REMOVE_TIMEOUT`]. Called before detaching, so that none of them runs a
    /// moment without the redirect.
    pub fn kill_leftovers(&self) {
        let leftover = self.pids().unwrap_or_default();
        if leftover.is_empty() {
            return;
        }
        log::warn!(
            "killing {} process(es) the command left in {}: {leftover:?}",
            leftover.len(),
            self.path.display()
        );
        // cgroup.kill exists since Linux 5.14; it kills every process in this cgroup only.
        if let Err(err) = fs::write(self.path.join("cgroup.kill"), "1") {
            log::warn!("cannot write {}/cgroup.kill: {err}", self.path.display());
            return;
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        while !self.pids().unwrap_or_default().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn remove(&self) -> io::Result<()> {
        self.kill_leftovers();
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        match self.remove() {
            Ok(()) => log::debug!("removed cgroup {}", self.path.display()),
            Err(err) => log::error!("cannot remove cgroup {}: {err}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_unified_mount() {
        assert_eq!(
            parse_mountinfo(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_mount_after_optional_fields() {
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn unescapes_spaces_in_mount_point() {
        let line = "50 1 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        let v1_only = "40 31 0:37 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_mountinfo(v1_only), None);
    }

    #[test]
    fn mount_root_outside_namespace_is_seen() {
        let line = "41 31 0:38 /.. /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let entries: Vec<_> = cgroup2_entries(line).collect();
        assert_eq!(
            entries,
            [("/..".to_owned(), PathBuf::from("/sys/fs/cgroup/unified"))]
        );
    }

    #[test]
    fn proc_cgroup_takes_v2_line() {
        let text = "4:memory:/job\n1:cpu:/\n0::/system.slice/runner.service\n";
        assert_eq!(
            parse_proc_cgroup(text),
            Some("/system.slice/runner.service")
        );
        assert_eq!(parse_proc_cgroup("1:cpu:/\n"), None);
    }
}
