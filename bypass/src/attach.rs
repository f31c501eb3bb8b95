//! `bypass attach`: the redirect on an existing cgroup until SIGINT or SIGTERM.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time,
};

use crate::{
    cgroup::{self, CgroupError},
    cli::AttachArgs,
    exit::UsageError,
    hitlog::{self, HitLog},
    setup,
};

/// How often `attach` checks that its cgroup still exists.
const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Attaches, logs hits until SIGINT or SIGTERM, then detaches. Fails with
/// [`CgroupError::Removed`] after detaching when the cgroup was removed before that.
pub async fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let rules = setup::rules_from_args(&args.rules)?;
    let mount = cgroup::find_mount()?;
    let target = cgroup::check_dir(&args.cgroup, &mount, args.all_processes)
        .map_err(|err| UsageError(err.into()))?;
    if args.all_processes {
        log::warn!("attaching to the root cgroup: every process on the host is redirected");
    }

    // Install the handlers first, so a signal that arrives during start-up detaches cleanly.
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install a signal handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install a signal handler")?;

    let cgroup_id = cgroup::cgroup_id(&target)
        .with_context(|| format!("cannot read the cgroup id of {}", target.display()))?;
    let mut redirector = setup::load(&args.rules, &rules)?;
    redirector.attach(&target)?;
    let hit_log = HitLog::start(&mut redirector);
    log::info!("redirecting; stop with SIGINT (Ctrl-C) or SIGTERM");

    let received = tokio::select! {
        _ = interrupt.recv() => Some("SIGINT"),
        _ = terminate.recv() => Some("SIGTERM"),
        () = removal(&target, cgroup_id) => None,
    };
    match received {
        Some(signal) => log::info!("{signal} received; detaching"),
        None => log::warn!("cgroup {} was removed; detaching", target.display()),
    }

    let totals = match hit_log {
        Some(hit_log) => Some(hit_log.stop().await),
        None => None,
    };
    hitlog::log_summary(&rules, &redirector, totals);
    drop(redirector);
    log::info!("detached from {}", target.display());
    match received {
        Some(_) => Ok(()),
        None => Err(CgroupError::Removed {
            path: target.display().to_string(),
        }
        .into()),
    }
}

/// Returns once the cgroup `id` at `path` is gone. The kernel ends the attachment with the
/// cgroup, and nothing can join a removed cgroup, so a loader that kept running would only
/// look like a redirect.
async fn removal(path: &Path, id: u64) {
    let mut interval = time::interval(REMOVAL_CHECK_INTERVAL);
    loop {
        interval.tick().await;
        if cgroup::is_gone(path, id) {
            return;
        }
    }
}
