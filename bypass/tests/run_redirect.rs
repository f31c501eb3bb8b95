//! `bypass run`: a real client in the new cgroup reaches the redirect target.

mod support;

use support::{Netns, TcpServer, bypass, require_root};

#[test]
fn curl_reaches_redirect_target() {
    if !require_root("curl_reaches_redirect_target") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");

    let curl = netns.command_line(&["curl", "-sS", "--max-time", "5", "telnet://10.0.0.22:80"]);
    let mut args = vec!["run", "--"];
    args.extend(curl.iter().map(String::as_str));
    let output = bypass(&args);

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bypass run failed: {stderr}");
    assert_eq!(stdout.trim(), "served-by 3000", "stderr: {stderr}");
    assert_eq!(target.accepted(), 1);
    assert!(
        stderr.contains("redirect connect4 tcp 10.0.0.22:80 -> 10.0.0.22:3000 rule 0"),
        "no hit log line in: {stderr}"
    );
}
