//! `cargo xtask demo`: bypass redirecting a real curl, inside a private network namespace.
//!
//! The namespace has 10.0.0.22 on its own `lo` and a Python HTTP server on 10.0.0.22:3000.
//! curl runs under `bypass run` and requests http://10.0.0.22/ (port 80), and bypass sends the
//! connection to port 3000. Nothing leaves the namespace: without the redirect, curl's
//! connection would be refused there.

use std::{
    fs,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads eBPF programs and makes a network namespace; run it as root");
    }
    crate::run(crate::cargo().args(["build", "--release", "--package", "bypass"]))?;

    let netns = Namespace(format!("bypass-demo-{}", std::process::id()));
    ip(&["netns", "add", &netns.0])?;
    ip(&["-n", &netns.0, "link", "set", "lo", "up"])?;
    ip(&["-n", &netns.0, "addr", "add", "10.0.0.22/32", "dev", "lo"])?;
    let nsenter = format!("--net=/var/run/netns/{}", netns.0);

    let root = tempdir()?;
    fs::write(
        root.join("index.html"),
        "hello from the server on 10.0.0.22:3000\n",
    )?;
    let server = Server(
        Command::new("nsenter")
            .args([
                &nsenter,
                "python3",
                "-m",
                "http.server",
                "3000",
                "--bind",
                "10.0.0.22",
            ])
            .current_dir(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start python3 -m http.server")?,
    );
    wait_for_server(&nsenter)?;

    println!(
        "\n$ bypass run -- curl http://10.0.0.22/   (in namespace {}, server on :3000)\n",
        netns.0
    );
    let status = Command::new("target/release/bypass")
        .args([
            "run",
            "--",
            "nsenter",
            &nsenter,
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://10.0.0.22/",
        ])
        .status()
        .context("cannot start target/release/bypass")?;
    drop(server);
    let _ = fs::remove_dir_all(&root);
    if !status.success() {
        bail!("bypass run failed with {status}");
    }
    println!("\ncurl asked for 10.0.0.22:80 and got the page served on 10.0.0.22:3000.");
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::run(Command::new("ip").args(args))
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("bypass-demo-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Waits until the server accepts connections (python takes a moment to start).
fn wait_for_server(nsenter: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let probe = Command::new("nsenter")
            .args([
                nsenter,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                "http://10.0.0.22:3000/",
            ])
            .status()?;
        if probe.success() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the demo server on 10.0.0.22:3000 did not start within 10 s")
}
