//! Host names as rule sources, resolved from a private /etc/hosts: nothing is looked up
//! through the network, because each test runs bypass in a mount namespace whose
//! nsswitch.conf names `files` only.

mod support;

use std::{fs, path::PathBuf, process::Output};

use support::{BYPASS, Netns, TcpServer, require_root, unique_name};

/// A hosts file and a files-only nsswitch.conf, removed on drop.
struct Resolver {
    hosts: PathBuf,
    nsswitch: PathBuf,
}

impl Resolver {
    fn new(hosts: &str) -> Self {
        let dir = std::env::temp_dir();
        let resolver = Self {
            hosts: dir.join(unique_name("bypass-hosts")),
            nsswitch: dir.join(unique_name("bypass-nsswitch")),
        };
        fs::write(&resolver.hosts, hosts).expect("write hosts");
        fs::write(&resolver.nsswitch, "hosts: files\n").expect("write nsswitch.conf");
        resolver
    }

    /// Runs bypass with `args` in a new mount namespace that sees these files.
    fn bypass(&self, args: &[String]) -> Output {
        let script = format!(
            "mount --bind {} /etc/hosts && mount --bind {} /etc/nsswitch.conf && exec \"$@\"",
            self.hosts.display(),
            self.nsswitch.display()
        );
        std::process::Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
                BYPASS,
            ])
            .args(args)
            .output()
            .expect("run unshare")
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.hosts);
        let _ = fs::remove_file(&self.nsswitch);
    }
}

#[test]
fn name_rule_covers_every_address() {
    if !require_root("name_rule_covers_every_address") {
        return;
    }
    let resolver =
        Resolver::new("10.0.0.22 registry.example.internal\nfd00::22 registry.example.internal\n");
    let netns = Netns::new();
    let v4 = TcpServer::start(&netns, "10.0.0.22:3000");
    let v6 = TcpServer::start(&netns, "[fd00::22]:3000");

    let script = "curl -sS --max-time 5 telnet://10.0.0.22:80; curl -sS --max-time 5 'telnet://[fd00::22]:80'";
    let mut args: Vec<String> = ["run", "--rule", "registry.example.internal:80=:3000", "--"]
        .map(String::from)
        .to_vec();
    args.extend(netns.command_line(&["sh", "-c", script]));
    let output = resolver.bypass(&args);

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stdout, "served-by 3000\nserved-by 3000\n", "{stderr}");
    assert_eq!(v4.accepted(), 1);
    assert_eq!(v6.accepted(), 1);
    assert!(
        stderr.contains("`registry.example.internal` resolves to 10.0.0.22"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`registry.example.internal` resolves to fd00::22"),
        "{stderr}"
    );
}

#[test]
fn unresolvable_name_is_a_clear_error() {
    if !require_root("unresolvable_name_is_a_clear_error") {
        return;
    }
    let resolver = Resolver::new("127.0.0.1 localhost\n");
    let args = [
        "run",
        "--rule",
        "registry.example.internal:80=:3000",
        "--",
        "true",
    ]
    .map(String::from);
    let output = resolver.bypass(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(
            "invalid rule `registry.example.internal:80=:3000`: cannot resolve host name \
             `registry.example.internal`"
        ),
        "{stderr}"
    );
}
