//! Builds the eBPF object from `bypass-ebpf` and leaves it in `OUT_DIR/bypass.bpf.o`, where
//! `src/loader.rs` embeds it into the binary.
//!
//! The bpf target needs `-Z build-std=core`, so the build needs a compiler that accepts `-Z`
//! flags and the library source of that same compiler. In order of preference:
//! 1. a rustup `nightly` toolchain with the `rust-src` component;
//! 2. a system `rustc` with its library source (Debian and Ubuntu: `rustc-web` and
//!    `rust-web-src`), run with `RUSTC_BOOTSTRAP=1`. `BYPASS_EBPF_RUSTC` names another one.
//!
//! Both also need `bpf-linker` on `PATH`.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";
const SYSTEM_RUSTC: &str = "/usr/bin/rustc";
const SETUP_HINT: &str = "run `cargo xtask setup` to install what is missing (Debian and Ubuntu), \
                          or see README.md, section Requirements";

enum Toolchain {
    /// `rustup run nightly cargo`.
    RustupNightly { rustup: PathBuf },
    /// This build's cargo with `RUSTC` pointing at a system compiler.
    System { rustc: PathBuf },
}

fn main() {
    for path in ["../bypass-ebpf", "../bypass-common/src", "../Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    for var in ["BYPASS_EBPF_RUSTC", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    if let Err(message) = build_ebpf() {
        // A panic would bury the message under a backtrace hint; print it plainly instead.
        eprintln!("error: cannot build the eBPF object: {message}");
        std::process::exit(1);
    }
}

fn build_ebpf() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let workspace = manifest_dir
        .parent()
        .ok_or("the bypass crate has no parent directory")?;

    let toolchain = find_toolchain()?;
    if find_in_path("bpf-linker").is_none() {
        return Err(format!(
            "bpf-linker not found on PATH; install it with `cargo install bpf-linker \
             --no-default-features --features llvm-22` (needs llvm-22-dev), or {SETUP_HINT}"
        ));
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = match &toolchain {
        Toolchain::RustupNightly { rustup } => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", "nightly", "cargo"]);
            cmd.env_remove("RUSTC");
            cmd
        }
        Toolchain::System { rustc } => {
            let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
            cmd
        }
    };
    cargo
        .current_dir(workspace)
        .args([
            "build",
            "--package",
            "bypass-ebpf",
            "--bin",
            "bypass",
            "--release",
        ])
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", bpf_rustflags())
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");

    let status = cargo
        .status()
        .map_err(|err| format!("failed to start {cargo:?}: {err}"))?;
    if !status.success() {
        return Err(format!("{cargo:?} failed with {status}"));
    }

    let object = target_dir.join(TARGET).join("release").join("bypass");
    fs::copy(&object, out_dir.join("bypass.bpf.o"))
        .map_err(|err| format!("failed to copy {}: {err}", object.display()))?;
    Ok(())
}

fn bpf_rustflags() -> OsString {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    // aya-ebpf reads `bpf_target_arch` to pick the kernel's pt_regs layout; `--btf` makes
    // bpf-linker emit the BTF that aya-log and the verifier's messages rely on.
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f")
    .into()
}

fn find_toolchain() -> Result<Toolchain, String> {
    let mut missing = Vec::new();

    if let Some(rustup) = find_in_path("rustup") {
        let mut cmd = Command::new(&rustup);
        cmd.args(["run", "nightly", "rustc"]);
        match sysroot_with_source(cmd) {
            Ok(()) => return Ok(Toolchain::RustupNightly { rustup }),
            Err(why) => missing.push(format!("rustup nightly: {why}")),
        }
    } else {
        missing.push("rustup: not found on PATH".into());
    }

    let rustc = env::var_os("BYPASS_EBPF_RUSTC").map_or_else(|| SYSTEM_RUSTC.into(), PathBuf::from);
    match sysroot_with_source(Command::new(&rustc)) {
        Ok(()) => return Ok(Toolchain::System { rustc }),
        Err(why) => missing.push(format!("{}: {why}", rustc.display())),
    }

    Err(format!(
        "no Rust compiler with its library source (rust-src) was found. {}. Fix one: \
         `rustup component add rust-src --toolchain nightly`, or on Debian and Ubuntu \
         `apt-get install rustc-web rust-web-src`; or {SETUP_HINT}",
        missing.join("; ")
    ))
}

/// Runs `rustc --print sysroot` and checks that the sysroot holds the `core` source.
fn sysroot_with_source(mut rustc: Command) -> Result<(), String> {
    let output = rustc
        .args(["--print", "sysroot"])
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .map_err(|err| format!("not runnable ({err})"))?;
    if !output.status.success() {
        return Err("not installed".into());
    }
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.is_file() {
        Ok(())
    } else {
        Err(format!("no library source at {}", core.display()))
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
