//! Pinned attachments: links and maps under `/sys/fs/bpf/bypass/NAME`, which outlive the
//! loader until `bypass detach NAME` (or `bypass gc`, once the cgroup is gone).

use std::{
    ffi::CString,
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::programs::links::PinnedLink;

use crate::{
    exit::UsageError,
    loader::Redirector,
    record::{self, Record},
    rulemap,
};

/// Mount point of the BPF file system that bypass uses.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `f_type` of the BPF file system (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Longest accepted pin name.
const MAX_NAME_LEN: usize = 64;
/// Prefix of the link pins in a pin directory; the rest is the program name.
const LINK_PREFIX: &str = "link_";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "invalid pin name `{0}`: use 1 to {MAX_NAME_LEN} ASCII letters, digits, '-' or '_' \
         (the BPF file system rejects '.')"
    )]
    InvalidName(String),
    #[error("an attachment named `{0}` is already pinned; detach it first (`bypass detach {0}`)")]
    Exists(String),
    #[error("no pinned attachment named `{0}`; `bypass status` lists them")]
    NotFound(String),
    #[error(
        "cannot mount the BPF file system at {BPFFS}; mount it with `mount -t bpf bpf {BPFFS}`"
    )]
    Mount(#[source] io::Error),
    #[error(
        "`bypass {0}` needs root (CAP_BPF and CAP_NET_ADMIN) to reach pinned attachments and \
         their maps; run it with sudo"
    )]
    NotPermitted(&'static str),
    #[error("cannot pin {what} at {path}")]
    Pin {
        what: String,
        path: String,
        source: aya::pin::PinError,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let path = path.display().to_string();
    move |source| PinError::Io {
        action,
        path,
        source,
    }
}

/// Checks a pin name: it becomes a directory name on the BPF file system, which rejects
/// any name with a '.', so no '/', no "..", nothing hidden.
pub fn validate_name(name: &str) -> Result<(), PinError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(allowed) {
        return Err(PinError::InvalidName(crate::rule::printable(name)));
    }
    Ok(())
}

/// Fails with a clear message when this process lacks the privileges that `command` needs.
pub fn require_privileges(command: &'static str) -> Result<(), PinError> {
    crate::loader::check_privileges().map_err(|_| PinError::NotPermitted(command))
}

/// Returns the directory that contains every bypass pin.
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("bypass")
}

/// Returns the pin directory of attachment `name`.
pub fn dir(name: &str) -> PathBuf {
    root().join(name)
}

/// Returns whether `path` is on a BPF file system.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` is plain data, so all-zero is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid, writable `statfs`.
    let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0;
    ok && stat.f_type == BPF_FS_MAGIC
}

/// Mounts the BPF file system at [`BPFFS`] unless it is there already.
pub fn ensure_bpffs() -> Result<(), PinError> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    let target = CString::new(BPFFS).expect("no NUL in a constant");
    let (source, fstype) = (c"bpf", c"bpf");
    // SAFETY: every pointer is a valid NUL-terminated string; no mount data is passed.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(PinError::Mount(io::Error::last_os_error()));
    }
    log::info!("mounted the BPF file system at {BPFFS}");
    Ok(())
}

/// Pins the links and maps of an attached `redirector` as `name` and records its cgroup.
///
/// Everything is pinned into a staging directory first, which one rename then turns into
/// `NAME`: a loader killed half-way leaves no partial `NAME`, only a staging directory that
/// the next `attach --pin` or `gc` removes. On failure nothing stays pinned, and the
/// caller's drop of `redirector` detaches.
pub fn pin(redirector: &mut Redirector, name: &str, cgroup: &Path) -> anyhow::Result<PathBuf> {
    validate_name(name)?;
    ensure_bpffs()?;
    let root = root();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(io_error("create", &root))?;
    sweep_staging();
    let dir = dir(name);
    if dir.exists() {
        return Err(PinError::Exists(name.to_owned()).into());
    }
    let staging = Staging::new(name);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging.dir)
        .map_err(io_error("create", &staging.dir))?;
    let result = pin_into(redirector, &staging, cgroup).and_then(|()| commit(&staging, name));
    if result.is_err() {
        let _ = remove_pins(&staging.dir);
        let _ = fs::remove_file(&staging.record);
    }
    result.map(|()| dir)
}

/// Prefix of staging directories and records: `~staging-PID-START-NAME`, hidden from
/// [`names`] because pin names cannot hold '~'.
const STAGING_PREFIX: &str = "~staging-";

/// Staging directory in which one `attach --pin` builds its pin before the rename.
struct Staging {
    dir: PathBuf,
    record: PathBuf,
}

impl Staging {
    fn new(name: &str) -> Self {
        let pid = std::process::id();
        let start = record::process_start(pid).unwrap_or(0);
        let stem = format!("{STAGING_PREFIX}{pid}-{start}-{name}");
        Self {
            dir: root().join(&stem),
            record: record::pinned_dir().join(format!("{stem}.json")),
        }
    }
}

/// Returns the pin name in a staging file name whose loader is gone; `None` for anything
/// else, staging files of live loaders included.
fn abandoned_staging(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix(STAGING_PREFIX)?;
    let rest = rest.strip_suffix(".json").unwrap_or(rest);
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let start: u64 = parts.next()?.parse().ok()?;
    let name = parts.next()?;
    let alive = start != 0 && record::process_start(pid) == Some(start);
    (!alive).then_some(name)
}

/// Cleans up after loaders killed during `attach --pin`: removes their staging directories,
/// which may hold attached links, and finishes or drops their records.
pub fn sweep_staging() {
    for path in entries(&root()) {
        let file_name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if abandoned_staging(file_name).is_some() {
            match remove_pins(&path) {
                Ok(()) => log::info!("removed {}, left by a killed loader", path.display()),
                Err(err) => log::warn!("cannot remove {}: {err:#}", path.display()),
            }
        }
    }
    for path in entries(&record::pinned_dir()) {
        let file_name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        let Some(name) = abandoned_staging(file_name) else {
            continue;
        };
        // The rename of the directory is the commit: a record whose pin made it is kept.
        let _ = if validate_name(name).is_ok() && dir(name).exists() {
            fs::rename(&path, record::pinned_path(name))
        } else {
            fs::remove_file(&path)
        };
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).map_or_else(
        |_| Vec::new(),
        |entries| {
            entries
                .filter_map(|entry| Some(entry.ok()?.path()))
                .collect()
        },
    )
}

/// Renames the staging directory to `NAME` (never over an existing pin), then its record.
fn commit(staging: &Staging, name: &str) -> anyhow::Result<()> {
    let dir = dir(name);
    let from = CString::new(staging.dir.as_os_str().as_encoded_bytes())?;
    let to = CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result != 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EEXIST | libc::ENOTEMPTY) => PinError::Exists(name.to_owned()),
            _ => io_error("rename", &staging.dir)(err),
        }
        .into());
    }
    let record_path = record::pinned_path(name);
    fs::rename(&staging.record, &record_path).map_err(io_error("write", &record_path))?;
    Ok(())
}

fn pin_into(redirector: &mut Redirector, staging: &Staging, cgroup: &Path) -> anyhow::Result<()> {
    let dir = staging.dir.as_path();
    // Permissions: bpffs takes the mode of the directory; make sure the group and others
    // cannot look in even if a umask or an earlier mkdir left it wider.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error("chmod", dir))?;
    let record = Record::new(cgroup, redirector, false)?;
    rulemap::pin_maps(redirector.ebpf(), dir).map_err(|source| PinError::Pin {
        what: "the maps".into(),
        path: dir.display().to_string(),
        source,
    })?;
    for (program, link) in redirector.take_links()? {
        let path = dir.join(format!("{LINK_PREFIX}{program}"));
        link.pin(&path).map_err(|source| PinError::Pin {
            what: format!("the link of {program}"),
            path: path.display().to_string(),
            source,
        })?;
    }
    record
        .write(&staging.record)
        .map_err(io_error("write", &staging.record))?;
    Ok(())
}

/// Unpins attachment `name`: its links go, so the programs detach, then its maps.
pub fn remove(name: &str) -> Result<(), PinError> {
    validate_name(name)?;
    let dir = dir(name);
    if !dir.exists() {
        return Err(PinError::NotFound(name.to_owned()));
    }
    remove_pins(&dir)?;
    let record_path = record::pinned_path(name);
    match fs::remove_file(&record_path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            log::warn!("cannot remove {}: {err}", record_path.display());
        }
        _ => {}
    }
    Ok(())
}

/// Unpins everything in pin directory `dir`, links first, and removes it.
fn remove_pins(dir: &Path) -> Result<(), PinError> {
    let entries = fs::read_dir(dir).map_err(io_error("read", dir))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    // Links first: once they are gone nothing runs that reads the maps.
    files.sort_by_key(|path| !is_link_pin(path));
    for file in files {
        unpin(&file)?;
    }
    fs::remove_dir(dir).map_err(io_error("remove", dir))
}

/// Removes one pin. A link is opened before its pin goes and closed after, because the kernel
/// releases a link at once on the last close but only later, from a work queue, when the last
/// reference was the pin. So `detach` returns with the programs already detached.
fn unpin(path: &Path) -> Result<(), PinError> {
    if !is_link_pin(path) {
        return fs::remove_file(path).map_err(io_error("unpin", path));
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            let link = link.unpin().map_err(io_error("unpin", path))?;
            drop(link);
            Ok(())
        }
        Err(err) => {
            log::debug!("cannot open link pin {}: {err}", path.display());
            fs::remove_file(path).map_err(io_error("unpin", path))
        }
    }
}

fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with(LINK_PREFIX))
}

/// Returns the names of every pinned attachment, sorted.
pub fn names() -> io::Result<Vec<String>> {
    let mut names: Vec<String> = match fs::read_dir(root()) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        result => result?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| validate_name(name).is_ok())
            .collect(),
    };
    names.sort();
    Ok(names)
}

/// `bypass detach NAME`.
pub fn detach(name: &str) -> anyhow::Result<()> {
    require_privileges("detach")?;
    validate_name(name).map_err(|err| UsageError(err.into()))?;
    let record = Record::read(&record::pinned_path(name)).ok();
    remove(name)?;
    match record {
        Some(record) => log::info!("detached `{name}` from {}", record.cgroup.display()),
        None => log::info!("detached `{name}`"),
    }
    Ok(())
}

/// `bypass gc`: detaches every pinned attachment whose cgroup is gone; returns how many.
pub fn gc() -> anyhow::Result<usize> {
    require_privileges("gc")?;
    sweep_staging();
    let mut removed = 0;
    for name in names()? {
        let record = Record::read(&record::pinned_path(&name));
        let gone = match &record {
            Ok(record) => !record.cgroup_exists(),
            Err(err) => {
                log::warn!(
                    "`{name}` has no readable record ({err}); keeping it, detach it by name"
                );
                false
            }
        };
        if gone {
            remove(&name)?;
            log::info!("removed `{name}`: its cgroup is gone");
            removed += 1;
        }
    }
    log::info!("gc removed {removed} pinned attachment(s)");
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in [
            "",
            "a/b",
            "..",
            "../x",
            ".hidden",
            "job.42",
            "sp ace",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["ci-job", "runner_1", "_job", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn invalid_name_is_quoted_on_one_line() {
        let message = validate_name("a\nb\u{1b}[31m").unwrap_err().to_string();
        assert!(!message.contains('\n'), "{message:?}");
        assert!(!message.contains('\u{1b}'), "{message:?}");
        assert!(message.contains("a\\nb\\u{1b}[31m"), "{message:?}");
    }
}
