//! UDP rules redirect connected and unconnected sends, and replies show the original source.

mod support;

use support::{
    Attached, Netns, TestCgroup, UDP_CLIENT, UdpEcho, assert_success, python_line, require_root,
    run_outside, stdout_of,
};

#[test]
fn udp_replies_come_from_the_original_address() {
    if !require_root("udp_replies_come_from_the_original_address") {
        return;
    }
    let netns = Netns::new();
    let echo4 = UdpEcho::start(&netns, "10.0.0.22:5353");
    let echo6 = UdpEcho::start(&netns, "[fd00::22]:5353");
    let cgroup = TestCgroup::new();
    let rules = [
        "--rule",
        "udp/10.0.0.22:53=:5353",
        "--rule",
        "udp/[fd00::22]:53=:5353",
    ];
    let bypass = Attached::start(cgroup.path(), &rules);

    let sends = [
        "connected,10.0.0.22:53",
        "sendto,10.0.0.22:53",
        "connected,[::ffff:10.0.0.22]:53",
        "sendto,[::ffff:10.0.0.22]:53",
        "connected,[fd00::22]:53",
        "sendto,[fd00::22]:53",
        "sendto,10.0.0.22:5353",
    ];
    let inside = cgroup.run(&python_line(&netns, UDP_CLIENT, &sends));
    assert_success("python in the cgroup", &inside);
    let expected = "\
connected,10.0.0.22:53 | echo 5353 ping | 10.0.0.22 53
sendto,10.0.0.22:53 | echo 5353 ping | 10.0.0.22 53
connected,[::ffff:10.0.0.22]:53 | echo 5353 ping | ::ffff:10.0.0.22 53
sendto,[::ffff:10.0.0.22]:53 | echo 5353 ping | ::ffff:10.0.0.22 53
connected,[fd00::22]:53 | echo 5353 ping | fd00::22 53
sendto,[fd00::22]:53 | echo 5353 ping | fd00::22 53
sendto,10.0.0.22:5353 | echo 5353 ping | 10.0.0.22 5353
";
    assert_eq!(stdout_of(&inside), expected, "bypass:\n{}", bypass.stderr());
    for line in [
        "redirect connect4 udp 10.0.0.22:53 -> 10.0.0.22:5353 rule 0",
        "redirect sendmsg4 udp 10.0.0.22:53 -> 10.0.0.22:5353 rule 0",
        "redirect connect6 udp ::ffff:10.0.0.22:53 -> ::ffff:10.0.0.22:5353 rule 0",
        "redirect connect6 udp [fd00::22]:53 -> [fd00::22]:5353 rule 1",
        "redirect sendmsg6 udp [fd00::22]:53 -> [fd00::22]:5353 rule 1",
    ] {
        assert!(
            bypass.wait_for_log(line),
            "no `{line}` in:\n{}",
            bypass.stderr()
        );
    }

    // Outside the cgroup nothing listens on port 53: the kernel replies with ICMP port
    // unreachable.
    let outside = run_outside(&python_line(
        &netns,
        UDP_CLIENT,
        &["connected,10.0.0.22:53"],
    ));
    assert!(
        !outside.status.success(),
        "outside reached: {}",
        stdout_of(&outside)
    );
    assert!(String::from_utf8_lossy(&outside.stderr).contains("ConnectionRefusedError"));
    let outside = run_outside(&python_line(&netns, UDP_CLIENT, &["sendto,10.0.0.22:5353"]));
    assert_success("python outside", &outside);
    assert_eq!(
        stdout_of(&outside),
        "sendto,10.0.0.22:5353 | echo 5353 ping | 10.0.0.22 5353\n"
    );

    let (status, stderr) = bypass.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    // The IPv4-mapped sendto goes through sendmsg4, so the IPv4 rule counts four sends.
    assert!(
        stderr.contains("4 hits: udp/10.0.0.22:53=10.0.0.22:5353"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 hits: udp/[fd00::22]:53=[fd00::22]:5353"),
        "{stderr}"
    );
    assert_eq!(echo4.received(), 6);
    assert_eq!(echo6.received(), 2);
}

/// Python client: one `AF_INET6` UDP socket sends to every `[HOST]:PORT` argument, then
/// prints `REPLY | SOURCE-HOST SOURCE-PORT` for each reply, sorted.
const ONE_SOCKET_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(5)
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s.sendto(b"ping", (host.strip("[]"), int(port)))
lines = []
for _ in sys.argv[1:]:
    reply, source = s.recvfrom(100)
    lines.append(f"{reply.decode()} | {source[0]} {source[1]}")
print("\n".join(sorted(lines)), flush=True)
"#;

#[test]
fn one_socket_keeps_several_origins() {
    if !require_root("one_socket_keeps_several_origins") {
        return;
    }
    let netns = Netns::new();
    let _echo53 = UdpEcho::start(&netns, "10.0.0.22:5353");
    let _echo54 = UdpEcho::start(&netns, "10.0.0.22:5354");
    let _echo6 = UdpEcho::start(&netns, "[fd00::22]:5353");
    let cgroup = TestCgroup::new();
    let rules = [
        "--rule",
        "udp/10.0.0.22:53=:5353",
        "--rule",
        "udp/10.0.0.22:54=:5354",
        "--rule",
        "udp/[fd00::22]:53=:5353",
    ];
    let bypass = Attached::start(cgroup.path(), &rules);

    // IPv4-mapped sends go through sendmsg4 and native IPv6 ones through sendmsg6; all three
    // mappings live in the storage of the one socket.
    let sends = [
        "[::ffff:10.0.0.22]:53",
        "[::ffff:10.0.0.22]:54",
        "[fd00::22]:53",
    ];
    let inside = cgroup.run(&python_line(&netns, ONE_SOCKET_CLIENT, &sends));
    assert_success("python in the cgroup", &inside);
    let expected = "\
echo 5353 ping | ::ffff:10.0.0.22 53
echo 5353 ping | fd00::22 53
echo 5354 ping | ::ffff:10.0.0.22 54
";
    assert_eq!(stdout_of(&inside), expected, "bypass:\n{}", bypass.stderr());
}
