//! Hostile input. The rule and config parsers never panic and allocate in proportion to their
//! input. Oversized files, non-UTF-8 paths and symlinks out of the cgroup mount get one clear
//! line each.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use bypass::{
    config::{self, MAX_CONFIG_BYTES},
    rule::{Rule, RuleSet},
};
use proptest::prelude::*;
use support::{
    Attached, BYPASS, TCP_PROGRAM_COUNT, TempFile, TestCgroup, attached_program_ids, cgroup2_mount,
    require_root, unique_name,
};

/// Counts the bytes each thread has allocated, so a test can see the peak of one call.
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + delta);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

// SAFETY: every call is passed on to `System` unchanged; only thread-local counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        // SAFETY: as in `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        // SAFETY: as in `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result and the most bytes it held allocated at once.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    (result, (PEAK.with(Cell::get) - start).max(0) as usize)
}

/// Bytes a parse may hold per byte of input, plus a fixed allowance. The worst input seen,
/// a long dotted key (`k.k.k...`), costs toml 0.8 about 95 bytes per input byte before it is
/// rejected. With the 1 MiB file cap, that bounds a parse at about 100 MB.
const BYTES_PER_INPUT_BYTE: usize = 128;
const FIXED_ALLOWANCE: usize = 64 * 1024;

fn allocation_limit(input: &str) -> usize {
    input.len() * BYTES_PER_INPUT_BYTE + FIXED_ALLOWANCE
}

fn parse_config(text: &str) -> (Result<RuleSet, String>, usize) {
    peak_allocation(|| {
        let mut rules = RuleSet::default();
        let parsed = config::parse(text, "fuzz.toml", &mut rules);
        parsed
            .map(|()| rules)
            .map_err(|err| format!("{:#}", anyhow::Error::from(err)))
    })
}

/// Text that looks like rules: protocols, addresses, ports and separators, mixed up.
fn rule_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("tcp/".to_owned()),
        Just("udp/".to_owned()),
        Just("=".to_owned()),
        Just(":".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("::ffff:".to_owned()),
        "[0-9]{1,25}",
        "[0-9a-fA-F]{1,5}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        "\\PC{0,4}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

/// Text that looks like a config file: rule tables, keys, values and TOML punctuation.
fn config_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[[rule]]\n".to_owned()),
        Just("[rule]\n".to_owned()),
        Just("from = ".to_owned()),
        Just("to = ".to_owned()),
        Just("protocol = ".to_owned()),
        Just("\"".to_owned()),
        Just("'''".to_owned()),
        Just("\n".to_owned()),
        Just("[".to_owned()),
        Just("{".to_owned()),
        Just("# comment\n".to_owned()),
        Just("\\n".to_owned()),
        Just("\\u001b".to_owned()),
        rule_like().prop_map(|rule| format!("\"{rule}\"\n")),
        "\\PC{0,6}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        // Failures are shown in the test output; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rule_parser_never_panics(text in prop_oneof![rule_like(), "\\PC{0,60}", ".{0,60}"]) {
        let (parsed, peak) = peak_allocation(|| text.parse::<Rule>());
        prop_assert!(peak <= allocation_limit(&text), "{peak} bytes for {text:?}");
        if let Ok(rule) = parsed {
            // What parses prints back to the same rule.
            prop_assert_eq!(rule.to_string().parse::<Rule>(), Ok(rule));
        }
    }

    #[test]
    fn config_parser_never_panics(text in prop_oneof![config_like(), "\\PC{0,200}"]) {
        let (parsed, peak) = parse_config(&text);
        prop_assert!(peak <= allocation_limit(&text), "{peak} bytes for {text:?}");
        if let Err(message) = parsed {
            // One line without control characters, whatever the input.
            prop_assert!(!message.is_empty());
            prop_assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let depth = 100_000;
    for text in [
        format!("a = {}", "[".repeat(depth)),
        format!("a = {}", "{ b = ".repeat(depth)),
        format!("{} = 1", vec!["k"; depth].join(".")),
        format!("[[{}]]", vec!["rule"; depth].join(".")),
    ] {
        let (parsed, peak) = parse_config(&text);
        let message = parsed.expect_err("deep nesting must be rejected");
        assert!(
            message.starts_with("invalid config file fuzz.toml, line 1: "),
            "{message}"
        );
        assert!(
            peak <= allocation_limit(&text),
            "{peak} bytes for {} input bytes",
            text.len()
        );
    }
}

#[test]
fn escapes_in_values_stay_escaped() {
    let text = "[[rule]]\nfrom = \"10.0.0.22\\n\\u001b[2J:80\"\nto = \":1\"\n";
    let (parsed, _) = parse_config(text);
    assert_eq!(
        parsed.expect_err("not an address"),
        "invalid rule in fuzz.toml, line 1: `10.0.0.22\\n\\u{1b}[2J` is not an IP address"
    );
}

#[test]
fn many_rules_parse_in_bounded_memory() {
    let text: String = (0..10_000u32)
        .map(|i| {
            format!(
                "[[rule]]\nfrom = \"10.{}.{}.1:80\"\nto = \":3000\"\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let (parsed, peak) = parse_config(&text);
    assert_eq!(parsed.map(|rules| rules.len()), Ok(10_000));
    assert!(
        peak <= allocation_limit(&text),
        "{peak} bytes for {} input bytes",
        text.len()
    );
}

/// Runs `bypass ARGS` quietly, so stderr holds only the error.
fn bypass_quiet(args: &[&OsStr]) -> Output {
    Command::new(BYPASS)
        .arg("-q")
        .args(args)
        .output()
        .expect("run bypass")
}

/// Asserts that `output` failed with `code` and one stderr line equal to `expected`.
fn assert_one_line(output: &Output, code: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr, format!("{expected}\n"));
}

fn run_with_config(config: &Path) -> Output {
    let args = [
        OsStr::new("run"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    bypass_quiet(&[&args[..], &[OsStr::new("--"), OsStr::new("true")]].concat())
}

#[test]
fn oversized_config_is_rejected() {
    let limit = MAX_CONFIG_BYTES as usize;
    let big = TempFile::with_bytes("bypass-big", &vec![b'#'; limit + 1]);
    let shown = big.path().display();
    assert_one_line(
        &run_with_config(big.path()),
        125,
        &format!("bypass: config file {shown} is larger than {limit} bytes; is it the right file?"),
    );
    // Endless input is cut off at the same limit.
    assert_one_line(
        &run_with_config(Path::new("/dev/zero")),
        125,
        &format!(
            "bypass: config file /dev/zero is larger than {limit} bytes; is it the right file?"
        ),
    );
    // A file of exactly the limit is read. It contains only a comment, so it yields no rules.
    let mut text = vec![b'#'; limit];
    text[limit - 1] = b'\n';
    let at_limit = TempFile::with_bytes("bypass-limit", &text);
    let mut rules = RuleSet::default();
    config::load(at_limit.path(), &mut rules).expect("a file of exactly the limit is read");
}

/// Returns a path in the temporary directory whose name is not UTF-8.
fn non_utf8_path(prefix: &str) -> PathBuf {
    let mut name = unique_name(prefix).into_bytes();
    name.extend_from_slice(b"-\xff\xfe");
    std::env::temp_dir().join(OsStr::from_bytes(&name))
}

#[test]
fn non_utf8_config_path_is_reported() {
    let missing = non_utf8_path("bypass-config");
    let shown = missing.display();
    assert_one_line(
        &run_with_config(&missing),
        125,
        &format!("bypass: cannot read config file {shown}: No such file or directory (os error 2)"),
    );

    let config = non_utf8_path("bypass-config");
    fs::write(
        &config,
        "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":1\"\nport = 2\n",
    )
    .expect("write");
    let output = run_with_config(&config);
    let _ = fs::remove_file(&config);
    assert_one_line(
        &output,
        125,
        &format!(
            "bypass: invalid config file {}, line 4: unknown field `port`, expected one of \
             `from`, `to`, `protocol`",
            config.display()
        ),
    );
}

#[test]
fn non_utf8_cgroup_path_works() {
    let missing = cgroup2_mount().join(OsStr::from_bytes(b"bypass-no-such-\xff"));
    let args = [
        OsStr::new("attach"),
        OsStr::new("--cgroup"),
        missing.as_os_str(),
    ];
    let shown = missing.display();
    assert_one_line(
        &bypass_quiet(&args),
        2,
        &format!("bypass: cgroup directory {shown} does not exist"),
    );

    if !require_root("non_utf8_cgroup_path_works") {
        return;
    }
    let parent = TestCgroup::new();
    let child = TestCgroup::named(parent.path(), OsStr::from_bytes(b"job-\xff\xfe"));
    let cgroup = child.path().to_owned();
    let bypass = Attached::start(&cgroup, &[]);
    assert_eq!(attached_program_ids(&cgroup).len(), TCP_PROGRAM_COUNT);
    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("detached from {}", cgroup.display())),
        "{stderr}"
    );
}

/// A symlink in the temporary directory, removed on drop.
struct Symlink(PathBuf);

impl Symlink {
    fn to(target: &Path) -> Self {
        let link = std::env::temp_dir().join(unique_name("bypass-link"));
        symlink(target, &link).expect("create symlink");
        Self(link)
    }
}

impl Drop for Symlink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn attach_args(cgroup: &Path) -> Vec<&OsStr> {
    vec![
        OsStr::new("attach"),
        OsStr::new("--cgroup"),
        cgroup.as_os_str(),
    ]
}

#[test]
fn symlink_out_of_cgroup_mount_is_rejected() {
    let mount = cgroup2_mount();
    let link = Symlink::to(&std::env::temp_dir());
    assert_one_line(
        &bypass_quiet(&attach_args(&link.0)),
        2,
        &format!(
            "bypass: {} is not a cgroup v2 directory; give a directory under the cgroup v2 \
             mount {}",
            link.0.display(),
            mount.display()
        ),
    );
}

#[test]
fn symlink_to_second_cgroup_mount_is_rejected() {
    if !require_root("symlink_to_second_cgroup_mount_is_rejected") {
        return;
    }
    let cgroup = TestCgroup::new();
    let second_mount = std::env::temp_dir().join(unique_name("bypass-cgroup2"));
    fs::create_dir(&second_mount).expect("mkdir mount point");
    let name = cgroup.path().file_name().expect("cgroup name");
    let link = Symlink::to(&second_mount.join(name));
    // The second mount lives in a private mount namespace and ends with it.
    let script = "mount -t cgroup2 none \"$1\" && shift && exec \"$@\"";
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c", script, "sh"])
        .arg(&second_mount)
        .args([BYPASS, "-q", "attach", "--cgroup"])
        .arg(&link.0)
        .output()
        .expect("run unshare");
    let _ = fs::remove_dir(&second_mount);
    assert_one_line(
        &output,
        2,
        &format!(
            "bypass: {} resolves to {}, which is outside the cgroup v2 mount {mount}; give a \
             directory under {mount}",
            link.0.display(),
            second_mount.join(name).display(),
            mount = cgroup2_mount().display()
        ),
    );
    assert_eq!(attached_program_ids(cgroup.path()), Vec::<u32>::new());
}

#[test]
fn symlink_into_cgroup_mount_attaches_to_target() {
    if !require_root("symlink_into_cgroup_mount_attaches_to_target") {
        return;
    }
    let cgroup = TestCgroup::new();
    let link = Symlink::to(cgroup.path());
    let bypass = Attached::start(&link.0, &[]);
    assert_eq!(attached_program_ids(cgroup.path()).len(), TCP_PROGRAM_COUNT);
    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
}
