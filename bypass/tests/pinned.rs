//! Pinned attachments under faults and hostile input: loaders killed while pinning, detach
//! and gc leaving nothing, a removed cgroup, no BPF file system, bad pin names, `--pid` of
//! a process that is gone, and who may touch pinned state.

mod support;

use std::{
    ffi::OsStr,
    fs,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{
    BYPASS, Netns, PROGRAM_COUNT, PinGuard, TcpServer, TestCgroup, attached_program_ids,
    attached_programs, bypass, fetch_in, map_exists, program_exists, program_map_ids, require_root,
    status_json, unique_name, wait_timeout, wait_until,
};

const PIN_ROOT: &str = "/sys/fs/bpf/bypass";
const RECORDS: &str = "/run/bypass/pinned";

fn record_of(name: &str) -> PathBuf {
    Path::new(RECORDS).join(format!("{name}.json"))
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The kernel objects of an attachment: its programs on the cgroup and the maps they use.
struct Objects {
    programs: Vec<u32>,
    maps: Vec<u32>,
}

impl Objects {
    fn of(cgroup: &Path) -> Self {
        let programs = attached_program_ids(cgroup);
        let mut maps: Vec<u32> = programs
            .iter()
            .flat_map(|&id| program_map_ids(id))
            .collect();
        maps.sort_unstable();
        maps.dedup();
        Self { programs, maps }
    }

    /// Checks that the kernel freed every program and map (it does so shortly after the
    /// last reference goes).
    fn assert_freed(&self) {
        let freed = wait_until(Duration::from_secs(5), || {
            !self.programs.iter().any(|&id| program_exists(id))
                && !self.maps.iter().any(|&id| map_exists(id))
        });
        assert!(
            freed,
            "programs {:?} or maps {:?} outlived the pin",
            self.programs, self.maps
        );
    }
}

/// Checks that nothing of pin `name` is left: no pin directory, no record, nothing attached
/// to `cgroup`, and, given its objects, no program or map of it in the kernel.
fn assert_nothing_left(name: &str, cgroup: &Path, objects: Option<&Objects>) {
    assert!(
        !Path::new(PIN_ROOT).join(name).exists(),
        "pin directory of {name} left"
    );
    assert!(!record_of(name).exists(), "record of {name} left");
    assert!(
        staging_of(name).is_empty(),
        "staging of {name} left: {:?}",
        staging_of(name)
    );
    let detached = wait_until(Duration::from_secs(5), || {
        attached_programs(cgroup).is_empty()
    });
    assert!(
        detached,
        "programs left on the cgroup: {:?}",
        attached_programs(cgroup)
    );
    if let Some(objects) = objects {
        objects.assert_freed();
    }
}

/// Staging directories and records of pin `name`, which only a killed loader leaves.
fn staging_of(name: &str) -> Vec<PathBuf> {
    let suffix = format!("-{name}");
    [PIN_ROOT, RECORDS]
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| {
            let file = path.file_name().and_then(OsStr::to_str).unwrap_or("");
            let stem = file.strip_suffix(".json").unwrap_or(file);
            file.starts_with("~staging-") && stem.ends_with(&suffix)
        })
        .collect()
}

fn cgroup_arg(cgroup: &TestCgroup) -> &str {
    cgroup
        .path()
        .to_str()
        .expect("test cgroups have UTF-8 paths")
}

#[test]
fn pin_outlives_loader_and_detach_frees_everything() {
    if !require_root("pin_outlives_loader_and_detach_frees_everything") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    // PinGuard checks that the loader exited with status 0.
    let pinned = PinGuard::attach(&["--cgroup", cgroup_arg(&cgroup), "-r", "10.0.0.22:80=:3000"]);
    let objects = Objects::of(cgroup.path());
    assert_eq!(
        objects.programs.len(),
        PROGRAM_COUNT,
        "programs attached after the loader exit"
    );
    assert!(!objects.maps.is_empty(), "the programs use no map");
    assert!(record_of(pinned.name()).exists(), "no record");
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");
    assert_eq!(target.accepted(), 1);

    let detached = bypass(&["detach", pinned.name()]);
    assert!(detached.status.success(), "{}", stderr_of(&detached));
    assert_nothing_left(pinned.name(), cgroup.path(), Some(&objects));
    assert_ne!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");
}

/// What a SIGKILLed `attach --pin` left.
#[derive(Debug, Default)]
struct KillOutcomes {
    complete: usize,
    nothing: usize,
    swept: usize,
}

/// Starts `bypass attach --pin NAME`, kills it after `delay` (or once its staging directory
/// appears, if `delay` is `None`) and checks that it left the whole pin or nothing.
fn kill_pinning_loader(cgroup: &TestCgroup, delay: Option<Duration>, tally: &mut KillOutcomes) {
    let name = unique_name("kill");
    let mut child = Command::new(BYPASS)
        .args([
            "-q",
            "attach",
            "--pin",
            &name,
            "--cgroup",
            cgroup_arg(cgroup),
        ])
        .args(["-r", "10.0.0.22:80=:3000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bypass attach --pin");
    match delay {
        Some(delay) => thread::sleep(delay),
        None => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while staging_of(&name).is_empty()
                && matches!(child.try_wait(), Ok(None))
                && Instant::now() < deadline
            {
                thread::yield_now();
            }
        }
    }
    let _ = child.kill();
    let _ = wait_timeout(&mut child, Duration::from_secs(10));

    let dir = Path::new(PIN_ROOT).join(&name);
    if dir.exists() {
        // A kill between the two renames leaves the record under its staging name until the
        // next sweep, which `gc` runs.
        let _ = bypass(&["gc"]);
        let links = fs::read_dir(&dir)
            .expect("read pin directory")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().as_bytes().starts_with(b"link_"))
            .count();
        assert_eq!(links, PROGRAM_COUNT, "a half pin after kill at {delay:?}");
        assert!(
            record_of(&name).exists(),
            "a pin without record after kill at {delay:?}"
        );
        assert_eq!(attached_programs(cgroup.path()).len(), PROGRAM_COUNT);
        let objects = Objects::of(cgroup.path());
        let detached = bypass(&["detach", &name]);
        assert!(detached.status.success(), "{}", stderr_of(&detached));
        assert_nothing_left(&name, cgroup.path(), Some(&objects));
        tally.complete += 1;
        return;
    }
    if !staging_of(&name).is_empty() {
        // Killed mid-pin: its staging is hidden from every command, and gc removes it.
        let gc = bypass(&["gc"]);
        assert!(gc.status.success(), "{}", stderr_of(&gc));
        tally.swept += 1;
    } else {
        tally.nothing += 1;
    }
    assert_nothing_left(&name, cgroup.path(), None);
}

/// Held by the tests that run `bypass gc` or leave a pin whose cgroup is gone: `gc` removes
/// every such pin on the host, so one test's `gc` would remove another test's pin.
static GC: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`GC`], also after a test that held it failed.
fn lock_gc() -> std::sync::MutexGuard<'static, ()> {
    GC.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn killed_pinning_loader_leaves_whole_pin_or_nothing() {
    if !require_root("killed_pinning_loader_leaves_whole_pin_or_nothing") {
        return;
    }
    let _gc = lock_gc();
    let cgroup = TestCgroup::new();
    // How long a whole `attach --pin` takes here, to spread the kills over it.
    let started = Instant::now();
    let pinned = PinGuard::attach(&["-q", "--cgroup", cgroup_arg(&cgroup)]);
    let whole = started.elapsed();
    drop(pinned);
    assert_nothing_left(&unique_name("none"), cgroup.path(), None);

    let mut tally = KillOutcomes::default();
    for step in 0..12 {
        kill_pinning_loader(&cgroup, Some(whole * step / 10), &mut tally);
    }
    for _ in 0..3 {
        kill_pinning_loader(&cgroup, None, &mut tally);
    }
    eprintln!("attach --pin takes {whole:?}; after SIGKILL: {tally:?}");
    assert!(
        tally.nothing > 0,
        "no kill landed before the pin: {tally:?}"
    );
}

#[test]
fn pin_of_removed_cgroup_shows_gone_and_gc_frees_it() {
    if !require_root("pin_of_removed_cgroup_shows_gone_and_gc_frees_it") {
        return;
    }
    let _gc = lock_gc();
    let cgroup = TestCgroup::new();
    let path = cgroup.path().to_owned();
    let pinned = PinGuard::attach(&["--no-verify", "--cgroup", cgroup_arg(&cgroup)]);
    let objects = Objects::of(&path);
    assert_eq!(objects.programs.len(), PROGRAM_COUNT);
    drop(cgroup);
    assert!(!path.exists(), "cgroup not removed");

    let status = bypass(&["status", pinned.name()]);
    let text = String::from_utf8_lossy(&status.stdout);
    let header = format!("pinned {}: {} (cgroup gone)", pinned.name(), path.display());
    assert_eq!(text.lines().next(), Some(header.as_str()), "{text}");
    assert_eq!(status_json(Some(pinned.name()))[0]["cgroup_exists"], false);

    let gc = bypass(&["gc"]);
    assert!(gc.status.success(), "{}", stderr_of(&gc));
    assert!(stderr_of(&gc).contains(&format!("removed `{}`: its cgroup is gone", pinned.name())));
    assert_nothing_left(pinned.name(), &path, Some(&objects));
}

#[test]
fn pin_mounts_missing_bpf_filesystem() {
    if !require_root("pin_mounts_missing_bpf_filesystem") {
        return;
    }
    let cgroup = TestCgroup::new();
    let name = unique_name("nobpffs");
    // Only inside a private mount namespace: the host's bpffs stays mounted.
    let script = r#"
        umount -q /sys/fs/bpf 2>/dev/null
        ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || exit 99
        "$0" attach --pin "$1" --no-verify --cgroup "$2" || exit 98
        grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || exit 97
        ls "/sys/fs/bpf/bypass/$1" | grep -c '^link_'
        "$0" detach "$1"
    "#;
    let output = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            BYPASS,
            &name,
        ])
        .arg(cgroup.path())
        .output()
        .expect("run unshare");
    let _ = fs::remove_file(record_of(&name));
    let stderr = stderr_of(&output);
    assert!(
        output.status.success(),
        "status {:?}: {stderr}",
        output.status.code()
    );
    assert!(
        stderr.contains("mounted the BPF file system at /sys/fs/bpf"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        PROGRAM_COUNT.to_string()
    );
    assert!(
        Path::new(PIN_ROOT).exists(),
        "the host's bpffs must stay mounted"
    );
    assert_nothing_left(&name, cgroup.path(), None);
}

#[test]
fn bad_pin_names_are_rejected() {
    if !require_root("bad_pin_names_are_rejected") {
        return;
    }
    let cgroup = TestCgroup::new();
    let long = "x".repeat(65);
    let names: [&[u8]; 8] = [
        b"a/b",
        b"..",
        b"../escape",
        b"",
        b"job.1",
        b"sp ace",
        long.as_bytes(),
        b"bad\xff",
    ];
    for name in names {
        let name = OsStr::from_bytes(name);
        let shown = name.to_string_lossy();
        let mut command = Command::new(BYPASS);
        command.args([
            "attach",
            "--no-verify",
            "--cgroup",
            cgroup_arg(&cgroup),
            "--pin",
        ]);
        let output = command.arg(name).output().expect("run bypass");
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{shown:?}: {stderr}");
        let expected = if name.to_str().is_some() {
            format!("bypass: invalid pin name `{shown}`: use 1 to 64 ASCII letters")
        } else {
            "invalid UTF-8".to_owned()
        };
        assert!(stderr.contains(&expected), "{shown:?}: {stderr}");
        if name.to_str().is_some() {
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "one line for {shown:?}: {stderr}"
            );
        }
        for command in [
            &["detach"][..],
            &["status"],
            &["rules", "add"],
            &["rules", "del"],
        ] {
            let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
            args.push(name);
            if command[0] == "rules" {
                args.push(OsStr::new("10.0.0.22:80=:3000"));
            }
            let output = Command::new(BYPASS)
                .args(&args)
                .output()
                .expect("run bypass");
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command:?} {shown:?}: {}",
                stderr_of(&output)
            );
        }
    }
    assert!(
        attached_programs(cgroup.path()).is_empty(),
        "a bad name attached something"
    );
    for path in [
        "/sys/fs/bpf/bypass/a",
        "/sys/fs/bpf/escape",
        "/sys/fs/bpf/bypass/.hidden",
    ] {
        assert!(!Path::new(path).exists(), "{path} was created");
    }
}

#[test]
fn pid_that_is_gone_or_invalid_is_rejected() {
    if !require_root("pid_that_is_gone_or_invalid_is_rejected") {
        return;
    }
    let cgroup = TestCgroup::new();
    // Exited and reaped: the pid is free.
    let mut reaped = cgroup.spawn(&["true"]);
    let reaped_pid = reaped.id().to_string();
    reaped.wait().expect("wait for true");
    // Exited, not reaped: a zombie, which /proc shows in the root cgroup.
    let mut zombie = cgroup.spawn(&["true"]);
    let zombie_pid = zombie.id().to_string();
    let stat = format!("/proc/{zombie_pid}/stat");
    let exited = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(&stat).is_ok_and(|text| text.contains(") Z "))
    });
    assert!(exited, "the child did not become a zombie");

    let cases = [
        (
            reaped_pid.as_str(),
            format!("no process with pid {reaped_pid}"),
        ),
        (
            zombie_pid.as_str(),
            format!("process {zombie_pid} has exited, so its cgroup is unknown"),
        ),
        ("4194305", "no process with pid 4194305".to_owned()),
        ("0", "no process with pid 0".to_owned()),
        ("-1", "invalid value '-1' for '--pid <PID>'".to_owned()),
        (
            "99999999999",
            "invalid value '99999999999' for '--pid <PID>'".to_owned(),
        ),
    ];
    for (pid, expected) in &cases {
        for pin in [None, Some(unique_name("pid"))] {
            let pid_arg = format!("--pid={pid}");
            let mut args = vec!["attach", "--no-verify", "--all-processes", &pid_arg];
            if let Some(pin) = &pin {
                args.extend(["--pin", pin]);
            }
            let output = bypass(&args);
            let stderr = stderr_of(&output);
            assert_eq!(output.status.code(), Some(2), "--pid {pid}: {stderr}");
            assert!(stderr.contains(expected.as_str()), "--pid {pid}: {stderr}");
            if let Some(pin) = &pin {
                assert!(
                    !Path::new(PIN_ROOT).join(pin).exists(),
                    "--pid {pid} pinned"
                );
            }
        }
    }
    assert!(
        attached_programs(cgroup.path()).is_empty(),
        "something was attached"
    );
    zombie.wait().expect("reap the zombie");
}

/// Runs `bypass ARGS` as user nobody, with no groups and no capabilities.
fn bypass_as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BYPASS,
        ])
        .args(args)
        .output()
        .expect("run setpriv")
}

/// Checks that `path` belongs to root and that group and others have no access.
fn assert_root_only(path: &Path) {
    let meta = fs::metadata(path).unwrap_or_else(|err| panic!("stat {}: {err}", path.display()));
    let mode = meta.permissions().mode();
    assert_eq!(meta.uid(), 0, "{} is not owned by root", path.display());
    assert_eq!(
        mode & 0o077,
        0,
        "{} has mode {:o}",
        path.display(),
        mode & 0o777
    );
}

#[test]
fn pinned_state_is_root_only() {
    if !require_root("pinned_state_is_root_only") {
        return;
    }
    let cgroup = TestCgroup::new();
    let pinned = PinGuard::attach(&["--no-verify", "--cgroup", cgroup_arg(&cgroup)]);
    let name = pinned.name();
    for path in [PIN_ROOT, "/run/bypass", RECORDS] {
        assert_root_only(Path::new(path));
    }
    assert_root_only(&pinned.dir());
    assert_root_only(&record_of(name));
    let pins: Vec<PathBuf> = fs::read_dir(pinned.dir())
        .expect("read pin directory")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(pins.len() > PROGRAM_COUNT, "links and maps: {pins:?}");
    for pin in &pins {
        assert_root_only(pin);
    }
    let peek = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(pinned.dir())
        .output()
        .expect("run setpriv");
    assert!(
        !peek.status.success(),
        "nobody could list the pin directory"
    );

    let cgroup_path = cgroup_arg(&cgroup);
    let needs_root = "needs root (CAP_BPF and CAP_NET_ADMIN)";
    let denied = "permission denied: loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN";
    let cases: [(&[&str], u8, &str); 8] = [
        (&["run", "--", "true"], 125, denied),
        (&["attach", "--cgroup", cgroup_path], 1, denied),
        (
            &["attach", "--pin", "nobody", "--cgroup", cgroup_path],
            1,
            denied,
        ),
        (&["detach", name], 1, needs_root),
        (&["gc"], 1, needs_root),
        (&["rules", "add", name, "10.0.0.22:81=:3000"], 1, needs_root),
        (&["rules", "del", name, "10.0.0.22:80"], 1, needs_root),
        (&["check"], 1, "FAIL capabilities: permission denied"),
    ];
    for (args, code, expected) in cases {
        let output = bypass_as_nobody(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            stderr_of(&output)
        );
        assert_eq!(
            output.status.code(),
            Some(i32::from(code)),
            "{args:?}: {text}"
        );
        assert!(text.contains(expected), "{args:?}: {text}");
        assert!(
            text.contains("root"),
            "{args:?} does not say it needs root: {text}"
        );
    }
    let status = bypass_as_nobody(&["status"]);
    assert_eq!(status.status.code(), Some(1));
    let said = stderr_of(&status);
    for hidden in [
        "/sys/fs/bpf/bypass",
        "/run/bypass",
        "rule or hit count",
        "sudo",
    ] {
        assert!(
            said.contains(hidden),
            "status as nobody does not mention {hidden}: {said}"
        );
    }

    assert!(pinned.dir().exists(), "nobody removed the pin");
    assert_eq!(attached_programs(cgroup.path()).len(), PROGRAM_COUNT);
    assert_eq!(
        status_json(Some(name))[0]["rules"].as_array().map(Vec::len),
        Some(1)
    );
}
