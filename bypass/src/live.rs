//! Changing the rules of a live attachment without a gap: `bypass rules add|del` on a pinned
//! one, and SIGHUP re-reading `--config` for a foreground one.
//!
//! Each map update replaces or removes one key atomically. New and changed rules go in
//! first, removed ones go last, and the maps are never cleared, so every connect() sees
//! either the old or the new rule of its destination.

use std::{fs, io, os::fd::AsRawFd as _};

use anyhow::Context as _;

use crate::{
    exit::UsageError,
    pin,
    rule::{Rule, RuleSet},
    rulemap::{self, RuleMaps},
};

/// What a reload changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

/// Parses a rule argument; `[tcp/|udp/]FROM` alone is accepted for deletion.
fn parse_rule(text: &str, allow_source_only: bool) -> Result<Rule, UsageError> {
    let parsed = if allow_source_only && !text.contains('=') {
        // Any target does: deletion matches on protocol and source only.
        format!("{text}=:1")
            .parse::<Rule>()
            .or_else(|_| format!("{text}=:2").parse())
    } else {
        text.parse()
    };
    parsed.map_err(|err| {
        UsageError(anyhow::Error::from(err).context(format!("invalid rule `{text}`")))
    })
}

/// The maps of a pinned attachment, with an exclusive lock on its pin directory, so that two
/// `bypass rules` commands at once cannot pick the same free rule id.
struct Locked {
    maps: RuleMaps,
    _lock: fs::File,
}

fn open_pinned(name: &str) -> anyhow::Result<Locked> {
    pin::require_privileges("rules")?;
    pin::validate_name(name).map_err(|err| UsageError(err.into()))?;
    let dir = pin::dir(name);
    let lock = match fs::File::open(&dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(UsageError(pin::PinError::NotFound(name.to_owned()).into()).into());
        }
        result => result.with_context(|| format!("cannot open {}", dir.display()))?,
    };
    // SAFETY: `flock` on a descriptor this function owns; the lock ends when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let err = io::Error::last_os_error();
        return Err(anyhow::Error::new(err).context(format!("cannot lock {}", dir.display())));
    }
    Ok(Locked {
        maps: RuleMaps::from_pins(&dir)?,
        _lock: lock,
    })
}

/// `bypass rules add NAME RULE`.
pub fn add(name: &str, text: &str) -> anyhow::Result<()> {
    let rule = parse_rule(text, false)?;
    let mut locked = open_pinned(name)?;
    let rule_id = locked.maps.add(&rule)?;
    log::info!("added rule {rule_id}: {rule} to `{name}`");
    Ok(())
}

/// `bypass rules del NAME RULE`.
pub fn del(name: &str, text: &str) -> anyhow::Result<()> {
    let rule = parse_rule(text, true)?;
    let Locked { mut maps, _lock } = open_pinned(name)?;
    if text.contains('=') {
        let current = maps.rules()?;
        if let Some((existing, _)) = current
            .iter()
            .find(|(known, _)| rulemap::same_source(known, &rule))
        {
            if existing.to != rule.to {
                return Err(UsageError(anyhow::anyhow!(
                    "`{name}` redirects {}/{} to {}, not to {}; give the rule as `bypass status {name}` shows it, or only its source",
                    rule.protocol, rule.from, existing.to, rule.to
                ))
                .into());
            }
        }
    }
    let removed = maps.remove(&rule)?;
    log::info!("deleted rule {removed} from `{name}`");
    Ok(())
}

/// Brings the maps to `wanted`: inserts new and changed rules (a changed rule keeps its id),
/// then removes the rules that are no longer wanted.
pub fn apply(maps: &mut RuleMaps, wanted: &RuleSet) -> anyhow::Result<Diff> {
    let current = maps.rules()?;
    let mut diff = Diff::default();
    for (rule, _) in wanted.iter() {
        match current
            .iter()
            .find(|(known, _)| rulemap::same_source(known, rule))
        {
            Some((known, _)) if known.to == rule.to => {}
            Some((_, rule_id)) => {
                maps.insert(rule, *rule_id)?;
                log::info!("rule {rule_id} changed: {rule}");
                diff.changed += 1;
            }
            None => {
                let rule_id = maps.add(rule)?;
                log::info!("rule {rule_id} added: {rule}");
                diff.added += 1;
            }
        }
    }
    for (known, rule_id) in &current {
        if !wanted
            .iter()
            .any(|(rule, _)| rulemap::same_source(known, rule))
        {
            maps.remove(known)?;
            log::info!("rule {rule_id} removed: {known}");
            diff.removed += 1;
        }
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_takes_source_only() {
        let rule = parse_rule("udp/10.0.0.53:53", true).expect("source only");
        assert_eq!(rule.from, "10.0.0.53:53".parse().unwrap());
        assert!(parse_rule("10.0.0.53:53", false).is_err());
        let err = parse_rule("10.0.0.300:53=:1", false).unwrap_err();
        assert!(format!("{:#}", err.0).starts_with("invalid rule `10.0.0.300:53=:1`"));
    }
}
