//! `bypass attach`: the redirect on an existing cgroup until SIGINT or SIGTERM.

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cgroup,
    cli::AttachArgs,
    exit::UsageError,
    hitlog::{self, HitLog},
    setup,
};

/// Attaches, logs hits until SIGINT or SIGTERM, then detaches.
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

    let mut redirector = setup::load(&args.rules, &rules)?;
    redirector.attach(&target)?;
    let hit_log = HitLog::start(&mut redirector);
    log::info!("redirecting; stop with SIGINT (Ctrl-C) or SIGTERM");

    let received = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    log::info!("{received} received; detaching");

    let totals = match hit_log {
        Some(hit_log) => Some(hit_log.stop().await),
        None => None,
    };
    hitlog::log_summary(&rules, &redirector, totals);
    drop(redirector);
    log::info!("detached from {}", target.display());
    Ok(())
}
