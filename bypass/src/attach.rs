//! `bypass attach`: the redirect on an existing cgroup until SIGINT or SIGTERM, or pinned
//! with `--pin NAME` until `bypass detach NAME`.

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
    live,
    loader::Redirector,
    pin, record,
    rule::RuleSet,
    rulemap::RuleMaps,
    setup, target, verify,
};

/// How often `attach` checks that its cgroup still exists.
const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Attaches, then either pins and returns, or logs hits until SIGINT or SIGTERM and detaches.
/// A foreground attachment fails with [`CgroupError::Removed`] after detaching when the
/// cgroup was removed before that.
pub async fn attach(mut args: AttachArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.pin {
        pin::validate_name(name).map_err(|err| UsageError(err.into()))?;
        // No process reads the hit log of a pinned attachment, but the counters still count.
        args.rules.log_rate = 0;
    }
    let rules = setup::rules_from_args(&args.rules)?;
    let mount = cgroup::find_mount()?;
    let target = target::resolve(args.cgroup.as_deref(), args.pid, &mount, args.all_processes)
        .map_err(|err| UsageError(err.into()))?;
    if args.all_processes {
        log::warn!("attaching to the root cgroup: every process on the host is redirected");
    }
    if let Some(pid) = args.pid {
        log::info!("process {pid} is in cgroup {}", target.display());
    }

    if let Some(name) = &args.pin {
        // `bypass rules add` may add UDP rules to a pin later.
        let mut redirector = setup::load(&args.rules, &rules, true)?;
        redirector.attach(&target)?;
        if !args.no_verify {
            verify::verify(&redirector, &target)?;
        }
        let dir = pin::pin(&mut redirector, name, &target)?;
        log::info!(
            "pinned as `{name}` in {}; it stays until `bypass detach {name}`",
            dir.display()
        );
        return Ok(());
    }
    foreground(args, rules, &target).await
}

async fn foreground(args: AttachArgs, rules: RuleSet, target: &Path) -> anyhow::Result<()> {
    // Install the handlers first, so a signal that arrives during start-up detaches cleanly.
    let handler = |kind| signal(kind).context("cannot install a signal handler");
    let mut interrupt = handler(SignalKind::interrupt())?;
    let mut terminate = handler(SignalKind::terminate())?;
    let mut hangup = handler(SignalKind::hangup())?;

    let cgroup_id = cgroup::cgroup_id(target)
        .with_context(|| format!("cannot read the cgroup id of {}", target.display()))?;
    // A SIGHUP reload of --config may add UDP rules.
    let rules_may_change = args.rules.config.is_some();
    let mut redirector = setup::load(&args.rules, &rules, rules_may_change)?;
    redirector.attach(target)?;
    if !args.no_verify {
        verify::verify(&redirector, target)?;
    }
    let _record = record::Running::write(target, &redirector);
    let hit_log = HitLog::start(&mut redirector);
    log::info!("redirecting; stop with SIGINT (Ctrl-C) or SIGTERM");

    let mut reloaded = false;
    let removed = removal(target, cgroup_id);
    tokio::pin!(removed);
    let received = loop {
        tokio::select! {
            _ = interrupt.recv() => break Some("SIGINT"),
            _ = terminate.recv() => break Some("SIGTERM"),
            () = &mut removed => break None,
            _ = hangup.recv() => reloaded |= reload(&args, &redirector),
        }
    };
    match received {
        Some(signal) => log::info!("{signal} received; detaching"),
        None => log::warn!("cgroup {} was removed; detaching", target.display()),
    }

    let totals = match hit_log {
        Some(hit_log) => Some(hit_log.stop().await),
        None => None,
    };
    if reloaded {
        log_summary_from_maps(&redirector);
    } else {
        hitlog::log_summary(&rules, &redirector, totals);
    }
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

/// Logs the hits of each rule as the maps hold them: after a reload, rule ids no longer
/// follow the order of the start-up rule set.
fn log_summary_from_maps(redirector: &Redirector) {
    let result = RuleMaps::from_ebpf(redirector.ebpf()).and_then(|maps| {
        for (rule, rule_id) in maps.rules()? {
            log::info!(
                "{}",
                hitlog::format_hits(&rule.to_string(), maps.hits(rule_id)?)
            );
        }
        Ok(())
    });
    if let Err(err) = result {
        log::warn!("cannot read hit counters: {err}");
    }
}

/// SIGHUP: re-reads `--rule` and `--config` and applies the difference in place; returns
/// whether the rules changed. A bad config leaves the running rules as they are.
fn reload(args: &AttachArgs, redirector: &Redirector) -> bool {
    if args.rules.config.is_none() {
        log::warn!("SIGHUP ignored: there is no --config file to re-read");
        return false;
    }
    let wanted = match setup::rules_from_args(&args.rules) {
        Ok(wanted) => wanted,
        Err(err) => {
            log::error!("SIGHUP: rules not changed: {:#}", err.0);
            return false;
        }
    };
    let result = RuleMaps::from_ebpf(redirector.ebpf())
        .map_err(anyhow::Error::from)
        .and_then(|mut maps| live::apply(&mut maps, &wanted));
    match result {
        Ok(diff) => log::info!(
            "reloaded rules: {} added, {} changed, {} removed",
            diff.added,
            diff.changed,
            diff.removed
        ),
        Err(err) => log::error!(
            "SIGHUP: cannot apply every rule change: {err:#}; `bypass status` shows the rules \
             in effect"
        ),
    }
    true
}
