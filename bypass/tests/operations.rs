//! Operating commands against the real kernel: pinned attachments, detach, status, live
//! rules, gc, `--pid` and `--user`.

mod support;

use std::{fs, os::unix::fs::PermissionsExt as _, time::Duration};

use support::{
    Attached, Netns, PROGRAM_COUNT, PinGuard, TcpServer, TestCgroup, attached_programs, bypass,
    fetch_in, require_root, status_json, wait_timeout,
};

#[test]
fn pin_survives_the_loader_and_detach_removes_it() {
    if !require_root("pin_survives_the_loader_and_detach_removes_it") {
        return;
    }
    let netns = Netns::new();
    let target = TcpServer::start(&netns, "10.0.0.22:3000");
    let cgroup = TestCgroup::new();
    let cgroup_arg = cgroup.path().to_str().expect("utf-8 path");
    let pinned = PinGuard::attach(&["--cgroup", cgroup_arg, "-r", "10.0.0.22:80=:3000"]);

    // The loader has exited; the redirect still works.
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");
    assert_eq!(target.accepted(), 2);
    assert_eq!(
        attached_programs(cgroup.path()).len(),
        PROGRAM_COUNT,
        "every program stays attached"
    );
    let mode = fs::metadata(pinned.dir())
        .expect("pin directory")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "pin directory mode {mode:o}");

    let status = status_json(Some(pinned.name()));
    let attachment = &status[0];
    assert_eq!(attachment["kind"], "pinned");
    assert_eq!(attachment["cgroup"], cgroup_arg);
    assert_eq!(attachment["cgroup_exists"], true);
    assert_eq!(
        attachment["rules"][0]["rule"],
        "tcp/10.0.0.22:80=10.0.0.22:3000"
    );
    assert_eq!(attachment["rules"][0]["hits"], 2);

    let output = bypass(&["detach", pinned.name()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        attached_programs(cgroup.path()).is_empty(),
        "programs left on the cgroup"
    );
    assert!(!pinned.dir().exists(), "pin directory left behind");
    assert_ne!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");

    let again = bypass(&["detach", pinned.name()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no pinned attachment named"));
}

#[test]
fn rules_added_live_apply_to_the_next_connect() {
    if !require_root("rules_added_live_apply_to_the_next_connect") {
        return;
    }
    let netns = Netns::new();
    let _first = TcpServer::start(&netns, "10.0.0.22:3000");
    let _second = TcpServer::start(&netns, "10.0.0.22:3001");
    let cgroup = TestCgroup::new();
    let cgroup_arg = cgroup.path().to_str().expect("utf-8 path");
    let pinned = PinGuard::attach(&["--cgroup", cgroup_arg, "-r", "10.0.0.22:80=:3000"]);
    let name = pinned.name();

    assert_eq!(
        fetch_in(&cgroup, &netns, "10.0.0.22:81"),
        "",
        "nothing listens on :81"
    );
    let added = bypass(&["rules", "add", name, "10.0.0.22:81=:3001"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:81"), "served-by 3001");
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");

    let status = status_json(Some(name));
    let rules = status[0]["rules"].as_array().expect("rules array");
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1]["id"], 1);
    assert_eq!(rules[1]["hits"], 1);

    let deleted = bypass(&["rules", "del", name, "10.0.0.22:81"]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:81"), "");
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");

    let duplicate = bypass(&["rules", "add", name, "10.0.0.22:80=:3001"]);
    assert_eq!(duplicate.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already has a rule"));
    let missing = bypass(&["rules", "del", name, "10.0.0.22:99"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no rule for tcp/10.0.0.22:99"));
}

#[test]
fn sighup_rereads_the_config_in_place() {
    if !require_root("sighup_rereads_the_config_in_place") {
        return;
    }
    let netns = Netns::new();
    let _first = TcpServer::start(&netns, "10.0.0.22:3000");
    let _second = TcpServer::start(&netns, "10.0.0.22:3001");
    let cgroup = TestCgroup::new();
    let config = std::env::temp_dir().join(support::unique_name("bypass-config"));
    let write = |text: &str| fs::write(&config, text).expect("write config");
    write("[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n");
    let attached = Attached::start(cgroup.path(), &["-c", config.to_str().expect("utf-8")]);
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3000");

    write(
        "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3001\"\n[[rule]]\nfrom = \"10.0.0.22:81\"\nto = \":3000\"\n",
    );
    // SAFETY: signals our own child, which has not been reaped.
    unsafe { libc::kill(attached.pid(), libc::SIGHUP) };
    assert!(
        attached.wait_for_log("1 added, 1 changed, 0 removed"),
        "{}",
        attached.stderr()
    );
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "served-by 3001");
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:81"), "served-by 3000");

    write("[[rule]]\nfrom = \"10.0.0.22:81\"\nto = \":3000\"\n");
    // SAFETY: as above.
    unsafe { libc::kill(attached.pid(), libc::SIGHUP) };
    assert!(
        attached.wait_for_log("0 added, 0 changed, 1 removed"),
        "{}",
        attached.stderr()
    );
    assert_eq!(fetch_in(&cgroup, &netns, "10.0.0.22:80"), "");

    let running = status_json(None);
    let mine = running
        .as_array()
        .expect("array")
        .iter()
        .find(|entry| entry["pid"] == attached.pid())
        .unwrap_or_else(|| panic!("running attachment missing from status: {running}"));
    assert_eq!(mine["kind"], "running");
    assert_eq!(mine["rules"].as_array().map(Vec::len), Some(1));
    let (status, stderr) = attached.stop_with(libc::SIGTERM);
    let _ = fs::remove_file(&config);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("1 hit: tcp/10.0.0.22:81=10.0.0.22:3000"),
        "{stderr}"
    );
}

#[test]
fn gc_removes_pins_whose_cgroup_is_gone() {
    if !require_root("gc_removes_pins_whose_cgroup_is_gone") {
        return;
    }
    let cgroup = TestCgroup::new();
    let kept = TestCgroup::new();
    let gone = PinGuard::attach(&["--no-verify", "--cgroup", cgroup.path().to_str().unwrap()]);
    let stays = PinGuard::attach(&["--no-verify", "--cgroup", kept.path().to_str().unwrap()]);
    drop(cgroup);

    let status = status_json(Some(gone.name()));
    assert_eq!(status[0]["cgroup_exists"], false);
    let output = bypass(&["gc"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!gone.dir().exists(), "gc kept a pin of a removed cgroup");
    assert!(stays.dir().exists(), "gc removed a pin of a live cgroup");
}

#[test]
fn pid_attaches_to_the_cgroup_of_that_process() {
    if !require_root("pid_attaches_to_the_cgroup_of_that_process") {
        return;
    }
    let cgroup = TestCgroup::new();
    let mut sleeper = cgroup.spawn(&["sleep", "30"]);
    let pid = sleeper.id().to_string();

    let pinned = PinGuard::attach(&["--no-verify", "--pid", &pid]);
    assert_eq!(attached_programs(cgroup.path()).len(), PROGRAM_COUNT);
    let status = status_json(Some(pinned.name()));
    assert_eq!(status[0]["cgroup"], cgroup.path().to_str().unwrap());

    let both = bypass(&[
        "attach",
        "--pid",
        &pid,
        "--cgroup",
        cgroup.path().to_str().unwrap(),
    ]);
    assert_eq!(
        both.status.code(),
        Some(2),
        "--pid with --cgroup must be a usage error"
    );
    let missing = bypass(&["attach", "--pid", "4000000"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no process with pid 4000000"));

    drop(pinned);
    assert!(attached_programs(cgroup.path()).is_empty());
    // SAFETY: our own child, not reaped yet.
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGKILL) };
    wait_timeout(&mut sleeper, Duration::from_secs(5));
}

#[test]
fn pid_of_a_process_in_the_root_cgroup_needs_all_processes() {
    if !require_root("pid_of_a_process_in_the_root_cgroup_needs_all_processes") {
        return;
    }
    // PID 2 (kthreadd) lives in the root cgroup; nothing is attached, the check comes first.
    let output = bypass(&["attach", "--pid", "2", "--no-verify"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pass --all-processes"));
}

#[test]
fn run_user_drops_to_that_user() {
    if !require_root("run_user_drops_to_that_user") {
        return;
    }
    let output = bypass(&["run", "--no-verify", "--user", "nobody", "--", "id"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("uid=65534(nobody) gid=65534("),
        "id printed: {stdout}"
    );
    assert!(
        !stdout.contains("(root)"),
        "a root group survived: {stdout}"
    );

    let by_uid = bypass(&["run", "--no-verify", "--user", "65534", "--", "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&by_uid.stdout).trim(), "65534");

    let unknown = bypass(&["run", "--user", "bypass-no-such-user", "--", "id"]);
    assert_eq!(unknown.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("unknown user `bypass-no-such-user`")
    );
}

#[test]
fn concurrent_rules_add_get_distinct_ids() {
    if !require_root("concurrent_rules_add_get_distinct_ids") {
        return;
    }
    let cgroup = TestCgroup::new();
    let pinned = PinGuard::attach(&["--no-verify", "--cgroup", cgroup.path().to_str().unwrap()]);
    let name = pinned.name().to_owned();
    let adders: Vec<_> = (0..16)
        .map(|i| {
            let (name, rule) = (name.clone(), format!("10.0.0.22:{}=:3000", 1000 + i));
            std::thread::spawn(move || bypass(&["rules", "add", &name, &rule]))
        })
        .collect();
    for adder in adders {
        let output = adder.join().expect("adder thread");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let status = status_json(Some(&name));
    let mut ids: Vec<u64> = status[0]["rules"]
        .as_array()
        .expect("rules array")
        .iter()
        .map(|rule| rule["id"].as_u64().expect("numeric id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..17).collect::<Vec<u64>>(),
        "rule ids must be distinct and dense"
    );
}
