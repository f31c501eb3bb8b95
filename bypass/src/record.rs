//! Records of attachments under `/run/bypass`, so that `status`, `rules` and `gc` find what
//! other bypass processes attached: `running/PID.json` for a foreground loader (removed when
//! it ends), `pinned/NAME.json` for a pinned attachment (removed by `detach`). Like the pins
//! themselves, they live on a tmpfs and end with the boot.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    loader::Redirector,
    rulemap::{self, MapIds},
    target,
};

/// Directory of the records.
pub const RUN_DIR: &str = "/run/bypass";

/// Facts about one attachment that `status` needs beyond its maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The cgroup v2 directory the programs are attached to.
    pub cgroup: PathBuf,
    /// Its cgroup id at attach time; a new cgroup at the same path has another one.
    pub cgroup_id: Option<u64>,
    /// Kernel ids of the rule and hit maps.
    pub maps: MapIds,
    /// The loader's pid and start time (clock ticks after boot), for foreground loaders.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
}

impl Record {
    /// Builds a record for `redirector`, attached to `cgroup` by this process.
    pub fn new(cgroup: &Path, redirector: &Redirector, foreground: bool) -> anyhow::Result<Self> {
        let pid = std::process::id();
        Ok(Self {
            cgroup: cgroup.to_owned(),
            cgroup_id: target::cgroup_id(cgroup),
            maps: rulemap::map_ids(redirector.ebpf())?,
            pid: foreground.then_some(pid),
            pid_start: foreground.then(|| process_start(pid)).flatten(),
        })
    }

    /// Returns whether the recorded cgroup still exists (and is the same cgroup).
    pub fn cgroup_exists(&self) -> bool {
        match (target::cgroup_id(&self.cgroup), self.cgroup_id) {
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Returns whether the foreground loader that wrote this record still runs.
    pub fn loader_alive(&self) -> bool {
        match self.pid {
            Some(pid) => self.pid_start.is_some() && process_start(pid) == self.pid_start,
            None => false,
        }
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        let temporary = path.with_extension("tmp");
        // Root only, like the pins: the file names the cgroup and the maps.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?
            .write_all(text.as_bytes())?;
        fs::rename(&temporary, path)
    }

    pub fn read(path: &Path) -> io::Result<Self> {
        let text = fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
    }
}

/// Returns the record file of the pinned attachment `name`.
pub fn pinned_path(name: &str) -> PathBuf {
    pinned_dir().join(format!("{name}.json"))
}

/// Returns the directory of the records of pinned attachments.
pub fn pinned_dir() -> PathBuf {
    Path::new(RUN_DIR).join("pinned")
}

/// Returns the directory of the records of foreground loaders.
pub fn running_dir() -> PathBuf {
    Path::new(RUN_DIR).join("running")
}

/// Returns the start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), which distinguishes a live process from a later one with the same pid.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The record of this foreground loader, removed again on drop.
pub struct Running {
    path: PathBuf,
}

impl Running {
    /// Writes the record of a foreground attachment; a failure only costs `status` its view
    /// of it, so it is logged and `None` returned.
    pub fn write(cgroup: &Path, redirector: &Redirector) -> Option<Self> {
        let path = running_dir().join(format!("{}.json", std::process::id()));
        let result =
            Record::new(cgroup, redirector, true).and_then(|record| Ok(record.write(&path)?));
        match result {
            Ok(()) => Some(Self { path }),
            Err(err) => {
                log::warn!(
                    "`bypass status` will not show this attachment: cannot write {}: {err:#}",
                    path.display()
                );
                None
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let pid = std::process::id();
        let start = process_start(pid).expect("own /proc/PID/stat");
        assert_eq!(process_start(pid), Some(start));
        assert_eq!(process_start(u32::MAX - 1), None);
    }
}
