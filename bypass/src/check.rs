//! `bypass check`: whether this host can run bypass, one line per requirement with the fix.

use std::{fmt, path::Path};

use crate::{
    cgroup,
    cli::CheckArgs,
    loader::{self, LoadOptions, PROGRAMS, Redirector},
    pin,
    rule::RuleSet,
};

/// Oldest kernel bypass supports: 5.8 brings the ring buffer of the hit log, and 5.7 the
/// BPF links for cgroups that `--pin` needs.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Works.
    Ok,
    /// Missing, but bypass works without it (a feature is lost).
    Warn,
    /// Missing, and bypass cannot work.
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK  ",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        })
    }
}

/// One line of the report: what was checked, the verdict, and the finding or the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub what: String,
    pub verdict: Verdict,
    pub detail: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.verdict, self.what, self.detail)
    }
}

fn line(what: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Line {
    Line {
        what: what.into(),
        verdict,
        detail: detail.into(),
    }
}

/// Prints one line per check; returns whether everything needed works.
pub fn check(args: &CheckArgs) -> anyhow::Result<bool> {
    let mountinfo = args
        .mountinfo
        .as_deref()
        .unwrap_or(Path::new("/proc/self/mountinfo"));
    let lines = run_checks(mountinfo);
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    crate::exit::print_stdout(&text)?;
    Ok(lines.iter().all(|line| line.verdict != Verdict::Fail))
}

/// Runs every check in order; the program checks only when the privileges allow them.
pub fn run_checks(mountinfo: &Path) -> Vec<Line> {
    let mut lines = vec![kernel(), capabilities(), bpf_syscall()];
    lines.push(cgroup_mount(mountinfo));
    let privileged = lines[1].verdict == Verdict::Ok && lines[2].verdict == Verdict::Ok;
    lines.extend(programs(privileged));
    lines.push(btf());
    lines.push(bpffs());
    lines
}

fn kernel() -> Line {
    // SAFETY: `utsname` is plain data, and `uname` fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return line(
            "kernel",
            Verdict::Warn,
            "cannot read the kernel version (uname failed)",
        );
    }
    // SAFETY: `uname` NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    match parse_version(&release) {
        Some(version) if version >= MIN_KERNEL => line("kernel", Verdict::Ok, release),
        Some(_) => line(
            "kernel",
            Verdict::Fail,
            format!(
                "{release} is older than {}.{}; upgrade the kernel",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => line(
            "kernel",
            Verdict::Warn,
            format!("cannot parse version `{release}`"),
        ),
    }
}

/// Parses the major and minor number of a kernel release such as `6.18.44-fc-v1147`.
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn capabilities() -> Line {
    match loader::check_privileges() {
        Ok(()) => line("capabilities", Verdict::Ok, "CAP_BPF and CAP_NET_ADMIN"),
        Err(err) => line("capabilities", Verdict::Fail, err.to_string()),
    }
}

/// Creates and closes a one-entry array map: the smallest `bpf()` call that needs the
/// privileges of a real load.
fn bpf_syscall() -> Line {
    #[repr(C)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        // The rest of `union bpf_attr`, zeroed, up to the fields this call may read.
        rest: [u32; 28],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        rest: [0; 28],
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr` for BPF_MAP_CREATE of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreateAttr,
            std::mem::size_of::<MapCreateAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` is a descriptor this function just received and owns.
        unsafe { libc::close(fd as libc::c_int) };
        return line("bpf syscall", Verdict::Ok, "allowed");
    }
    let err = std::io::Error::last_os_error();
    let fix = match err.raw_os_error() {
        Some(libc::ENOSYS) => {
            "the kernel was built without CONFIG_BPF_SYSCALL; use a kernel with BPF"
        }
        Some(libc::EPERM) => {
            "denied: run as root, and outside containers or seccomp profiles that block bpf()"
        }
        _ => "failed; see the error",
    };
    line("bpf syscall", Verdict::Fail, format!("{fix} ({err})"))
}

fn cgroup_mount(mountinfo: &Path) -> Line {
    match cgroup::find_mount_in(mountinfo) {
        Ok(mount) => line(
            "cgroup v2",
            Verdict::Ok,
            format!("mounted at {}", mount.display()),
        ),
        Err(err) => line("cgroup v2", Verdict::Fail, format!("{err:#}")),
    }
}

/// Loads every program of the embedded object and unloads it again; nothing is attached.
fn programs(privileged: bool) -> Vec<Line> {
    let what = |name: &str| format!("program {name}");
    if !privileged {
        return PROGRAMS
            .iter()
            .map(|program| {
                line(
                    what(program.name),
                    Verdict::Fail,
                    "not tried: needs the privileges above",
                )
            })
            .collect();
    }
    let options = LoadOptions {
        max_rules: 1,
        log_rate: bypass_common::DEFAULT_LOG_RATE,
        udp: true,
    };
    match Redirector::load(&RuleSet::default_rules(), options) {
        Ok(redirector) => PROGRAMS
            .iter()
            .map(|program| {
                let (name, lost) = (program.name, program.lost);
                if redirector.loaded().contains(&name) {
                    line(what(name), Verdict::Ok, "loads")
                } else if program.required {
                    line(
                        what(name),
                        Verdict::Fail,
                        "rejected by this kernel; upgrade the kernel",
                    )
                } else {
                    line(
                        what(name),
                        Verdict::Warn,
                        format!("rejected by this kernel, so {lost}"),
                    )
                }
            })
            .collect(),
        Err(err) => vec![line(
            "programs",
            Verdict::Fail,
            format!("{:#}", anyhow::Error::from(err)),
        )],
    }
}

fn btf() -> Line {
    let path = "/sys/kernel/btf/vmlinux";
    if Path::new(path).exists() {
        line("BTF", Verdict::Ok, path)
    } else {
        line(
            "BTF",
            Verdict::Warn,
            format!(
                "{path} is missing; bypass works without it, but tools such as bpftool show less"
            ),
        )
    }
}

fn bpffs() -> Line {
    if pin::is_bpffs(Path::new(pin::BPFFS)) {
        line("bpffs", Verdict::Ok, format!("mounted at {}", pin::BPFFS))
    } else {
        line(
            "bpffs",
            Verdict::Warn,
            format!(
                "not mounted at {0}; `attach --pin` mounts it, or run `mount -t bpf bpf {0}`",
                pin::BPFFS
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v1147"), Some((6, 18)));
        assert_eq!(parse_version("5.8.0"), Some((5, 8)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("5.4.0-generic").unwrap() < MIN_KERNEL);
    }

    #[test]
    fn lines_show_verdict_and_fix() {
        let shown = line("cgroup v2", Verdict::Fail, "no cgroup v2 file system").to_string();
        assert_eq!(shown, "FAIL cgroup v2: no cgroup v2 file system");
        assert_eq!(line("BTF", Verdict::Ok, "x").to_string(), "OK   BTF: x");
    }
}
