//! `cargo xtask setup`: the eBPF toolchain and the programs the tests use.
//!
//! Installs on Debian and Ubuntu with apt-get and cargo; elsewhere prints what to install.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// LLVM directory that bpf-linker is built against; its `bin` goes first on PATH.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// Debian packages: the system Rust with library source (fallback when no rustup nightly
/// has rust-src), LLVM for bpf-linker, and the tools the tests and demo run.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "curl",
    "python3",
    "bpftool",
    "iptables",
    "socat",
];

/// bpf-linker release and features known to build with the toolchains above.
const BPF_LINKER_ARGS: &[&str] = &[
    "install",
    "bpf-linker",
    "--version",
    "0.13.0",
    "--locked",
    "--no-default-features",
    "--features",
    "llvm-22",
];

pub fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|name| !dpkg_installed(name))
        .collect();
    if !missing.is_empty() {
        install_packages(&missing)?;
    }
    if find_in_path("bpf-linker").is_none() {
        eprintln!("xtask: installing bpf-linker (a few minutes)");
        let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo.args(BPF_LINKER_ARGS).env("PATH", build_path());
        crate::run(&mut cargo)?;
    }
    Ok(())
}

fn install_packages(missing: &[&str]) -> anyhow::Result<()> {
    let apt = Path::new("/usr/bin/apt-get");
    // SAFETY: `geteuid` has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !apt.exists() || !root {
        bail!(
            "missing packages: {}. On Debian or Ubuntu, as root: apt-get install {}. \
             Elsewhere install: a Rust compiler with its library source (or `rustup toolchain \
             install nightly --component rust-src`), LLVM 22 development files, iproute2, \
             curl, python3, bpftool, iptables and socat; then `cargo {}`",
            missing.join(" "),
            missing.join(" "),
            BPF_LINKER_ARGS.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    crate::run(Command::new(apt).args(["update", "-q"]))?;
    crate::run(
        Command::new(apt)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).contains("install ok installed")
        })
}

/// PATH with LLVM's bin directory and cargo's install directory first.
pub fn build_path() -> OsString {
    let mut dirs = vec![PathBuf::from(LLVM_BIN)];
    if let Some(home) = env::var_os("CARGO_HOME").or_else(|| {
        env::var_os("HOME").map(|home| Path::new(&home).join(".cargo").into_os_string())
    }) {
        dirs.push(Path::new(&home).join("bin"));
    }
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).unwrap_or_default()
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&build_path())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
